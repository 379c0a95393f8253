#!/usr/bin/env bash
# bench/netns_pair.sh — the sidecar pair in transparent mode, between two network namespaces
# joined by a veth pair, against the same two namespaces with no mesh (as root).
#
# Two such pairs of namespaces are made, each pair joined by its own veth link (private
# addresses, 10.213.N.1 for the client and 10.213.N.2 for the server; no IPv6):
#
#   direct  oha (client ns) -> nginx (server ns, 1 KiB body), nothing in between
#   mesh    the same, with `bulkhead-proxy init` run in both namespaces and a transparent
#           sidecar in each: oha's connection is redirected to the client sidecar, which
#           dials the server's sidecar over mTLS; that one forwards to nginx at the address
#           the client dialled. The control plane runs in the server namespace on a port the
#           capture leaves alone (`--exclude-inbound-ports`); the policy allows the client's
#           SPIFFE ID GET and HEAD, as bench/pair_policy.yaml does.
#
# oha runs as uid 65534 (the sidecars, as root, are the uid `init` leaves uncaptured), pinned
# to CPU 1 with the control plane; nginx and the sidecars are pinned to CPU 0, as in
# ../shared/bench/peer_bench.sh. Each rep runs, on each column in turn: a 1 s warm-up, a
# closed-loop run (CONNS connections, DURATION) for the maximum rate, and an open-loop run at
# RATE requests/s over RATE_CONNS connections (latency-corrected) for the latencies and the
# sidecars' CPU. Reps are interleaved and the medians reported, with the mesh's ratios to
# direct. Every response must be a 200.
#
# Usage (from the repository root, as root):
#   bash bench/netns_pair.sh
#
# Environment: DURATION (5s), REPS (3), CONNS (32), RATE (1000), RATE_CONNS (16),
# BULKHEAD_BIN_DIR (default target/release, built when missing), NETNS_BUILD=1 (rebuild),
# NETNS_KEEP=1 (keep the work directory), OHA (default: oha on PATH or
# ~/.cache/bench-tools/bin/oha, as the shared harness installs it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DURATION=${DURATION:-5s}
REPS=${REPS:-3}
CONNS=${CONNS:-32}
RATE=${RATE:-1000}
RATE_CONNS=${RATE_CONNS:-16}
CONTROL_PORT=7443
APP_PORT=8080

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

[[ $(id -u) == 0 ]] || { echo "bench/netns_pair.sh needs root (network namespaces, iptables)" >&2; exit 1; }
for tool in ip iptables iptables-restore nginx jq setpriv taskset; do
    command -v "$tool" >/dev/null || { echo "bench/netns_pair.sh needs $tool on PATH" >&2; exit 1; }
done
OHA=${OHA:-$(command -v oha || echo "${XDG_CACHE_HOME:-$HOME/.cache}/bench-tools/bin/oha")}
[[ -x $OHA ]] || { echo "no oha at $OHA: run ../shared/bench/peer_bench.sh once (it installs it) or set OHA" >&2; exit 1; }

bench_bins NETNS_BUILD
bench_workdir bulkhead-netns NETNS_KEEP
chmod 755 "$W"
cp "$OHA" "$W/oha"   # where uid 65534 can run it
NS_PREFIX="bhb$$"
NAMESPACES=()
bench_on_exit() {
    local ns
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
}

# Background processes are started with `ip netns exec` itself (it execs, so $! is the
# process), never through this function (a function in the background is a subshell).
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# make_link N: namespaces ${NS_PREFIX}cN and ${NS_PREFIX}sN joined by a veth pair,
# 10.213.N.1/24 and 10.213.N.2/24, loopback up, IPv6 off.
make_link() {
    local n=$1 c="${NS_PREFIX}c$1" s="${NS_PREFIX}s$1"
    ip netns add "$c"
    NAMESPACES+=("$c")
    ip netns add "$s"
    NAMESPACES+=("$s")
    ip link add "bhv${n}c$$" netns "$c" type veth peer name "bhv${n}s$$" netns "$s"
    for ns in "$c" "$s"; do
        in_ns "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
        in_ns "$ns" ip link set lo up
    done
    in_ns "$c" ip link set "bhv${n}c$$" name eth0
    in_ns "$s" ip link set "bhv${n}s$$" name eth0
    in_ns "$c" ip addr add "10.213.$n.1/24" dev eth0
    in_ns "$s" ip addr add "10.213.$n.2/24" dev eth0
    in_ns "$c" ip link set eth0 up
    in_ns "$s" ip link set eth0 up
}

