# shellcheck shell=bash
# Node-level environment for an erc-verl Ray cluster, sourced by start_ray_head.sh and start_ray_worker.sh.
# Ray workers inherit the environment of the `ray start` that spawned them, so NCCL settings belong here,
# not in a job's runtime env. Every value keeps one already exported by the caller.

# NCCL for multi-node runs over InfiniBand / RoCE. Long runs should not die on a transient link hiccup:
# a longer IB timeout and more retries than NCCL's defaults (harmless without IB).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-12}"

# Fabric-specific, so opt-in: the interface for bootstrap/Gloo traffic on nodes with several (e.g.
# ERC_NET_IFNAME=ib0 or bond0), the HCAs NCCL may use (e.g. ERC_IB_HCA=mlx5_0,mlx5_1) and, on RoCE, the GID
# index of the RoCE v2 address (usually ERC_IB_GID_INDEX=3). Unset: NCCL picks by itself.
if [ -n "${ERC_NET_IFNAME:-}" ]; then
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$ERC_NET_IFNAME}"
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$ERC_NET_IFNAME}"
    export TP_SOCKET_IFNAME="${TP_SOCKET_IFNAME:-$ERC_NET_IFNAME}"
fi
if [ -n "${ERC_IB_HCA:-}" ]; then
    export NCCL_IB_HCA="${NCCL_IB_HCA:-$ERC_IB_HCA}"
fi
if [ -n "${ERC_IB_GID_INDEX:-}" ]; then
    export NCCL_IB_GID_INDEX="${NCCL_IB_GID_INDEX:-$ERC_IB_GID_INDEX}"
fi

# Readable job logs: one line per rank instead of Ray's "repeated Nx" folding; full Hydra tracebacks.
export RAY_DEDUP_LOGS="${RAY_DEDUP_LOGS:-0}"
export HYDRA_FULL_ERROR="${HYDRA_FULL_ERROR:-1}"

# Ray 2.60 token authentication, on unless the caller exported RAY_AUTH_MODE=disabled. The token comes from
# RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (shared home: every node sees it).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

erc_token_file() {
    echo "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
}

# Fails (non-zero) with a message when token auth is on and no token is available to this node.
erc_require_token() {
    [ "$RAY_AUTH_MODE" = token ] || return 0
    [ -n "${RAY_AUTH_TOKEN:-}" ] && return 0
    local file
    file="$(erc_token_file)"
    if [ ! -s "$file" ]; then
        echo "erc-verl: RAY_AUTH_MODE=token but no token: $file is missing. Copy the head's token there" \
             "(print it on the head with \`ray get-auth-token\`), or export RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH." >&2
        return 1
    fi
}
