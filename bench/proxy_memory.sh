#!/usr/bin/env bash
# bench/proxy_memory.sh — resident memory of one sidecar pair, idle and holding connections.
#
# Starts a control plane, `bulkhead sample-app`, a server-side sidecar in front of it
# (--inbound/--app) and a client-side sidecar whose upstream listener leads there over mTLS
# (the same setup as bench/mesh_pair.sh, on ports picked by the kernel). Then it reads VmRSS
# and VmHWM from /proc/PID/status of both proxies in three states:
#
#   idle    after start, once both have their first configuration, before any traffic
#   open    with MEM_CONNS (default 1,000) client connections open through the pair: each
#           plain HTTP/1.1 keep-alive connection to the client proxy has completed one
#           `GET /` and is held open, so the client proxy holds 1,000 downstream and 1,000
#           upstream (mTLS) connections, and the server proxy 1,000 inbound mTLS connections
#           and 1,000 connections to the app
#   closed  after the client has closed all of them and the proxies have released them
#
# Issue targets (per proxy): under 10 MiB idle, under 30 MiB with 1,000 open connections.
#
# Both proxies run with --header-read-timeout-secs 300: the default of 10 s also closes idle
# keep-alive connections waiting for their next request head, which would close the first
# connections before the last ones are open.
#
# Usage (from the repository root):
#   bash bench/proxy_memory.sh
#
# Environment:
#   BULKHEAD_BIN_DIR  directory holding `bulkhead` and `bulkhead-proxy` (default
#                     target/release; built with `cargo build --release --bins` if missing)
#   MEM_BUILD         set to 1 to run `cargo build --release --bins` even if binaries exist
#   MEM_CONNS         connections to hold open (default 1000)
#   MEM_SETTLE        seconds to wait before each reading (default 2)
#   MEM_KEEP          set to 1 to keep the work directory (logs, tokens) after the run
#
# Exit status: 0 if both targets were met by both proxies, 3 if a target was missed, other
# non-zero if the benchmark itself failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CONNS="${MEM_CONNS:-1000}"
SETTLE="${MEM_SETTLE:-2}"
IDLE_TARGET_MIB=10
OPEN_TARGET_MIB=30

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
bench_bins MEM_BUILD

# Per proxy: 2 sockets per client connection; the client script and the app: 1 each.
want_fds=$((2 * CONNS + 256))
if (($(ulimit -n) < want_fds)); then
    ulimit -n "$want_fds" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fi
if (($(ulimit -n) < want_fds)); then
    echo "ulimit -n is $(ulimit -n) (hard $(ulimit -Hn)); $want_fds needed for $CONNS connections" >&2
    exit 1
fi

bench_workdir bulkhead-mem MEM_KEEP

export BULKHEAD_LOG=${BULKHEAD_LOG:-warn}   # no per-request decision log

start_control

# The pair's policy mirrors the HAProxy pair's rule: only the client's SPIFFE ID, GET or HEAD.
cp "$ROOT/bench/pair_policy.yaml" "$W/policy.yaml"
"$BIN/bulkhead" apply -f "$W/policy.yaml" >/dev/null 2>"$W/apply.log" || fail "bulkhead apply failed"
"$BIN/bulkhead" token create --identity spiffe://bench.local/ns/default/sa/server >"$W/server.token"
"$BIN/bulkhead" token create --identity spiffe://bench.local/ns/default/sa/client >"$W/client.token"

start_sample_app server

limits=(--header-read-timeout-secs 300)
common=(--control "$CONTROL" --trust-bundle "$W/data/ca.pem" --admin 127.0.0.1:0 "${limits[@]}")
server_args=("${common[@]}" --token-file "$W/server.token" --inbound 127.0.0.1:0 --app "$APP" --port 8080
    --ready-file "$W/server-proxy.json")
"$BIN/bulkhead-proxy" "${server_args[@]}" 2>"$W/server-proxy.log" &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
wait_for "$W/server-proxy.json" "$SERVER_PID" "the server proxy"
INBOUND=$(json "$W/server-proxy.json" 'j["inbound"]')

client_args=("${common[@]}" --token-file "$W/client.token"
    --upstream "name=server,listen=127.0.0.1:0,address=$INBOUND,identity=spiffe://bench.local/ns/default/sa/server,port=8080,workload=default/server"
    --ready-file "$W/client-proxy.json")
