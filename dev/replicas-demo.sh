#!/usr/bin/env bash
# Three control-plane replicas on etcd, and the loss of one (docs/replicas.md).
#
# Starts, all on loopback and in a temporary directory removed on exit: three etcd members,
# three `bulkhead control --etcd` replicas sharing them, the payments sample app with its
# sidecar and an orders sidecar calling it, both sidecars given all three replicas'
# addresses. It shows `bulkhead get replicas`, a call allowed and one denied, then kills the
# replica the sidecars are on and shows them on another replica, the same verdicts, a
# deny applied on a surviving replica enforced, and `get replicas` again.
#
# Needs etcd (Debian: `apt-get install etcd-server`), curl, and the built binaries:
#
#   cargo build --release -p bulkhead-cli -p bulkhead-proxy
#   dev/replicas-demo.sh                 # B=target/debug dev/replicas-demo.sh for a debug build
#
# No root needed. Ports used on 127.0.0.1: 22379-22384 (etcd), 17443-17445 (replicas),
# 18080 (sample app), 15000-15001 (sidecar admin), 15006 and 19001 (sidecar traffic);
# set PORT_OFFSET=N to move them all up by N.
set -euo pipefail
cd "$(dirname "$0")/.."

B=${B:-target/release}
O=${PORT_OFFSET:-0}
for bin in "$B/bulkhead" "$B/bulkhead-proxy"; do
  [ -x "$bin" ] || { echo "no $bin: build first (cargo build --release), or set B=target/debug" >&2; exit 1; }
done
ETCD_BIN=$(command -v etcd) || { echo "no etcd on PATH: apt-get install etcd-server" >&2; exit 1; }
command -v curl >/dev/null || { echo "no curl on PATH" >&2; exit 1; }

