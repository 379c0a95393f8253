//! Transparent capture for real: `bulkhead-proxy init` in network namespaces of a lab, checked
//! with the firewall's own listing and with connections and datagrams, over IPv4 and IPv6,
//! that are, or are not, redirected, dropped or refused.
//!
//! Needs root, iproute2, curl, tcpdump, setpriv and the backend's tools; without them each
//! test skips, or fails under BULKHEAD_STRICT=1. The test process cannot enter a namespace,
//! so the listeners standing in for the proxy and for servers are this test binary, run again
//! inside one ([`listener_in_namespace`]).
#![allow(clippy::unwrap_used)]

use bulkhead_testkit::netns::{Lab, can_run, contains};
use bulkhead_testkit::{Proc, TempDir};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead-proxy");

#[derive(Clone, Copy, Debug)]
enum Backend {
    Iptables,
    Nftables,
}

impl Backend {
    fn flag(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables",
            Backend::Nftables => "nftables",
        }
    }

    fn tools(self) -> &'static [&'static str] {
        match self {
            Backend::Iptables => &[
                "iptables",
                "iptables-save",
                "iptables-restore",
                "ip6tables-save",
                "ip6tables-restore",
            ],
            Backend::Nftables => &["nft"],
        }
    }

    /// What the firewall itself says is installed, one trimmed line each, only our part:
    /// for iptables, `4 ` or `6 ` and the line of `iptables-save` or `ip6tables-save`.
    fn listing(self, lab: &Lab, host: &str) -> Vec<String> {
        match self {
            Backend::Iptables => {
                let mut lines = Vec::new();
                for (family, program) in [("4", "iptables-save"), ("6", "ip6tables-save")] {
                    let (code, out, err) = run(lab, host, program, &[]);
                    assert_eq!(code, 0, "{program}: {err}");
                    lines.extend(
                        out.lines()
                            .filter(|l| l.contains("BULKHEAD"))
                            .map(|l| format!("{family} {l}")),
                    );
                }
                lines
            }
            Backend::Nftables => {
                // The table of earlier versions must be gone too.
                let (code, _, _) = run(lab, host, "nft", &["list", "table", "ip", "bulkhead"]);
                assert_ne!(code, 0, "table ip bulkhead exists");
                let (code, out, _) = run(lab, host, "nft", &["list", "table", "inet", "bulkhead"]);
                if code != 0 {
                    // No table, no rules: `nft list` fails.
                    return Vec::new();
                }
                out.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect()
            }
        }
    }
}

/// Runs `program` in `host`'s namespace; (exit code, stdout, stderr).
fn run(lab: &Lab, host: &str, program: &str, args: &[&str]) -> (i32, String, String) {
    let out = lab
        .command(host, Path::new(program))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} in {host}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `bulkhead-proxy init <args>` in `host`'s namespace, which must succeed.
fn init(lab: &Lab, host: &str, backend: Backend, args: &[&str]) {
    let args: Vec<&str> = ["init", "--backend", backend.flag()]
        .iter()
        .chain(args)
        .copied()
        .collect();
    let (code, out, err) = run(lab, host, BIN, &args);
    assert_eq!(code, 0, "bulkhead-proxy {args:?} failed:\n{out}{err}");
}

