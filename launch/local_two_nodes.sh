#!/usr/bin/env bash
# Two Ray nodes on this machine: start a Ray head and a second Ray node (one CPU each, so Ray must place one
# worker on each), run a two-worker sp = 2 job across them with `mcdist train --ray`, then an sp = 2 inference
# job on the trained model with `mcdist generate --ray` and an sp = 2 evaluation with `mcdist eval --ray` (both
# checked against one process), then stop both.
#
#   launch/local_two_nodes.sh [extra `mcdist train` arguments, e.g. --set train.steps=20]
#
# Environment: PYTHON (default .venv/bin/python), CONFIG (default examples/ray_tiny.json), OUT_DIR (default
# runs/two_nodes, emptied first), PORT (the head's GCS port; default a free one).
#
# Everything is addressed through 127.0.0.1 (Ray advertises the machine's own address for it; its servers
# listen on all interfaces, as Ray always does). Both nodes run under `ray start --block` in the background and
# are stopped by their process ids on exit (SIGTERM: each drains and stops its own Ray processes), so a Ray
# that something else runs on this machine is left alone (`ray stop` would stop every Ray here). The nodes keep
# their files in a temporary folder of their own, which is removed at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-.venv/bin/python}
RAY="$(dirname "$PYTHON")/ray"
CONFIG=${CONFIG:-examples/ray_tiny.json}
OUT_DIR=${OUT_DIR:-runs/two_nodes}
PORT=${PORT:-$("$PYTHON" -c 'from mcdist.parallel.spawn import free_port; print(free_port())')}
ADDRESS="127.0.0.1:$PORT"
RAY_TEMP=$(mktemp -d /tmp/mcdist-two-nodes-XXXXXX)
# Token authentication, as every head of ours starts (docs/launch.md): with RAY_AUTH_MODE=token `ray start --head`
# requires the token of ~/.ray/auth_token (made when missing) and the second node and the driver present it.
export RAY_AUTH_MODE=token
NODE_OPTIONS=(--num-cpus 1 --disable-usage-stats --object-store-memory 200000000 --block)

HEAD_PID=""
NODE_PID=""
stop_nodes() {
    local status=$?
    for pid in $NODE_PID $HEAD_PID; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $NODE_PID $HEAD_PID; do
        wait "$pid" 2>/dev/null || true
    done
    [ "$status" -eq 0 ] || { echo "--- head log"; tail -n 20 "$RAY_TEMP/head.log"; echo "--- node log";
                             tail -n 20 "$RAY_TEMP/node.log" 2>/dev/null || true; } >&2
    rm -rf "$RAY_TEMP"
    echo "two_nodes: stopped both Ray nodes"
    exit "$status"
}
trap stop_nodes EXIT INT TERM

wait_for_nodes() {  # wait until the cluster at $ADDRESS has $1 live nodes (up to 180 s)
    "$PYTHON" - "$ADDRESS" "$1" <<'EOF'
import sys, time
import ray
address, wanted = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 180
while True:
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        alive = [node for node in ray.nodes() if node["Alive"]]
        ray.shutdown()
        if len(alive) >= wanted:
            break
    except Exception as error:  # not up yet
        ray.shutdown()
        if time.monotonic() > deadline:
            sys.exit(f"two_nodes: the Ray cluster at {address} did not reach {wanted} node(s) in 180 s: {error}")
    if time.monotonic() > deadline:
        sys.exit(f"two_nodes: the Ray cluster at {address} has {len(alive)} node(s), expected {wanted}")
    time.sleep(2)
print(f"two_nodes: {wanted} Ray node(s) up at {address}")
EOF
}

echo "two_nodes: starting the Ray head at $ADDRESS (files in $RAY_TEMP)"
"$RAY" start --head --port "$PORT" --node-ip-address 127.0.0.1 --include-dashboard=false \
    --temp-dir "$RAY_TEMP" "${NODE_OPTIONS[@]}" >"$RAY_TEMP/head.log" 2>&1 &
HEAD_PID=$!
wait_for_nodes 1

echo "two_nodes: starting the second Ray node"
# one log monitor per machine (the head's forwards every worker's output; a second would print it twice)
"$RAY" start --address "$ADDRESS" --include-log-monitor=false "${NODE_OPTIONS[@]}" >"$RAY_TEMP/node.log" 2>&1 &
NODE_PID=$!
wait_for_nodes 2

