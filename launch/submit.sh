#!/usr/bin/env bash
# Submit a training job to a running Ray cluster (one started with `ray up launch/cluster.yaml`):
#
#   ray job submit --working-dir . -- python -m mcdist.cli train --ray [your arguments]
#
#   launch/submit.sh --config examples/main_job.json --workers 8 --sp 4 --set train.device=cuda
#
# Environment:
#   RAY_ADDRESS  the cluster's job server, the head's dashboard port (default http://127.0.0.1:8265: run
#                `ray dashboard launch/cluster.yaml` in another terminal first to forward it from the head)
#   RAY          the ray command (default: ray from .venv if there is one, else from PATH)
#   MCDIST_COMMAND  the mcdist command to run with --ray (default train; launch/generate.sh sets generate,
#                launch/eval.sh eval)
#
# The working directory (this checkout, minus .gitignore'd files such as .venv and runs/) is uploaded and is
# the current directory of the driver and of every worker; mcdist itself must be installed on the cluster
# (cluster.yaml's setup_commands do it). On the head, the driver finds the cluster through RAY_ADDRESS, which
# Ray sets for submitted jobs. Give train.out_dir and ray.storage_path on storage that every node shares (an
# NFS mount or s3://...) so that checkpoints survive a lost node. `ray job submit` streams the job's output
# and returns its exit status; add --no-wait to return at once and follow it with `ray job logs -f ID`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${RAY:-}" ]; then
    if [ -x .venv/bin/ray ]; then RAY=.venv/bin/ray; else RAY=ray; fi
fi
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}

exec "$RAY" job submit --address "$RAY_ADDRESS" --working-dir . \
    --runtime-env-json '{"excludes": [".git", ".venv", "runs", "benchmarks/results"]}' \
    -- python -m mcdist.cli "${MCDIST_COMMAND:-train}" --ray "$@"