fn installs_once_and_removes_cleanly(test: &str, backend: Backend) {
    if !can_run(test, backend.tools()) {
        return;
    }
    let lab = Lab::new(&["pod"]);
    let args = [
        "--proxy-uid",
        "0",
        "--exclude-outbound-ports",
        "5432",
        "--exclude-inbound-ports",
        "2222",
        "--exclude-cidrs",
        "10.96.0.0/12,fd00:96::/64",
        "--control",
        "10.0.0.1:7443",
        "--dns-servers",
        "10.0.0.10,fd00::10",
    ];
    init(&lab, "pod", backend, &args);
    let first = backend.listing(&lab, "pod");
    // The same capture for both families, each with its own addresses, and the filters.
    let expected: &[&str] = match backend {
        Backend::Iptables => &[
            "4 -A PREROUTING -p tcp -j BULKHEAD_INBOUND",
            "4 -A OUTPUT -p tcp -j BULKHEAD_OUTBOUND",
            "4 -A BULKHEAD_INBOUND -i lo -j RETURN",
            "4 -A BULKHEAD_INBOUND -p tcp -m tcp --dport 2222 -j RETURN",
            "4 -A BULKHEAD_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
            "4 -A BULKHEAD_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "4 -A BULKHEAD_OUTBOUND -m owner --uid-owner 0 -j RETURN",
            "4 -A BULKHEAD_OUTBOUND -d 10.0.0.1/32 -p tcp -m tcp --dport 7443 -j RETURN",
            "4 -A BULKHEAD_OUTBOUND -d 10.96.0.0/12 -j RETURN",
            "4 -A BULKHEAD_OUTBOUND -p tcp -m tcp --dport 5432 -j RETURN",
            "4 -A BULKHEAD_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "4 -A INPUT -j BULKHEAD_IN_FILTER",
            "4 -A OUTPUT -j BULKHEAD_OUT_FILTER",
            "4 -A BULKHEAD_OUT_FILTER -o lo -p tcp -m tcp --dport 15000 -m owner ! --uid-owner 0 -m conntrack --ctstate NEW -j REJECT --reject-with tcp-reset",
            "4 -A BULKHEAD_OUT_FILTER -d 10.0.0.10/32 -p udp -m udp --dport 53 -j RETURN",
            "4 -A BULKHEAD_OUT_FILTER -p udp -j DROP",
            "4 -A BULKHEAD_IN_FILTER -p udp -j DROP",
            "6 -A PREROUTING -p tcp -j BULKHEAD_INBOUND",
            "6 -A OUTPUT -p tcp -j BULKHEAD_OUTBOUND",
            "6 -A BULKHEAD_INBOUND -p tcp -m tcp --dport 2222 -j RETURN",
            "6 -A BULKHEAD_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "6 -A BULKHEAD_OUTBOUND -d ::1/128 -j RETURN",
            "6 -A BULKHEAD_OUTBOUND -d fd00:96::/64 -j RETURN",
            "6 -A BULKHEAD_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "6 -A BULKHEAD_OUT_FILTER -d fd00::10/128 -p udp -m udp --dport 53 -j RETURN",
            "6 -A BULKHEAD_OUT_FILTER -p udp -j DROP",
        ],
        Backend::Nftables => &[
            "type nat hook prerouting priority dstnat; policy accept;",
            "iifname \"lo\" return",
            "tcp dport { 2222, 15000 } return",
            "meta l4proto tcp redirect to :15006",
            "meta skuid 0 return",
            "ip6 daddr ::1 return",
            "ip daddr 10.0.0.1 tcp dport 7443 return",
            "ip daddr 10.96.0.0/12 return",
            "ip6 daddr fd00:96::/64 return",
            "tcp dport 5432 return",
            "meta l4proto tcp redirect to :15001",
            "oifname \"lo\" tcp dport 15000 meta skuid != 0 ct state new reject with tcp reset",
            "ip daddr 10.0.0.10 udp dport 53 return",
            "ip6 daddr fd00::10 udp dport 53 return",
            "meta l4proto udp drop",
        ],
    };
    for rule in expected {
        assert!(
            first.iter().any(|l| l == rule),
            "{rule:?} not installed; installed:\n{}",
            first.join("\n")
        );
    }

    init(&lab, "pod", backend, &args);
    assert_eq!(
        backend.listing(&lab, "pod"),
        first,
        "a second init changed the rules"
    );

    init(&lab, "pod", backend, &["--remove"]);
    assert_eq!(backend.listing(&lab, "pod"), Vec::<String>::new());
    init(&lab, "pod", backend, &["--remove"]);
}

#[test]
fn iptables_init_installs_once_and_removes_cleanly() {
    installs_once_and_removes_cleanly(
        "iptables_init_installs_once_and_removes_cleanly",
        Backend::Iptables,
    );
}

#[test]
fn nftables_init_installs_once_and_removes_cleanly() {
    installs_once_and_removes_cleanly(
        "nftables_init_installs_once_and_removes_cleanly",
        Backend::Nftables,
    );
}

/// The uid the app runs as in these tests; the proxy's is [`PROXY_UID`].
const APP_UID: u32 = 65534;
const PROXY_UID: u32 = 1337;

