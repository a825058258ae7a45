#!/usr/bin/env bash
# Start the head node of an erc-verl Ray cluster in the foreground (SIGTERM or Ctrl-C stops the node).
#
#   launch/start_ray_head.sh [extra `ray start` flags...]
#
# Environment (defaults in brackets):
#   ERC_RAY_PORT [6379]            GCS port the workers join:  launch/start_ray_worker.sh HEAD_IP:6379
#   ERC_DASHBOARD_PORT [8265]      dashboard + job API:        erc-verl submit ... --address http://HEAD_IP:8265
#   ERC_DASHBOARD_HOST [0.0.0.0]   interface the job API listens on
#   ERC_NODE_IP                    this node's address on the cluster network [Ray picks one]
#   ERC_NUM_GPUS, ERC_NUM_CPUS     resources to advertise [Ray detects them]
#   ERC_RAY_TEMP_DIR               Ray's session/log dir [/tmp/ray]
#   ERC_CLIENT_PORT [10001], ERC_AGENT_PORT [52365]   Ray client server and dashboard agent ports
#   RAY_AUTH_MODE [token], RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH: see cluster_env.sh. A missing token file
#                                  is created here; workers and submitters need the same token.
#   plus the NCCL settings of cluster_env.sh.
set -euo pipefail
# shellcheck source=launch/cluster_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_env.sh"

if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    token_file="$(erc_token_file)"
    if [ ! -s "$token_file" ]; then
        mkdir -p "$(dirname "$token_file")"
        # 256 random bits, as `ray get-auth-token --generate` makes (which only writes ~/.ray/auth_token).
        (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' > "$token_file")
        echo "erc-verl: generated a Ray auth token in $token_file: workers and submitters need it" >&2
    fi
fi

args=(
    --head --block --disable-usage-stats
    --port "${ERC_RAY_PORT:-6379}"
    --dashboard-host "${ERC_DASHBOARD_HOST:-0.0.0.0}"
    --dashboard-port "${ERC_DASHBOARD_PORT:-8265}"
    --ray-client-server-port "${ERC_CLIENT_PORT:-10001}"
    --dashboard-agent-listen-port "${ERC_AGENT_PORT:-52365}"
)
[ -n "${ERC_NODE_IP:-}" ] && args+=(--node-ip-address "$ERC_NODE_IP")
[ -n "${ERC_NUM_GPUS:-}" ] && args+=(--num-gpus "$ERC_NUM_GPUS")
[ -n "${ERC_NUM_CPUS:-}" ] && args+=(--num-cpus "$ERC_NUM_CPUS")
[ -n "${ERC_RAY_TEMP_DIR:-}" ] && args+=(--temp-dir "$ERC_RAY_TEMP_DIR")

# exec: the caller's PID is Ray's, so signalling it stops the node and everything it started.
exec ray start "${args[@]}" "$@"
