#!/usr/bin/env bash
# bench/request_cost.sh — where one request's cost goes in each sidecar (issue #19): machine
# instructions per request (valgrind's callgrind) and system calls per request (strace), over a
# fixed number of requests, so the figures do not depend on how busy the machine is.
#
# Setup, as bench/proxy_memory.sh (and bench/mesh_pair.sh, on ports the kernel picks): a control
# plane with bench/pair_policy.yaml, `bulkhead sample-app` as the app, a server-side sidecar in
# front of it (--inbound/--app) and a client-side sidecar whose upstream listener leads there
# over mTLS. Loopback only. The proxies log at `warn`, as in bench/peer.sh; flow reporting is at
# its default.
#
# Load: one client (Python's http.client, one keep-alive HTTP/1.1 connection, one request at a
# time) sends WARMUP `GET $REQ_PATH` (not counted), then REQUESTS more (the measured window);
# every answer must be a 200 from the app. One request in flight at a time is the worst case
# for system calls (nothing to batch); it is also what makes the count per request exact.
# RC_CONNS=N runs N such connections at once instead.
#
# Two runs, each with a fresh pair of sidecars:
#   callgrind  both sidecars under `valgrind --tool=callgrind`. Before the window both
#              profiles are zeroed (`callgrind_control -z`, which reaches a proxy blocked in
#              epoll_wait through vgdb), then dumped empty (`-d`: what the two control calls
#              themselves leave in a window, shown as "empty window"), and dumped again after
#              the last request: that dump is the window. Ir per request = the window's total
#              Ir / REQUESTS, start-up and warm-up excluded. Top functions by inclusive and by
#              self cost come from callgrind_annotate on that dump.
#   strace     both sidecars run natively; `strace -c -f -p PID` attaches to every thread of
#              each just before the window and is stopped (SIGINT) just after; its calls and
#              errors per kind, divided by REQUESTS.
# Instruction counts repeat to within about 2 % from run to run (the keys, the TLS nonces
# and the timer wake-ups differ). The window starts at least 15 s after the client proxy was
# ready, once both flow reporters have dialled the control plane for their first report (a
# TLS handshake); callgrind runs the code about 50× slower, so later timer-driven work (a
# flow report every 10 s, on the connection already open) weighs a little more there than at
# full speed. Under valgrind, aws-lc sees valgrind's CPU (AVX2, AES-NI, no AVX-512) and picks
# its code paths for it. glibc copies over 2 KiB with `rep movsb`, which valgrind counts once
# per byte. strace slows every system call, which changes nothing when one request is in
# flight at a time.
#
# valgrind and strace are bench-only tools: installed here with apt-get when missing, never
# needed by dev/test or CI.
#
# Usage (from the repository root):
#   bash bench/request_cost.sh            # prints a Markdown report on stdout
#
# Environment:
#   REQUESTS WARMUP   measured requests and warm-up requests (default 2000, 200)
#   REQ_PATH          the path requested (default /orders/42)
#   RC_RUNS           which runs: "callgrind strace" (default), or one of them
#   RC_TOP            how many functions to list (default 15)
#   RC_CONNS          client connections sending at once (default 1), each one request at a
#                     time, sharing REQUESTS and WARMUP between them: with more than one,
#                     requests are in flight together and the sidecars can batch them on
#                     their shared connection (run with RC_RUNS=strace to see it)
#   BULKHEAD_BIN_DIR  directory holding `bulkhead` and `bulkhead-proxy` (default
#                     target/release, built with `cargo build --release -p bulkhead-proxy
#                     -p bulkhead-cli` if missing; RC_BUILD=1 builds anyway)
#   RC_KEEP=1         keep the work directory (logs, callgrind dumps, strace summaries)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
REQUESTS=${REQUESTS:-2000}
WARMUP=${WARMUP:-200}
REQ_PATH=${REQ_PATH:-/orders/42}
CONNS=${RC_CONNS:-1}
RUNS=${RC_RUNS:-callgrind strace}
TOP=${RC_TOP:-15}

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need valgrind || ! need callgrind_control || ! need callgrind_annotate || ! need strace; then
    log "installing valgrind and strace (bench-only tools)"
    apt-get install -y valgrind strace >&2 || fail "cannot install valgrind and strace"