# start_nginx NS NAME: nginx in NS on 0.0.0.0:APP_PORT serving a 1 KiB body, pinned to CPU 0.
start_nginx() {
    local dir="$W/$2"
    nginx_conf "$dir" "0.0.0.0:$APP_PORT" "$dir/nginx.err"
    ip netns exec "$1" taskset -c 0 nginx -p "$dir/" -c "$dir/nginx.conf" -e "$dir/nginx.err" -g 'daemon off;' &
    PIDS+=($!)
}

# The columns: link 1 direct, link 2 with the mesh.
log "making two pairs of namespaces joined by veth (10.213.1.0/24 direct, 10.213.2.0/24 mesh)"
make_link 1
make_link 2
DC="${NS_PREFIX}c1" DS="${NS_PREFIX}s1" MC="${NS_PREFIX}c2" MS="${NS_PREFIX}s2"
CLIENT_IP=10.213.2.1 SERVER_IP=10.213.2.2
start_nginx "$DS" direct-nginx
start_nginx "$MS" mesh-nginx

# The control plane, in the mesh's server namespace, on CPU 1.
ip netns exec "$MS" taskset -c 1 "$BIN/bulkhead" control --data-dir "$W/data" \
    --listen "$SERVER_IP:$CONTROL_PORT" --trust-domain bench.local 2>"$W/control.log" &
PIDS+=($!)
wait_for "$W/data/admin.yaml" "${PIDS[-1]}" "the control plane"
sleep 0.2
export BULKHEAD_CONTEXT=$W/data/admin.yaml
CONTROL="$SERVER_IP:$CONTROL_PORT"
cat >"$W/policy.yaml" <<EOF
apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: server, namespace: default}
spec:
  identity: spiffe://bench.local/ns/default/sa/server
  addresses: ["$SERVER_IP"]
  ports: [{port: $APP_PORT, protocol: http}]
---
apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: client, namespace: default}
spec:
  identity: spiffe://bench.local/ns/default/sa/client
  addresses: ["$CLIENT_IP"]
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: server-allow-client, namespace: default}
spec:
  selector: {workload: server}
  action: allow
  rules:
    - name: client-reads
      from: {identities: ["spiffe://bench.local/ns/default/sa/client"]}
      to: {methods: [GET, HEAD]}
EOF
in_ns "$MS" "$BIN/bulkhead" apply -f "$W/policy.yaml" >/dev/null

# sidecar NS SA: init's capture rules, then a transparent sidecar for SA, on CPU 0.
sidecar() {
    local ns=$1 sa=$2
    in_ns "$ns" "$BIN/bulkhead-proxy" init --proxy-uid 0 --control "$CONTROL" \
        --exclude-inbound-ports "$CONTROL_PORT" >"$W/$sa-init.log" 2>&1 ||
        fail "bulkhead-proxy init failed in $ns"
    in_ns "$MS" "$BIN/bulkhead" token create --identity "spiffe://bench.local/ns/default/sa/$sa" >"$W/$sa.token"
    BULKHEAD_LOG=warn ip netns exec "$ns" taskset -c 0 "$BIN/bulkhead-proxy" --control "$CONTROL" \
        --trust-bundle "$W/data/ca.pem" --token-file "$W/$sa.token" --transparent \
        --inbound 0.0.0.0:15006 --outbound 127.0.0.1:15001 --admin 127.0.0.1:15000 \
        --ready-file "$W/$sa-proxy.json" 2>"$W/$sa-proxy.log" &
    PIDS+=($!)
    wait_for "$W/$sa-proxy.json" "${PIDS[-1]}" "the $sa sidecar"
    eval "${sa^^}_PID=${PIDS[-1]}"
}
sidecar "$MS" server
sidecar "$MC" client

# oha NS ARGS…: the load generator in NS as uid 65534 (captured), on CPU 1.
oha() {
    local ns=$1
    shift
    in_ns "$ns" setpriv --reuid=65534 --regid=65534 --clear-groups taskset -c 1 \
        "$W/oha" --no-tui --output-format json "$@"
}