rm -rf "$OUT_DIR"
echo "two_nodes: mcdist train --ray --address $ADDRESS --workers 2 --sp 2 --config $CONFIG"
"$PYTHON" -m mcdist.cli train --ray --address "$ADDRESS" --workers 2 --sp 2 --config "$CONFIG" \
    --set "train.out_dir=$OUT_DIR" "$@" 2>&1 | tee "$RAY_TEMP/train.out"

# the two workers must have run on different nodes (each prints "ray: worker rank R/W on node ID")
nodes=$(grep -o 'ray: worker rank [0-9]*/2 on node [0-9a-f]*' "$RAY_TEMP/train.out" | awk '{print $NF}' \
    | sort -u | wc -l)
if [ "$nodes" -ne 2 ]; then
    echo "two_nodes: expected the two workers on two different nodes, found $nodes node id(s)" >&2
    exit 1
fi
echo "two_nodes: the two workers ran on two different Ray nodes; the final model is in $OUT_DIR/checkpoint"

# inference across the same two nodes: a prompt long enough to shard (2·P·C = 64 tokens under zigzag) plus a
# tail; the two Ray workers must continue it exactly as one process does
PROMPT=$("$PYTHON" -c 'print(",".join(str(7 * i % 64) for i in range(70)))')
echo "two_nodes: mcdist generate --ray --address $ADDRESS --sp 2 (a 70-token prompt, 8 new tokens)"
"$PYTHON" -m mcdist.cli generate --checkpoint "$OUT_DIR/checkpoint" --prompt-ids "$PROMPT" --max-new-tokens 8 \
    --ray --address "$ADDRESS" --sp 2 >"$RAY_TEMP/generate_ray.jsonl"
"$PYTHON" -m mcdist.cli generate --checkpoint "$OUT_DIR/checkpoint" --prompt-ids "$PROMPT" --max-new-tokens 8 \
    >"$RAY_TEMP/generate_one.jsonl"
if ! cmp -s "$RAY_TEMP/generate_ray.jsonl" "$RAY_TEMP/generate_one.jsonl"; then
    echo "two_nodes: the Ray inference job differs from one process:" >&2
    cat "$RAY_TEMP/generate_ray.jsonl" "$RAY_TEMP/generate_one.jsonl" >&2
    exit 1
fi
echo "two_nodes: generate on two Ray nodes = one process: $(cat "$RAY_TEMP/generate_one.jsonl")"

# evaluation across the same two nodes: each worker scores its half of every sequence, by position bucket; the
# sums are all-reduced in another order than one process adds them, so the numbers agree to rounding
echo "two_nodes: mcdist eval --ray --address $ADDRESS --sp 2 --buckets 3"
"$PYTHON" -m mcdist.cli eval --checkpoint "$OUT_DIR/checkpoint" --ray --address "$ADDRESS" --sp 2 --buckets 3 \
    >"$RAY_TEMP/eval_ray.jsonl"
"$PYTHON" -m mcdist.cli eval --checkpoint "$OUT_DIR/checkpoint" --buckets 3 --device cpu >"$RAY_TEMP/eval_one.jsonl"
"$PYTHON" - "$RAY_TEMP/eval_ray.jsonl" "$RAY_TEMP/eval_one.jsonl" <<'PY'
import json, math, sys
ray, one = (json.loads(open(path).read()) for path in sys.argv[1:])
pairs = [(ray, one)] + list(zip(ray["by_position"], one["by_position"]))
if not all(a["labelled"] == b["labelled"] and math.isclose(a["eval_loss"], b["eval_loss"], rel_tol=1e-5)
           and a["eval_accuracy"] == b["eval_accuracy"] for a, b in pairs):
    sys.exit(f"two_nodes: the Ray evaluation differs from one process:\n{ray}\n{one}")
print(f"two_nodes: eval on two Ray nodes = one process: accuracy {one['eval_accuracy']:.4f}, loss "
      f"{one['eval_loss']:.4f}, by position " + ", ".join(f"[{b['start']}, {b['end']}) {b['eval_accuracy']:.3f}"
                                                     for b in one["by_position"]))
PY
