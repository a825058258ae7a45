#!/usr/bin/env bash
# Join a worker node to an erc-verl Ray cluster, in the foreground (SIGTERM or Ctrl-C stops the node).
#
#   launch/start_ray_worker.sh HEAD_IP[:PORT] [extra `ray start` flags...]
#
# Environment: ERC_NODE_IP, ERC_NUM_GPUS, ERC_NUM_CPUS, ERC_RAY_TEMP_DIR, ERC_AGENT_PORT [52365] as for the
# head; the head's auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); the NCCL settings
# of cluster_env.sh, which must match the head's.
set -euo pipefail
# shellcheck source=launch/cluster_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_env.sh"

if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: $0 HEAD_IP[:PORT] [ray start flags...]" >&2
    exit 2
fi
head="$1"
shift
[[ "$head" == *:* ]] || head="$head:6379"
erc_require_token

args=(--address "$head" --block --disable-usage-stats --dashboard-agent-listen-port "${ERC_AGENT_PORT:-52365}")
[ -n "${ERC_NODE_IP:-}" ] && args+=(--node-ip-address "$ERC_NODE_IP")
[ -n "${ERC_NUM_GPUS:-}" ] && args+=(--num-gpus "$ERC_NUM_GPUS")
[ -n "${ERC_NUM_CPUS:-}" ] && args+=(--num-cpus "$ERC_NUM_CPUS")
[ -n "${ERC_RAY_TEMP_DIR:-}" ] && args+=(--temp-dir "$ERC_RAY_TEMP_DIR")

exec ray start "${args[@]}" "$@"
