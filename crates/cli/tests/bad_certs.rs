//! Bad certificates and bad join tokens, end to end with the real binaries: every refusal
//! names its own reason, in the proxy's log and as a label of
//! `bulkhead_tls_handshake_failures_total`, and on the outbound side in the 502 the app gets;
//! a used-up or expired token stops a proxy at start with a message that says what to do.
#![allow(clippy::unwrap_used)]

use bulkhead_identity::tls::{ExpectedServer, client_config, provider, server_name};
use bulkhead_identity::{Ca, SpiffeId, TrustBundle};
use bulkhead_testkit::mesh::{Mesh, WAIT, addr, eventually, id};
use bulkhead_testkit::{Proc, http, parse_response, tls_get};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const OTHER_TD: &str = "other.domain";

/// A CA that signs whatever leaf a test asks for, however wrong: the mesh's own (from the
/// control plane's data directory), an impostor under its name, or a stranger.
struct Authority {
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    fn of(ca: &Ca) -> Authority {
        Authority::from_pem(ca.cert_pem(), &ca.key_pem())
    }

    fn from_pem(cert_pem: &str, key_pem: &str) -> Authority {
        let key = KeyPair::from_pem(key_pem).unwrap();
        Authority {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key).unwrap(),
        }
    }

    /// The mesh's CA, read from the control plane's data directory.
    fn mesh(mesh: &Mesh) -> Authority {
        let read = |f: &str| std::fs::read_to_string(mesh.data().join(f)).unwrap();
        Authority::from_pem(&read("ca.pem"), &read("ca.key"))
    }

    /// Another key behind the mesh root's exact subject name: a different root with the same
    /// name, as a forger (or a regenerated root with a fixed name) would have.
    fn namesake(mesh: &Mesh) -> Authority {
        let root = std::fs::read_to_string(mesh.data().join("ca.pem")).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Authority {
            issuer: Issuer::from_ca_cert_pem(&root, key).unwrap(),
        }
    }

    /// A leaf for `uris`, valid from `from` to `until`, with the CA flag if `ca`; otherwise
    /// made as the control plane makes an SVID.
    fn leaf(&self, uris: &[&str], ca: bool, from: SystemTime, until: SystemTime) -> Leaf {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "bulkhead");
        params.distinguished_name = dn;
        params.is_ca = if ca {
            IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.not_before = from.into();
        params.not_after = until.into();
        params.use_authority_key_identifier_extension = true;
        self.sign(params, &key)
    }

    /// A leaf like [`Authority::svid`] but for servers only: its extended key usage lacks
    /// clientAuth.
    fn server_only(&self, uri: &str) -> Leaf {
        let now = SystemTime::now();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        params.not_before = (now - MINUTE).into();
        params.not_after = (now + HOUR).into();
        self.sign(params, &key)
    }

    /// `params` for `key`, signed by this authority.
    fn sign(&self, params: CertificateParams, key: &KeyPair) -> Leaf {
        let cert = params.signed_by(key, &self.issuer).unwrap();
        Leaf {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    }

    /// A leaf that is right in every way the issuer controls: one URI SAN, no CA flag, valid now.
    fn svid(&self, uri: &str) -> Leaf {
        let now = SystemTime::now();
        self.leaf(&[uri], false, now - MINUTE, now + HOUR)
    }
}