declare -A NS_OF=([direct]=$DC [mesh]=$MC) URL_OF=([direct]=http://10.213.1.2:$APP_PORT/ [mesh]=http://$SERVER_IP:$APP_PORT/)
# Both answer before any measuring; the mesh's answer must have crossed the sidecars.
for col in direct mesh; do
    code=$(in_ns "${NS_OF[$col]}" setpriv --reuid=65534 --regid=65534 --clear-groups \
        curl -s -o /dev/null -w '%{http_code}' --max-time 5 "${URL_OF[$col]}" || true)
    [[ $code == 200 ]] || fail "$col: GET ${URL_OF[$col]} answered $code"
done
before=$(in_ns "$MS" curl -s http://127.0.0.1:15000/metrics | awk '/^bulkhead_requests_total\{direction="inbound"/ {s += $NF} END {print s + 0}')
((before >= 1)) || fail "the mesh's probe was not counted by the server sidecar: the capture did not take it"

HZ=$(getconf CLK_TCK)
ticks() { local t=0 p f; for p in "$@"; do read -r -a f </proc/"$p"/stat; t=$((t + f[13] + f[14])); done; echo $t; }
NON200='[.statusCodeDistribution|to_entries[]|select(.key!="200")|.value]|add // 0'
declare -A R
add() { R[$1]="${R[$1]:-} $2"; }
for rep in $(seq "$REPS"); do
    for col in direct mesh; do
        log "rep $rep/$REPS: $col"
        ns=${NS_OF[$col]} url=${URL_OF[$col]} j="$W/$col.$rep"
        oha "$ns" -z 1s -c "$CONNS" "$url" >/dev/null
        oha "$ns" -z "$DURATION" -c "$CONNS" "$url" >"$j.tput.json"
        pids=()
        [[ $col == mesh ]] && pids=("$CLIENT_PID" "$SERVER_PID")
        t0=$(ticks "${pids[@]}")
        s0=$(date +%s.%N)
        oha "$ns" -z "$DURATION" -c "$RATE_CONNS" -q "$RATE" --latency-correction "$url" >"$j.rate.json"
        t1=$(ticks "${pids[@]}")
        s1=$(date +%s.%N)
        add "$col.rps" "$(jq '.summary.requestsPerSec|floor' "$j.tput.json")"
        for q in p50 p90 p99; do add "$col.$q" "$(jq ".latencyPercentiles.$q*1000" "$j.rate.json")"; done
        add "$col.err" $(($(jq "$NON200" "$j.tput.json") + $(jq "$NON200" "$j.rate.json")))
        [[ $col == mesh ]] && add mesh.cpu "$(awk -v d=$((t1 - t0)) -v hz="$HZ" -v a="$s0" -v b="$s1" 'BEGIN {print 100 * d / hz / (b - a)}')"
    done
done
after=$(in_ns "$MS" curl -s http://127.0.0.1:15000/metrics | awk '/^bulkhead_requests_total\{direction="inbound"/ {s += $NF} END {print s + 0}')

median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
m() { echo "${R[$1]}" | median; }
rss() { awk '/^VmRSS/ {r = $2} /^VmHWM/ {h = $2} END {printf "%.1f / %.1f", r / 1024, h / 1024}' /proc/"$1"/status; }

echo
echo "## Transparent mode between two network namespaces (bench/netns_pair.sh)"
echo
echo "Run $(date -u +%Y-%m-%dT%H:%MZ), revision $(git rev-parse --short HEAD 2>/dev/null || echo '?'); HTTP/1.1 keep-alive, 1 KiB body;" \
    "median of $REPS interleaved reps; closed loop c=$CONNS for $DURATION, open loop $RATE req/s over $RATE_CONNS connections;" \
    "nginx and sidecars on CPU 0, oha and the control plane on CPU 1; $(nproc) vCPUs."
echo
echo "| metric | direct | bulkhead pair | bulkhead / direct |"
echo "| --- | ---: | ---: | ---: |"
printf '| max req/s | %.0f | %.0f | **%.2f** |\n' "$(m direct.rps)" "$(m mesh.rps)" "$(awk -v a="$(m mesh.rps)" -v b="$(m direct.rps)" 'BEGIN {print a / b}')"
for q in p50 p90 p99; do
    printf '| %s at %s req/s (ms) | %.3f | %.3f | %+.3f ms |\n' "$q" "$RATE" "$(m direct.$q)" "$(m mesh.$q)" \
        "$(awk -v a="$(m mesh.$q)" -v b="$(m direct.$q)" 'BEGIN {print a - b}')"
done
printf '| CPU of both sidecars at %s req/s | — | %.1f %% of a core | |\n' "$RATE" "$(m mesh.cpu)"
echo "| sidecar RSS now / peak (MiB), client; server | — | $(rss "$CLIENT_PID"); $(rss "$SERVER_PID") | |"
sum() { tr ' ' '\n' | awk '{s += $1} END {print s + 0}'; }
echo "| non-200 responses | $(echo "${R[direct.err]}" | sum) | $(echo "${R[mesh.err]}" | sum) | |"
echo
echo "Requests the server sidecar counted inbound during the run: $((after - before)) (every mesh request was captured and crossed the pair)."
echo "Per-rep max req/s: direct${R[direct.rps]}; mesh${R[mesh.rps]}."
errs=$(($(echo "${R[direct.err]}" | sum) + $(echo "${R[mesh.err]}" | sum)))
((errs == 0)) || fail "$errs responses were not 200"