fi

bench_bins RC_BUILD
bench_workdir bulkhead-cost RC_KEEP
export BULKHEAD_LOG=${BULKHEAD_LOG:-warn}   # no per-request decision log

start_control
cp "$ROOT/bench/pair_policy.yaml" "$W/policy.yaml"
"$BIN/bulkhead" apply -f "$W/policy.yaml" >/dev/null 2>"$W/apply.log" || fail "bulkhead apply failed"

start_sample_app server


# start_pair RUN [WRAPPER…]: a server and a client sidecar, each run through WRAPPER (with
# %s in it replaced by the side's name); sets SERVER_PID, CLIENT_PID, UPSTREAM.
start_pair() {
    local run=$1 side
    shift
    for side in server client; do
        "$BIN/bulkhead" token create --identity "spiffe://bench.local/ns/default/sa/$side" \
            >"$W/$run-$side.token"
    done
    local wrap=("$@")
    common=(--control "$CONTROL" --trust-bundle "$W/data/ca.pem" --admin 127.0.0.1:0)
    server_args=("${common[@]}" --token-file "$W/$run-server.token" --inbound 127.0.0.1:0 --app "$APP"
        --port 8080 --ready-file "$W/$run-server.json")
    "${wrap[@]//%s/server}" "$BIN/bulkhead-proxy" "${server_args[@]}" 2>"$W/$run-server.log" &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_for "$W/$run-server.json" "$SERVER_PID" "the server proxy ($run)" 300  # room for valgrind's start-up
    local inbound
    inbound=$(json "$W/$run-server.json" 'j["inbound"]')
    client_args=("${common[@]}" --token-file "$W/$run-client.token"
        --upstream "name=server,listen=127.0.0.1:0,address=$inbound,identity=spiffe://bench.local/ns/default/sa/server,port=8080,workload=default/server"
        --ready-file "$W/$run-client.json")
    "${wrap[@]//%s/client}" "$BIN/bulkhead-proxy" "${client_args[@]}" 2>"$W/$run-client.log" &
    CLIENT_PID=$!
    PIDS+=("$CLIENT_PID")
    wait_for "$W/$run-client.json" "$CLIENT_PID" "the client proxy ($run)" 300  # room for valgrind's start-up
    CLIENT_READY=$SECONDS
    UPSTREAM=$(json "$W/$run-client.json" 'j["upstreams"]["server"]')
}

stop_pair() {
    stop_pid "$CLIENT_PID"
    stop_pid "$SERVER_PID"
}

# start_load RUN: the client; it sends the warm-up, writes $W/RUN.warm, waits for $W/RUN.go,
# sends the measured requests, writes $W/RUN.done, and closes its connection and exits once
# $W/RUN.quit exists. Sets LOAD_PID.
start_load() {
    python3 - "$UPSTREAM" "$REQ_PATH" "$WARMUP" "$REQUESTS" "$W/$1" "$CONNS" >"$W/$1-load.out" 2>"$W/$1-load.log" <<'PY' &
import http.client, os, sys, threading, time

host, port = sys.argv[1].rsplit(":", 1)
path, warmup, requests, base = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
conns = int(sys.argv[6])
sizes = set()
failures = []
finished = 0
lock = threading.Lock()
warm = threading.Barrier(conns + 1)
go, all_done, quit_ = threading.Event(), threading.Event(), threading.Event()


def send(conn, n):
    for _ in range(n):
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or resp.will_close:
            raise SystemExit(f"status {resp.status} (close: {resp.will_close}): {body[:200]!r}")
        sizes.add(len(body))


def share(total, i):
    return total // conns + (1 if i < total % conns else 0)


def client(i):
    # Each connection sends its share of the warm-up and of the window, one request at a
    # time; with several connections, their requests are in flight together.
    global finished
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        send(conn, share(warmup, i))
        warm.wait()
        go.wait()
        send(conn, share(requests, i))
    except BaseException as e:
        failures.append(e)
        warm.abort()
        all_done.set()
        return
    with lock:
        finished += 1
        if finished == conns:
            all_done.set()
    # The connection stays open until the counts are taken, so its close is not in them.
    quit_.wait()
    conn.close()


def mark(name):
    with open(base + "." + name + ".tmp", "w") as f:
        f.write("1\n")
    os.rename(base + "." + name + ".tmp", base + "." + name)


threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(conns)]
for t in threads:
    t.start()