/// A certificate and its key. The chain presented is the leaf alone: a peer finds the issuer
/// in its own bundle, or does not.
struct Leaf {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

/// Presents `leaf` whatever it holds: rustls' own client side never checks its certificate.
#[derive(Debug)]
struct Present(Arc<CertifiedKey>);

impl ResolvesClientCert for Present {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Connects over mTLS presenting `leaf` (the server is verified as `server_id` against the
/// mesh bundle) and sends one GET. Returns the raw answer, or the error that ended the
/// exchange.
fn mtls_get(
    addr: SocketAddr,
    bundle: &TrustBundle,
    server_id: &str,
    leaf: &Leaf,
) -> Result<Vec<u8>, String> {
    let expected = ExpectedServer::Exact(SpiffeId::parse(server_id).unwrap());
    let mut config = client_config(None, bundle, expected, &[b"http/1.1"]).unwrap();
    let key =
        CertifiedKey::from_der(vec![leaf.cert.clone()], leaf.key.clone_key(), &provider()).unwrap();
    config.client_auth_cert_resolver = Arc::new(Present(Arc::new(key)));
    tls_get(config, addr, "/orders")
}

/// A TLS 1.3 server on a thread that presents `leaf` to whoever connects, for as long as the
/// test runs: a stand-in for an upstream's sidecar.
fn fake_upstream(leaf: &Leaf) -> SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.cert.clone()], leaf.key.clone_key())
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut tcp in listener.incoming().flatten() {
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
            let mut conn = rustls::ServerConnection::new(config.clone()).unwrap();
            while conn.is_handshaking() && conn.complete_io(&mut tcp).is_ok() {}
        }
    });
    addr
}