"$BIN/bulkhead-proxy" "${client_args[@]}" 2>"$W/client-proxy.log" &
CLIENT_PID=$!
PIDS+=("$CLIENT_PID")
wait_for "$W/client-proxy.json" "$CLIENT_PID" "the client proxy"
UPSTREAM=$(json "$W/client-proxy.json" 'j["upstreams"]["server"]')

# One reading of both proxies: "state|clientRSS|serverRSS|clientHWM|serverHWM|clientFDs|serverFDs" (kB).
status_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
ROWS=()
SPLIT=()
measure() {
    kill -0 "$CLIENT_PID" 2>/dev/null || fail "the client proxy died"
    kill -0 "$SERVER_PID" 2>/dev/null || fail "the server proxy died"
    ROWS+=("$1|$(status_kb "$CLIENT_PID" VmRSS)|$(status_kb "$SERVER_PID" VmRSS)|$(status_kb "$CLIENT_PID" VmHWM)|$(status_kb "$SERVER_PID" VmHWM)|$(fds "$CLIENT_PID")|$(fds "$SERVER_PID")")
    SPLIT+=("$1|$(status_kb "$CLIENT_PID" RssAnon)|$(status_kb "$CLIENT_PID" RssFile)|$(status_kb "$SERVER_PID" RssAnon)|$(status_kb "$SERVER_PID" RssFile)|$(status_kb "$CLIENT_PID" Threads)|$(status_kb "$SERVER_PID" Threads)")
}

log "pair up: control $CONTROL, app $APP, server proxy pid $SERVER_PID on $INBOUND, client proxy pid $CLIENT_PID on $UPSTREAM"
sleep "$SETTLE"
measure idle
log "idle reading taken; opening $CONNS connections"
idle_fds_client=$(fds "$CLIENT_PID")
idle_fds_server=$(fds "$SERVER_PID")

# The client: opens CONNS keep-alive connections one after another, each completing one
# GET (head and body read), writes $W/open when all are open, holds them until $W/close
# exists, then checks how many the proxy still had open and closes them all.
python3 - "$UPSTREAM" "$CONNS" "$W" >"$W/client.out" 2>"$W/client.log" <<'PY' &
import os, socket, sys, time