/// `program args…` in `host`'s namespace, as `uid` (root when `None`).
fn as_uid(lab: &Lab, host: &str, uid: Option<u32>, program: &str, args: &[&str]) -> (i32, String) {
    let (code, out, err) = match uid {
        None => run(lab, host, program, args),
        Some(uid) => {
            let ids = [format!("--reuid={uid}"), format!("--regid={uid}")];
            let mut argv: Vec<&str> = vec![&ids[0], &ids[1], "--clear-groups", program];
            argv.extend(args);
            run(lab, host, "setpriv", &argv)
        }
    };
    (code, format!("{out}{err}"))
}

/// What curl got: the body, or its exit code (7: nothing listened where it connected, or
/// the connection was refused).
fn curl_as(
    lab: &Lab,
    from: &str,
    uid: Option<u32>,
    url: &str,
    marker: &str,
) -> Result<String, i32> {
    let header = format!("x-marker: {marker}");
    let (code, out) = as_uid(
        lab,
        from,
        uid,
        "curl",
        &["-sS", "--max-time", "5", "-H", &header, url],
    );
    if code == 0 { Ok(out) } else { Err(code) }
}

fn curl(lab: &Lab, from: &str, url: &str, marker: &str) -> Result<String, i32> {
    curl_as(lab, from, None, url, marker)
}

fn url(ip: IpAddr, port: u16) -> String {
    format!("http://{}/", SocketAddr::new(ip, port))
}

/// Whether a UDP datagram from `from` (as `uid`) to `to` came back from the echo server
/// there within a second: bash's /dev/udp sends it and reads the answer.
fn udp_echoed(lab: &Lab, from: &str, uid: Option<u32>, to: SocketAddr) -> bool {
    let script = format!(
        "exec 3<>/dev/udp/{}/{} && printf probe >&3 && timeout 1 head -c 5 <&3",
        to.ip(),
        to.port()
    );
    let (code, out) = as_uid(lab, from, uid, "bash", &["-c", &script]);
    code == 0 && out == "probe"
}

/// Starts this test binary in `host` as [`listener_in_namespace`]: TCP listeners answering
/// with their label and the original destination (`tcp`: `port=label,…`), UDP echo servers
/// (`udp`: ports); every socket dual-stack. Returns once it listens.
fn listener(lab: &Lab, dir: &TempDir, host: &str, tcp: &str, udp: &str) -> Proc {
    let ready = dir.path().join(format!("{host}-listener.ready"));
    let mut cmd = lab.command(host, &std::env::current_exe().unwrap());
    cmd.args([
        "listener_in_namespace",
        "--exact",
        "--ignored",
        "--nocapture",
    ])
    .env(LISTENER_ENV, &ready)
    .env(TCP_ENV, tcp)
    .env(UDP_ENV, udp);
    let mut listener = Proc::from_command(&format!("{host}-listener"), dir.path(), cmd);
    listener.wait_for_file(&ready, Duration::from_secs(30));
    listener
}

