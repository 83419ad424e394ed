#!/usr/bin/env bash
# Submit an inference job to a running Ray cluster (one started with `ray up launch/cluster.yaml`):
#
#   ray job submit --working-dir . -- python -m mcdist.cli generate --ray [your arguments]
#
#   launch/generate.sh --checkpoint /shared/runs/big/checkpoint --prompt-file /shared/prompts.txt \
#       --max-new-tokens 256 --sp 4 --device cuda --out /shared/runs/big/generated.jsonl
#
# Environment: RAY_ADDRESS and RAY as for launch/submit.sh (which this runs).
#
# Every worker loads the checkpoint itself, so it must lie on storage every node mounts at the same path (the
# same goes for --prompt-file, read by the driver, and --out, written by it: the driver runs on the head).
# The JSON lines also stream back with the job's output. docs/inference.md has the options.
set -euo pipefail
MCDIST_COMMAND=generate exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" "$@"