try:
    warm.wait()
except threading.BrokenBarrierError:
    raise SystemExit(f"a client failed in the warm-up: {failures[0] if failures else '?'}")
mark("warm")
while not os.path.exists(base + ".go"):
    time.sleep(0.02)
t0 = time.monotonic()
go.set()
all_done.wait()
if failures:
    raise SystemExit(f"a client failed: {failures[0]}")
elapsed = time.monotonic() - t0
print(f"{requests} requests over {conns} connection(s) in {elapsed:.2f} s; response bodies {sorted(sizes)} bytes", flush=True)
mark("done")
while not os.path.exists(base + ".quit"):
    time.sleep(0.02)
quit_.set()
for t in threads:
    t.join(timeout=5)
PY
    LOAD_PID=$!
    PIDS+=("$LOAD_PID")
}

# await_mark RUN NAME: until $W/RUN.NAME exists; fails if the client exits first.
await_mark() {
    for _ in $(seq 36000); do
        [[ -e $W/$1.$2 ]] && return 0
        kill -0 "$LOAD_PID" 2>/dev/null || fail "the client failed: $(tail -n 3 "$W/$1-load.log")"
        sleep 0.05
    done
    fail "the client did not reach '$2' within 30 minutes"
}

# settle_reporter: until the flow reporters' first reports are behind both proxies. A
# reporter starts just before its proxy has its configuration (the ready file), reports one
# interval (10 s) later, and dials the control plane for it (a TLS handshake, about 3 million
# Ir under callgrind: 1.5 k per request if it fell in the window); later reports reuse that
# connection. So the window starts at least 15 s after the client proxy (the later one) was
# ready.
settle_reporter() {
    local left=$((CLIENT_READY + 15 - SECONDS))
    if ((left > 0)); then
        log "waiting $left s for the flow reporters' first reports (they dial the control plane)"
        sleep "$left"
    fi
}

# cg_dump_file SIDE N: the Nth dump callgrind wrote for SIDE.
cg_dump_file() { ls "$W"/cg-"$1".*."$2" 2>/dev/null | head -n 1; }
cg_total() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }

run_callgrind() {
    log "callgrind run: starting the pair under valgrind"
    start_pair callgrind valgrind --tool=callgrind --dump-instr=no --vgdb=yes \
        "--callgrind-out-file=$W/cg-%s.%p" --log-file="$W/valgrind-%s.log"
    start_load callgrind
    await_mark callgrind warm
    settle_reporter
    log "callgrind run: warm-up done; zeroing, dumping an empty window"
    local pid
    for pid in "$SERVER_PID" "$CLIENT_PID"; do
        callgrind_control -z "$pid" >>"$W/callgrind_control.log" 2>&1 || fail "callgrind_control -z $pid failed"
    done
    for pid in "$SERVER_PID" "$CLIENT_PID"; do
        callgrind_control -d empty "$pid" >>"$W/callgrind_control.log" 2>&1 || fail "callgrind_control -d $pid failed"
    done
    touch "$W/callgrind.go"
    await_mark callgrind done
    for pid in "$SERVER_PID" "$CLIENT_PID"; do
        callgrind_control -d window "$pid" >>"$W/callgrind_control.log" 2>&1 || fail "callgrind_control -d $pid failed"
    done
    touch "$W/callgrind.quit"
    log "callgrind run: $(cat "$W/callgrind-load.out")"
    CG_LOAD=$(cat "$W/callgrind-load.out")
    stop_pair
}