fn redirects_what_it_should_and_nothing_else(test: &str, backend: Backend) {
    let mut needs = vec!["curl", "tcpdump"];
    needs.extend(backend.tools());
    if !can_run(test, &needs) {
        return;
    }
    let lab = Lab::new(&["pod", "peer", "db"]);
    let dir = TempDir::new().unwrap();
    // The stand-in for the proxy, in the pod, on both capture ports (dual-stack).
    let mut listener = listener(&lab, &dir, "pod", "15001=outbound,15006=inbound", "");

    let control = format!("{}:7443", lab.ip("peer"));
    let db_cidrs = format!("{}/32,{}", lab.ip("db"), lab.ip6("db"));
    init(
        &lab,
        "pod",
        backend,
        &[
            "--proxy-uid",
            "1337",
            "--exclude-outbound-ports",
            "9090",
            "--exclude-inbound-ports",
            "2222",
            "--exclude-cidrs",
            &db_cidrs,
            "--control",
            &control,
        ],
    );

    let capture = lab.capture();
    for v6 in [false, true] {
        let (pod, peer, db) = (
            lab.addr("pod", v6),
            lab.addr("peer", v6),
            lab.addr("db", v6),
        );
        // Outbound: everything the app sends goes to the outbound port, its destination
        // intact (IPv6 as IPv6, IPv4 as IPv4 on the same dual-stack listener)…
        assert_eq!(
            curl(&lab, "pod", &url(peer, 8080), "outbound-stays-local"),
            Ok(format!("outbound {}", SocketAddr::new(peer, 8080)))
        );
        // …but for excluded ports, excluded CIDRs and loopback, which go where they were
        // sent (where nothing listens).
        let loopback: IpAddr = if v6 {
            "::1".parse().unwrap()
        } else {
            "127.0.0.1".parse().unwrap()
        };
        for url in [url(peer, 9090), url(db, 8080), url(loopback, 8080)] {
            assert_eq!(curl(&lab, "pod", &url, "x"), Err(7), "{url} was captured");
        }
        // Inbound: from another host to any port but the excluded ones and the admin port.
        assert_eq!(
            curl(&lab, "peer", &url(pod, 8080), "inbound-crosses"),
            Ok(format!("inbound {}", SocketAddr::new(pod, 8080)))
        );
        for port in [2222, 15000] {
            let url = url(pod, port);
            assert_eq!(curl(&lab, "peer", &url, "x"), Err(7), "{url} was captured");
        }
    }
    // The IPv4 control plane is not captured.
    assert_eq!(
        curl(&lab, "pod", &format!("http://{control}/"), "x"),
        Err(7),
        "the control plane was captured"
    );
    let pcap = capture.stop();
    assert!(
        contains(&pcap, b"inbound-crosses"),
        "the capture missed the inbound request"
    );
    assert!(
        !contains(&pcap, b"outbound-stays-local"),
        "a redirected outbound request left the pod"
    );

    // The proxy's own traffic is never captured: re-init with root as the proxy's uid
    // replaces the rules, and curl (root) now reaches the peer directly.
    init(&lab, "pod", backend, &["--proxy-uid", "0"]);
    for v6 in [false, true] {
        let peer = lab.addr("peer", v6);
        assert_eq!(curl(&lab, "pod", &url(peer, 8080), "x"), Err(7));
    }
    listener.assert_running();
}

#[test]
fn iptables_redirects_what_it_should_and_nothing_else() {
    redirects_what_it_should_and_nothing_else(
        "iptables_redirects_what_it_should_and_nothing_else",
        Backend::Iptables,
    );
}

#[test]
fn nftables_redirects_what_it_should_and_nothing_else() {
    redirects_what_it_should_and_nothing_else(
        "nftables_redirects_what_it_should_and_nothing_else",
        Backend::Nftables,
    );
}

