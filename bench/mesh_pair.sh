#!/usr/bin/env bash
# bench/mesh_pair.sh — the Bulkhead column of ../shared/bench/peer_bench.sh.
#
# Starts a control plane, then a server-side sidecar on $MESH_SERVER_PORT in front of the
# harness's nginx on $UP_PORT, and a client-side sidecar whose upstream port $MESH_CLIENT_PORT
# leads there over mTLS. The policy mirrors the HAProxy pair's: only the client's SPIFFE ID,
# and only GET or HEAD. Bulkhead uses its own CA (certificates from the control plane, keys
# made in each proxy), so run the harness with MESH_SELFTEST=0: its direct probes of the
# server port present the harness's CA, which our server side rightly refuses.
#
# Usage (from the repository root; builds release binaries first):
#   bench/peer.sh            # wraps ../shared/bench/peer_bench.sh with the right variables
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BULKHEAD_BIN:-$HERE/target/release}
W=${MESH_WORK_DIR:?run me from peer_bench.sh}
export BULKHEAD_LOG=${BULKHEAD_LOG:-warn}   # no per-request decision log, as the peers log nothing

"$BIN/bulkhead" control --data-dir "$W/data" --listen 127.0.0.1:0 --trust-domain bench.local \
  2>"$W/control.log" &
for _ in $(seq 100); do [[ -f $W/data/admin.yaml ]] && break; sleep 0.1; done
export BULKHEAD_CONTEXT=$W/data/admin.yaml
CONTROL=$(awk '/^server:/{gsub(/"/,"",$2); print $2}' "$BULKHEAD_CONTEXT")

# The pair's policy mirrors the HAProxy pair's rule: only the client's SPIFFE ID, GET or HEAD.
cp "$HERE/bench/pair_policy.yaml" "$W/policy.yaml"
"$BIN/bulkhead" apply -f "$W/policy.yaml" >/dev/null
"$BIN/bulkhead" token create --identity spiffe://bench.local/ns/default/sa/server >"$W/server.token"
"$BIN/bulkhead" token create --identity spiffe://bench.local/ns/default/sa/client >"$W/client.token"

common=(--control "$CONTROL" --trust-bundle "$W/data/ca.pem" --admin 127.0.0.1:0 --threads "${PROXY_THREADS:-1}")
"$BIN/bulkhead-proxy" "${common[@]}" --token-file "$W/server.token" \
  --inbound "127.0.0.1:$MESH_SERVER_PORT" --app "127.0.0.1:$UP_PORT" --port 8080 \
  2>"$W/server-proxy.log" &
"$BIN/bulkhead-proxy" "${common[@]}" --token-file "$W/client.token" \
  --upstream "name=server,listen=127.0.0.1:$MESH_CLIENT_PORT,address=127.0.0.1:$MESH_SERVER_PORT,identity=spiffe://bench.local/ns/default/sa/server,port=8080,workload=default/server" \
  2>"$W/client-proxy.log" &
wait