run_strace() {
    log "strace run: starting the pair"
    start_pair strace
    start_load strace
    await_mark strace warm
    settle_reporter
    local side pid spids=()
    for side in server client; do
        pid=$SERVER_PID
        [[ $side == client ]] && pid=$CLIENT_PID
        strace -c -f -p "$pid" -o "$W/strace-$side.txt" 2>"$W/strace-$side.log" &
        spids+=($!)
        PIDS+=($!)
        # Until every thread of the proxy is traced.
        for _ in $(seq 100); do
            ! grep -qs '^TracerPid:[[:space:]]*0$' /proc/"$pid"/task/*/status && break
            sleep 0.05
        done
    done
    touch "$W/strace.go"
    await_mark strace done
    for pid in "${spids[@]}"; do kill -INT "$pid"; done
    for pid in "${spids[@]}"; do wait "$pid" || true; done
    touch "$W/strace.quit"
    log "strace run: $(cat "$W/strace-load.out")"
    ST_LOAD=$(cat "$W/strace-load.out")
    stop_pair
}

CG_LOAD="" ST_LOAD=""
for run in $RUNS; do
    case $run in
        callgrind) run_callgrind ;;
        strace) run_strace ;;
        *) fail "unknown run '$run' in RC_RUNS" ;;
    esac
done

per() { awk -v a="$1" -v n="$REQUESTS" 'BEGIN {printf "%.2f", a / n}'; }
commify() { echo "$1" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'; }

echo
echo "## Per-request cost: $REQUESTS keep-alive HTTP/1.1 GETs over $CONNS connection(s) through one sidecar pair"
echo
echo "Run: \`bash bench/request_cost.sh\` (REQUESTS=$REQUESTS, WARMUP=$WARMUP, REQ_PATH=$REQ_PATH, RC_CONNS=$CONNS)," \
    "$(date -u +%Y-%m-%dT%H:%MZ), revision $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- crates Cargo.toml 2>/dev/null || echo ' + uncommitted changes')"
echo "Binaries: $BIN (bulkhead-proxy built $(date -u -r "$BIN/bulkhead-proxy" +%Y-%m-%dT%H:%MZ)," \
    "$(stat -c %s "$BIN/bulkhead-proxy") bytes)"
echo

if [[ -n $CG_LOAD ]]; then
    echo "### Instructions (callgrind)"
    echo
    echo "Client: $CG_LOAD (under valgrind)."
    echo
    echo "| sidecar | Ir in the window | Ir per request | empty window Ir |"
    echo "| --- | ---: | ---: | ---: |"
    for side in client server; do
        win=$(cg_dump_file "$side" 2)
        empty=$(cg_dump_file "$side" 1)
        [[ -n $win && -n $empty ]] || fail "no callgrind dumps for the $side proxy"
        t=$(cg_total "$win")
        e=$(cg_total "$empty")
        echo "| $side | $(commify "$t") | **$(commify "$(per "$t" | cut -d. -f1)")** | $(commify "$e") |"
    done
    # Self cost grouped by area (crate, or libc's memcpy and malloc); it sums to the total.
    for side in client server; do
        callgrind_annotate --inclusive=no --threshold=100 --auto=no "$(cg_dump_file "$side" 2)" \
            >"$W/self-$side.txt" 2>/dev/null || fail "callgrind_annotate failed on the $side dump"
        python3 - "$REQUESTS" "$W/self-$side.txt" >"$W/areas-$side.tsv" <<'PY'
import re, sys
n = int(sys.argv[1])
line_re = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*?):(.*?)(?: \[(.*)\])?$")
areas = {}
total = 0
started = False
prog = None
for line in open(sys.argv[2], errors="replace"):
    if "PROGRAM TOTALS" in line:
        prog = int(line.split()[0].replace(",", ""))
        continue
    if "file:function" in line:
        started = True
        continue
    if not started:
        continue
    m = line_re.match(line.rstrip("\n"))
    if not m:
        continue
    ir = int(m.group(1).replace(",", ""))
    path, fn, obj = m.group(2), m.group(3), m.group(4) or ""
    # The frames every request ran under are listed with the whole window's cost when the
    # dump is taken mid-run; they are not self cost.
    if ir == prog:
        continue
    crate = None
    mm = re.search(r"/registry/src/[^/]+/([A-Za-z0-9_\-]+?)-\d+\.\d+[^/]*/", path)
    if mm:
        crate = mm.group(1)
    mm = re.search(r"/crates/([a-z\-]+)/src/", path)
    if mm:
        crate = "bulkhead-" + mm.group(1)
    head = fn.lstrip("<").split("::")[0]
    if "/aws-lc/" in path or fn.startswith(("aws_lc", "_aesni", "__ecp", "aead_aes", "ecp_")):
        area = "TLS crypto (aws-lc: AES-GCM, GHASH, and any handshake)"
    elif fn.startswith(("__mem", "memcpy", "memmove", "memset", "__memset", "__memcmp", "__memmove")):
        area = "libc memcpy/memmove/memset/memcmp"
    elif fn.startswith(("malloc", "free", "_int_", "realloc", "calloc", "cfree", "tcache", "__libc_malloc", "__libc_free", "__libc_realloc", "unlink_chunk", "malloc_consolidate")):
        area = "allocator (glibc malloc/free)"
    elif "core::hash::sip" in fn:
        area = "SipHash (std HashMap keys, flow fingerprints)"
    elif head in ("rustls", "tokio_rustls") or crate in ("rustls", "tokio-rustls"):
        area = "rustls (records, buffers)"
    elif head == "h2" or crate == "h2":
        area = "h2 (HTTP/2 framing, HPACK, streams)"
    elif head in ("hyper", "hyper_util") or crate in ("hyper", "hyper-util"):
        area = "hyper (HTTP/1 parse and encode, dispatch, client pool)"
    elif head == "http" or crate in ("http", "httparse"):
        area = "http (HeaderMap, header names)"
    elif head == "httparse":
        area = "http (HeaderMap, header names)"
    elif head == "tokio" or crate == "tokio":
        area = "tokio (tasks, I/O driver, timers, channels)"
    elif head in ("prometheus_client",) or crate == "prometheus-client":
        area = "metrics (prometheus-client)"
    elif head.startswith("bulkhead_") or (crate or "").startswith("bulkhead-"):
        area = (crate or head.replace("_", "-")) + " (own code, with what it inlines)"
    elif head == "tracing" or head.startswith("tracing_") or (crate or "").startswith("tracing"):
        area = "tracing"
    elif obj.endswith(".so.6") or obj.endswith(".so.2") or ".so" in obj:
        area = "other libc / kernel entry (syscall wrappers)"
    else:
        area = "other: " + (crate or head)
    areas[area] = areas.get(area, 0) + ir
    total += ir
rows = sorted(areas.items(), key=lambda kv: -kv[1])
big = [(a, v) for a, v in rows if v / total >= 0.01]
rest = total - sum(v for _, v in big)
for a, v in big:
    print(f"{a}\t{v / n:.0f}\t{100 * v / total:.1f}")
print(f"everything else\t{rest / n:.0f}\t{100 * rest / total:.1f}")
print(f"sum of self costs\t{total / n:.0f}\t{100 * total / prog:.1f}")
PY
    done
    echo
    echo "Self cost by area (Ir per request, % of the sidecar's total; areas under 1 % in \"everything else\"):"
    echo
    echo "| sidecar | area | Ir/request | % |"
    echo "| --- | --- | ---: | ---: |"
    for side in client server; do
        while IFS=$'\t' read -r area ir pct; do
            echo "| $side | $area | $(commify "$ir") | $pct |"
        done <"$W/areas-$side.tsv"
    done
    for side in client server; do
        win=$(cg_dump_file "$side" 2)
        t=$(cg_total "$win")
        for mode in inclusive self; do
            echo
            echo "Top $TOP functions of the $side proxy by $mode cost (Ir per request, % of the window;"
            echo "main and tokio's runtime frames, which every request runs under, left out):"
            echo
            echo "| Ir/request | % | function |"
            echo "| ---: | ---: | --- |"
            incl=no
            [[ $mode == inclusive ]] && incl=yes
            # Frames every request runs under (the runtime, main) are left out of the list.
            { callgrind_annotate --inclusive=$incl --threshold=100 "$win" 2>/dev/null || true; } |
                awk -v n="$REQUESTS" -v t="$t" -v top="$TOP" '
                    /^-+$/ { dashes++; next }
                    dashes >= 4 && /^ *[0-9,]+ / {
                        ir = $1; gsub(",", "", ir)
                        $1 = ""; sub(/^ +/, "")
                        sub(/^\([ 0-9.]+%\) +/, "")        # callgrind_annotate'"'"'s own percentage
                        sub(/ \[[^]]*\]$/, "")             # the object file
                        sub(/^[^:]*:/, "")                 # the source file
                        if ($0 ~ /^(PROGRAM TOTALS|\(below main\)|__libc_start_main|main$|0x[0-9a-f]+$|std::rt::|std::sys::backtrace::|bulkhead_proxy::main|tokio::runtime::)/) next
                        gsub(/\|/, "\\|")
                        if (length($0) > 110) $0 = substr($0, 1, 107) "..."
                        printf "| %d | %.1f | `%s` |\n", ir / n, 100 * ir / t, $0
                        if (++shown >= top) exit
                    }'
        done
    done
    echo