D=$(mktemp -d /tmp/bulkhead-replicas-demo.XXXXXX)
cleanup() {
  local pids
  pids=$(jobs -p)
  [ -n "$pids" ] && kill $pids 2>/dev/null
  wait 2>/dev/null
  rm -rf "$D"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
wait_for() { # wait_for WHAT SECONDS COMMAND...: polls COMMAND every 0.2 s
  local what=$1 tries=$(($2 * 5)); shift 2
  until "$@" >/dev/null 2>&1; do
    tries=$((tries - 1))
    [ "$tries" -gt 0 ] || { echo "$what did not happen; logs in $D are removed on exit:" >&2; tail -n 20 "$D"/*.log >&2; exit 1; }
    sleep 0.2
  done
}

step "three etcd members on loopback"
CLUSTER="" ENDPOINTS=""
for i in 0 1 2; do
  CLUSTER+="${CLUSTER:+,}m$i=http://127.0.0.1:$((22380 + 2 * i + O))"
  ENDPOINTS+="${ENDPOINTS:+,}http://127.0.0.1:$((22379 + 2 * i + O))"
done
for i in 0 1 2; do
  client=http://127.0.0.1:$((22379 + 2 * i + O)) peer=http://127.0.0.1:$((22380 + 2 * i + O))
  "$ETCD_BIN" --name "m$i" --data-dir "$D/m$i.etcd" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new \
    --initial-cluster-token bulkhead-demo 2>"$D/etcd-m$i.log" &
done
for i in 0 1 2; do
  wait_for "etcd member m$i healthy" 30 \
    sh -c "curl -s http://127.0.0.1:$((22379 + 2 * i + O))/health | grep -q '\"health\":\"true\"'"
done
echo "etcd: $ENDPOINTS"

step "three replicas sharing them (one secret key seals the CA keys in etcd)"
head -c 32 /dev/urandom >"$D/etcd-secret.key"
chmod 600 "$D/etcd-secret.key"
declare -a REPLICA_PID REPLICA_ADDR
for i in 0 1 2; do
  addr=127.0.0.1:$((17443 + i + O))
  "$B/bulkhead" control --data-dir "$D/r$i" --listen "$addr" \
    --etcd "$ENDPOINTS" --etcd-secret-key-file "$D/etcd-secret.key" 2>"$D/replica-$i.log" &
  REPLICA_PID[i]=$!
  REPLICA_ADDR[i]=$addr
  # The first makes the CA set; the others take it from etcd.
  wait_for "replica $i listening" 30 test -s "$D/r$i/admin.yaml"
done
CONTROLS=$(IFS=,; echo "${REPLICA_ADDR[*]}")
export BULKHEAD_CONTEXT=$D/r0/admin.yaml
wait_for "three replicas listed" 10 sh -c "'$B/bulkhead' get replicas | grep -c healthy | grep -qx 3"
"$B/bulkhead" get replicas

step "the shop's policy, applied on replica 0"
"$B/bulkhead" apply -f examples/shop.yaml

step "payments (sample app + sidecar) and an orders sidecar, given all three replicas"
"$B/bulkhead" token create --identity spiffe://bulkhead.local/ns/shop/sa/payments >"$D/payments.token"
"$B/bulkhead" token create --identity spiffe://bulkhead.local/ns/shop/sa/orders >"$D/orders.token"
"$B/bulkhead" sample-app --name payments --listen "127.0.0.1:$((18080 + O))" 2>"$D/payments-app.log" &
"$B/bulkhead-proxy" --control "$CONTROLS" --trust-bundle "$D/r0/ca.pem" \
  --token-file "$D/payments.token" --inbound "127.0.0.1:$((15006 + O))" \
  --app "127.0.0.1:$((18080 + O))" --port 8080 --admin "127.0.0.1:$((15000 + O))" \
  2>"$D/payments-proxy.log" &
"$B/bulkhead-proxy" --control "$CONTROLS" --trust-bundle "$D/r0/ca.pem" \
  --token-file "$D/orders.token" --admin "127.0.0.1:$((15001 + O))" \
  --upstream "name=payments,listen=127.0.0.1:$((19001 + O)),address=127.0.0.1:$((15006 + O)),identity=spiffe://bulkhead.local/ns/shop/sa/payments" \
  2>"$D/orders-proxy.log" &
ADMINS="127.0.0.1:$((15000 + O)) 127.0.0.1:$((15001 + O))"
for a in $ADMINS; do wait_for "sidecar $a ready" 30 curl -sf "http://$a/ready"; done
# The replica a sidecar is on: bulkhead_control_replica is its place (from 1) in --control.
replica_of() {
  local n
  n=$(curl -s "http://$1/metrics" | awk '$1 == "bulkhead_control_replica" { print $2 }')
  case $n in 1 | 2 | 3) echo "${REPLICA_ADDR[n - 1]}" ;; *) echo "" ;; esac
}
for a in $ADMINS; do echo "sidecar $a is on replica $(replica_of "$a")"; done
"$B/bulkhead" get proxies

calls() {
  echo "orders POST /charge:      $(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$((19001 + O))/charge")  (allowed)"
  echo "orders GET  /admin/users: $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$((19001 + O))/admin/users")  (denied)"
}
step "calls through the pair"
calls

ON=$(replica_of "127.0.0.1:$((15000 + O))")
for i in 0 1 2; do [ "${REPLICA_ADDR[i]}" = "$ON" ] && KILLED=$i; done
step "killing replica $KILLED ($ON), the one payments' sidecar is on"
kill -9 "${REPLICA_PID[KILLED]}"
{ wait "${REPLICA_PID[KILLED]}"; } 2>/dev/null || true
SURVIVOR=$(((KILLED + 1) % 3))
export BULKHEAD_CONTEXT=$D/r$SURVIVOR/admin.yaml
moved() { for a in $ADMINS; do r=$(replica_of "$a"); [ -n "$r" ] && [ "$r" != "$ON" ] || return 1; done; }
wait_for "both sidecars on another replica" 30 moved
for a in $ADMINS; do echo "sidecar $a is now on replica $(replica_of "$a")"; done
calls

step "a deny applied on replica $SURVIVOR: no more charges"
cat >"$D/no-charge.yaml" <<'EOF'
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: payments-frozen, namespace: shop}
spec:
  selector: {workload: payments}
  action: deny
  rules:
    - name: frozen
      to: {paths: ["/charge"]}
EOF
"$B/bulkhead" apply -f "$D/no-charge.yaml"
denied() { [ "$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$((19001 + O))/charge")" = 403 ]; }
wait_for "the deny enforced" 10 denied
echo "orders POST /charge:      $(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$((19001 + O))/charge")  (denied now)"

step "the replicas and proxies, as replica $SURVIVOR sees them (the dead one drops out, and a leader is elected, within seconds)"
two_and_a_leader() {
  local list
  list=$("$B/bulkhead" get replicas) || return 1
  [ "$(grep -c healthy <<<"$list")" = 2 ] && grep -q ' leader ' <<<"$list"
}
wait_for "two replicas left, one leading" 15 two_and_a_leader
"$B/bulkhead" get replicas
"$B/bulkhead" get proxies
step "done; stopping everything and removing $D"
