//! Transparent capture for real: `bulkhead-proxy init` in network namespaces of a lab, checked
//! with the firewall's own listing and with connections that are, or are not, redirected.
//!
//! Needs root, iproute2, curl, tcpdump and the backend's tools; without them each test skips,
//! or fails under BULKHEAD_STRICT=1. The test process cannot enter a namespace, so the
//! listener standing in for the proxy is this test binary, run again inside one
//! ([`listener_in_namespace`]).
#![allow(clippy::unwrap_used)]

use bulkhead_testkit::netns::{Lab, can_run, contains};
use bulkhead_testkit::{Proc, TempDir};
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
            Backend::Iptables => &["iptables", "iptables-save", "iptables-restore"],
            Backend::Nftables => &["nft"],
        }
    }

    /// What the firewall itself says is installed, one trimmed line each; only our part.
    fn listing(self, lab: &Lab, host: &str) -> Vec<String> {
        let (program, args): (&str, &[&str]) = match self {
            Backend::Iptables => ("iptables-save", &["-t", "nat"]),
            Backend::Nftables => ("nft", &["list", "table", "ip", "bulkhead"]),
        };
        let (code, out, err) = run(lab, host, program, args);
        match self {
            Backend::Iptables => {
                assert_eq!(code, 0, "iptables-save: {err}");
                out.lines()
                    .filter(|l| l.contains("BULKHEAD"))
                    .map(str::to_string)
                    .collect()
            }
            // No table, no rules: `nft list` fails.
            Backend::Nftables if code != 0 => Vec::new(),
            Backend::Nftables => out
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
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
        "10.96.0.0/12",
        "--control",
        "10.0.0.1:7443",
    ];
    init(&lab, "pod", backend, &args);
    let first = backend.listing(&lab, "pod");
    let expected: &[&str] = match backend {
        Backend::Iptables => &[
            "-A PREROUTING -p tcp -j BULKHEAD_INBOUND",
            "-A OUTPUT -p tcp -j BULKHEAD_OUTBOUND",
            "-A BULKHEAD_INBOUND -i lo -j RETURN",
            "-A BULKHEAD_INBOUND -p tcp -m tcp --dport 2222 -j RETURN",
            "-A BULKHEAD_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
            "-A BULKHEAD_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A BULKHEAD_OUTBOUND -m owner --uid-owner 0 -j RETURN",
            "-A BULKHEAD_OUTBOUND -d 10.0.0.1/32 -p tcp -m tcp --dport 7443 -j RETURN",
            "-A BULKHEAD_OUTBOUND -d 10.96.0.0/12 -j RETURN",
            "-A BULKHEAD_OUTBOUND -p tcp -m tcp --dport 5432 -j RETURN",
            "-A BULKHEAD_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        ],
        Backend::Nftables => &[
            "type nat hook prerouting priority dstnat; policy accept;",
            "iifname \"lo\" return",
            "tcp dport { 2222, 15000 } return",
            "meta l4proto tcp redirect to :15006",
            "meta skuid 0 return",
            "ip daddr 10.0.0.1 tcp dport 7443 return",
            "ip daddr 10.96.0.0/12 return",
            "tcp dport 5432 return",
            "meta l4proto tcp redirect to :15001",
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

/// What curl got: the body, or its exit code (7: nothing listened where it connected).
fn curl(lab: &Lab, from: &str, url: &str, marker: &str) -> Result<String, i32> {
    let header = format!("x-marker: {marker}");
    let (code, out, _) = run(
        lab,
        from,
        "curl",
        &["-sS", "--max-time", "5", "-H", &header, url],
    );
    if code == 0 { Ok(out) } else { Err(code) }
}

fn redirects_what_it_should_and_nothing_else(test: &str, backend: Backend) {
    let mut needs = vec!["curl", "tcpdump"];
    needs.extend(backend.tools());
    if !can_run(test, &needs) {
        return;
    }
    let lab = Lab::new(&["pod", "peer", "db"]);
    let (pod, peer, db) = (lab.ip("pod"), lab.ip("peer"), lab.ip("db"));
    let dir = TempDir::new().unwrap();

    // The stand-in for the proxy, in the pod, on both capture ports.
    let ready = dir.path().join("listener.ready");
    let mut cmd = lab.command("pod", &std::env::current_exe().unwrap());
    cmd.args([
        "listener_in_namespace",
        "--exact",
        "--ignored",
        "--nocapture",
    ])
    .env(LISTENER_ENV, &ready);
    let mut listener = Proc::from_command("listener", dir.path(), cmd);
    listener.wait_for_file(&ready, Duration::from_secs(30));

    let control = format!("{peer}:7443");
    let db_cidr = format!("{db}/32");
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
            &db_cidr,
            "--control",
            &control,
        ],
    );

    let capture = lab.capture();
    // Outbound: everything the app sends goes to the outbound port, its destination intact…
    assert_eq!(
        curl(
            &lab,
            "pod",
            &format!("http://{peer}:8080/"),
            "outbound-stays-local"
        ),
        Ok(format!("outbound {peer}:8080"))
    );
    // …but for excluded ports, the control plane, excluded CIDRs and loopback, which go
    // where they were sent (where nothing listens).
    for url in [
        format!("http://{peer}:9090/"),
        format!("http://{control}/"),
        format!("http://{db}:8080/"),
        "http://127.0.0.1:8080/".to_string(),
    ] {
        assert_eq!(curl(&lab, "pod", &url, "x"), Err(7), "{url} was captured");
    }
    // Inbound: from another host to any port but the excluded ones and the admin port.
    assert_eq!(
        curl(
            &lab,
            "peer",
            &format!("http://{pod}:8080/"),
            "inbound-crosses"
        ),
        Ok(format!("inbound {pod}:8080"))
    );
    for port in [2222, 15000] {
        let url = format!("http://{pod}:{port}/");
        assert_eq!(curl(&lab, "peer", &url, "x"), Err(7), "{url} was captured");
    }
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
    assert_eq!(
        curl(&lab, "pod", &format!("http://{peer}:8080/"), "x"),
        Err(7)
    );
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

const LISTENER_ENV: &str = "BULKHEAD_CAPTURE_LISTENER";

/// Not a test: run inside a namespace by the tests above (with BULKHEAD_CAPTURE_LISTENER
/// naming a ready file), it listens on 15001 and 15006 and answers every connection with
/// `outbound|inbound <original destination>`, as [`capture::original_dst`] reads it.
///
/// [`capture::original_dst`]: bulkhead_proxy::capture::original_dst
#[test]
#[ignore = "a helper the redirection tests run inside a network namespace"]
fn listener_in_namespace() {
    let Some(ready) = std::env::var_os(LISTENER_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let outbound = tokio::net::TcpListener::bind("0.0.0.0:15001")
            .await
            .unwrap();
        let inbound = tokio::net::TcpListener::bind("0.0.0.0:15006")
            .await
            .unwrap();
        std::fs::write(&ready, "listening").unwrap();
        loop {
            let (stream, side) = tokio::select! {
                r = outbound.accept() => (r.unwrap().0, "outbound"),
                r = inbound.accept() => (r.unwrap().0, "inbound"),
            };
            tokio::spawn(answer(stream, side));
        }
    });
}

async fn answer(mut stream: tokio::net::TcpStream, side: &str) {
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
    let body = format!("{side} {dst}");
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