fi

if [[ -n $ST_LOAD ]]; then
    echo "### System calls (strace -c -f)"
    echo
    echo "Client: $ST_LOAD (sidecars traced)."
    echo
    # syscall -> "calls errors" per side, from strace's summary table.
    declare -A calls errs names
    for side in client server; do
        while read -r name c e; do
            calls[$side.$name]=$c
            errs[$side.$name]=$e
            names[$name]=1
        done < <(awk '
            /^-/ || /% time/ || / total$/ { next }
            NF >= 5 {
                name = $NF
                if (NF == 6) { c = $4; e = $5 } else { c = $4; e = 0 }
                print name, c, e
            }' "$W/strace-$side.txt")
    done
    echo "| system call | client: calls/request | client: errors/request | server: calls/request | server: errors/request |"
    echo "| --- | ---: | ---: | ---: | ---: |"
    tc=0 ts=0
    for name in $(for n in "${!names[@]}"; do echo "$(( ${calls[client.$n]:-0} + ${calls[server.$n]:-0} )) $n"; done | sort -rn | awk '{print $2}'); do
        c=${calls[client.$name]:-0} s=${calls[server.$name]:-0}
        tc=$((tc + c)) ts=$((ts + s))
        echo "| $name | $(per "$c") | $(per "${errs[client.$name]:-0}") | $(per "$s") | $(per "${errs[server.$name]:-0}") |"
    done
    echo "| **all** | **$(per "$tc")** | | **$(per "$ts")** | |"
    echo
fi

echo "Commands (W=$W, BULKHEAD_LOG=$BULKHEAD_LOG; callgrind: \`valgrind --tool=callgrind --dump-instr=no\`" \
    "before each, strace: \`strace -c -f -p PID\` during the window):"
echo
echo '```'
echo "bulkhead-proxy ${server_args[*]}" | sed "s|$W|\$W|g; s|$BIN/||g; s|strace-||g; s|callgrind-||g"
echo "bulkhead-proxy ${client_args[*]}" | sed "s|$W|\$W|g; s|$BIN/||g; s|strace-||g; s|callgrind-||g"
echo '```'