/// UDP dropped but DNS to the resolvers, the admin port closed to the app, and IPv6
/// dropped on request; `init --remove` opens everything again.
fn filters_udp_the_admin_port_and_ipv6(test: &str, backend: Backend) {
    let mut needs = vec!["curl", "setpriv", "bash", "timeout", "head"];
    needs.extend(backend.tools());
    if !can_run(test, &needs) {
        return;
    }
    let mut lab = Lab::new(&["pod", "peer", "dns"]);
    let dir = TempDir::new().unwrap();
    let _servers = [
        listener(&lab, &dir, "pod", "15000=admin", "9999,4789"),
        listener(&lab, &dir, "peer", "8080=peer", "9999,4789,53"),
        listener(&lab, &dir, "dns", "", "53"),
    ];
    let resolv = format!(
        "nameserver {}\nnameserver {}\n",
        lab.ip("dns"),
        lab.ip6("dns")
    );
    lab.set_resolv_conf("pod", &resolv);
    let (app, proxy) = (Some(APP_UID), Some(PROXY_UID));
    let uid = PROXY_UID.to_string();
    init(
        &lab,
        "pod",
        backend,
        &["--proxy-uid", &uid, "--allow-udp-ports", "4789"],
    );

    for v6 in [false, true] {
        let at = |host: &str, port| SocketAddr::new(lab.addr(host, v6), port);
        let loopback = SocketAddr::new(if v6 { "::1" } else { "127.0.0.1" }.parse().unwrap(), 9999);
        // UDP out of the app: dropped, but DNS to the resolvers of resolv.conf, ports
        // opened with --allow-udp-ports, and loopback.
        assert!(
            !udp_echoed(&lab, "pod", app, at("peer", 9999)),
            "{v6}: UDP to a neighbour passed"
        );
        assert!(
            !udp_echoed(&lab, "pod", app, at("peer", 53)),
            "{v6}: DNS to a non-resolver passed"
        );
        assert!(
            udp_echoed(&lab, "pod", app, at("dns", 53)),
            "{v6}: DNS to the resolver dropped"
        );
        assert!(
            udp_echoed(&lab, "pod", app, at("peer", 4789)),
            "{v6}: an allowed UDP port dropped"
        );
        assert!(
            udp_echoed(&lab, "pod", app, loopback),
            "{v6}: UDP on loopback dropped"
        );
        // The proxy's uid is not filtered.
        assert!(
            udp_echoed(&lab, "pod", proxy, at("peer", 9999)),
            "{v6}: the proxy's UDP dropped"
        );
        // UDP into the workload: dropped but the allowed port.
        assert!(
            !udp_echoed(&lab, "peer", None, at("pod", 9999)),
            "{v6}: UDP into the pod passed"
        );
        assert!(
            udp_echoed(&lab, "peer", None, at("pod", 4789)),
            "{v6}: an allowed UDP port dropped inbound"
        );

        // The admin port: refused to the app's uid on any local address, open to the
        // proxy's uid and to other hosts (scrapes).
        let pod = lab.addr("pod", v6);
        let lo: IpAddr = loopback.ip();
        for ip in [lo, pod] {
            assert_eq!(
                curl_as(&lab, "pod", app, &url(ip, 15000), "x"),
                Err(7),
                "the app reached the admin port at {ip}"
            );
            let ok = curl_as(&lab, "pod", proxy, &url(ip, 15000), "x");
            assert!(
                ok.as_ref().is_ok_and(|b| b.starts_with("admin")),
                "{ip}: {ok:?}"
            );
        }
        let scrape = curl(&lab, "peer", &url(pod, 15000), "x");
        assert!(
            scrape.as_ref().is_ok_and(|b| b.starts_with("admin")),
            "{scrape:?}"
        );
    }

    // IPv6 dropped but on loopback; UDP and the admin port left open on request.
    init(
        &lab,
        "pod",
        backend,
        &[
            "--proxy-uid",
            &uid,
            "--ipv6",
            "drop",
            "--udp",
            "allow",
            "--allow-app-admin",
        ],
    );
    let peer6 = SocketAddr::new(lab.ip6("peer").into(), 9999);
    let pod6 = SocketAddr::new(lab.ip6("pod").into(), 4789);
    assert!(udp_echoed(
        &lab,
        "pod",
        app,
        SocketAddr::new(lab.ip("peer").into(), 9999)
    ));
    assert!(!udp_echoed(&lab, "pod", app, peer6), "IPv6 UDP out passed");
    assert!(
        !udp_echoed(&lab, "pod", proxy, peer6),
        "IPv6 UDP out passed for the proxy"
    );
    assert!(!udp_echoed(&lab, "peer", None, pod6), "IPv6 UDP in passed");
    assert!(udp_echoed(&lab, "pod", app, "[::1]:9999".parse().unwrap()));
    // IPv6 TCP is neither redirected (nothing listens on 15001 here) nor let out: a
    // timeout, not an answer from the peer.
    let tcp6 = curl_as(&lab, "pod", app, &url(lab.ip6("peer").into(), 8080), "x");
    assert_eq!(tcp6, Err(28), "IPv6 TCP out of the app");
    let admin = curl_as(
        &lab,
        "pod",
        app,
        &url("127.0.0.1".parse().unwrap(), 15000),
        "x",
    );
    assert!(
        admin.as_ref().is_ok_and(|b| b.starts_with("admin")),
        "{admin:?}"
    );

    // Removed: everything passes again.
    init(&lab, "pod", backend, &["--remove"]);
    assert_eq!(backend.listing(&lab, "pod"), Vec::<String>::new());
    assert!(udp_echoed(&lab, "pod", app, peer6));
}

#[test]
fn iptables_filters_udp_the_admin_port_and_ipv6() {
    filters_udp_the_admin_port_and_ipv6(
        "iptables_filters_udp_the_admin_port_and_ipv6",
        Backend::Iptables,
    );
}

#[test]
fn nftables_filters_udp_the_admin_port_and_ipv6() {
    filters_udp_the_admin_port_and_ipv6(
        "nftables_filters_udp_the_admin_port_and_ipv6",
        Backend::Nftables,
    );
}

const LISTENER_ENV: &str = "BULKHEAD_CAPTURE_LISTENER";
const TCP_ENV: &str = "BULKHEAD_CAPTURE_TCP";
const UDP_ENV: &str = "BULKHEAD_CAPTURE_UDP";

