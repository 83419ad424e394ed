#!/usr/bin/env bash
# Submit an evaluation job to a running Ray cluster (one started with `ray up launch/cluster.yaml` or
# launch/local_cluster.yaml, or `.venv/bin/ray start --head` on this machine):
#
#   ray job submit --working-dir . -- JOB_PYTHON -m mcdist.cli eval --ray [your arguments]
#
#   launch/eval.sh --checkpoint /shared/runs/big/checkpoint --seq-lens 131072,524288,1048576 --buckets 8 \
#       --sp 8 --device cuda --out /shared/runs/big/eval.jsonl
#
# Environment: RAY_ADDRESS, RAY, JOB_PYTHON and RAY_AUTH_MODE as for launch/submit.sh (which this runs).
#
# Every worker loads the checkpoint and reads the run's data files itself, so they must lie on storage every
# node mounts at the same path (run_config.json beside the checkpoint names the data; --out is written by the
# driver, on the head). The JSON lines also stream back with the job's output. docs/evaluation.md has the options.
set -euo pipefail
MCDIST_COMMAND=eval exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" "$@"
