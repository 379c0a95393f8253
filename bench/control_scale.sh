#!/usr/bin/env bash
# Control-plane scale benchmark: 1,000 simulated proxies on real gRPC streams against real
# `bulkhead control` processes, first one on its embedded store, then REPLICAS replicas on a
# three-member etcd cluster with the proxies spread over them. See bench/control_scale.md.
#
#   bash bench/control_scale.sh [extra arguments for the example, e.g. --proxies 200]
#
# Environment:
#   SCALE_MODES     which stores to run, in order (default "embedded etcd")
#   REPLICAS        control-plane replicas in the etcd mode (default 3)
#   SCALE_TIMEOUT   bound on each run of the example in seconds (default 900)
#   SCALE_NO_BUILD  set to 1 to skip the release builds
#   SCALE_BIN_DIR   where the binaries are (default target/release; target/debug for a quick
#                   check of the script with SCALE_NO_BUILD=1 and a few --proxies)
#   SCALE_PERF      set to 1 to record the control plane (replica 0) with `perf record` during
#                   the run; the report goes to $SCALE_PERF_OUT (default
#                   /tmp/control_scale.perf.txt, suffixed with the mode); SCALE_PERF_ARGS
#                   replaces the sampling options (default "-F 499 -g"; the release build has
#                   no frame pointers, so for inclusive figures through Rust code use
#                   "-F 199 --call-graph dwarf,16384")
#
# The etcd mode needs `etcd` (Debian: etcd-server) and python3 (to find free ports).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TIMEOUT="${SCALE_TIMEOUT:-900}"
MODES="${SCALE_MODES:-embedded etcd}"
ENDPOINTS=""
REPLICAS="${REPLICAS:-3}"

if [[ "${SCALE_NO_BUILD:-0}" != 1 ]]; then
    cargo build --release --bin bulkhead
    cargo build --release -p bulkhead-control --example scale
fi
BIN_DIR="${SCALE_BIN_DIR:-$ROOT/target/release}"
BULKHEAD="$BIN_DIR/bulkhead"
SCALE="$BIN_DIR/examples/scale"
if [[ " $MODES " == *" etcd "* ]]; then
    ETCD_BIN=$(command -v etcd) || {
        echo "the etcd mode needs etcd on PATH (Debian: apt-get install etcd-server), or SCALE_MODES=embedded" >&2
        exit 1
    }
fi

# Two sockets per proxy (its watch connection here, and the control plane's end), plus the
# short-lived join connections.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