host, port = sys.argv[1].rsplit(":", 1)
n, work = int(sys.argv[2]), sys.argv[3]
req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def read_response(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip().lower()
    if "content-length" in headers:
        left = int(headers["content-length"]) - len(rest)
        while left > 0:
            chunk = s.recv(min(left, 65536))
            if not chunk:
                raise ConnectionError("closed during the body")
            left -= len(chunk)
    elif "chunked" in headers.get("transfer-encoding", ""):
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the body")
            rest += chunk
    if "close" in headers.get("connection", ""):
        raise ConnectionError(f"status {status} with Connection: close")
    return status


socks, statuses = [], {}
t0 = time.monotonic()
for i in range(n):
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(req)
    st = read_response(s)
    statuses[st] = statuses.get(st, 0) + 1
    socks.append(s)
elapsed = time.monotonic() - t0
print(f"opened {n} connections in {elapsed:.1f} s; statuses {statuses}", flush=True)
with open(os.path.join(work, "open.tmp"), "w") as f:
    f.write(f"{elapsed:.1f}\n")
os.rename(os.path.join(work, "open.tmp"), os.path.join(work, "open"))

deadline = time.monotonic() + 600
while not os.path.exists(os.path.join(work, "close")) and time.monotonic() < deadline:
    time.sleep(0.05)

alive = 0
for s in socks:
    s.setblocking(False)  # with a timeout set, recv would first wait for data
    try:
        alive += s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print(f"still open when told to close: {alive}/{n}", flush=True)
for s in socks:
    s.close()
PY
PY_PID=$!
PIDS+=("$PY_PID")
for _ in $(seq 900); do
    [[ -s $W/open ]] && break
    kill -0 "$PY_PID" 2>/dev/null || fail "the client script failed: $(tail -n 3 "$W/client.log")"
    sleep 0.1
done
[[ -s $W/open ]] || fail "the client script did not open $CONNS connections within 90 s"
open_secs=$(cat "$W/open")
log "all $CONNS open after $open_secs s"
sleep "$SETTLE"
measure open
log "open reading taken; closing"
open_fds_client=$(fds "$CLIENT_PID")
open_fds_server=$(fds "$SERVER_PID")

touch "$W/close"
wait "$PY_PID" || fail "the client script failed while closing: $(tail -n 3 "$W/client.log")"
# Until the proxies have let go of the connections (their fd counts back near idle), at most 30 s.
for _ in $(seq 300); do
    (($(fds "$CLIENT_PID") <= idle_fds_client + 16 && $(fds "$SERVER_PID") <= idle_fds_server + 16)) && break
    sleep 0.1
done
sleep "$SETTLE"
measure closed
log "closed reading taken"

mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
echo
echo "## bulkhead-proxy memory: $CONNS keep-alive HTTP/1.1 connections through one sidecar pair"
echo
echo "Run: \`bash bench/proxy_memory.sh\` (MEM_CONNS=$CONNS, MEM_SETTLE=$SETTLE), $(date -u +%Y-%m-%dT%H:%MZ)," \
    "revision $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- crates 2>/dev/null || echo ' + uncommitted changes'), nproc $(nproc), ulimit -n $(ulimit -n)"
echo "Binaries: $BIN (bulkhead-proxy built $(date -u -r "$BIN/bulkhead-proxy" +%Y-%m-%dT%H:%MZ))"
echo
echo "| state | client proxy RSS MiB | server proxy RSS MiB | client VmHWM MiB | server VmHWM MiB | open fds client / server |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
for row in "${ROWS[@]}"; do
    IFS='|' read -r state crss srss chwm shwm cfd sfd <<<"$row"
    echo "| $state | $(mib "$crss") | $(mib "$srss") | $(mib "$chwm") | $(mib "$shwm") | $cfd / $sfd |"
done
echo
echo "Of which (RssAnon: heap and stacks; RssFile: mapped pages of the executable and libraries):"
echo
echo "| state | client RssAnon / RssFile MiB | server RssAnon / RssFile MiB | threads client / server |"
echo "| --- | ---: | ---: | ---: |"
for row in "${SPLIT[@]}"; do
    IFS='|' read -r state ca cf sa sf ct st <<<"$row"
    echo "| $state | $(mib "$ca") / $(mib "$cf") | $(mib "$sa") / $(mib "$sf") | $ct / $st |"
done
echo
echo "- Opening the connections took $open_secs s, one at a time; $(head -n 1 "$W/client.out" | sed 's/.*; //')."
alive_line=$(tail -n 1 "$W/client.out")
if [[ $alive_line == *" $CONNS/$CONNS" ]]; then
    echo "- All $CONNS connections were still open when the client closed them."
else
    echo "- **${alive_line^}** (the rest had been closed by a proxy or the app)."
fi
echo "- Both proxies ran with \`--header-read-timeout-secs 300\` (default 10 s, which also closes"
echo "  idle keep-alive connections); other limits at their defaults (--max-connections 10000)."
echo "- VmHWM is the peak RSS since the process started. Readings are taken $SETTLE s after each state is reached."
echo
echo "Commands (W=$W, BULKHEAD_LOG=$BULKHEAD_LOG):"
echo
echo '```'
echo "bulkhead-proxy ${server_args[*]}" | sed "s|$W|\$W|g; s|$BIN/||g"
echo "bulkhead-proxy ${client_args[*]}" | sed "s|$W|\$W|g; s|$BIN/||g"
echo '```'
echo

status=0
verdict() {   # verdict WHAT KB TARGET_MIB
    if (($2 < $3 * 1024)); then
        echo "- $1: $(mib "$2") MiB, target under $3 MiB: met"
    else
        echo "- $1: $(mib "$2") MiB, target under $3 MiB: **missed**"
        status=3
    fi
}
IFS='|' read -r _ idle_c idle_s _ <<<"${ROWS[0]}"
IFS='|' read -r _ open_c open_s _ <<<"${ROWS[1]}"
echo "Targets:"
verdict "client proxy idle" "$idle_c" "$IDLE_TARGET_MIB"
verdict "server proxy idle" "$idle_s" "$IDLE_TARGET_MIB"
verdict "client proxy, $CONNS open" "$open_c" "$OPEN_TARGET_MIB"
verdict "server proxy, $CONNS open" "$open_s" "$OPEN_TARGET_MIB"
if ((open_fds_client < idle_fds_client + 2 * CONNS || open_fds_server < idle_fds_server + 2 * CONNS)); then
    echo "warning: fewer open sockets than expected at the 'open' reading (client $open_fds_client," \
        "server $open_fds_server; expected about idle + $((2 * CONNS)) each)" >&2
fi
exit "$status"
