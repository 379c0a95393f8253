//! CA rotation end to end, with the real binaries: `bulkhead ca add-root` → every proxy holds
//! the two-root bundle → `ca switch` → every proxy presents a certificate from the new CA →
//! `ca retire` the old one, while requests keep flowing (new connections and one keep-alive
//! connection) without a single failure. And bring-your-own CA: an enterprise intermediate
//! (whose root names no SPIFFE trust domain) imported with its chain, checked, and signing.
#![allow(clippy::unwrap_used)]

#[path = "mesh/join.rs"]
mod join;

use bulkhead_identity::tls::{ExpectedServer, client_config, server_name};
use bulkhead_identity::{SpiffeId, Svid, TrustBundle, fingerprint};
use bulkhead_testkit::mesh::{
    Mesh, TD, WAIT, addr, eventually, id, orders_policy, orders_upstream,
};
use bulkhead_testkit::{KeepAlive, http, http_raw, parse_response, run};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// 4-second SVIDs: proxies renew about every 2 s, and a CA that stopped signing can be
/// retired 5 s later.
const SVID_LIFETIME: &str = "4s";

/// A mesh with the policy applied, orders (app + sidecar) and a frontend sidecar; returns the
/// mesh, its processes, the frontend's upstream port, and both sidecars' admin ports.
struct Shop {
    mesh: Mesh,
    _procs: Vec<bulkhead_testkit::Proc>,
    to_orders: SocketAddr,
    orders_in: SocketAddr,
    admins: Vec<SocketAddr>,
}

fn shop() -> Shop {
    let mesh = Mesh::start_with(&["--svid-lifetime", SVID_LIFETIME]);
    let policy = mesh.dir.path().join("policy.yaml");
    std::fs::write(&policy, orders_policy("/orders")).unwrap();
    assert_eq!(mesh.cli(&["apply", "-f", policy.to_str().unwrap()]).0, 0);
    let (procs, to_orders) = mesh.orders_and_frontend(&[]);
    let orders_in = addr(&mesh.proxy_ready("orders")["inbound"]);
    let admins = ["orders", "frontend"]
        .iter()
        .map(|n| addr(&mesh.proxy_ready(n)["admin"]))
        .collect();
    assert_eq!(http(to_orders, "GET", "/orders").status, 200);
    Shop {
        mesh,
        _procs: procs,
        to_orders,
        orders_in,
        admins,
    }
}

/// A proxy's `/config` page.
fn proxy_config(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&http(admin, "GET", "/config").body).unwrap()
}

fn ca_status(mesh: &Mesh) -> serde_json::Value {
    mesh.cli_json(&["ca", "status", "-o", "json"])
}

