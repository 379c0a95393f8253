//! SPIFFE federation between two meshes, each with its own control plane, CA and trust
//! domain, each serving its bundle endpoint and federating with the other
//! (`bulkhead control --federation`): a client of a.test calls a server of b.test through
//! both sidecars; B's policy decides on A's identity; a CA of one domain cannot vouch for the
//! other's identities; A's CA rotation reaches B by refresh; a failed refresh keeps the last
//! good bundle and says so; py-spiffe sees the federated bundle on B's Workload API, and a
//! JWT-SVID of A's validates at B's.

use crate::check::jwt_federated;
use bulkhead_testkit::mesh::{Mesh, WAIT, addr, eventually};
use bulkhead_testkit::{ForeignIdentity, free_port, http, mtls_raw, run};
use std::path::Path;

const A: &str = "a.test";
const B: &str = "b.test";

/// A `FederatedTrustDomain` for `td`, whose bootstrap bundle is `mesh`'s SPIFFE bundle now.
fn federation_file(dir: &Path, td: &str, endpoint: &str, mesh: &Mesh) -> String {
    let (code, doc, err) = mesh.cli(&["ca", "bundle", "-o", "spiffe"]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(dir.join(format!("{td}.bundle.json")), doc).unwrap();
    let file = dir.join(format!("federate-{td}.yaml"));
    std::fs::write(
        &file,
        format!(
            "apiVersion: bulkhead.dev/v1alpha1
kind: FederatedTrustDomain
metadata: {{name: {td}}}
spec:
  trustDomain: {td}
  bundleEndpointURL: https://{endpoint}/
  bundleEndpointProfile:
    type: https_spiffe
    endpointSPIFFEID: spiffe://{td}/bulkhead/bundle-endpoint
  trustDomainBundleFile: {td}.bundle.json
"
        ),
    )
    .unwrap();
    file.to_str().unwrap().to_string()
}

fn orders_of_b(allowed: &str) -> String {
    format!(
        r#"apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {{name: orders, namespace: shop}}
spec:
  identity: spiffe://{B}/ns/shop/sa/orders
  ports: [{{port: 8080, protocol: http}}]
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: orders-allow-partner, namespace: shop}}
spec:
  selector: {{workload: orders}}
  action: allow
  rules:
    - name: partner-reads-orders
      from: {{identities: ["{allowed}"]}}
      to: {{methods: [GET], paths: ["/orders/*"]}}
"#
    )
}

/// An SVID for `id` signed by the CA whose files are `ca_pem` and `ca_key` (whatever its
/// trust domain), made with OpenSSL: what a federated domain's CA would sign to impersonate.
fn forged(dir: &Path, name: &str, ca_pem: &Path, ca_key: &Path, id: &str) -> ForeignIdentity {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let cert = dir.join(format!("{name}.pem"));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!(
            "subjectAltName=critical,URI:{id}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\n"
        ),
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let (code, out, err) = run(Path::new("openssl"), args, &[]);
        assert_eq!(code, 0, "openssl {args:?}: {out}{err}");
    };
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-subj",
        "/O=forged",
        "-out",
        csr.to_str().unwrap(),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().unwrap(),
        "-CA",
        ca_pem.to_str().unwrap(),
        "-CAkey",
        ca_key.to_str().unwrap(),
        "-set_serial",
        &format!(
            "{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ),
        "-days",
        "1",
        "-extfile",
        ext.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    ForeignIdentity {
        chain_pem: std::fs::read_to_string(cert).unwrap(),
        key_pem: std::fs::read_to_string(key).unwrap(),
    }
}

fn proxy_config(admin: std::net::SocketAddr) -> serde_json::Value {
    serde_json::from_str(&http(admin, "GET", "/config").body).unwrap()
}

fn federated_roots(config: &serde_json::Value, td: &str) -> Vec<String> {
    config["federatedTrustBundles"][td]
        .as_array()
        .map(|a| {
            let mut roots: Vec<String> =
                a.iter().map(|r| r.as_str().unwrap().to_string()).collect();
            roots.sort();
            roots
        })
        .unwrap_or_default()
}

/// How many `federation-refresh-failed` events `mesh` has recorded about `td`.
fn refresh_failures(mesh: &Mesh, td: &str) -> usize {
    let events = mesh.cli_json(&["events", "-o", "json"]);
    events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["kind"] == "federation-refresh-failed"
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains(&format!("trust domain {td} ")))
        })
        .count()
}

