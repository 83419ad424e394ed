#!/usr/bin/env bash
# Submit a batch inference job to a running Ray cluster (one started with `ray up launch/cluster.yaml` or
# launch/local_cluster.yaml):
#
#   ray job submit --working-dir . -- JOB_PYTHON -m mcdist.cli infer --ray [your arguments]
#
#   launch/infer.sh --checkpoint /shared/runs/big/checkpoint --prompts /shared/prompts.jsonl \
#       --out /shared/runs/big/infer.jsonl --replicas 4 --sp 2 --max-new-tokens 256 --device cuda
#
# Environment: RAY_ADDRESS, RAY, JOB_PYTHON and RAY_AUTH_MODE as for launch/submit.sh (which this runs).
#
# The driver runs on the head: it reads --prompts and appends each result to --out there as it is done (a rerun
# with the same --out finishes what is missing); every rank loads the checkpoint itself, so it must lie on
# storage every node mounts at the same path. docs/inference.md has the options and the file formats.
set -euo pipefail
MCDIST_COMMAND=infer exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" "$@"
