#!/usr/bin/env bash
# bench/peer.sh — our sidecar pair beside a direct connection and an HAProxy mTLS pair, in one
# run of ../shared/bench/peer_bench.sh. Knobs pass through (DURATION, REPS, RATE, …).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
PEER=${PEER_BENCH:-$HERE/../shared/bench/peer_bench.sh}
[[ -x $PEER || -f $PEER ]] || { echo "peer_bench.sh not found at $PEER (set PEER_BENCH)" >&2; exit 1; }
(cd "$HERE" && cargo build --release --bin bulkhead --bin bulkhead-proxy)
MESH_NAME=bulkhead MESH_CLIENT_PORT=${MESH_CLIENT_PORT:-16001} MESH_SERVER_PORT=${MESH_SERVER_PORT:-16443} \
  MESH_SELFTEST=0 MESH_CMD="$HERE/bench/mesh_pair.sh" bash "$PEER"