#[test]
fn two_trust_domains_federate_and_each_vouches_only_for_its_own() {
    let (ep_a, ep_b) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    // A's SVIDs live 4 s, so that its proxies renew from a new CA within seconds.
    let a_flags = [
        "--bundle-endpoint",
        ep_a.as_str(),
        "--bundle-refresh-hint",
        "1s",
        "--svid-lifetime",
        "4s",
    ];
    let mut a = Mesh::start_in(A, &a_flags);
    let b_federation = federation_file(a.dir.path(), A, &ep_a, &a);
    let b = Mesh::start_in(
        B,
        &[
            "--bundle-endpoint",
            &ep_b,
            "--bundle-refresh-hint",
            "1s",
            "--federation",
            &b_federation,
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    // A learns B's bundle the same way, then restarts federating with it.
    let a_federation = federation_file(b.dir.path(), B, &ep_b, &b);
    let mut flags = a_flags.to_vec();
    flags.extend(["--federation", a_federation.as_str()]);
    a.stop_control();
    a.restart_control_in(A, &flags);

    // B: the orders app behind its sidecar, which also serves the Workload API; B's policy
    // lets A's frontend GET /orders/*.
    let frontend_a = format!("spiffe://{A}/ns/shop/sa/frontend");
    let orders_b = format!("spiffe://{B}/ns/shop/sa/orders");
    b.apply("orders.yaml", &orders_of_b(&frontend_a));
    let (_orders_app, orders_app_addr) = b.app("orders");
    std::fs::create_dir(b.dir.path().join("run")).unwrap();
    let socket = b.dir.path().join("run/workload.sock");
    let (_orders_proxy, orders) = b.inbound_proxy(
        "orders",
        &b.token(&orders_b),
        orders_app_addr,
        &["--workload-api", socket.to_str().unwrap()],
    );
    let orders_in = addr(&orders["inbound"]);
    let orders_admin = addr(&orders["admin"]);

    // A: a frontend sidecar with an upstream to B's orders, expecting B's identity.
    let upstream =
        format!("name=orders,listen=127.0.0.1:0,address={orders_in},identity={orders_b}");
    std::fs::create_dir(a.dir.path().join("run")).unwrap();
    let a_socket = a.dir.path().join("run/workload.sock");
    let (_frontend_proxy, frontend) = a.proxy(
        "frontend",
        &a.token(&frontend_a),
        &[
            "--upstream",
            &upstream,
            "--workload-api",
            a_socket.to_str().unwrap(),
        ],
    );
    let to_orders = addr(&frontend["upstreams"]["orders"]);
    let frontend_admin = addr(&frontend["admin"]);

    // Each side's proxy holds the other's roots, for the other's trust domain.
    let a_roots = |a: &Mesh| -> Vec<String> {
        let s = a.cli_json(&["ca", "status", "-o", "json"]);
        let mut r: Vec<String> = s["bundleSha256"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        r.sort();
        r
    };
    eventually(WAIT, "B's orders proxy holding A's roots", || {
        federated_roots(&proxy_config(orders_admin), A) == a_roots(&a)
    });
    eventually(WAIT, "A's frontend proxy holding B's roots", || {
        federated_roots(&proxy_config(frontend_admin), B) == a_roots(&b)
    });

    // Allowed: B's policy names A's identity.
    let r = http(to_orders, "GET", "/orders/1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("x-bulkhead-decision"),
        Some("allow; policy=shop/orders-allow-partner; rule=partner-reads-orders; revision=1")
    );
    // Denied, with the nearest miss: outside the path the policy allows…
    let r = http(to_orders, "GET", "/admin");
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.body.contains("nearest miss: policy shop/orders-allow-partner rule partner-reads-orders matched the identity"),
        "{}",
        r.body
    );
    // …and when B's policy names another of A's identities.
    b.apply(
        "orders.yaml",
        &orders_of_b(&format!("spiffe://{A}/ns/shop/sa/billing")),
    );
    eventually(WAIT, "the narrower policy enforced", || {
        http(to_orders, "GET", "/orders/1").status == 403
    });
    let r = http(to_orders, "GET", "/orders/1");
    assert!(r.body.contains("nearest miss"), "{}", r.body);
    assert!(r.body.contains("identity"), "{}", r.body);
    b.apply("orders.yaml", &orders_of_b(&frontend_a));
    eventually(WAIT, "A's frontend allowed again", || {
        http(to_orders, "GET", "/orders/1").status == 200
    });

    // A CA never vouches for another trust domain's identities: B's CA claiming A's
    // frontend, and A's CA claiming one of B's own identities, are refused at B's sidecar.
    let b_ca = b.data().join("ca.pem");
    let b_bundle = std::fs::read_to_string(&b_ca).unwrap();
    for (name, mesh, id) in [
        ("b-signs-a", &b, frontend_a.as_str()),
        (
            "a-signs-b",
            &a,
            &format!("spiffe://{B}/ns/shop/sa/frontend")[..],
        ),
    ] {
        let forged = forged(
            b.dir.path(),
            name,
            &mesh.data().join("ca.pem"),
            &mesh.data().join("ca.key"),
            id,
        );
        let answer = mtls_raw(orders_in, &b_bundle, &orders_b, &forged, "/orders/1");
        assert!(
            answer.as_ref().map_or(true, |raw| raw.is_empty()),
            "{name}: a certificate for {id} from the other domain's CA was answered: {:?}",
            answer.map(|r| String::from_utf8_lossy(&r).into_owned())
        );
    }
    // The control: A's own CA for A's own identity is accepted by B (and judged by policy).
    let genuine = forged(
        b.dir.path(),
        "a-signs-a",
        &a.data().join("ca.pem"),
        &a.data().join("ca.key"),
        &frontend_a,
    );
    let raw = mtls_raw(orders_in, &b_bundle, &orders_b, &genuine, "/orders/1").unwrap();
    assert!(
        String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );

    // py-spiffe on B's Workload API sees B's bundle and A's.
    if let Some(python) = bulkhead_testkit::python_with(
        "two_trust_domains_federate_and_each_vouches_only_for_its_own",
        "spiffe",
    ) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/spiffe/check.py");
        let (code, out, err) = run(
            &python,
            &[
                script.to_str().unwrap(),
                "federated",
                socket.to_str().unwrap(),
                "--trust-domain",
                B,
                "--ca-pem",
                b_ca.to_str().unwrap(),
                "--federated-domain",
                A,
                "--federated-ca-pem",
                a.data().join("ca.pem").to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(code, 0, "check.py federated failed:\n{out}\n{err}");
        // A JWT-SVID of A's frontend validates at B's sidecar, with A's JWT key from A's
        // bundle endpoint.
        let (code, out, err) = jwt_federated(&python, &a_socket, &socket, &frontend_a, &[]);
        assert_eq!(code, 0, "check.py jwt-federated failed:\n{out}\n{err}");
    }

    // A rotates its CA: the new root reaches B by refresh, and once A's frontend presents a
    // certificate from the new CA, B still accepts it.
    let (code, _, err) = a.cli(&["ca", "add-root"]);
    assert_eq!(code, 0, "{err}");
    let both = a_roots(&a);
    assert_eq!(both.len(), 2);
    eventually(WAIT, "A's new root reaching B's orders proxy", || {
        federated_roots(&proxy_config(orders_admin), A) == both
    });
    let status = a.cli_json(&["ca", "status", "-o", "json"]);
    let new = status["cas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["state"] == "trusted")
        .unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(WAIT, "A's proxies confirming the two-root bundle", || {
        a.cli(&["ca", "switch", &new]).0 == 0
    });
    eventually(WAIT, "A's frontend renewed from the new CA", || {
        proxy_config(frontend_admin)["certificate"]["issuerSha256"] == new.as_str()
    });
    let r = http(to_orders, "GET", "/orders/2");
    assert_eq!(r.status, 200, "{r:?}");
    // The JWT key rotated with A's CA: a token from the new key validates at B once B's
    // refresh has brought it.
    if let Some(python) = bulkhead_testkit::python_with(
        "two_trust_domains_federate_and_each_vouches_only_for_its_own",
        "spiffe",
    ) {
        eventually(
            WAIT,
            "a JWT-SVID from A's rotated key validating at B",
            || {
                let (code, _, _) =
                    jwt_federated(&python, &a_socket, &socket, &frontend_a, &["--kids", "2"]);
                code == 0
            },
        );
    }

    // A's control plane goes away: B keeps A's last good bundle, counts the failures and
    // records one event for the run of them (A's restart above may have made one already).
    let before = refresh_failures(&b, A);
    a.stop_control();
    eventually(WAIT, "B recording the failed refresh", || {
        refresh_failures(&b, A) == before + 1
    });
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(
        refresh_failures(&b, A),
        before + 1,
        "one event per run of failures"
    );
    let metrics = http(b.metrics_addr(), "GET", "/metrics").body;
    let failures: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "bulkhead_federation_refresh_failures_total{{trust_domain=\"{A}\"}} "
            ))
        })
        .unwrap_or_else(|| panic!("no failure counter for {A}:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(failures >= 2.0, "{failures}");
    assert_eq!(federated_roots(&proxy_config(orders_admin), A), both);
    let log = std::fs::read_to_string(b.dir.path().join("control.log")).unwrap();
    assert!(log.contains("its last good bundle stays in force"), "{log}");
}
