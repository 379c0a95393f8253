# bench/lib.sh — what the benchmark scripts share; sourced, not run.
#
#   bench_bins BUILD_VAR       sets BIN: $BULKHEAD_BIN_DIR, else target/release, built with
#                              cargo when a binary is missing or $BUILD_VAR is 1
#   bench_workdir NAME KEEP_VAR
#                              makes the work directory W and the PIDS list; on exit every
#                              PID is stopped (INT, KILL after 3 s) in reverse order and W is
#                              removed unless $KEEP_VAR is 1; a function bench_on_exit,
#                              if the script defines one, runs after the PIDs are stopped
#   start_control [RUNNER…]    a control plane on loopback with its data in $W/data, run
#                              through RUNNER if given; sets BULKHEAD_CONTEXT and CONTROL
#   wait_for FILE PID WHAT     until FILE is non-empty; fails if PID exits or 30 s pass
#   nginx_conf DIR LISTEN ERRLOG
#                              writes DIR/nginx.conf: one worker on LISTEN serving a 1 KiB
#                              body to every path, temp files in DIR/tmp, errors to ERRLOG
#   start_sample_app NAME      `bulkhead sample-app` NAME on loopback, logging to $W/app.log;
#                              sets APP to its address
#   fail MESSAGE               prints it and the end of every log in W, and exits 1
#   log, json FILE EXPR, free_port, stop_pid PID

log() { echo "[$(date +%T)] $*" >&2; }

fail() {
    echo "ERROR: $1" >&2
    local f
    for f in "${W:-/nonexistent}"/*.log; do
        [[ -s $f ]] || continue
        echo "--- $(basename "$f") (last 15 lines)" >&2
        tail -n 15 "$f" >&2
    done
    exit 1
}

bench_bins() {
    local build_var=$1 b
    if [[ -n "${BULKHEAD_BIN_DIR:-}" ]]; then
        BIN="$(cd "$BULKHEAD_BIN_DIR" && pwd)"
    else
        BIN="$ROOT/target/release"
        if [[ "${!build_var:-0}" == 1 || ! -x "$BIN/bulkhead" || ! -x "$BIN/bulkhead-proxy" ]]; then
            cargo build --release --locked -p bulkhead-proxy -p bulkhead-cli
        fi
        if [[ -n "$(find "$ROOT/crates" -name '*.rs' -newer "$BIN/bulkhead-proxy" -print -quit 2>/dev/null)" ]]; then
            log "warning: sources under crates/ are newer than $BIN/bulkhead-proxy ($build_var=1 rebuilds)"
        fi
    fi
    for b in bulkhead bulkhead-proxy; do
        [[ -x "$BIN/$b" ]] || fail "no executable $BIN/$b (set BULKHEAD_BIN_DIR)"
    done
}

stop_pid() {
    kill -INT "$1" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

bench_workdir() {
    W="$(mktemp -d "/tmp/$1.XXXXXX")"
    BENCH_KEEP_VAR=$2
    PIDS=()
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

bench_cleanup() {
    local status=$? i
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -INT "${PIDS[i]}" 2>/dev/null || true; done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
    # A script's own teardown after its processes (bench/netns_pair.sh: its namespaces).
    if declare -F bench_on_exit >/dev/null; then bench_on_exit; fi
    if [[ "${!BENCH_KEEP_VAR:-0}" == 1 ]]; then
        echo "work directory kept: $W" >&2
    else
        rm -rf "$W"
    fi
    exit "$status"
}

# wait_for FILE PID WHAT [SECONDS]: until FILE is written, failing if PID exits first or
# SECONDS (default 30) pass.
wait_for() {
    local secs=${4:-30}
    for _ in $(seq $((secs * 10))); do
        [[ -s $1 ]] && return 0
        kill -0 "$2" 2>/dev/null || fail "$3 exited during start"
        sleep 0.1
    done
    fail "$3 was not ready within $secs s"
}

# nginx_conf DIR LISTEN ERRLOG: the upstream the pair benchmarks put behind the server sidecar.
nginx_conf() {
    local dir=$1 listen=$2 errlog=$3
    mkdir -p "$dir/www" "$dir/tmp"
    head -c 1024 /dev/zero | tr '\0' x >"$dir/www/body"
    chmod -R a+rX "$dir"
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1; pid $dir/nginx.pid; error_log $errlog warn;
events { worker_connections 8192; }
http {
  access_log off; keepalive_requests 10000000; keepalive_timeout 120s; default_type application/octet-stream;
  client_body_temp_path $dir/tmp; proxy_temp_path $dir/tmp; fastcgi_temp_path $dir/tmp; uwsgi_temp_path $dir/tmp; scgi_temp_path $dir/tmp;
  server { listen $listen; root $dir/www; location / { try_files /body =404; } }
}
EOF
}

start_sample_app() {
    "$BIN/bulkhead" sample-app --name "$1" --listen 127.0.0.1:0 --ready-file "$W/app.json" \
        2>"$W/app.log" &
    PIDS+=($!)
    wait_for "$W/app.json" "${PIDS[-1]}" "the sample app"
    APP=$(json "$W/app.json" 'j["addr"]')
}

# json FILE EXPR: a value from a ready file (EXPR is Python on the parsed object `j`).
json() { python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_control() {
    "$@" "$BIN/bulkhead" control --data-dir "$W/data" --listen 127.0.0.1:0 \
        --trust-domain bench.local 2>"$W/control.log" &
    PIDS+=($!)
    wait_for "$W/data/admin.yaml" "${PIDS[-1]}" "the control plane"
    sleep 0.2   # admin.yaml is written once the listener is up; let the write finish
    export BULKHEAD_CONTEXT=$W/data/admin.yaml
    CONTROL=$(awk '/^server:/{gsub(/"/,"",$2); print $2}' "$BULKHEAD_CONTEXT")
}
