#!/usr/bin/env bash
# bench/restart_enforce.sh — how long a deny applied right after a control-plane restart takes
# to be enforced (issue #14.2).
#
# Starts a control plane on a fixed loopback port, a sample app behind a server-side sidecar
# and a client-side sidecar with an upstream to it, all release binaries. Then, per round:
# kill -9 the control plane, wait OUTAGE seconds, start it again on the same port and data
# directory, apply a deny for a fresh path as soon as it answers, and poll that path through
# the client sidecar every 10 ms until it gets 403. Prints, per outage, the time from `apply`
# returning to the first 403 (and from the control plane being back), median and max.
#
#   bash bench/restart_enforce.sh                  # OUTAGES="0.5 3 10 26" REPS=3
#   OUTAGES="26" REPS=5 bash bench/restart_enforce.sh
#
# The issue measured 24.6 s for a 26 s outage before proxies reconnected promptly.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
OUTAGES=${OUTAGES:-0.5 3 10 26}
REPS=${REPS:-3}
export BULKHEAD_LOG=${BULKHEAD_LOG:-warn}

bench_bins RESTART_BUILD
bench_workdir bulkhead-restart RESTART_KEEP
PORT=$(free_port)
CONTROL=127.0.0.1:$PORT
export BULKHEAD_CONTEXT=$W/data/admin.yaml
CONTROL_PID=

control_up() {
    rm -f "$BULKHEAD_CONTEXT"
    "$BIN/bulkhead" control --data-dir "$W/data" --listen "$CONTROL" --trust-domain bench.local \
        >/dev/null 2>>"$W/control.log" &
    CONTROL_PID=$!
    PIDS+=("$CONTROL_PID")
    wait_for "$BULKHEAD_CONTEXT" "$CONTROL_PID" "the control plane"
}

now_ms() { date +%s%3N; }

control_up
cat >"$W/policy.yaml" <<'EOF'
apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: orders, namespace: shop}
spec:
  identity: spiffe://bench.local/ns/shop/sa/orders
  ports: [{port: 8080, protocol: http}]
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: orders-allow-frontend, namespace: shop}
spec:
  selector: {workload: orders}
  action: allow
  rules:
    - name: frontend-reads
      from: {identities: ["spiffe://bench.local/ns/shop/sa/frontend"]}
      to: {methods: [GET]}
EOF
"$BIN/bulkhead" apply -f "$W/policy.yaml" >/dev/null
"$BIN/bulkhead" token create --identity spiffe://bench.local/ns/shop/sa/orders >"$W/orders.token"
"$BIN/bulkhead" token create --identity spiffe://bench.local/ns/shop/sa/frontend >"$W/frontend.token"
start_sample_app orders
common=(--control "$CONTROL" --trust-bundle "$W/data/ca.pem" --admin 127.0.0.1:0)
"$BIN/bulkhead-proxy" "${common[@]}" --token-file "$W/orders.token" --inbound 127.0.0.1:0 \
    --app "$APP" --port 8080 --ready-file "$W/orders.json" \
    2>"$W/orders-proxy.log" &
PIDS+=($!)
wait_for "$W/orders.json" "${PIDS[-1]}" "the orders sidecar"
"$BIN/bulkhead-proxy" "${common[@]}" --token-file "$W/frontend.token" --ready-file "$W/frontend.json" \
    --upstream "name=orders,listen=127.0.0.1:0,address=$(json "$W/orders.json" 'j["inbound"]'),identity=spiffe://bench.local/ns/shop/sa/orders" \
    2>"$W/frontend-proxy.log" &
PIDS+=($!)
wait_for "$W/frontend.json" "${PIDS[-1]}" "the frontend sidecar"
UP=$(json "$W/frontend.json" 'j["upstreams"]["orders"]')
status() { curl -s -o /dev/null -w '%{http_code}' "http://$UP$1"; }
[[ $(status /secret/0) == 200 ]] || fail "the mesh does not serve"

round=0
echo "outage_s rep after_apply_ms after_back_ms" | tee "$W/figures.txt"
# Not in a pipeline: the loop must run in this shell, which keeps track of the control
# plane it restarts.
for outage in $OUTAGES; do
    for rep in $(seq "$REPS"); do
        round=$((round + 1))
        kill -KILL "$CONTROL_PID"
        wait "$CONTROL_PID" 2>/dev/null || true
        sleep "$outage"
        control_up
        back=$(now_ms)
        cat >"$W/deny.yaml" <<EOF
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-secret-$round, namespace: shop}
spec:
  selector: {workload: orders}
  action: deny
  rules:
    - name: secret
      to: {paths: ["/secret/$round"]}
EOF
        "$BIN/bulkhead" apply -f "$W/deny.yaml" >/dev/null
        applied=$(now_ms)
        until [[ $(status "/secret/$round") == 403 ]]; do
            (($(now_ms) - applied < 60000)) || fail "round $round: not enforced within 60 s"
            sleep 0.01
        done
        done_at=$(now_ms)
        echo "$outage $rep $((done_at - applied)) $((done_at - back))" | tee -a "$W/figures.txt"
    done
done

python3 - "$W/figures.txt" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l[0].isdigit()]
print("\n| outage | reps | after apply returned: median / max | after the control plane was back: median / max |")
print("| ---: | ---: | ---: | ---: |")
for outage in dict.fromkeys(r[0] for r in rows):
    a = [int(r[2]) for r in rows if r[0] == outage]
    b = [int(r[3]) for r in rows if r[0] == outage]
    print(f"| {outage} s | {len(a)} | {statistics.median(a):.0f} / {max(a)} ms | {statistics.median(b):.0f} / {max(b)} ms |")
EOF
