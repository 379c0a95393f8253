#!/usr/bin/env bash
# Control-plane scale benchmark: 1,000 simulated proxies on real gRPC streams against a real
# `bulkhead control` process. See bench/control_scale.md.
#
#   bash bench/control_scale.sh [extra arguments for the example, e.g. --proxies 200]
#
# Environment:
#   SCALE_TIMEOUT   bound on the example's run time in seconds (default 900)
#   SCALE_NO_BUILD  set to 1 to skip the release builds
#   SCALE_PERF      set to 1 to record the control plane with `perf record` during the run;
#                   the report goes to $SCALE_PERF_OUT (default /tmp/control_scale.perf.txt);
#                   SCALE_PERF_ARGS replaces the sampling options (default "-F 499 -g"; the
#                   release build has no frame pointers, so for inclusive figures through
#                   Rust code use "-F 199 --call-graph dwarf,16384")
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TIMEOUT="${SCALE_TIMEOUT:-900}"

if [[ "${SCALE_NO_BUILD:-0}" != 1 ]]; then
    cargo build --release --bin bulkhead
    cargo build --release -p bulkhead-control --example scale
fi
BULKHEAD="$ROOT/target/release/bulkhead"
SCALE="$ROOT/target/release/examples/scale"

# Two sockets per proxy (its watch connection here, and the control plane's end), plus the
# short-lived join connections.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

TMP="$(mktemp -d /tmp/bulkhead-scale.XXXXXX)"
CONTROL_PID=""
PERF_PID=""
cleanup() {
    if [[ -n "$PERF_PID" ]] && kill -0 "$PERF_PID" 2>/dev/null; then
        kill -INT "$PERF_PID" 2>/dev/null || true
        wait "$PERF_PID" 2>/dev/null || true
    fi
    if [[ -n "$CONTROL_PID" ]] && kill -0 "$CONTROL_PID" 2>/dev/null; then
        kill -INT "$CONTROL_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$CONTROL_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$CONTROL_PID" 2>/dev/null || true
        wait "$CONTROL_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$BULKHEAD" control --data-dir "$TMP/data" --listen 127.0.0.1:0 --trust-domain scale.local \
    >"$TMP/control.log" 2>&1 &
CONTROL_PID=$!

for _ in $(seq 300); do
    [[ -s "$TMP/data/admin.yaml" ]] && break
    if ! kill -0 "$CONTROL_PID" 2>/dev/null; then
        echo "control plane exited during start:" >&2
        cat "$TMP/control.log" >&2
        exit 1
    fi
    sleep 0.1
done
if [[ ! -s "$TMP/data/admin.yaml" ]]; then
    echo "control plane wrote no admin.yaml within 30 s" >&2
    cat "$TMP/control.log" >&2
    exit 1
fi

if [[ "${SCALE_PERF:-0}" == 1 ]]; then
    # shellcheck disable=SC2086 # SCALE_PERF_ARGS is a list of options
    perf record ${SCALE_PERF_ARGS:--F 499 -g} -p "$CONTROL_PID" -o "$TMP/perf.data" >"$TMP/perf.log" 2>&1 &
    PERF_PID=$!
fi

echo "control plane pid $CONTROL_PID, data dir $TMP/data; nproc $(nproc), ulimit -n $(ulimit -n)" >&2
status=0
timeout --signal=INT --kill-after=10 "$TIMEOUT" \
    "$SCALE" --data-dir "$TMP/data" --control-pid "$CONTROL_PID" "$@" || status=$?

if ! kill -0 "$CONTROL_PID" 2>/dev/null; then
    echo "the control plane died during the run; its log ends:" >&2
    tail -n 20 "$TMP/control.log" >&2
    status=1
fi
warnings=$(grep -c -E ' (WARN|ERROR) ' "$TMP/control.log" || true)
echo "control-plane log: $(wc -l <"$TMP/control.log") lines, $warnings WARN/ERROR" >&2
grep -E ' (WARN|ERROR) ' "$TMP/control.log" | head -n 5 >&2 || true

if [[ -n "$PERF_PID" ]]; then
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    PERF_PID=""
    # Inclusive ("Children") and own ("Self") share of the samples, per function.
    perf report -i "$TMP/perf.data" --children --sort symbol -g none --percent-limit 1 --stdio \
        >"${SCALE_PERF_OUT:-/tmp/control_scale.perf.txt}" 2>/dev/null || true
    echo "perf report: ${SCALE_PERF_OUT:-/tmp/control_scale.perf.txt}" >&2
fi

case $status in
    0) ;;
    124 | 130) echo "the benchmark did not finish within $TIMEOUT s" >&2 ;;
    3) echo "the benchmark ran; at least one target was missed (see above)" >&2 ;;
    *) echo "the benchmark failed (exit $status)" >&2 ;;
esac
exit "$status"