/// A dual-stack socket on `[::]:port` (IPv4 arrives as `::ffff:a.b.c.d`).
fn bind_dual(port: u16, kind: socket2::Type) -> socket2::Socket {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, kind, None).unwrap();
    socket.set_only_v6(false).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.set_nonblocking(true).unwrap();
    let addr: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
    socket.bind(&addr.into()).unwrap();
    socket
}

/// Not a test: run inside a namespace by the tests above (with BULKHEAD_CAPTURE_LISTENER
/// naming a ready file), it listens on the TCP ports of BULKHEAD_CAPTURE_TCP (`port=label`,
/// comma-separated) and answers every connection with `<label> <original destination>`, as
/// [`capture::original_dst`] reads it; and echoes every datagram on the UDP ports of
/// BULKHEAD_CAPTURE_UDP.
///
/// [`capture::original_dst`]: bulkhead_proxy::capture::original_dst
#[test]
#[ignore = "a helper the redirection tests run inside a network namespace"]
fn listener_in_namespace() {
    let Some(ready) = std::env::var_os(LISTENER_ENV) else {
        return;
    };
    let list = |var: &str| -> Vec<String> {
        std::env::var(var)
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for spec in list(TCP_ENV) {
            let (port, label) = spec.split_once('=').unwrap();
            let socket = bind_dual(port.parse().unwrap(), socket2::Type::STREAM);
            socket.listen(128).unwrap();
            let listener = tokio::net::TcpListener::from_std(socket.into()).unwrap();
            let label: &'static str = Box::leak(label.to_string().into_boxed_str());
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    tokio::spawn(answer(stream, label));
                }
            });
        }
        for port in list(UDP_ENV) {
            let socket = bind_dual(port.parse().unwrap(), socket2::Type::DGRAM);
            let socket = tokio::net::UdpSocket::from_std(socket.into()).unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 1500];
                loop {
                    let (n, from) = socket.recv_from(&mut buf).await.unwrap();
                    let _ = socket.send_to(&buf[..n], from).await;
                }
            });
        }
        std::fs::write(&ready, "listening").unwrap();
        std::future::pending::<()>().await;
    });
}

async fn answer(mut stream: tokio::net::TcpStream, label: &str) {
    let dst = match bulkhead_proxy::capture::original_dst(&stream) {
        Ok(addr) => addr.to_string(),
        Err(e) => format!("error: {e}"),
    };
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("{label} {dst}");
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// IPv6 is never left open: when its rules cannot be installed (here an ip6tables-restore
/// that fails as on a kernel without IPv6 NAT), init fails, says to pass `--ipv6 drop`, and
/// installs nothing, IPv4 included.
#[test]
fn init_fails_rather_than_leave_ipv6_open() {
    if !can_run(
        "init_fails_rather_than_leave_ipv6_open",
        Backend::Iptables.tools(),
    ) {
        return;
    }
    let lab = Lab::new(&["pod"]);
    let dir = TempDir::new().unwrap();
    let fake = dir.path().join("ip6tables-restore");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"ip6tables-restore v1.8.9: can't initialize ip6tables table 'nat'\" >&2\nexit 2\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = lab
        .command("pod", Path::new(BIN))
        .args(["init", "--proxy-uid", "1337"])
        .env("PATH", &path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`ip6tables-restore --noflush` failed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("can't initialize ip6tables table 'nat'"),
        "{stderr}"
    );
    assert!(stderr.contains("pass --ipv6 drop"), "{stderr}");
    assert_eq!(Backend::Iptables.listing(&lab, "pod"), Vec::<String>::new());
    // With --ipv6 drop there is no IPv6 NAT to fail, and the real tools install it all.
    init(
        &lab,
        "pod",
        Backend::Iptables,
        &["--proxy-uid", "1337", "--ipv6", "drop"],
    );
    let listing = Backend::Iptables.listing(&lab, "pod");
    assert!(
        listing.contains(&"6 -A BULKHEAD_OUT_FILTER -j DROP".to_string()),
        "{listing:?}"
    );
    assert!(
        !listing
            .iter()
            .any(|l| l.starts_with("6 ") && l.contains("REDIRECT")),
        "{listing:?}"
    );
}