TMP="$(mktemp -d /tmp/bulkhead-scale.XXXXXX)"
PIDS=()
PERF_PID=""
# Stops what this script started: SIGINT, then SIGKILL after 5 s.
stop_all() {
    if [[ -n "$PERF_PID" ]] && kill -0 "$PERF_PID" 2>/dev/null; then
        kill -INT "$PERF_PID" 2>/dev/null || true
        wait "$PERF_PID" 2>/dev/null || true
    fi
    PERF_PID=""
    local pid
    for pid in "${PIDS[@]}"; do
        kill -INT "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
cleanup() {
    stop_all
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_file FILE PID LOG: waits up to 30 s for FILE to be written by process PID.
wait_file() {
    for _ in $(seq 300); do
        [[ -s "$1" ]] && return 0
        if ! kill -0 "$2" 2>/dev/null; then
            echo "process $2 exited during start; $3 ends:" >&2
            tail -n 20 "$3" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "no $1 within 30 s; $3 ends:" >&2
    tail -n 20 "$3" >&2
    exit 1
}

# Three etcd members on loopback; sets ENDPOINTS.
start_etcd() {
    local dir=$1 cluster="" i client peer
    local -a clients peers
    ENDPOINTS=""
    for i in 0 1 2; do
        clients[i]=$(free_port)
        peers[i]=$(free_port)
        cluster+="${cluster:+,}m$i=http://127.0.0.1:${peers[i]}"
        ENDPOINTS+="${ENDPOINTS:+,}http://127.0.0.1:${clients[i]}"
    done
    for i in 0 1 2; do
        client=http://127.0.0.1:${clients[i]} peer=http://127.0.0.1:${peers[i]}
        "$ETCD_BIN" --name "m$i" --data-dir "$dir/m$i.etcd" \
            --listen-client-urls "$client" --advertise-client-urls "$client" \
            --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
            --initial-cluster "$cluster" --initial-cluster-state new \
            --initial-cluster-token bulkhead-scale >"$dir/etcd-m$i.log" 2>&1 &
        PIDS+=($!)
    done
    for i in 0 1 2; do
        for _ in $(seq 300); do
            curl -s "http://127.0.0.1:${clients[i]}/health" 2>/dev/null | grep -q '"health":"true"' && break
            sleep 0.1
        done
        curl -s "http://127.0.0.1:${clients[i]}/health" | grep -q '"health":"true"' || {
            echo "etcd member m$i not healthy within 30 s:" >&2
            tail -n 20 "$dir/etcd-m$i.log" >&2
            exit 1
        }
    done
}

# run_mode MODE: starts the control plane(s) of MODE, runs the example, stops them.
run_mode() {
    local mode=$1 dir="$TMP/$1" n=1 i status=0
    local -a args control_pids
    mkdir -p "$dir"
    if [[ $mode == etcd ]]; then
        n=$REPLICAS
        start_etcd "$dir"
        head -c 32 /dev/urandom >"$dir/etcd-secret.key"
        chmod 600 "$dir/etcd-secret.key"
    fi
    for ((i = 0; i < n; i++)); do
        local -a store=()
        if [[ $mode == etcd ]]; then
            store=(--etcd "$ENDPOINTS" --etcd-secret-key-file "$dir/etcd-secret.key")
        fi
        "$BULKHEAD" control --data-dir "$dir/r$i" --listen 127.0.0.1:0 --trust-domain scale.local \
            "${store[@]}" >"$dir/control-$i.log" 2>&1 &
        control_pids[i]=$!
        PIDS+=($!)
        # One at a time: the first with an empty etcd makes the CA set, the others take it.
        wait_file "$dir/r$i/admin.yaml" "${control_pids[i]}" "$dir/control-$i.log"
        args+=(--data-dir "$dir/r$i" --control-pid "${control_pids[i]}")
    done
    if [[ "${SCALE_PERF:-0}" == 1 ]]; then
        # shellcheck disable=SC2086 # SCALE_PERF_ARGS is a list of options
        perf record ${SCALE_PERF_ARGS:--F 499 -g} -p "${control_pids[0]}" -o "$dir/perf.data" \
            >"$dir/perf.log" 2>&1 &
        PERF_PID=$!
    fi
    # CPU ticks (utime + stime) of every process of this mode before the example runs.
    local -a ticks_before
    for ((i = 0; i < ${#PIDS[@]}; i++)); do
        ticks_before[i]=$(awk '{print $14 + $15}' "/proc/${PIDS[i]}/stat" 2>/dev/null || echo 0)
    done
    echo "== $mode: $n control plane(s), pids ${control_pids[*]}${ENDPOINTS:+, etcd $ENDPOINTS}; nproc $(nproc), ulimit -n $(ulimit -n)" >&2
    timeout --signal=INT --kill-after=10 "$TIMEOUT" \
        "$SCALE" --store "$mode" "${args[@]}" "${EXTRA[@]}" | tee "$TMP/$mode.out" || status=${PIPESTATUS[0]}
    # CPU each process used during the run (joins, applies, renewals), in seconds.
    local cpu=""
    for ((i = 0; i < ${#PIDS[@]}; i++)); do
        local now
        now=$(awk '{print $14 + $15}' "/proc/${PIDS[i]}/stat" 2>/dev/null || echo 0)
        cpu+=" $(ps -o comm= -p "${PIDS[i]}" 2>/dev/null || echo '?') $(awk -v a="${ticks_before[i]}" -v b="$now" 'BEGIN {printf "%.1f", (b - a) / 100}') s;"
    done
    echo "$mode: CPU during the run (process, seconds):$cpu" | tee -a "$TMP/$mode.out"
    for ((i = 0; i < n; i++)); do
        if ! kill -0 "${control_pids[i]}" 2>/dev/null; then
            echo "control plane $i died during the run; its log ends:" >&2
            tail -n 20 "$dir/control-$i.log" >&2
            status=1
        fi
        local warnings
        warnings=$(grep -c -E ' (WARN|ERROR) ' "$dir/control-$i.log" || true)
        echo "control plane $i log: $(wc -l <"$dir/control-$i.log") lines, $warnings WARN/ERROR" >&2
        grep -E ' (WARN|ERROR) ' "$dir/control-$i.log" | head -n 5 >&2 || true
    done
    if [[ -n "$PERF_PID" ]]; then
        kill -INT "$PERF_PID" 2>/dev/null || true
        wait "$PERF_PID" 2>/dev/null || true
        PERF_PID=""
        local out="${SCALE_PERF_OUT:-/tmp/control_scale.perf.txt}.$mode"
        # Inclusive ("Children") and own ("Self") share of the samples, per function.
        perf report -i "$dir/perf.data" --children --sort symbol -g none --percent-limit 1 --stdio \
            >"$out" 2>/dev/null || true
        echo "perf report: $out" >&2
    fi
    stop_all
    case $status in
        0) ;;
        124 | 130) echo "$mode: the benchmark did not finish within $TIMEOUT s" >&2 ;;
        3) echo "$mode: the benchmark ran; at least one target was missed (see above)" >&2 ;;
        *) echo "$mode: the benchmark failed (exit $status)" >&2 ;;
    esac
    return "$status"
}

EXTRA=("$@")
overall=0
for mode in $MODES; do
    case $mode in
        embedded | etcd) ;;
        *) echo "unknown mode $mode in SCALE_MODES (embedded, etcd)" >&2; exit 2 ;;
    esac
    run_mode "$mode" || { s=$?; [[ $overall == 0 || $overall == 3 ]] && overall=$s; }
done

# The modes side by side: the example's "figure:" lines.
echo
printf '%-44s' "figure"
for mode in $MODES; do printf '%16s' "$mode"; done
echo
first=$(set -- $MODES; echo "$1")
grep '^figure: ' "$TMP/$first.out" 2>/dev/null | cut -d'|' -f1 | sed 's/^figure: //' | while read -r name; do
    printf '%-44s' "$name"
    for mode in $MODES; do
        v=$(grep -F "figure: $name|" "$TMP/$mode.out" 2>/dev/null | cut -d'|' -f2 || true)
        printf '%16s' "${v:--}"
    done
    echo
done
exit "$overall"
