#!/usr/bin/env bash
# Run COMMAND against a Ray cluster of two node processes that exists only while it runs:
#
#     bench/local_ray_cluster.sh CPUS_PER_NODE COMMAND [ARGS...]
#
# The head listens on 127.0.0.1:6380; the second node process (with the resource second_node) stands
# in for a second machine. Ray binds every interface it finds, so the script re-runs itself in new
# user, network, PID and mount namespaces where loopback is the only interface: nothing is reachable
# from outside, `ray stop` sees only this cluster, and every Ray process ends with the command.
set -euo pipefail
if [[ "${EDGE_EXPORT_RAY_NAMESPACE:-}" != 1 ]]; then
    exec env EDGE_EXPORT_RAY_NAMESPACE=1 unshare --user --map-root-user --net --pid --fork --mount --mount-proc \
        "$0" "$@"
fi
cpus=$1
shift
ip link set lo up
ray=${RAY:-$(dirname "$(command -v python)")/ray}
temp=$(mktemp -d /tmp/edge-export-ray-XXXXXX)
trap 'timeout 60 "$ray" stop --force >/dev/null 2>&1 || true; rm -rf "$temp"' EXIT
common=(--node-ip-address=127.0.0.1 --num-cpus="$cpus" --object-store-memory=100000000 --disable-usage-stats)
timeout 120 "$ray" start --head --port=6380 --include-dashboard=false --temp-dir="$temp" "${common[@]}" \
    >"$temp/head.log" 2>&1 || { cat "$temp/head.log"; exit 4; }
timeout 120 "$ray" start --address=127.0.0.1:6380 --resources='{"second_node": 1}' "${common[@]}" \
    >"$temp/node.log" 2>&1 || { cat "$temp/node.log"; exit 4; }
"$@"
