#!/usr/bin/env bash
# The trainer under torchrun, without Ray: NPROC processes on each of NNODES machines, one rank each.
#
#   launch/torchrun.sh [extra `mcdist train` arguments, e.g. --set train.steps=20]
#
# Environment:
#   PYTHON     the interpreter (default .venv/bin/python)
#   CONFIG     the run config (default examples/ray_tiny.json)
#   NPROC      processes per machine (default 2; one per GPU on a GPU machine)
#   SP         sequence-parallel ranks per sequence (default NPROC · NNODES); dp = NPROC · NNODES / SP
#   NNODES     machines (default 1: `torchrun --standalone`, nothing to set up)
#   NODE_RANK  this machine's index, 0 .. NNODES-1 (several machines only)
#   MASTER     host:port of machine 0, which every machine can reach (several machines only)
#
# Run the same command on every machine. Each process runs `python -m mcdist.cli train`, which sees torchrun's
# environment (TORCHELASTIC_RUN_ID, RANK, WORLD_SIZE, MASTER_ADDR/PORT), joins the process group (gloo on CPUs,
# NCCL on GPUs) and runs its rank; rank 0 writes train.out_dir and prints the final metrics as one JSON line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-examples/ray_tiny.json}
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
WORLD=$((NPROC * NNODES))
SP=${SP:-$WORLD}
if [ $((WORLD % SP)) -ne 0 ]; then
    echo "torchrun.sh: SP = $SP does not divide NPROC · NNODES = $WORLD; expected a divisor" >&2
    exit 2
fi
DP=$((WORLD / SP))

if [ "$NNODES" -eq 1 ]; then
    RENDEZVOUS=(--standalone)
else
    : "${MASTER:?set MASTER=host:port of machine 0 (reachable from every machine)}"
    : "${NODE_RANK:?set NODE_RANK to the index of this machine (0 .. NNODES-1)}"
    RENDEZVOUS=(--rdzv-backend c10d --rdzv-endpoint "$MASTER" --rdzv-id "mcdist-${RDZV_ID:-1}" --node-rank "$NODE_RANK")
fi

echo "torchrun.sh: $NNODES machine(s) × $NPROC process(es) = dp $DP × sp $SP, config $CONFIG"
exec "$PYTHON" -m torch.distributed.run "${RENDEZVOUS[@]}" --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    -m mcdist.cli train --config "$CONFIG" --set "parallel.dp=$DP" --set "parallel.sp=$SP" "$@"
