# shellcheck shell=bash
# Node-level environment for an erc-verl Ray cluster, sourced by start_ray_head.sh and start_ray_worker.sh.
# Ray workers inherit the environment of the `ray start` that spawned them, so NCCL settings belong here,
# not in a job's runtime env. Every value keeps one already exported by the caller.

# NCCL for multi-node runs over InfiniBand / RoCE. Long runs should not die on a transient link hiccup: a
# longer IB timeout than NCCL's default (4.096 us x 2^22 ~ 17 s per try) and the most retries the verbs field
# holds (harmless without IB). Both are bit fields of the queue pair: the timeout has 5 bits (0-31), the retry
# count 3 (0-7); mlx5 silently masks larger values (12 becomes 4, fewer retries than NCCL's 7) and other verbs
# stacks refuse them, so an out-of-range value stops here.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
erc_check_range() {  # erc_check_range NAME MAX: NAME's value is an integer in 0..MAX
    local value="${!1}"
    if ! [[ "$value" =~ ^[0-9]+$ ]] || [ "$value" -gt "$2" ]; then
        echo "erc-verl: $1=$value: must be an integer in 0..$2 (an InfiniBand queue-pair bit field)" >&2
        return 1
    fi
}
erc_check_range NCCL_IB_TIMEOUT 31
erc_check_range NCCL_IB_RETRY_CNT 7

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

# The IPv4 address other nodes reach this one on: ERC_NET_IFNAME's address when set, else the first one that is
# not loopback from `hostname --ip-address`, then `hostname --all-ip-addresses`. Ubuntu's /etc/hosts maps the
# host name to 127.0.1.1: a head that advertised it would pass its own port check and never see a worker.
erc_node_ip() {
    local found addr
    if [ -n "${ERC_NET_IFNAME:-}" ]; then
        read -r -a found <<< "$(ip -4 -o addr show dev "$ERC_NET_IFNAME" 2>/dev/null | awk '{sub("/.*", "", $4); printf "%s ", $4}')"
    else
        read -r -a found <<< "$(hostname --ip-address 2>/dev/null) $(hostname --all-ip-addresses 2>/dev/null)"
    fi
    for addr in "${found[@]}"; do
        case "$addr" in 127.* | *:*) ;; *) echo "$addr" && return 0 ;; esac
    done
    echo "erc-verl: no routable IPv4 address on $(hostname) (${ERC_NET_IFNAME:+interface $ERC_NET_IFNAME, }found:" \
         "${found[*]:-none}). Set ERC_HEAD_IP to the address the other nodes reach the head on, or" \
         "ERC_NET_IFNAME to its network interface." >&2
    return 1
}
