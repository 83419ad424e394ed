#!/usr/bin/env bash
# Submit a training job to a running Ray cluster: one started with `ray up launch/cluster.yaml` (or
# launch/local_cluster.yaml), or a head started by hand on this machine with `.venv/bin/ray start --head`:
#
#   ray job submit --working-dir . -- JOB_PYTHON -m mcdist.cli train --ray [your arguments]
#
#   launch/submit.sh --config examples/main_job.json --workers 8 --sp 4 --set train.device=cuda
#
# Environment:
#   RAY_ADDRESS  the cluster's job server, the head's dashboard port (default http://127.0.0.1:8265: on this
#                machine, or `ray dashboard launch/cluster.yaml` in another terminal forwards it from the head)
#   RAY          the ray command (default: ray from .venv if there is one, else from PATH); it needs the job CLI
#                of ray[default], which the `ray` extra of pyproject.toml installs (`make setup`)
#   JOB_PYTHON   the Python that runs the job on the head; it must import torch, ray and mcdist's installed
#                parts. Default: for a head on this machine (RAY_ADDRESS on 127.0.0.1 or localhost) the Python
#                beside $RAY, i.e. this checkout's venv, from which such a head is started; for any other head
#                `python` on the head's PATH (cluster.yaml and local_cluster.yaml start Ray with their venv
#                first on it). Set it for a head whose Ray runs from another Python.
#   MCDIST_COMMAND  the mcdist command to run with --ray (default train; launch/generate.sh sets generate,
#                launch/eval.sh eval, launch/infer.sh infer)
#   RAY_AUTH_MODE  left as you set it; unset, it becomes `token` when a Ray auth token is here (RAY_AUTH_TOKEN,
#                RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), as for mcdist's own driver: a head started where a
#                token exists (`ray start --head` after any local Ray run, or our cluster files) requires it
#
# The working directory (this checkout, minus .git, .venv, runs/ and .gitignore'd files) is uploaded and is the
# current directory of the driver and of every worker, and Ray puts it first on their PYTHONPATH, so the job
# runs this checkout's mcdist/ package with the head's installed torch, Ray and compiled parts (docs/launch.md,
# "How a submitted job finds mcdist"). On the head, the driver finds the cluster through RAY_ADDRESS, which Ray
# sets for submitted jobs. Give train.out_dir and ray.storage_path on storage that every node shares (an NFS
# mount or s3://...) so that checkpoints survive a lost node. `ray job submit` streams the job's output and
# returns its exit status; add --no-wait (as RAY_SUBMIT_ARGS=--no-wait) to return at once and follow it with
# `ray job logs -f ID`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${RAY:-}" ]; then
    if [ -x .venv/bin/ray ]; then RAY=.venv/bin/ray; else RAY=ray; fi
fi
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}

if [ -z "${JOB_PYTHON:-}" ]; then
    host=${RAY_ADDRESS#*://}
    host=${host%%[:/]*}
    ray_path=$(command -v "$RAY" || true)
    if [[ "$host" =~ ^(127\.[0-9.]+|localhost)$ ]] && [ -n "$ray_path" ] && [ -x "$(dirname "$ray_path")/python" ]; then
        JOB_PYTHON="$(cd "$(dirname "$ray_path")" && pwd)/python"
    else
        JOB_PYTHON=python
    fi
fi

if [ -z "${RAY_AUTH_MODE:-}" ]; then
    if [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
        export RAY_AUTH_MODE=token
    fi
fi

echo "submit.sh: $RAY_ADDRESS, the job runs $JOB_PYTHON -m mcdist.cli ${MCDIST_COMMAND:-train} --ray" \
     "(auth ${RAY_AUTH_MODE:-off})" >&2
# shellcheck disable=SC2086  # RAY_SUBMIT_ARGS is a list of options
exec "$RAY" job submit --address "$RAY_ADDRESS" --working-dir . ${RAY_SUBMIT_ARGS:-} \
    --runtime-env-json '{"excludes": [".git", ".venv", "runs", "benchmarks/results"]}' \
    -- "$JOB_PYTHON" -m mcdist.cli "${MCDIST_COMMAND:-train}" --ray "$@"
