#!/usr/bin/env bash
# Flows shared through etcd at the flow store's bound (200,000 edges): how big one replica's
# `flows/<id>` value is, how many edges fit, how long the union takes, and whether a real etcd
# member (Debian's, default limits) takes the value. See ARCHITECTURE.md, "Replicas on etcd".
#
#   bash bench/flows_scale.sh [--edges 200000] [--replicas 3]
#
# SCALE_NO_BUILD=1 skips the release build; SCALE_BIN_DIR=target/debug uses a debug one.
# Needs etcd and etcdctl (Debian: etcd-server, etcd-client) and python3 (free ports).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ "${SCALE_NO_BUILD:-0}" != 1 ]]; then
    cargo build --release -p bulkhead-control --example flows_scale
fi
EXAMPLE="${SCALE_BIN_DIR:-$ROOT/target/release}/examples/flows_scale"
ETCD_BIN=$(command -v etcd) || { echo "needs etcd on PATH (Debian: etcd-server)" >&2; exit 1; }
ETCDCTL=$(command -v etcdctl) || { echo "needs etcdctl on PATH (Debian: etcd-client)" >&2; exit 1; }

TMP="$(mktemp -d /tmp/bulkhead-flows-scale.XXXXXX)"
ETCD_PID=""
cleanup() {
    if [[ -n "$ETCD_PID" ]]; then
        kill "$ETCD_PID" 2>/dev/null || true
        wait "$ETCD_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$EXAMPLE" --out "$TMP/values" "$@"

port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
client=http://127.0.0.1:$(port) peer=http://127.0.0.1:$(port)
"$ETCD_BIN" --name m0 --data-dir "$TMP/m0.etcd" --listen-client-urls "$client" \
    --advertise-client-urls "$client" --listen-peer-urls "$peer" \
    --initial-advertise-peer-urls "$peer" --initial-cluster "m0=$peer" >"$TMP/etcd.log" 2>&1 &
ETCD_PID=$!
for _ in $(seq 300); do
    curl -s "$client/health" 2>/dev/null | grep -q '"health":"true"' && break
    sleep 0.1
done
echo
echo "One replica's value put into etcd $($ETCD_BIN --version | head -n 1 | awk '{print $3}') (default --max-request-bytes):"
for edges in $(ls "$TMP/values" | sed -n 's/^flows-\([0-9]*\)\.json$/\1/p' | sort -n); do
    f="$TMP/values/flows-$edges.json"
    start=$(date +%s%N)
    if out=$(ETCDCTL_API=3 "$ETCDCTL" --endpoints "$client" put /bulkhead/flows/bench <"$f" 2>&1); then
        verdict="stored"
    else
        verdict="refused: $(echo "$out" | tail -n 1)"
    fi
    took=$(( ($(date +%s%N) - start) / 1000000 ))
    printf '  %9s edges, %9s bytes: %s (%s ms)\n' "$edges" "$(stat -c %s "$f")" "$verdict" "$took"
done
