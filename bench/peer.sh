#!/usr/bin/env bash
# bench/peer.sh — our sidecar pair beside a direct connection and an HAProxy mTLS pair, in one
# run of ../shared/bench/peer_bench.sh. Knobs pass through (DURATION, REPS, RATE, FLOOR, …).
# BULKHEAD_BIN_DIR=DIR uses the `bulkhead` and `bulkhead-proxy` in DIR instead of building
# release binaries (the control plane is not in the data path; only the proxy need be release).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
# ../shared sits beside the main checkout; from a git worktree elsewhere, find it through the
# repository the worktree belongs to.
MAIN=$(dirname "$(git -C "$HERE" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || echo "$HERE/.git")")
PEER=${PEER_BENCH:-$HERE/../shared/bench/peer_bench.sh}
[[ -f $PEER ]] || PEER=$MAIN/../shared/bench/peer_bench.sh
[[ -x $PEER || -f $PEER ]] || { echo "peer_bench.sh not found at $PEER (set PEER_BENCH)" >&2; exit 1; }
if [[ -n ${BULKHEAD_BIN_DIR:-} ]]; then
  export BULKHEAD_BIN=$(cd "$BULKHEAD_BIN_DIR" && pwd)
else
  (cd "$HERE" && cargo build --release --bin bulkhead --bin bulkhead-proxy)
fi
MESH_NAME=bulkhead MESH_CLIENT_PORT=${MESH_CLIENT_PORT:-16001} MESH_SERVER_PORT=${MESH_SERVER_PORT:-16443} \
  MESH_SELFTEST=0 MESH_CMD="$HERE/bench/mesh_pair.sh" bash "$PEER"
