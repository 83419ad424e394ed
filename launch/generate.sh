#!/usr/bin/env bash
# Submit an inference job to a running Ray cluster (one started with `ray up launch/cluster.yaml` or
# launch/local_cluster.yaml, or `.venv/bin/ray start --head` on this machine):
#
#   ray job submit --working-dir . -- JOB_PYTHON -m mcdist.cli generate --ray [your arguments]
#
#   launch/generate.sh --checkpoint /shared/runs/big/checkpoint --prompt-file /shared/prompts.txt \
#       --max-new-tokens 256 --sp 4 --device cuda --out /shared/runs/big/generated.jsonl
#
# Environment: RAY_ADDRESS, RAY, JOB_PYTHON and RAY_AUTH_MODE as for launch/submit.sh (which this runs).
#
# Every worker loads the checkpoint itself, so it must lie on storage every node mounts at the same path (the
# same goes for --prompt-file, read by the driver, and --out, written by it: the driver runs on the head).
# The JSON lines also stream back with the job's output. docs/inference.md has the options.
set -euo pipefail
MCDIST_COMMAND=generate exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" "$@"