/// The `bulkhead_tls_handshake_failures_total` lines of one direction.
fn tls_failures(metrics: &str, direction: &str) -> Vec<String> {
    let prefix = format!("bulkhead_tls_handshake_failures_total{{direction=\"{direction}\",");
    let mut lines: Vec<String> = metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

fn failure_line(direction: &str, reason: &str) -> String {
    format!(
        "bulkhead_tls_handshake_failures_total{{direction=\"{direction}\",reason=\"{reason}\"}} 1"
    )
}

/// The orders app behind its sidecar: both processes, and the sidecar's ready-file JSON.
fn orders_behind_its_sidecar(mesh: &Mesh) -> (Proc, Proc, serde_json::Value) {
    let (app_proc, app) = mesh.app("orders");
    let token = mesh.token(&id("orders"));
    let (proxy, orders) = mesh.inbound_proxy("orders", &token, app, &[]);
    (app_proc, proxy, orders)
}

#[test]
fn each_bad_client_certificate_is_refused_with_its_own_reason() {
    let mesh = Mesh::start();
    let (_app, _proxy, orders) = orders_behind_its_sidecar(&mesh);
    let inbound = addr(&orders["inbound"]);
    let bundle =
        TrustBundle::from_pem(&std::fs::read_to_string(mesh.data().join("ca.pem")).unwrap())
            .unwrap();

    let now = SystemTime::now();
    let ours = Authority::mesh(&mesh);
    let namesake = Authority::namesake(&mesh);
    let stranger = Authority::of(&Ca::generate(OTHER_TD, now).unwrap());
    let frontend = id("frontend");
    let other_domain = format!("spiffe://{OTHER_TD}/ns/shop/sa/frontend");
    let cases = [
        (
            "expired",
            ours.leaf(&[&frontend], false, now - 2 * HOUR, now - HOUR),
            "expired",
        ),
        (
            "not yet valid",
            ours.leaf(&[&frontend], false, now + HOUR, now + 2 * HOUR),
            "not_yet_valid",
        ),
        (
            "wrong trust domain, signed by the mesh CA",
            ours.svid(&other_domain),
            "wrong_trust_domain",
        ),
        (
            "two URI SANs",
            ours.leaf(
                &[&frontend, &id("payments")],
                false,
                now - MINUTE,
                now + HOUR,
            ),
            "many_uri_sans",
        ),
        (
            "CA flag on the leaf",
            ours.leaf(&[&frontend], true, now - MINUTE, now + HOUR),
            "ca_flag_on_leaf",
        ),
        // Our root's name but not its key: indistinguishable from a forged issuer.
        (
            "unknown CA with our root's name",
            namesake.svid(&frontend),
            "bad_signature",
        ),
        ("unknown CA", stranger.svid(&frontend), "unknown_ca"),
        // Its dates are wrong too, but a certificate we cannot place is named by its CA.
        (
            "expired, from an unknown CA",
            stranger.leaf(&[&frontend], false, now - 2 * HOUR, now - HOUR),
            "unknown_ca",
        ),
        (
            "no clientAuth purpose",
            ours.server_only(&frontend),
            "wrong_purpose",
        ),
    ];

    let refusals = || -> Vec<String> {
        std::fs::read_to_string(mesh.dir.path().join("orders-proxy.log"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("connection refused"))
            .map(str::to_string)
            .collect()
    };
    for (what, leaf, reason) in &cases {
        let before = refusals().len();
        let answer = mtls_get(inbound, &bundle, &id("orders"), leaf);
        assert!(
            answer
                .as_deref()
                .map(|raw| parse_response(raw).is_none())
                .unwrap_or(true),
            "{what}: the certificate got an HTTP answer: {answer:?}"
        );
        eventually(WAIT, &format!("{what}: a refusal in the log"), || {
            refusals().len() > before
        });
        let line = &refusals()[before];
        assert!(
            line.contains(&format!("reason=\"{reason}\"")),
            "{what}: want reason={reason}, the proxy logged: {line}"
        );
    }

    let metrics = http(addr(&orders["admin"]), "GET", "/metrics").body;
    let mut counts = std::collections::BTreeMap::<&str, u32>::new();
    for (_, _, reason) in &cases {
        *counts.entry(reason).or_default() += 1;
    }
    let want: Vec<String> = counts
        .iter()
        .map(|(reason, n)| format!("bulkhead_tls_handshake_failures_total{{direction=\"inbound\",reason=\"{reason}\"}} {n}"))
        .collect();
    assert_eq!(
        tls_failures(&metrics, "inbound"),
        want,
        "each bad certificate counted once under its own reason"
    );
    // A good certificate still passes the handshake (and policy answers).
    let answer = mtls_get(inbound, &bundle, &id("orders"), &ours.svid(&frontend)).unwrap();
    assert!(parse_response(&answer).is_some(), "{answer:?}");
}

#[test]
fn each_bad_upstream_certificate_is_a_502_naming_its_reason() {
    let mesh = Mesh::start();
    let now = SystemTime::now();
    let ours = Authority::mesh(&mesh);
    let stranger = Authority::of(&Ca::generate(OTHER_TD, now).unwrap());
    let orders = id("orders");
    // (upstream name, what its server presents, metric reason, what the 502 says)
    let cases = [
        (
            "expired",
            ours.leaf(&[&orders], false, now - 2 * HOUR, now - HOUR),
            "expired",
            "Expired",
        ),
        (
            "wrong-domain",
            ours.svid(&format!("spiffe://{OTHER_TD}/ns/shop/sa/orders")),
            "wrong_trust_domain",
            "is outside trust domain test.local",
        ),
        (
            "unknown-ca",
            stranger.svid(&orders),
            "unknown_ca",
            "UnknownIssuer",
        ),
        (
            "impostor",
            ours.svid(&id("payments")),
            "unexpected_identity",
            "is not the expected spiffe://test.local/ns/shop/sa/orders",
        ),
    ];
    let mut args = Vec::new();
    for (name, leaf, _, _) in &cases {
        let server = fake_upstream(leaf);
        args.push("--upstream".to_string());
        args.push(format!(
            "name={name},listen=127.0.0.1:0,address={server},identity={orders}"
        ));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_proxy, frontend) = mesh.proxy("frontend", &mesh.token(&id("frontend")), &args);

    for (name, _, reason, says) in &cases {
        let r = http(addr(&frontend["upstreams"][name]), "GET", "/orders");
        assert_eq!(r.status, 502, "{name}: {r:?}");
        assert!(
            r.body.contains(says),
            "{name}: the 502 should say {says:?} ({reason}): {}",
            r.body
        );
    }
    let metrics = http(addr(&frontend["admin"]), "GET", "/metrics").body;
    let mut want: Vec<String> = cases
        .iter()
        .map(|(_, _, reason, _)| failure_line("outbound", reason))
        .collect();
    want.sort();
    assert_eq!(tls_failures(&metrics, "outbound"), want);
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn used_up_and_expired_tokens_are_refused_with_what_to_do() {
    let mesh = Mesh::start();

    // The shortest lifetime the CLI accepts; it runs out while the rest of the test runs.
    let (code, out, err) = mesh.cli(&["token", "create", "--identity", &id("late"), "--ttl", "1s"]);
    assert_eq!(code, 0, "{err}");
    // The control plane's deadline is at most one whole second past this.
    let expired_by = unix_secs() + 1;
    let late = mesh.dir.path().join("late.token");
    std::fs::write(&late, out.trim()).unwrap();

    // A single-use token: the first proxy joins, a second proxy with the token (and no kept
    // credential of its own) is refused.
    let token = mesh.token(&id("frontend"));
    let upstream = unused_upstream();
    let (mut first, _) = mesh.proxy("frontend", &token, &["--upstream", &upstream]);
    first.assert_running();
    let err = mesh.failing_proxy(&token, &["--no-credential-file"]);
    assert!(
        err.contains("join token has been used up; create a new one with `bulkhead token create`"),
        "{err}"
    );

    // Polls the clock, not the control plane: an unexpired token would start a proxy.
    eventually(Duration::from_secs(5), "the token's expiry", || {
        unix_secs() >= expired_by
    });
    let err = mesh.failing_proxy(&late, &[]);
    assert!(
        err.contains("join token expired; create a new one with `bulkhead token create`"),
        "{err}"
    );
}

/// Runs `openssl s_client` against `addr` with the admin credential, saving the session to
/// `sess` (`-sess_out`) or offering it (`-sess_in`). It keeps reading for half a second after
/// the handshake, so a session ticket the server sends would be saved. Returns its stdout.
fn s_client(mesh: &Mesh, addr: SocketAddr, sess: &std::path::Path, offer: bool) -> String {
    use std::process::{Command, Stdio};
    let data = mesh.data();
    let mut child = Command::new("openssl")
        .args(["s_client", "-tls1_3", "-connect", &addr.to_string()])
        .arg("-cert")
        .arg(data.join("admin.pem"))
        .arg("-key")
        .arg(data.join("admin.key"))
        .arg("-CAfile")
        .arg(data.join("ca.pem"))
        .arg(if offer { "-sess_in" } else { "-sess_out" })
        .arg(sess)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed (dev/setup installs it)");
    std::thread::sleep(Duration::from_millis(500));
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn no_mtls_listener_resumes_a_session() {
    let mesh = Mesh::start();
    let (_app, _proxy, orders) = orders_behind_its_sidecar(&mesh);
    // The harness sees a resumption where there is one: `openssl s_server` with the same
    // credential sends tickets, and the saved session is resumed.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = mesh.data();
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-tls1_3", "-accept", &port.to_string()])
        .arg("-cert")
        .arg(data.join("admin.pem"))
        .arg("-key")
        .arg(data.join("admin.key"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let resumable = SocketAddr::from(([127, 0, 0, 1], port));
    eventually(WAIT, "openssl s_server listening", || {
        TcpStream::connect(resumable).is_ok()
    });
    let sess = mesh.dir.path().join("control.sess");
    let first = s_client(&mesh, resumable, &sess, false);
    let second = s_client(&mesh, resumable, &sess, true);
    let _ = server.kill();
    let _ = server.wait();
    assert!(first.contains("New Session Ticket"), "{first}");
    assert!(second.contains("Reused, TLSv1.3"), "{second}");

    for (what, listener) in [
        ("control plane", mesh.control_addr),
        ("sidecar inbound", addr(&orders["inbound"])),
    ] {
        let sess = mesh.dir.path().join(format!("{}.sess", listener.port()));
        let first = s_client(&mesh, listener, &sess, false);
        assert!(
            first.contains("New, TLSv1.3"),
            "{what}: no handshake: {first}"
        );
        // openssl prints each TLS 1.3 ticket that arrives and saves the session only when
        // it could resume it: neither happens, so there is nothing to offer back.
        assert!(
            !first.contains("New Session Ticket"),
            "{what} sent a session ticket: {first}"
        );
        assert!(!sess.exists(), "{what}: openssl saved a resumable session");
    }
}

#[test]
fn reserved_identities_cannot_have_a_token_and_logging_is_documented() {
    let mesh = Mesh::start();
    for reserved in [
        "spiffe://test.local/bulkhead/control",
        "spiffe://test.local/bulkhead/admin",
        "spiffe://test.local/bulkhead/anything",
    ] {
        let (code, out, err) = mesh.cli(&["token", "create", "--identity", reserved]);
        assert_ne!(code, 0, "{reserved}: a token was made: {out}");
        assert!(
            err.contains("is reserved") && err.contains("ns/<namespace>/sa/<account>"),
            "{reserved}: {err}"
        );
    }
    for bin in [&mesh.bins.bulkhead, &mesh.bins.proxy] {
        let help = std::process::Command::new(bin)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(
            help.contains("BULKHEAD_LOG") && help.contains("RUST_LOG"),
            "{}: {help}",
            bin.display()
        );
    }
}

/// An upstream no request goes to: a proxy needs one listener to start.
fn unused_upstream() -> String {
    format!(
        "name=x,listen=127.0.0.1:0,address=127.0.0.1:9,identity={}",
        id("x")
    )
}

/// One mTLS connection presenting `leaf` (of the mesh's CA) to `addr`, kept open after its
/// first exchange.
struct OpenMtls {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl OpenMtls {
    fn connect(addr: SocketAddr, bundle: &TrustBundle, server_id: &str, leaf: &Leaf) -> OpenMtls {
        let expected = ExpectedServer::Exact(SpiffeId::parse(server_id).unwrap());
        let mut config = client_config(None, bundle, expected, &[b"http/1.1"]).unwrap();
        let key =
            CertifiedKey::from_der(vec![leaf.cert.clone()], leaf.key.clone_key(), &provider())
                .unwrap();
        config.client_auth_cert_resolver = Arc::new(Present(Arc::new(key)));
        let conn = rustls::ClientConnection::new(Arc::new(config), server_name()).unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        OpenMtls {
            tls: rustls::StreamOwned::new(conn, tcp),
        }
    }

    /// Sends a keep-alive GET and reads its answer's head and body (Content-Length).
    fn get(&mut self, path: &str) -> String {
        write!(self.tls, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.tls.read(&mut chunk).unwrap();
            assert_ne!(
                n,
                0,
                "closed before the answer: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            if let Some(r) = parse_response(&buf) {
                let len: usize = r.header("content-length").unwrap().parse().unwrap();
                if r.body.len() >= len {
                    return String::from_utf8_lossy(&buf)
                        .lines()
                        .next()
                        .unwrap()
                        .to_string();
                }
            }
        }
    }

    /// How long until the server closes the connection (at most `limit`); `None` if it did
    /// not.
    fn closed_within(&mut self, limit: Duration) -> Option<Duration> {
        let start = std::time::Instant::now();
        self.tls.sock.set_read_timeout(Some(limit)).unwrap();
        let mut chunk = [0u8; 256];
        match self.tls.read(&mut chunk) {
            Ok(0) => Some(start.elapsed()),
            Err(e)
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut =>
            {
                Some(start.elapsed())
            }
            _ => None,
        }
    }
}

fn counter(metrics: &str, line_start: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_revoked_identity_is_refused_within_a_second_and_its_open_connection_closed() {
    let mesh = Mesh::start();
    mesh.apply(
        "policy.yaml",
        &bulkhead_testkit::mesh::orders_policy("/orders"),
    );
    let (_procs, to_orders) = mesh.orders_and_frontend(&[]);
    let orders_in = addr(&mesh.proxy_ready("orders")["inbound"]);
    let orders_admin = addr(&mesh.proxy_ready("orders")["admin"]);
    let frontend_admin = addr(&mesh.proxy_ready("frontend")["admin"]);
    let bundle =
        TrustBundle::from_pem(&std::fs::read_to_string(mesh.data().join("ca.pem")).unwrap())
            .unwrap();
    let metric =
        |admin: SocketAddr, line: &str| counter(&http(admin, "GET", "/metrics").body, line);

    // An intruder holding a valid certificate of the mesh, with a keep-alive connection
    // open to orders (policy denies it; the connection stays open for its next request).
    let intruder = id("intruder");
    let stolen = Authority::mesh(&mesh).svid(&intruder);
    let mut open = OpenMtls::connect(orders_in, &bundle, &id("orders"), &stolen);
    assert!(open.get("/orders").starts_with("HTTP/1.1 403"));
    assert!(
        open.get("/orders").starts_with("HTTP/1.1 403"),
        "kept alive"
    );

    let (code, out, err) = mesh.cli(&["revoke", "identity", &intruder, "--reason", "key leaked"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("identity {intruder} revoked")),
        "{out}"
    );
    let closed = open.closed_within(Duration::from_secs(1));
    assert!(
        closed.is_some(),
        "the open connection of the revoked identity stayed open for over a second"
    );
    let err = mtls_get(orders_in, &bundle, &id("orders"), &stolen).unwrap_err();
    assert!(!err.is_empty());
    eventually(WAIT, "the refusals counted", || {
        metric(
            orders_admin,
            "bulkhead_tls_handshake_failures_total{direction=\"inbound\",reason=\"revoked\"}",
        ) >= 1
            && metric(
                orders_admin,
                "bulkhead_connections_reset_total{direction=\"inbound\",reason=\"revoked\"}",
            ) >= 1
    });
    let (code, _, err) = mesh.cli(&["token", "create", "--identity", &intruder]);
    assert_ne!(code, 0);
    assert!(
        err.contains("was revoked") && err.contains("key leaked"),
        "{err}"
    );
    let (code, _, err) = mesh.cli(&["unrevoke", "identity", &intruder]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot be unrevoked before"), "{err}");
    let (code, _, err) = mesh.cli(&["revoke", "identity", "spiffe://test.local/bulkhead/admin"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot be revoked"), "{err}");

    // One proxy instance, orders': frontend's sidecar closes its open shared connection to
    // it and refuses new handshakes; the control plane ends orders' configuration stream
    // and keeps it closed.
    let mut app = bulkhead_testkit::KeepAlive::connect(to_orders).unwrap();
    assert_eq!(app.request("GET", "/orders").unwrap().status, 200);
    let (_, json, _) = mesh.cli(&["get", "proxies", "-o", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let orders = rows
        .iter()
        .find(|p| p["workload"] == "orders")
        .expect("orders is listed");
    let instance = orders["instance"].as_str().unwrap().to_string();
    assert_eq!(instance.len(), 12, "{orders}");
    let (code, out, err) = mesh.cli(&["revoke", "proxy", &instance, "--reason", "host lost"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("certificates refused: "), "{out}");
    let outbound_reset =
        "bulkhead_connections_reset_total{direction=\"outbound\",reason=\"revoked\"}";
    eventually(
        Duration::from_secs(1),
        "frontend closing its connection to orders",
        || metric(frontend_admin, outbound_reset) >= 1,
    );
    let refused = http(to_orders, "GET", "/orders");
    assert_eq!(refused.status, 502, "{}", refused.body);
    assert!(refused.body.contains("reason=revoked"), "{}", refused.body);
    eventually(WAIT, "orders' stream closed", || {
        let (_, json, _) = mesh.cli(&["get", "proxies", "-o", "json"]);
        let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
        rows.iter().any(|p| {
            p["workload"] == "orders"
                && p["connected"] == false
                && p["revoked"].as_str().unwrap_or("").contains("host lost")
        })
    });

    // What the operator sees.
    let (_, list, _) = mesh.cli(&["get", "revocations"]);
    assert!(
        list.contains(&intruder) && list.contains("key leaked") && list.contains(&instance),
        "{list}"
    );
    let (_, history, _) = mesh.cli(&["history"]);
    assert!(
        history.contains(&format!("revoke identity {intruder}"))
            && history.contains(&format!("revoke proxy {instance}")),
        "{history}"
    );
    let (_, proxies, _) = mesh.cli(&["get", "proxies", "-o", "wide"]);
    assert!(
        proxies.contains("REVOKED: proxy instance") && proxies.contains(&instance),
        "{proxies}"
    );

    // Join tokens: listed without secrets, deleted once.
    let (_, tokens, _) = mesh.cli(&["token", "list", "-o", "json"]);
    assert!(!tokens.contains("bhj."), "{tokens}");
    let tokens: Vec<serde_json::Value> = serde_json::from_str(&tokens).unwrap();
    let orders_token = tokens
        .iter()
        .find(|t| t["spiffeId"] == id("orders").as_str())
        .expect("orders' spent token is listed");
    assert_eq!(orders_token["usesLeft"], 0);
    let token_id = orders_token["id"].as_str().unwrap();
    let (code, out, err) = mesh.cli(&["token", "delete", token_id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted"), "{out}");
    let (code, _, err) = mesh.cli(&["token", "delete", token_id]);
    assert_ne!(code, 0);
    assert!(err.contains("there is no join token"), "{err}");
}

/// A proxy and the CLI talk to a control plane only if it presents the control identity
/// from the mesh's CA: a workload's own SVID (which a compromised workload holds) or the
/// control identity from another CA is refused before the token or the admin credential is
/// used, and the token still works with the real control plane afterwards.
#[test]
fn a_fake_control_plane_is_refused_by_proxies_and_the_cli() {
    let mesh = Mesh::start();
    let token = mesh.token(&id("orders"));
    let workload_svid = Authority::mesh(&mesh).svid(&id("orders"));
    let stranger = Ca::generate("test.local", SystemTime::now()).unwrap();
    let foreign_control = Authority::of(&stranger).svid("spiffe://test.local/bulkhead/control");
    let fakes = [
        (
            fake_upstream(&workload_svid),
            "spiffe://test.local/bulkhead/control",
        ),
        (fake_upstream(&foreign_control), "unknown"),
    ];
    for (fake, expected) in fakes {
        let mut args = mesh.proxy_args(&token);
        args[1] = fake.to_string();
        args.extend(["--upstream".into(), unused_upstream()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = bulkhead_testkit::run(&mesh.bins.proxy, &args, &[]);
        assert_ne!(code, 0, "joined a fake control plane: {err}");
        assert!(
            err.to_lowercase().contains(expected),
            "{fake}: expected {expected:?} in: {err}"
        );

        let context = std::fs::read_to_string(mesh.data().join("admin.yaml")).unwrap();
        let real = mesh.control_addr.to_string();
        let fake_context = mesh.dir.path().join("fake-admin.yaml");
        std::fs::write(&fake_context, context.replace(&real, &fake.to_string())).unwrap();
        let (code, out, err) = bulkhead_testkit::run(
            &mesh.bins.bulkhead,
            &[
                "--context",
                fake_context.to_str().unwrap(),
                "get",
                "policies",
            ],
            &[],
        );
        assert_ne!(code, 0, "the CLI believed a fake control plane: {out}");
        assert!(!err.is_empty());
    }
    // The token was never offered to the impostors: it still joins the real one, named by
    // a DNS name (resolved at every dial) rather than an address, and given after both
    // impostors as replicas of the control plane: each is refused as alone, and the next
    // replica tried.
    let mut args = mesh.proxy_args(&token);
    args[1] = format!(
        "{},{},localhost:{}",
        fakes[0].0,
        fakes[1].0,
        mesh.control_addr.port()
    );
    let ready = mesh.dir.path().join("orders-by-name.json");
    args.extend([
        "--upstream".into(),
        unused_upstream(),
        "--ready-file".into(),
        ready.to_str().unwrap().into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut orders = bulkhead_testkit::Proc::spawn(
        "orders-by-name",
        mesh.dir.path(),
        &mesh.bins.proxy,
        &args,
        &[],
    );
    let joined: serde_json::Value =
        serde_json::from_str(&orders.wait_for_file(&ready, WAIT)).unwrap();
    assert_eq!(joined["spiffe_id"], id("orders"));
    orders.assert_running();
    // A name that resolves nowhere is a clear error.
    let mut args = mesh.proxy_args(&token);
    args[1] = "no-such-control.invalid:7443".into();
    // (The proxy above holds this token file's kept credential.)
    args.extend([
        "--upstream".into(),
        unused_upstream(),
        "--no-credential-file".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = bulkhead_testkit::run(&mesh.bins.proxy, &args, &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot resolve no-such-control.invalid:7443"),
        "{err}"
    );
}
