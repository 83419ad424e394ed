#!/usr/bin/env bash
# Submit an inference job to a running Ray cluster (one started with `ray up launch/cluster.yaml`):
#
#   ray job submit --working-dir . -- python -m mcdist.cli generate --ray [your arguments]
#
#   launch/generate.sh --checkpoint /shared/runs/big/checkpoint --prompt-file /shared/prompts.txt \
#       --max-new-tokens 256 --sp 4 --device cuda --out /shared/runs/big/generated.jsonl
#
# Environment: RAY_ADDRESS and RAY as for launch/submit.sh.
#
# Every worker loads the checkpoint itself, so it must lie on storage every node mounts at the same path (the
# same goes for --prompt-file, read by the driver, and --out, written by it: the driver runs on the head).
# The JSON lines also stream back with the job's output. docs/inference.md has the options.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${RAY:-}" ]; then
    if [ -x .venv/bin/ray ]; then RAY=.venv/bin/ray; else RAY=ray; fi
fi
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}

exec "$RAY" job submit --address "$RAY_ADDRESS" --working-dir . \
    --runtime-env-json '{"excludes": [".git", ".venv", "runs", "benchmarks/results"]}' \
    -- python -m mcdist.cli generate --ray "$@"