/// The SHA-256 of the CA in `state` (the first, if several).
fn ca_in(status: &serde_json::Value, state: &str) -> String {
    status["cas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["state"] == state)
        .unwrap_or_else(|| panic!("no {state} CA in {status:#}"))["sha256"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits until every proxy's `/config` satisfies `f`.
fn every_proxy(shop: &Shop, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    eventually(WAIT, what, || {
        shop.admins.iter().all(|a| f(&proxy_config(*a)))
    });
}

fn bundle_of(config: &serde_json::Value) -> Vec<String> {
    config["trustBundleSha256"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect()
}

/// Requests through the frontend's upstream port until stopped: each round one request on a
/// new connection and one on a keep-alive connection opened at the start. Every failure is
/// kept with the time it happened.
struct Traffic {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    rounds: Arc<Mutex<u32>>,
    thread: std::thread::JoinHandle<()>,
}

impl Traffic {
    fn start(to: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let rounds = Arc::new(Mutex::new(0));
        let (s, f, r) = (stop.clone(), failures.clone(), rounds.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut kept = KeepAlive::connect(to).unwrap();
            while !s.load(Ordering::Relaxed) {
                let at = started.elapsed();
                match kept.request("GET", "/orders") {
                    Ok(r) if r.status == 200 => {}
                    other => f
                        .lock()
                        .unwrap()
                        .push(format!("keep-alive at {at:?}: {other:?}")),
                }
                match http_raw(to, "GET", "/orders").map(|raw| parse_response(&raw)) {
                    Ok(Some(r)) if r.status == 200 => {}
                    other => f
                        .lock()
                        .unwrap()
                        .push(format!("new connection at {at:?}: {other:?}")),
                }
                *r.lock().unwrap() += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Traffic {
            stop,
            failures,
            rounds,
            thread,
        }
    }

    /// Stops; returns the number of rounds and every failure.
    fn finish(self) -> (u32, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let rounds = *self.rounds.lock().unwrap();
        let failures = self.failures.lock().unwrap().clone();
        (rounds, failures)
    }
}

/// The admin credential (re-issued by the control plane from the signing CA), usable as a
/// client certificate for a handshake.
fn admin_svid(mesh: &Mesh) -> Svid {
    let read = |f: &str| std::fs::read_to_string(mesh.data().join(f)).unwrap();
    Svid::from_pem(&read("admin.pem"), &read("admin.key")).unwrap()
}

/// Handshakes with the orders sidecar, trusting only `roots_pem`; returns the chain it
/// presented, or the error that stopped the handshake.
fn orders_chain(
    orders_in: SocketAddr,
    roots_pem: &str,
    client: &Svid,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let bundle = TrustBundle::from_pem_for(TD, roots_pem).map_err(|e| e.to_string())?;
    let expected = ExpectedServer::Exact(SpiffeId::parse(&id("orders")).unwrap());
    let config = client_config(Some(client), &bundle, expected, &[b"http/1.1"])
        .map_err(|e| e.to_string())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name())
        .map_err(|e| e.to_string())?;
    let mut tcp = TcpStream::connect(orders_in).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok(conn
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect())
}

/// The PEM of a CA's certificate file in the data directory (the CA, then its chain).
fn ca_file(mesh: &Mesh, sha256: &str) -> String {
    std::fs::read_to_string(mesh.data().join(format!("cas/{}.pem", &sha256[..16]))).unwrap()
}

/// `ca retire ID`, retried until it is no longer refused as too early; the first refusal
/// must say when it becomes safe.
fn retire_when_safe(mesh: &Mesh, ca: &str) -> String {
    let (code, out, err) = mesh.cli(&["ca", "retire", ca]);
    if code == 0 {
        return out;
    }
    assert!(
        err.contains(&format!(
            "CA {} signed certificates that may be valid until",
            &ca[..16]
        )) && err.contains("pass --force to retire it anyway"),
        "{err}"
    );
    let mut out = String::new();
    eventually(WAIT, "retiring the old CA being allowed", || {
        let (code, o, e) = mesh.cli(&["ca", "retire", ca]);
        assert!(code == 0 || e.contains("may be valid until"), "{e}");
        out = o;
        code == 0
    });
    out
}

#[test]
fn ca_rotation_add_switch_retire_without_a_failed_request() {
    let shop = shop();
    let mesh = &shop.mesh;
    let old = ca_in(&ca_status(mesh), "active");
    let traffic = Traffic::start(shop.to_orders);
    std::thread::sleep(Duration::from_millis(500));

    // 1. A new root: trusted, not signing, pushed to every proxy.
    let (code, out, err) = mesh.cli(&["ca", "add-root"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("trusted, not signing"), "{out}");
    let status = ca_status(mesh);
    let new = ca_in(&status, "trusted");
    assert_eq!(ca_in(&status, "active"), old);
    let both = vec![
        fingerprint_of_file(mesh, &old),
        fingerprint_of_file(mesh, &new),
    ];
    every_proxy(&shop, "both proxies holding the two-root bundle", |c| {
        let mut held = bundle_of(c);
        held.sort();
        let mut want = both.clone();
        want.sort();
        held == want
    });
    eventually(
        WAIT,
        "ca status counting both proxies on the new bundle",
        || {
            let s = ca_status(mesh);
            s["proxies"]["connected"] == 2 && s["proxies"]["withCurrentBundle"] == 2
        },
    );
    let (_, proxies, _) = mesh.cli(&["get", "proxies"]);
    assert_eq!(proxies.matches("current (2 roots)").count(), 2, "{proxies}");

    // 2. Switch: the proxies renew soon, from the new CA.
    let (code, out, err) = mesh.cli(&["ca", "switch", &new[..12]]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("CA {} signs now", &new[..16])),
        "{out}"
    );
    every_proxy(
        &shop,
        "both proxies presenting certificates from the new CA",
        |c| c["certificate"]["issuerSha256"] == new.as_str(),
    );
    assert_eq!(admin_svid(mesh).issuer_fingerprint(), Some(new.clone()));
    let s = ca_status(mesh);
    assert_eq!(ca_in(&s, "active"), new);
    assert_eq!(ca_in(&s, "trusted"), old);

    // 3. Retire the old CA once nothing it signed can still be valid.
    let out = retire_when_safe(mesh, &old);
    assert!(out.contains("retired CA"), "{out}");
    every_proxy(&shop, "both proxies holding only the new root", |c| {
        bundle_of(c) == vec![fingerprint_of_file(mesh, &new)]
    });
    let s = ca_status(mesh);
    assert_eq!(ca_in(&s, "retired"), old);
    assert_eq!(s["bundleSha256"].as_array().unwrap().len(), 1);
    assert!(
        !mesh.data().join("ca.key").exists(),
        "the retired root's key is deleted"
    );
    std::thread::sleep(Duration::from_secs(3));

    let (rounds, failures) = traffic.finish();
    assert!(
        failures.is_empty(),
        "{} failed requests: {failures:#?}",
        failures.len()
    );
    assert!(rounds >= 40, "only {rounds} rounds of requests");

    // A new connection's certificate chains to the new root, and only to it.
    let admin = admin_svid(mesh);
    let new_root = ca_file(mesh, &new);
    let chain = orders_chain(shop.orders_in, &new_root, &admin).unwrap();
    assert_eq!(chain[1], pem_cert(&new_root));
    let err = orders_chain(shop.orders_in, &ca_file(mesh, &old), &admin).unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert_eq!(
        std::fs::read_to_string(mesh.data().join("ca.pem")).unwrap(),
        new_root,
        "ca.pem holds the current bundle for new proxies"
    );
    assert_eq!(http(shop.to_orders, "GET", "/orders").status, 200);
}

fn pem_cert(pem: &str) -> CertificateDer<'static> {
    TrustBundle::from_pem_for(TD, pem).unwrap().roots()[0].clone()
}

/// The SHA-256 of the root a CA of the data directory chains to.
fn fingerprint_of_file(mesh: &Mesh, sha256: &str) -> String {
    let pem = ca_file(mesh, sha256);
    let bundle = TrustBundle::from_pem_for(TD, &pem).unwrap();
    fingerprint(bundle.roots().last().unwrap())
}

/// An enterprise PKI: a root (no SPIFFE URI) and an intermediate it signed, as files.
struct Pki {
    root: PathBuf,
    intermediate: PathBuf,
    key: PathBuf,
    other_key: PathBuf,
}

fn enterprise_pki(dir: &Path) -> Pki {
    let ca = |cn: &str| {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Example Corp");
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (SystemTime::now() - Duration::from_secs(3600)).into();
        params.not_after = (SystemTime::now() + Duration::from_secs(365 * 86_400)).into();
        params
    };
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let root_params = ca("Example Corp Root CA");
    let root = root_params.self_signed(&root_key).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let intermediate = ca("Example Corp Mesh CA")
        .signed_by(&key, &Issuer::new(root_params, root_key))
        .unwrap();
    let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    Pki {
        root: write("root.pem", root.pem()),
        intermediate: write("intermediate.pem", intermediate.pem()),
        key: write("intermediate.key", key.serialize_pem()),
        other_key: write("other.key", other.serialize_pem()),
    }
}

#[test]
fn bring_your_own_intermediate_ca() {
    let shop = shop();
    let mesh = &shop.mesh;
    let pki = enterprise_pki(mesh.dir.path());
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let generated = ca_in(&ca_status(mesh), "active");
    // `bulkhead ca add-root --import-cert CERT --import-key KEY [--chain CHAIN]`.
    let import = |cert: &Path, key: &Path, chain: Option<&Path>| {
        let mut args = vec!["ca", "add-root", "--import-cert", cert.to_str().unwrap()];
        args.extend(["--import-key", key.to_str().unwrap()]);
        if let Some(chain) = chain {
            args.extend(["--chain", chain.to_str().unwrap()]);
        }
        mesh.cli(&args)
    };

    // Import refuses a key that is not the certificate's, and a chain that stops short.
    let (code, _, err) = import(&pki.intermediate, &pki.other_key, Some(&pki.root));
    assert_eq!(code, 1);
    assert!(
        err.contains("CA refused: the private key does not belong to O=Example Corp, CN=Example Corp Mesh CA: its public key differs from the certificate's; pass the key that was certified"),
        "{err}"
    );
    let (code, _, err) = import(&pki.intermediate, &pki.key, None);
    assert_eq!(code, 1);
    assert!(
        err.contains("the chain stops at O=Example Corp, CN=Example Corp Mesh CA: no certificate given is its issuer (O=Example Corp, CN=Example Corp Root CA)"),
        "{err}"
    );
    assert_eq!(
        ca_status(mesh)["cas"].as_array().unwrap().len(),
        1,
        "nothing was added"
    );

    // The intermediate with its chain: its root joins the bundle.
    let (code, out, err) = import(&pki.intermediate, &pki.key, Some(&pki.root));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("chaining to root") && out.contains("CN=Example Corp Root CA"),
        "{out}"
    );
    let intermediate = ca_in(&ca_status(mesh), "trusted");
    let root_pem = std::fs::read_to_string(&pki.root).unwrap();
    let enterprise_root = fingerprint(&pem_cert(&root_pem));
    every_proxy(&shop, "both proxies holding the enterprise root", |c| {
        bundle_of(c).contains(&enterprise_root)
    });
    let (code, _, err) = mesh.cli(&["ca", "switch", &intermediate]);
    assert_eq!(code, 0, "{err}");
    every_proxy(
        &shop,
        "both proxies presenting certificates from the intermediate",
        |c| c["certificate"]["issuerSha256"] == intermediate.as_str(),
    );
    assert_eq!(http(shop.to_orders, "GET", "/orders").status, 200);

    // The orders sidecar presents its leaf and the intermediate (not the root); OpenSSL
    // verifies the leaf against the enterprise root through the intermediate.
    let ca_pem = std::fs::read_to_string(mesh.data().join("ca.pem")).unwrap();
    let chain = orders_chain(shop.orders_in, &ca_pem, &admin_svid(mesh)).unwrap();
    assert_eq!(chain.len(), 2, "leaf + intermediate");
    assert_eq!(fingerprint(&chain[1]), intermediate);
    let (der, leaf) = (
        mesh.dir.path().join("leaf.der"),
        mesh.dir.path().join("leaf.pem"),
    );
    std::fs::write(&der, &chain[0]).unwrap();
    let (code, _, err) = run(
        Path::new("openssl"),
        &[
            "x509",
            "-inform",
            "DER",
            "-in",
            &path(&der),
            "-out",
            &path(&leaf),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(
        Path::new("openssl"),
        &[
            "verify",
            "-CAfile",
            &path(&pki.root),
            "-untrusted",
            &path(&pki.intermediate),
            &path(&leaf),
        ],
        &[],
    );
    assert_eq!(code, 0, "openssl verify: {out}{err}");

    // With the generated root retired, the bundle names no trust domain: a new proxy must
    // be told it (--identity), and then joins with an SVID from the intermediate.
    retire_when_safe(mesh, &generated);
    let ca_pem = std::fs::read_to_string(mesh.data().join("ca.pem")).unwrap();
    assert_eq!(fingerprint(&pem_cert(&ca_pem)), enterprise_root);
    let token = mesh.token(&id("payments"));
    let err = mesh.failing_proxy(&token, &[]);
    assert!(
        err.contains("pass --identity spiffe://<trust-domain>/"),
        "{err}"
    );
    let upstream = orders_upstream(shop.orders_in);
    let (_payments, ready) = mesh.proxy(
        "payments",
        &token,
        &["--identity", &id("payments"), "--upstream", &upstream],
    );
    let config = proxy_config(addr(&ready["admin"]));
    assert_eq!(config["certificate"]["issuerSha256"], intermediate.as_str());
    assert_eq!(bundle_of(&config), vec![enterprise_root]);
    assert_eq!(http(shop.to_orders, "GET", "/orders").status, 200);
}

/// Joins as `identity` the way a proxy does, and opens its configuration stream without
/// acknowledging anything: a proxy that has not (yet) taken the new bundle. Returns the
/// stream and the proxy's channel to the control plane.
async fn silent_proxy(
    mesh: &Mesh,
    identity: &str,
) -> (
    tonic::Streaming<bulkhead_api::v1::ProxyConfig>,
    tonic::transport::Channel,
) {
    let as_proxy = join::channel_as(mesh, identity).await;
    let stream = join::watch(as_proxy.clone(), "frontend").await.unwrap();
    (stream, as_proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_waits_for_proxies_and_force_overrides_the_safety_checks() {
    let mut mesh = Mesh::start_with(&["--svid-lifetime", "1h"]);
    let (mut stream, as_proxy) = silent_proxy(&mesh, &id("frontend")).await;
    let first = stream.message().await.unwrap().unwrap();

    // The CA calls are admin-only, like every admin call.
    use bulkhead_api::v1::admin_client::AdminClient;
    use bulkhead_api::v1::{AddCaRequest, CaStatusRequest};
    let mut not_admin = AdminClient::new(as_proxy);
    let err = not_admin.ca_status(CaStatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = not_admin.add_ca(AddCaRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(ca_status(&mesh)["cas"].as_array().unwrap().len(), 1);

    assert_eq!(first.trust_bundle.unwrap().roots_der.len(), 1);
    let old = ca_in(&ca_status(&mesh), "active");

    let (code, _, err) = mesh.cli(&["ca", "add-root"]);
    assert_eq!(code, 0, "{err}");
    let new = ca_in(&ca_status(&mesh), "trusted");
    let pushed = stream.message().await.unwrap().unwrap();
    let bundle = pushed.trust_bundle.unwrap();
    assert_eq!(
        bundle.roots_der.len(),
        2,
        "the new bundle is pushed at once"
    );
    assert_eq!(bundle.signing_ca_sha256, old, "and the old CA still signs");

    // The proxy never confirmed the new root: switching now would break it.
    let (code, _, err) = mesh.cli(&["ca", "switch", &new]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "1 connected proxies have not confirmed holding the root of CA {} and would refuse the certificates it signs: {} (shop/frontend)",
            &new[..16],
            id("frontend")
        )) && err.contains("or pass --force"),
        "{err}"
    );
    let (_, table, _) = mesh.cli(&["ca", "status"]);
    assert!(
        table.contains("proxies: 1 connected, 0 hold the current bundle"),
        "{table}"
    );
    let (code, _, err) = mesh.cli(&["ca", "switch", &new, "--force"]);
    assert_eq!(code, 0, "{err}");
    let pushed = stream.message().await.unwrap().unwrap();
    assert_eq!(pushed.trust_bundle.unwrap().signing_ca_sha256, new);

    // With 1 h certificates the old CA cannot be retired for an hour, unless forced.
    let (code, _, err) = mesh.cli(&["ca", "retire", &old]);
    assert_eq!(code, 1);
    assert!(err.contains("(in 360"), "{err}");
    let (code, _, err) = mesh.cli(&["ca", "retire", &new]);
    assert_eq!(code, 1);
    assert!(err.contains("signs now and cannot be retired"), "{err}");
    let (code, _, err) = mesh.cli(&["ca", "retire", &old[..6], "--force"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = mesh.cli(&["ca", "switch", &old]);
    assert_eq!(code, 1);
    assert!(err.contains("is retired; add a new CA instead"), "{err}");

    // The set survives a restart of the control plane.
    drop(stream);
    mesh.stop_control();
    mesh.restart_control();
    let status = ca_status(&mesh);
    assert_eq!(ca_in(&status, "active"), new);
    assert_eq!(ca_in(&status, "retired"), old);
    let (_, table, _) = mesh.cli(&["ca", "status"]);
    let active_line = table.lines().find(|l| l.starts_with(&new[..16])).unwrap();
    assert!(active_line.contains(" active   yes "), "{table}");
}
