#!/usr/bin/env bash
# launch/local_cluster.yaml for real, on this machine: `ray up` over ssh to 127.0.0.1, a training job and an
# inference job through `ray job submit` (launch/submit.sh, launch/infer.sh or generate.sh), then `ray down`.
#
#   sudo launch/local_cluster_demo.sh          # as root: it installs packages and adds a user
#
# What it does, in order (docs/launch.md, "An on-premise cluster over ssh", has a transcript):
#   1. installs Debian's openssh-server and rsync when missing (apt-get; the package's own sshd is not started);
#   2. adds the user `mcdist` (the cluster's ssh_user; no password, key login only) when missing, and gives it
#      root's pip configuration (~/.config/pip/pip.conf, where there is one: the same package sources);
#   3. makes the key ~/.ssh/mcdist_local_cluster when missing and authorizes it for mcdist, alone;
#   4. starts an sshd of its own on 127.0.0.1:22 only (ListenAddress 127.0.0.1; mcdist alone may log in, by key),
#      its config, host key, pid and log in ~/.mcdist-local-cluster;
#   5. makes this machine's Ray auth token (~/.ray/auth_token) when missing: the cluster's head requires it;
#   6. `ray up -y launch/local_cluster.yaml` (copies the checkout to /home/mcdist/mcdist, `make setup` there: the
#      first time some minutes, then seconds; starts the head);
#   7. empties /home/mcdist/runs/local_cluster, submits a training job there (launch/submit.sh,
#      examples/ray_tiny.json: 2 workers, sp = 2, 40 steps) and an inference job on the model it saved
#      (launch/infer.sh: `mcdist infer`, two prompts; launch/generate.sh where this checkout has no `infer`);
#   8. `ray down -y launch/local_cluster.yaml`, and stops its sshd (also on failure or Ctrl-C).
#
# Environment: PYTHON (default .venv/bin/python; its `ray` runs `ray up` and submits, and must be the cluster's
# Ray version), SSH_PORT_CHECK=0 skips the check that nothing listens on 127.0.0.1:22 yet.
# Not part of `make test`: it installs system packages and adds a user.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "local_cluster: $*"; }
fail() { echo "local_cluster: $*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || fail "run as root (it installs openssh-server and adds the user mcdist); got uid $(id -u)"
PYTHON=${PYTHON:-.venv/bin/python}
RAY="$(dirname "$PYTHON")/ray"
[ -x "$RAY" ] || fail "no ray beside PYTHON = $PYTHON; expected a venv with the ray extra (make setup)"
CLUSTER=launch/local_cluster.yaml
CLUSTER_USER=mcdist
KEY=$HOME/.ssh/mcdist_local_cluster
STATE=$HOME/.mcdist-local-cluster
JOB_ADDRESS=http://127.0.0.1:8275
OUT=/home/$CLUSTER_USER/runs/local_cluster

# 1. packages
if [ ! -x /usr/sbin/sshd ] || ! command -v rsync >/dev/null; then
    say "installing openssh-server and rsync (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync >/dev/null
fi

# 2. the cluster's user
if ! id "$CLUSTER_USER" >/dev/null 2>&1; then
    say "adding the user $CLUSTER_USER"
    useradd --create-home --shell /bin/bash "$CLUSTER_USER"
fi
usermod -p '*' "$CLUSTER_USER"  # no password; '*' (not '!') lets sshd accept its key without PAM
# the cluster's `make setup` installs from the package sources root's pip uses here (e.g. a local folder of
# wheels with the CPU build of torch): over ssh it gets none of root's environment
if [ -f "$HOME/.config/pip/pip.conf" ]; then
    install -d -o "$CLUSTER_USER" -g "$CLUSTER_USER" "/home/$CLUSTER_USER/.config" "/home/$CLUSTER_USER/.config/pip"
    install -m 644 -o "$CLUSTER_USER" -g "$CLUSTER_USER" "$HOME/.config/pip/pip.conf" \
        "/home/$CLUSTER_USER/.config/pip/pip.conf"
fi

# 3. the key
install -d -m 700 "$HOME/.ssh"
[ -f "$KEY" ] || ssh-keygen -q -t ed25519 -N "" -C "mcdist local cluster" -f "$KEY"
install -d -m 700 -o "$CLUSTER_USER" -g "$CLUSTER_USER" "/home/$CLUSTER_USER/.ssh"
install -m 600 -o "$CLUSTER_USER" -g "$CLUSTER_USER" "$KEY.pub" "/home/$CLUSTER_USER/.ssh/authorized_keys"

# 4. an sshd of our own, loopback only
install -d -m 700 "$STATE"
[ -f "$STATE/host_key" ] || ssh-keygen -q -t ed25519 -N "" -C "mcdist local cluster host" -f "$STATE/host_key"
cat >"$STATE/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port 22
HostKey $STATE/host_key
PidFile $STATE/sshd.pid
AllowUsers $CLUSTER_USER
PermitRootLogin no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
X11Forwarding no
AllowTcpForwarding local
Subsystem sftp internal-sftp
EOF
if [ "${SSH_PORT_CHECK:-1}" != 0 ] && (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null; then
    fail "something listens on 127.0.0.1:22 already; expected the port free for this demo's sshd"
fi
mkdir -p /run/sshd  # sshd's privilege-separation folder
SSHD_PID=""
CLUSTER_UP=0
finish() {
    local status=$?
    trap - EXIT INT TERM
    if [ "$CLUSTER_UP" = 1 ]; then
        say "ray down -y $CLUSTER"
        "$RAY" down -y "$CLUSTER" || true
    fi
    if [ -n "$SSHD_PID" ]; then
        kill -TERM "$SSHD_PID" 2>/dev/null || true
        say "stopped sshd (pid $SSHD_PID)"
    fi
    exit "$status"
}
trap finish EXIT INT TERM
/usr/sbin/sshd -f "$STATE/sshd_config" -E "$STATE/sshd.log"
for _ in $(seq 50); do [ -s "$STATE/sshd.pid" ] && break; sleep 0.1; done
SSHD_PID=$(cat "$STATE/sshd.pid")
say "sshd (pid $SSHD_PID) on 127.0.0.1:22, key $KEY for $CLUSTER_USER"
ssh -i "$KEY" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes \
    "$CLUSTER_USER@127.0.0.1" true || fail "ssh $CLUSTER_USER@127.0.0.1 with $KEY failed (log: $STATE/sshd.log)"

# 5. the auth token the head will require
if [ ! -f "$HOME/.ray/auth_token" ]; then
    "$RAY" get-auth-token --generate >/dev/null
    say "made a Ray auth token in ~/.ray/auth_token"
fi

# 6. the cluster
say "ray up -y $CLUSTER"
CLUSTER_UP=1
"$RAY" up -y "$CLUSTER" --disable-usage-stats

# 7. the jobs, once the head's job server answers (401 without the token: up, and wanting it)
"$PYTHON" - "$JOB_ADDRESS" <<'PY' || fail "the head's job server at $JOB_ADDRESS did not answer in 60 s"
import sys, time, urllib.error, urllib.request
for _ in range(60):
    try:
        urllib.request.urlopen(sys.argv[1] + "/api/version", timeout=5)
        sys.exit(0)
    except urllib.error.HTTPError as error:
        sys.exit(0 if error.code == 401 else 1)
    except OSError:
        time.sleep(1)
sys.exit(1)
PY
rm -rf "$OUT"  # a fresh run (the training job would resume an earlier one, the inference job skip its ids)
say "training job: launch/submit.sh --config examples/ray_tiny.json (2 workers, sp 2) -> $OUT"
RAY="$RAY" RAY_ADDRESS=$JOB_ADDRESS JOB_PYTHON=python launch/submit.sh --config examples/ray_tiny.json \
    --set "train.out_dir=$OUT"
PROMPT=$("$PYTHON" -c 'print(",".join(str(7 * i % 64) for i in range(70)))')
if "$PYTHON" -m mcdist.cli infer --help >/dev/null 2>&1; then
    # two prompts: one long enough to shard over the sp group (2·P·segment_len = 64 tokens), one short
    printf '%s\n' "{\"id\": \"a\", \"prompt_ids\": [$PROMPT]}" '{"id": "b", "prompt_ids": [1, 2, 3]}' \
        | su "$CLUSTER_USER" -c "cat >$OUT/prompts.jsonl"
    say "inference job: launch/infer.sh --checkpoint $OUT/checkpoint --prompts $OUT/prompts.jsonl --sp 2"
    RAY="$RAY" RAY_ADDRESS=$JOB_ADDRESS JOB_PYTHON=python launch/infer.sh --checkpoint "$OUT/checkpoint" \
        --prompts "$OUT/prompts.jsonl" --out "$OUT/infer.jsonl" --max-new-tokens 8 --sp 2
    say "the inference job wrote $OUT/infer.jsonl:"
    cat "$OUT/infer.jsonl"
else
    say "inference job: launch/generate.sh --checkpoint $OUT/checkpoint --sp 2 (a 70-token prompt, 8 new tokens)"
    RAY="$RAY" RAY_ADDRESS=$JOB_ADDRESS JOB_PYTHON=python launch/generate.sh --checkpoint "$OUT/checkpoint" \
        --prompt-ids "$PROMPT" --max-new-tokens 8 --sp 2 --out "$OUT/generated.jsonl"
    say "the inference job wrote $OUT/generated.jsonl:"
    cat "$OUT/generated.jsonl"
fi
# finish() takes the cluster down and stops sshd
