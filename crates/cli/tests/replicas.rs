//! Several control-plane replicas on etcd (issue #18), end-to-end with the real binaries: a
//! real three-member etcd cluster (Debian's `etcd`) on loopback ports and three `bulkhead
//! control --etcd` replicas, each on its own data directory and port. The cluster and the
//! replicas are started once for this binary; the scenarios run in order against them: one
//! CA set for all (no key in etcd in clear), a root added on one replica reaches all;
//! concurrent applies on all three replicas lose nothing and every replica shows the same
//! history; an apply on one replica reaches the proxies connected to another and changes
//! what they allow, any replica lists those proxies with their replica, graphs the flows
//! they reported (asking the others for theirs on demand) and lists the anomalies found in
//! them, and a replica that does not answer is named by `graph`, which answers with the
//! others' edges; `apply --wait` on one replica awaits the sidecars on another, naming
//! the one that refuses the revision and its replica; a join token
//! redeemed on one replica is used up on the others, and the proxy it made is served by
//! another replica after a restart; an identity revoked on one replica is revoked on all,
//! and so is a proxy instance (refused by every replica's sidecars, its renewal by every
//! replica, and in every replica's credential history); one JWT-SVID key for all (sealed in etcd), rotating with `ca switch` on any;
//! with one etcd member killed, applies still succeed everywhere; the leader killed,
//! another replica leads within its lease; that replica back, a sidecar pair given all
//! three replicas' addresses loses the replica it is on under 50 requests a second with no
//! failed request, and enforces a deny applied on a survivor. Apart, on one etcd member that serves clients over
//! TLS only and asks for a client certificate: a replica given its CA and a client
//! certificate runs on it; one given another CA, or no client certificate, is refused.
#![allow(clippy::unwrap_used)]

#[path = "spiffe/check.rs"]
mod check;

use bulkhead_testkit::etcd::EtcdCluster;
use bulkhead_testkit::mesh::{Mesh, TD, WAIT, eventually, orders_policy};
use bulkhead_testkit::{TempDir, http, tool};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

/// The three replicas, each a [`Mesh`] whose control plane keeps its set in `etcd`.
struct Replicas {
    etcd: EtcdCluster,
    replicas: Vec<Mesh>,
}

impl Replicas {
    fn start(test: &str) -> Option<Replicas> {
        let etcd = tool(test, "etcd")?;
        let etcd = EtcdCluster::start(etcd, 3);
        let endpoints = etcd.endpoints();
        let secret = secret_key(&etcd);
        let secret = secret.to_str().unwrap();
        let replicas = (0..3)
            .map(|_| {
                Mesh::start_with(&[
                    "--etcd",
                    &endpoints,
                    "--etcd-secret-key-file",
                    secret,
                    // Anomalies from the first flow on: `events` lists every replica's.
                    "--anomaly-learning-secs",
                    "0",
                ])
            })
            .collect();
        Some(Replicas { etcd, replicas })
    }
}

/// The secret key every replica is given: 32 random bytes, 0600, in the cluster's directory.
fn secret_key(etcd: &EtcdCluster) -> std::path::PathBuf {
    let secret = etcd.dir.path().join("secret.key");
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut bytes,
    )
    .unwrap();
    std::fs::write(&secret, bytes).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    secret
}

/// A policy named `name` that denies `/blocked/<name>` on orders: many of them can be
/// applied by several writers without touching one another's.
fn deny(name: &str) -> String {
    format!(
        "apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{workload: orders}}\n  action: deny\n  rules:\n    - name: blocked\n      to: {{paths: [\"/blocked/{name}\"]}}\n"
    )
}

/// `bulkhead history -o json`'s revisions.
fn revisions(mesh: &Mesh) -> serde_json::Value {
    let json = mesh.cli_json(&["history", "-o", "json", "--limit", "1000"]);
    json["revisions"].clone()
}

/// The names of the AuthorizationPolicies `bulkhead get` lists on `mesh`.
fn policy_names(mesh: &Mesh) -> Vec<String> {
    let json = mesh.cli_json(&["get", "policies", "-o", "json"]);
    let items = json
        .as_array()
        .or_else(|| json["items"].as_array())
        .cloned()
        .unwrap_or_default();
    let mut names: Vec<String> = items
        .iter()
        .filter_map(|r| r["metadata"]["name"].as_str().map(String::from))
        .collect();
    names.sort();
    names
}

fn apply_file(mesh: &Mesh, name: &str, text: &str) -> (i32, String, String) {
    let file = mesh.dir.path().join(name);
    std::fs::write(&file, text).unwrap();
    mesh.cli(&["apply", "-f", file.to_str().unwrap()])
}

fn status(to: SocketAddr, path: &str) -> u16 {
    http(to, "GET", path).status
}

#[test]
fn three_replicas_on_etcd() {
    let Some(mut r) = Replicas::start("three_replicas_on_etcd") else {
        return;
    };
    one_ca_set_for_all_replicas(&r);
    a_ca_added_on_one_replica_reaches_all(&r);
    a_data_dir_with_another_ca_is_not_overwritten(&r);
    concurrent_applies_lose_nothing(&r);
    apply_on_one_replica_reaches_proxies_on_another(&r);
    graph_names_a_replica_that_does_not_answer(&r);
    promote_checks_every_replicas_flows(&r);
    apply_wait_follows_every_replicas_proxies(&r);
    a_join_token_is_spent_on_every_replica(&r);
    a_revocation_on_one_replica_holds_on_all(&r);
    a_proxy_revoked_on_one_replica_is_refused_everywhere(&r);
    a_ca_switch_waits_for_every_replicas_proxies(&r);
    one_jwt_key_for_every_replica(&r);
    applies_succeed_with_one_etcd_member_down(&mut r);
    let dead = the_leadership_moves_when_the_leader_dies(&mut r);
    proxies_on_a_killed_replica_move_to_another_with_no_failed_request(&mut r, dead);
}

/// A replica reaches etcd over mutual TLS (our own etcd client, rustls): with the members'
/// CA and a client certificate it starts, leads and commits; with another CA it is refused
/// (the member's certificate is not trusted), and without a client certificate too (the
/// member refuses it), each before writing anything.
#[test]
fn a_replica_reaches_etcd_over_mutual_tls() {
    let test = "a_replica_reaches_etcd_over_mutual_tls";
    let (Some(etcd), Some(openssl)) = (tool(test, "etcd"), tool(test, "openssl")) else {
        return;
    };
    let (cluster, tls) = EtcdCluster::start_tls(etcd, openssl);
    let endpoints = cluster.endpoints();
    assert!(endpoints.starts_with("https://"), "{endpoints}");
    let secret = secret_key(&cluster);
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let mesh = Mesh::start_with(&[
        "--etcd",
        &endpoints,
        "--etcd-secret-key-file",
        &path(&secret),
        "--etcd-ca",
        &path(&tls.ca),
        "--etcd-cert",
        &path(&tls.client_cert),
        "--etcd-key",
        &path(&tls.client_key),
    ]);
    let (code, _, err) = apply_file(&mesh, "orders.yaml", &orders_policy("/orders/*"));
    assert_eq!(code, 0, "apply over TLS to etcd failed: {err}");
    let (code, _, err) = apply_file(&mesh, "over-tls.yaml", &deny("over-tls"));
    assert_eq!(code, 0, "apply over TLS to etcd failed: {err}");
    assert!(policy_names(&mesh).contains(&"over-tls".to_string()));
    eventually(WAIT, "the replica on TLS etcd leading", || {
        let list = replicas(&mesh);
        list["store"] == "etcd"
            && list["replicas"]
                .as_array()
                .is_some_and(|all| all.len() == 1 && all[0]["leader"] == true)
    });
    assert_eq!(revisions(&mesh).as_array().map(Vec::len), Some(2));

    let refused = |name: &str, tls_args: &[&str]| {
        let data = mesh.dir.path().join(name);
        let log = refused_replica(&mesh, name, &data, &endpoints, &secret, tls_args);
        assert!(!data.join("ca.key").exists(), "{name} made a CA");
        log
    };
    let (ca, cert, key, other) = (
        path(&tls.ca),
        path(&tls.client_cert),
        path(&tls.client_key),
        path(&tls.other_ca),
    );
    let log = refused(
        "control-other-ca",
        &[
            "--etcd-ca",
            &other,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
        ],
    );
    assert!(
        log.contains("did not answer") && log.contains("UnknownIssuer"),
        "{log}"
    );
    let log = refused("control-no-client-cert", &["--etcd-ca", &ca]);
    assert!(log.contains("did not answer"), "{log}");
    let log = refused(
        "control-cert-without-ca",
        &["--etcd-cert", &cert, "--etcd-key", &key],
    );
    assert!(log.contains("--etcd-cert needs --etcd-ca"), "{log}");
    // The applies above are still the only revisions: nothing refused wrote anything.
    assert_eq!(revisions(&mesh).as_array().map(Vec::len), Some(2));
}

/// An identity revoked on replica 1: every replica lists it, and refuses it a join token
/// (made before or after); its unused token made on replica 2 before is gone.
fn a_revocation_on_one_replica_holds_on_all(r: &Replicas) {
    let mallory = bulkhead_testkit::mesh::id("mallory");
    let early = r.replicas[2].token(&mallory);
    let (code, _, err) = r.replicas[1].cli(&["revoke", "identity", &mallory, "--reason", "stolen"]);
    assert_eq!(code, 0, "{err}");
    for (i, mesh) in r.replicas.iter().enumerate() {
        eventually(WAIT, &format!("replica {i} listing the revocation"), || {
            let (_, out, _) = mesh.cli(&["get", "revocations", "-o", "json"]);
            out.contains(&mallory) && out.contains("stolen")
        });
        let (code, _, err) = mesh.cli(&["token", "create", "--identity", &mallory]);
        assert_ne!(code, 0, "replica {i} made a token for a revoked identity");
        assert!(err.contains("revoked"), "{err}");
    }
    let err = r.replicas[0].failing_proxy(&early, &[]);
    assert!(err.contains("not known"), "{err}");
}

/// A proxy instance on replica 0, called by a frontend sidecar on each replica, revoked on
/// replica 1: every replica lists the revocation, the frontends on all three refuse its
/// certificate (200 → 502 `reason=revoked`), replica 0 ends its configuration stream, and
/// its renewal with its kept credential is refused at every replica, naming the revocation.
fn a_proxy_revoked_on_one_replica_is_refused_everywhere(r: &Replicas) {
    use bulkhead_testkit::mesh::{addr, id};
    let a = &r.replicas[0];
    let (code, _, err) = apply_file(a, "orders-open.yaml", &orders_policy("/orders/*"));
    assert_eq!(code, 0, "{err}");
    let (_app, app) = a.app("orders-rv");
    let app = app.to_string();
    let token = a.token(&id("orders"));
    let inbound = ["--inbound", "127.0.0.1:0", "--app", &app, "--port", "8080"];
    let (mut orders, ready) = a.proxy("orders-rv", &token, &inbound);
    let upstream = format!(
        "name=orders,listen=127.0.0.1:0,address={},identity={}",
        addr(&ready["inbound"]),
        id("orders")
    );
    let frontends: Vec<(bulkhead_testkit::Proc, SocketAddr)> = r
        .replicas
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let token = m.token(&id("frontend"));
            let (p, ready) = m.proxy(
                &format!("frontend-rv{i}"),
                &token,
                &["--upstream", &upstream],
            );
            (p, addr(&ready["upstreams"]["orders"]))
        })
        .collect();
    for (i, (_, to_orders)) in frontends.iter().enumerate() {
        eventually(WAIT, &format!("replica {i}'s frontend allowed"), || {
            status(*to_orders, "/orders/1") == 200
        });
    }
    let id0 = replica_id(a);
    let proxies = |m: &Mesh| -> Vec<serde_json::Value> {
        let (_, out, _) = m.cli(&["get", "proxies", "-o", "json"]);
        serde_json::from_str(&out).unwrap_or_default()
    };
    let instance = proxies(&r.replicas[1])
        .into_iter()
        .find(|p| {
            p["workload"] == "orders" && p["connected"] == true && p["replica"] == id0.as_str()
        })
        .expect("orders listed on replica 0")["instance"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(instance.len(), 12, "{instance}");

    let (code, out, err) =
        r.replicas[1].cli(&["revoke", "proxy", &instance, "--reason", "host lost"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("certificates refused: "), "{out}");
    let revoked = std::time::Instant::now();
    for (i, (_, to_orders)) in frontends.iter().enumerate() {
        eventually(
            WAIT,
            &format!("replica {i}'s frontend refusing orders"),
            || {
                let got = http(*to_orders, "GET", "/orders/1");
                got.status == 502 && got.body.contains("reason=revoked")
            },
        );
    }
    eprintln!(
        "proxy instance revoked on replica 1: refused by the frontends on all three replicas within {} ms",
        revoked.elapsed().as_millis()
    );
    for (i, mesh) in r.replicas.iter().enumerate() {
        eventually(WAIT, &format!("replica {i} listing the revocation"), || {
            let (_, out, _) = mesh.cli(&["get", "revocations", "-o", "json"]);
            out.contains(&instance) && out.contains("host lost")
        });
    }
    // Revoking it again on another replica: it is revoked already, saying by whom and why.
    let (code, _, err) = r.replicas[2].cli(&["revoke", "proxy", &instance]);
    assert_ne!(code, 0);
    assert!(
        err.contains("already revoked") && err.contains("host lost"),
        "{err}"
    );
    // The credential audit log is every replica's: the revocation as replica 1 made it,
    // by whom and why, in `history` on all three (once each).
    let action = format!("revoke proxy {instance}");
    for (i, mesh) in r.replicas.iter().enumerate() {
        eventually(
            WAIT,
            &format!("replica {i}'s history with the revocation"),
            || {
                let (_, out, _) = mesh.cli(&["history", "-o", "json"]);
                let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                let made: Vec<&serde_json::Value> = json["credentials"]
                    .as_array()
                    .map(|all| {
                        all.iter()
                            .filter(|e| e["action"] == action.as_str())
                            .collect()
                    })
                    .unwrap_or_default();
                made.len() == 1
                    && made[0]["actor"]
                        .as_str()
                        .is_some_and(|a| a.ends_with("(user alice)"))
                    && made[0]["detail"].to_string().contains("host lost")
            },
        );
    }
    eventually(WAIT, "replica 0 ending orders' stream", || {
        proxies(a).iter().any(|p| {
            p["instance"] == instance.as_str()
                && p["connected"] == false
                && p["revoked"].as_str().unwrap_or("").contains("host lost")
        })
    });
    // Its kept credential renews nowhere, and its spent token does not let it join.
    orders.kill();
    for (i, mesh) in r.replicas.iter().enumerate() {
        let err = mesh.failing_proxy(&token, &[]);
        assert!(
            err.contains("was refused") && err.contains("host lost") && err.contains(&instance),
            "replica {i}: {err}"
        );
    }
}

/// A JWT-SVID fetched through a sidecar on replica 0 validates at a sidecar on replica 2
/// (py-spiffe and ValidateJWTSVID), every replica holds the same key, and etcd holds it
/// sealed only. After `ca switch` on replica 1, a token from the rotated key validates at
/// replica 2's sidecar too, with the old key still in its bundle.
fn one_jwt_key_for_every_replica(r: &Replicas) {
    use bulkhead_testkit::mesh::id;
    let python = bulkhead_testkit::python_with("three_replicas_on_etcd", "spiffe");
    let upstream = format!(
        "name=x,listen=127.0.0.1:0,address=127.0.0.1:9,identity={}",
        id("x")
    );
    let sidecar = |m: &Mesh, sa: &str| {
        let run = m.dir.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        let socket = run.join(format!("{sa}.sock"));
        let token = m.token(&id(sa));
        let args = [
            "--upstream",
            &upstream,
            "--workload-api",
            socket.to_str().unwrap(),
        ];
        let (p, _) = m.proxy(&format!("{sa}-jwt"), &token, &args);
        (p, socket)
    };
    let (_fetching, fetch) = sidecar(&r.replicas[0], "frontend");
    let (_validating, validate) = sidecar(&r.replicas[2], "orders");
    let key = |m: &Mesh| std::fs::read(m.data().join("jwt-svid.key")).unwrap();
    for m in &r.replicas[1..] {
        assert_eq!(
            key(m),
            key(&r.replicas[0]),
            "a replica with its own JWT key"
        );
    }
    let check = |kids: &str| {
        check::jwt_federated(
            python.as_ref().unwrap(),
            &fetch,
            &validate,
            &id("frontend"),
            &["--kids", kids],
        )
    };
    if python.is_some() {
        let (code, out, err) = check("1");
        assert_eq!(code, 0, "check.py jwt-federated failed:\n{out}\n{err}");
    }
    let stored = etcd_get_prefix(r, "/bulkhead/");
    let pem = String::from_utf8(key(&r.replicas[0])).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        stored.contains("\"jwt-svid.key\":{\"sealed\""),
        "no sealed JWT key in etcd"
    );
    assert!(!stored.contains("PRIVATE KEY"), "a key in etcd in clear");
    assert!(
        !stored.contains(&body[..40]),
        "the JWT key in etcd in clear"
    );

    // A CA switch on replica 1 rotates the one key for all.
    let (_, out, _) = r.replicas[1].cli(&["ca", "status", "-o", "json"]);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let next = status["cas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["state"] == "trusted")
        .expect("the root added on replica 0")["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, _, err) = r.replicas[1].cli(&["ca", "switch", &next, "--force"]);
    assert_eq!(code, 0, "{err}");
    for (i, m) in r.replicas.iter().enumerate() {
        eventually(
            WAIT,
            &format!("replica {i} signing JWT-SVIDs with the rotated key"),
            || key(m) != pem.as_bytes() && key(m) == key(&r.replicas[1]),
        );
    }
    if python.is_some() {
        eventually(
            WAIT,
            "a JWT-SVID from the rotated key validating at replica 2",
            || check("2").0 == 0,
        );
    }
}

/// `ca switch` on one replica is refused while a proxy connected to another has not
/// confirmed holding the new root (it would refuse every certificate the CA signs),
/// naming the proxy and its replica.
fn a_ca_switch_waits_for_every_replicas_proxies(r: &Replicas) {
    use bulkhead_testkit::mesh::id;
    let c = &r.replicas[2];
    let upstream = format!(
        "name=x,listen=127.0.0.1:0,address=127.0.0.1:9,identity={}",
        id("x")
    );
    let token = c.token(&id("frontend"));
    let (held, _) = c.proxy("held", &token, &["--upstream", &upstream]);
    let on = replica_id(c);
    eventually(
        WAIT,
        "replica 0 listing the held proxy on replica 2",
        || {
            let (_, out, _) = r.replicas[0].cli(&["get", "proxies", "-o", "json"]);
            let list: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            list.as_array().is_some_and(|all| {
                all.iter().any(|p| {
                    p["spiffeId"] == id("frontend").as_str()
                        && p["replica"] == on.as_str()
                        && p["connected"] == true
                })
            })
        },
    );
    let trusted = || -> Vec<String> {
        let (_, out, _) = r.replicas[0].cli(&["ca", "status", "-o", "json"]);
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        status["cas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["state"] == "trusted")
            .map(|c| c["sha256"].as_str().unwrap().to_string())
            .collect()
    };
    let before = trusted();
    // Stopped, it stays connected and never confirms the root added now.
    signal("-STOP", held.id());
    let (code, _, err) = r.replicas[0].cli(&["ca", "add-root"]);
    assert_eq!(code, 0, "{err}");
    let newest = trusted()
        .into_iter()
        .find(|c| !before.contains(c))
        .expect("the root just added, trusted");
    // `ca status` on replica 0 counts the proxies of every replica: the held one is
    // connected and not on the current bundle.
    let (_, out, _) = r.replicas[0].cli(&["ca", "status", "-o", "json"]);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let connected = status["proxies"]["connected"].as_u64().unwrap();
    let current = status["proxies"]["withCurrentBundle"].as_u64().unwrap();
    assert!(connected >= 1 && current < connected, "{out}");
    let (code, _, err) = r.replicas[0].cli(&["ca", "switch", &newest]);
    signal("-CONT", held.id());
    assert_eq!(
        code, 1,
        "switched while a proxy on replica 2 lacked the root: {err}"
    );
    assert!(
        err.contains("have not confirmed holding the root")
            && err.contains(&format!(
                "{} (shop/frontend) on replica {on}",
                id("frontend")
            )),
        "{err}"
    );
}

/// The id `mesh`'s replica has in `get replicas`.
fn replica_id(mesh: &Mesh) -> String {
    replicas(mesh)["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["answering"] == true)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A series' value on a sidecar's admin `/metrics` (0 if absent).
fn proxy_metric(admin: SocketAddr, series: &str) -> f64 {
    http(admin, "GET", "/metrics")
        .body
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A sidecar's admin `/config` `controlPlane` object.
fn control_plane(admin: SocketAddr) -> serde_json::Value {
    let config: serde_json::Value =
        serde_json::from_str(&http(admin, "GET", "/config").body).unwrap();
    config["controlPlane"].clone()
}

/// The replica killed with the leader started again on its data directory and port: three
/// replicas, healthy, on the two etcd members left. A sidecar pair joins replica 1 and is
/// given all three replicas' addresses; the frontend calls orders at a fixed 50 requests a
/// second (a new connection each) while the replica both sidecars are on is killed: no
/// request fails, both move to a surviving replica (`/config`, `/metrics`, `get proxies`),
/// and a deny applied on a surviving replica (the other one, when it can be) is enforced by
/// them.
fn proxies_on_a_killed_replica_move_to_another_with_no_failed_request(
    r: &mut Replicas,
    dead: usize,
) {
    let secret = r.etcd.dir.path().join("secret.key");
    let endpoints = r.etcd.endpoints();
    r.replicas[dead].restart_control_in(
        TD,
        &[
            "--etcd",
            &endpoints,
            "--etcd-secret-key-file",
            secret.to_str().unwrap(),
        ],
    );
    for (i, mesh) in r.replicas.iter().enumerate() {
        eventually(WAIT, &format!("replica {i} listing three replicas"), || {
            let list = replicas(mesh);
            let all = list["replicas"].as_array().unwrap();
            all.len() == 3 && all.iter().all(|x| x["healthy"] == true)
        });
    }
    let ids: Vec<String> = r.replicas.iter().map(replica_id).collect();
    // Reopen everything the frontend may GET under /orders/ (deny-seven stays).
    let (code, _, err) = apply_file(
        &r.replicas[1],
        "orders-again.yaml",
        &orders_policy("/orders/*"),
    );
    assert_eq!(code, 0, "{err}");
    let start = &r.replicas[1];
    let first = start.control_addr;
    let others: Vec<String> = [2, 0]
        .iter()
        .map(|&i| r.replicas[i].control_addr.to_string())
        .collect();
    let others = others.join(",");
    let (procs, to_orders) =
        start.orders_and_frontend_with(&["--control", &others], &["--control", &others]);
    let given = format!("{},{others}", start.control_addr);
    let admins: Vec<SocketAddr> = ["orders", "frontend"]
        .iter()
        .map(|name| {
            let ready =
                std::fs::read_to_string(start.dir.path().join(format!("{name}-proxy.json")))
                    .unwrap();
            let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
            bulkhead_testkit::mesh::addr(&ready["admin"])
        })
        .collect();
    eventually(WAIT, "GET /orders/1 allowed", || {
        status(to_orders, "/orders/1") == 200
    });
    // Both sidecars on replica 1, the first address they were given.
    for admin in &admins {
        let on = control_plane(*admin);
        assert_eq!(on["given"], given.as_str(), "{on:#}");
        assert_eq!(on["replica"], start.control_addr.to_string(), "{on:#}");
        assert_eq!(proxy_metric(*admin, "bulkhead_control_replica "), 1.0);
    }
    let killed = r
        .replicas
        .iter()
        .position(|m| m.control_addr == first)
        .unwrap();

    // Fixed-rate traffic through both sidecars, a new connection each time.
    let traffic = bulkhead_testkit::FixedRate::start(to_orders, "/orders/live-");
    std::thread::sleep(Duration::from_secs(1));

    let stopped = std::time::Instant::now();
    r.replicas[killed].stop_control();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != killed).collect();
    let survivor_addrs: Vec<String> = survivors
        .iter()
        .map(|&i| r.replicas[i].control_addr.to_string())
        .collect();
    eventually(WAIT, "both sidecars on a surviving replica", || {
        admins.iter().all(|a| {
            let on = control_plane(*a);
            on["replica"]
                .as_str()
                .is_some_and(|x| survivor_addrs.iter().any(|s| s == x))
        })
    });
    let moved = stopped.elapsed();
    // Which survivor each is on, by address.
    let on: Vec<usize> = admins
        .iter()
        .map(|a| {
            let replica = control_plane(*a)["replica"].as_str().unwrap().to_string();
            survivors
                .iter()
                .copied()
                .find(|&i| r.replicas[i].control_addr.to_string() == replica)
                .unwrap()
        })
        .collect();
    for admin in &admins {
        assert!(proxy_metric(*admin, "bulkhead_control_replica ") >= 2.0);
        assert_eq!(
            proxy_metric(*admin, "bulkhead_control_replica_moves_total "),
            1.0
        );
        let why = control_plane(*admin)["movedBecause"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(why.contains(&format!("{first} was lost")), "{why}");
    }
    // The surviving replicas list them, connected to the replica each moved to.
    eventually(WAIT, "the sidecars listed on their new replica", || {
        let (code, out, _) = r.replicas[survivors[0]].cli(&["get", "proxies", "-o", "json"]);
        let Ok(list) = serde_json::from_str::<serde_json::Value>(&out) else {
            return false;
        };
        code == 0
            && ["orders", "frontend"].iter().zip(&on).all(|(w, &i)| {
                list.as_array().unwrap().iter().any(|p| {
                    p["workload"] == *w && p["replica"] == ids[i].as_str() && p["connected"] == true
                })
            })
    });

    // A deny applied on a surviving replica, the one orders' sidecar is not on if the two
    // survivors differ in that: the sidecars enforce it.
    let via = survivors
        .iter()
        .copied()
        .find(|&i| i != on[0])
        .unwrap_or(on[0]);
    assert_eq!(status(to_orders, "/orders/forbidden"), 200);
    let (code, _, err) = apply_file(
        &r.replicas[via],
        "no-forbidden.yaml",
        &deny_path("no-forbidden", "/orders/forbidden"),
    );
    assert_eq!(code, 0, "{err}");
    let applied = std::time::Instant::now();
    eventually(Duration::from_secs(5), "the deny enforced", || {
        status(to_orders, "/orders/forbidden") == 403
    });
    let enforced = applied.elapsed();

    // The traffic carries on a while on the new replica: at least 2 s after the kill, and
    // 1 s after the deny.
    let rest = Duration::from_secs(2).saturating_sub(stopped.elapsed());
    std::thread::sleep(rest.max(Duration::from_secs(1)));
    let (sent, failed, lasted) = traffic.stop();
    eprintln!(
        "replica {killed} killed under 50 req/s: {sent} requests in {:.1} s, {} failed; both sidecars on replica(s) {on:?} {} ms after the kill; a deny applied on replica {via} enforced within {} ms",
        lasted.as_secs_f64(),
        failed.len(),
        moved.as_millis(),
        enforced.as_millis()
    );
    assert!(failed.is_empty(), "failed during the move: {failed:?}");
    // The rate held: at least 80 % of 50 a second, over at least 2.5 s.
    assert!(lasted >= Duration::from_millis(2500), "{lasted:?}");
    assert!(
        f64::from(sent) >= 0.8 * 50.0 * lasted.as_secs_f64(),
        "{sent} requests in {lasted:?}"
    );
    drop(procs);
}

/// `bulkhead get replicas -o json` on `mesh`.
fn replicas(mesh: &Mesh) -> serde_json::Value {
    mesh.cli_json(&["get", "replicas", "-o", "json"])
}

/// The id of the leader `mesh` lists, and how many replicas it lists.
fn leader(mesh: &Mesh) -> (Option<String>, usize) {
    let list = replicas(mesh);
    let all = list["replicas"].as_array().unwrap();
    let leaders: Vec<&serde_json::Value> = all.iter().filter(|x| x["leader"] == true).collect();
    assert!(leaders.len() <= 1, "{list:#}");
    (
        leaders
            .first()
            .map(|l| l["id"].as_str().unwrap().to_string()),
        all.len(),
    )
}

/// Every replica lists the three, healthy, one of them leading. Killing the leader: within
/// its lease another replica leads, and the dead one is gone from the list; applies go on.
/// Returns which replica it killed.
fn the_leadership_moves_when_the_leader_dies(r: &mut Replicas) -> usize {
    for mesh in &r.replicas {
        eventually(WAIT, "three replicas, one leading", || {
            let list = replicas(mesh);
            let all = list["replicas"].as_array().unwrap();
            list["store"] == "etcd"
                && all.len() == 3
                && all.iter().all(|x| x["healthy"] == true)
                && all.iter().filter(|x| x["leader"] == true).count() == 1
                && all.iter().filter(|x| x["answering"] == true).count() == 1
        });
    }
    let (Some(old), _) = leader(&r.replicas[0]) else {
        panic!("no leader");
    };
    let (code, table, err) = r.replicas[0].cli(&["get", "replicas"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("leader") && table.contains("store: etcd"),
        "{table}"
    );
    let dead = r
        .replicas
        .iter()
        .position(|m| {
            replicas(m)["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["answering"] == true && x["id"] == old.as_str())
        })
        .unwrap();
    r.replicas[dead].stop_control();
    let alive = (dead + 1) % 3;
    let killed = std::time::Instant::now();
    eventually(
        Duration::from_secs(10),
        "another replica leading",
        || matches!(leader(&r.replicas[alive]), (Some(new), 2) if new != old),
    );
    eprintln!(
        "leadership moved {} ms after the leader was killed",
        killed.elapsed().as_millis()
    );
    let (code, _, err) = apply_file(
        &r.replicas[alive],
        "after-leader.yaml",
        &deny("after-leader"),
    );
    assert_eq!(code, 0, "{err}");
    dead
}

/// The first replica made the CA set and stored it in etcd, keys sealed; the others took
/// it: one trust bundle, and no CA key in etcd in clear.
fn one_ca_set_for_all_replicas(r: &Replicas) {
    let bundle = |m: &Mesh| std::fs::read_to_string(m.data().join("ca.pem")).unwrap();
    for m in &r.replicas[1..] {
        assert_eq!(bundle(m), bundle(&r.replicas[0]));
    }
    let key = std::fs::read_to_string(r.replicas[0].data().join("ca.key")).unwrap();
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let stored = etcd_get_prefix(r, "/bulkhead/ca/");
    assert!(stored.contains("aes256gcm"), "{stored}");
    assert!(!stored.contains("PRIVATE KEY"), "a CA key in etcd in clear");
    assert!(!stored.contains(&body[..40]), "a CA key in etcd in clear");
}

/// A root added on replica 0 is trusted by every replica: each takes the CA set up from
/// etcd and serves the new bundle.
fn a_ca_added_on_one_replica_reaches_all(r: &Replicas) {
    let (code, _, err) = r.replicas[0].cli(&["ca", "add-root"]);
    assert_eq!(code, 0, "{err}");
    let cas = |m: &Mesh| {
        let status = m.cli_json(&["ca", "status", "-o", "json"]);
        let mut fingerprints: Vec<String> = status["cas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| format!("{} {}", c["sha256"], c["state"]))
            .collect();
        fingerprints.sort();
        fingerprints
    };
    let on_0 = cas(&r.replicas[0]);
    assert_eq!(on_0.len(), 2, "{on_0:?}");
    for (i, m) in r.replicas.iter().enumerate().skip(1) {
        eventually(WAIT, &format!("replica {i} holding the new root"), || {
            cas(m) == on_0
                && std::fs::read_to_string(m.data().join("ca.pem")).unwrap()
                    == std::fs::read_to_string(r.replicas[0].data().join("ca.pem")).unwrap()
        });
    }
}

/// A control plane that ran on its own, started against the replicas' etcd: refused,
/// naming its CA, and its key left as it was.
fn a_data_dir_with_another_ca_is_not_overwritten(r: &Replicas) {
    let mut alone = Mesh::start();
    alone.stop_control();
    let key_before = std::fs::read(alone.data().join("ca.key")).unwrap();
    let secret = r.etcd.dir.path().join("secret.key");
    let data = alone.data();
    let log = refused_replica(
        &alone,
        "control-alone",
        &data,
        &r.etcd.endpoints(),
        &secret,
        &[],
    );
    assert!(
        log.contains("not in the CA set the replicas share in etcd"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(alone.data().join("ca.key")).unwrap(),
        key_before
    );

    // Another secret key, an empty data directory: refused, no key written.
    let other = alone.dir.path().join("other.key");
    std::fs::write(&other, [9u8; 32]).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let fresh = alone.dir.path().join("fresh");
    let log = refused_replica(
        &alone,
        "control-other-key",
        &fresh,
        &r.etcd.endpoints(),
        &other,
        &[],
    );
    assert!(log.contains("does not open with it"), "{log}");
    assert!(!fresh.join("ca.key").exists());
}

/// Starts a replica on `data` with the etcd at `endpoints`, `secret` and `extra` flags,
/// beside `alone`; expects it to exit with an error, and returns its log.
fn refused_replica(
    alone: &Mesh,
    name: &str,
    data: &std::path::Path,
    endpoints: &str,
    secret: &std::path::Path,
    extra: &[&str],
) -> String {
    let mut args = vec![
        "control",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--trust-domain",
        TD,
        "--etcd",
        endpoints,
        "--etcd-secret-key-file",
        secret.to_str().unwrap(),
    ];
    args.extend(extra);
    let mut control =
        bulkhead_testkit::Proc::spawn(name, alone.dir.path(), &alone.bins.bulkhead, &args, &[]);
    assert_ne!(control.wait_exit(WAIT), Some(0), "{}", control.log_text());
    control.log_text()
}

/// A join token made on replica 0 is redeemed by a proxy joining replica 1; the same token
/// presented to replica 2 is refused as used up.
fn a_join_token_is_spent_on_every_replica(r: &Replicas) {
    let token = r.replicas[0].token(&bulkhead_testkit::mesh::id("once"));
    let upstream = [
        "--upstream",
        "name=x,listen=127.0.0.1:0,address=127.0.0.1:9,identity=spiffe://test.local/ns/shop/sa/x",
    ];
    let (mut proxy, _) = r.replicas[1].proxy("once", &token, &upstream);
    // A copy: a proxy keeps its credential beside its token file, and would renew with it.
    let again = r.replicas[2].dir.path().join("once-again.token");
    std::fs::copy(&token, &again).unwrap();
    let err = r.replicas[2].failing_proxy(&again, &[]);
    assert!(err.contains("used up"), "{err}");
    // The proxy that joined on replica 1, restarted against replica 2: it renews there with
    // its kept credential, and replica 2 serves it its configuration (the binding its join
    // made is in etcd).
    proxy.kill();
    let (_proxy, _) = r.replicas[2].proxy("once", &token, &upstream);
    eventually(
        WAIT,
        "replica 2 serving the proxy joined on replica 1",
        || {
            let (_, out, _) = r.replicas[2].cli(&["get", "proxies", "-o", "json"]);
            let list: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            let answering = replica_id(&r.replicas[2]);
            list.as_array().is_some_and(|l| {
                l.iter().any(|p| {
                    p["workload"] == "once"
                        && p["connected"] == true
                        && p["replica"] == answering.as_str()
                        && p["ackedRevision"].as_u64() > Some(0)
                })
            })
        },
    );
}

/// Ten applies on each replica at once, each of its own policy: all thirty are in the set
/// every replica serves, each is one revision, and `bulkhead history` is the same on all
/// three.
fn concurrent_applies_lose_nothing(r: &Replicas) {
    // The workload the policies select, applied once.
    let (code, _, err) = apply_file(&r.replicas[0], "orders.yaml", &orders_policy("/orders/*"));
    assert_eq!(code, 0, "{err}");
    let base = revisions(&r.replicas[0]).as_array().unwrap().len();
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for (i, mesh) in r.replicas.iter().enumerate() {
            s.spawn(move || {
                for n in 0..10 {
                    let name = format!("r{i}-deny-{n}");
                    let (code, out, err) = apply_file(mesh, &format!("{name}.yaml"), &deny(&name));
                    assert_eq!(code, 0, "apply {name} on replica {i} failed: {err}");
                    assert!(
                        out.contains(&format!("AuthorizationPolicy/shop/{name} created")),
                        "{out}"
                    );
                }
            });
        }
    });
    eprintln!(
        "30 applies, 10 on each of 3 replicas at once: {} ms",
        started.elapsed().as_millis()
    );
    let mut expected: Vec<String> = (0..3)
        .flat_map(|i| (0..10).map(move |n| format!("r{i}-deny-{n}")))
        .collect();
    expected.push("orders-allow-frontend".into());
    expected.sort();
    for (i, mesh) in r.replicas.iter().enumerate() {
        eventually(
            WAIT,
            &format!("replica {i} serving all 31 policies"),
            || policy_names(mesh) == expected,
        );
    }
    let history = revisions(&r.replicas[0]);
    let entries = history.as_array().unwrap();
    assert_eq!(entries.len(), base + 30, "{history:#}");
    // One revision per apply, numbered without a gap, each naming its one policy.
    for (k, e) in entries.iter().enumerate() {
        assert_eq!(
            e["revision"].as_u64().unwrap(),
            (entries.len() - k) as u64,
            "{history:#}"
        );
    }
    for name in expected.iter().filter(|n| n.contains("-deny-")) {
        let created = format!("AuthorizationPolicy/shop/{name} created");
        let count = entries
            .iter()
            .filter(|e| {
                e["changes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c == &created)
            })
            .count();
        assert_eq!(count, 1, "{name} in the history: {history:#}");
    }
    for (i, mesh) in r.replicas.iter().enumerate().skip(1) {
        assert_eq!(revisions(mesh), history, "replica {i}'s history differs");
    }
    assert!(
        entries
            .iter()
            .all(|e| e["actor"] == format!("spiffe://{TD}/bulkhead/admin (user alice)")),
        "{history:#}"
    );
}

/// Sidecars joined to replica 0; the policies they enforce are applied on replicas 1 and 2.
fn apply_on_one_replica_reaches_proxies_on_another(r: &Replicas) {
    let a = &r.replicas[0];
    let (_procs, to_orders) = a.orders_and_frontend(&["--flow-interval-secs", "1"]);
    // Allowed by orders-allow-frontend, applied on replica 0 above.
    eventually(WAIT, "GET /orders/1 allowed", || {
        status(to_orders, "/orders/1") == 200
    });
    // Replica 1 narrows the allow to /orders/7 only: replica 0's proxies enforce it.
    let (code, _, err) = apply_file(&r.replicas[1], "narrow.yaml", &orders_policy("/orders/7"));
    assert_eq!(code, 0, "{err}");
    let applied = std::time::Instant::now();
    eventually(
        Duration::from_secs(5),
        "the narrowed policy enforced",
        || status(to_orders, "/orders/1") == 403,
    );
    eprintln!(
        "applied on replica 1, enforced by replica 0's proxies within {} ms",
        applied.elapsed().as_millis()
    );
    assert_eq!(status(to_orders, "/orders/7"), 200);
    // Replica 2 denies /orders/7 outright.
    let (code, _, err) = apply_file(
        &r.replicas[2],
        "deny7.yaml",
        &deny_path("deny-seven", "/orders/7"),
    );
    assert_eq!(code, 0, "{err}");
    eventually(Duration::from_secs(5), "the deny enforced", || {
        status(to_orders, "/orders/7") == 403
    });
    // Any replica lists those proxies, on replica 0.
    let id0 = replica_id(&r.replicas[0]);
    eventually(WAIT, "replica 2 listing replica 0's proxies", || {
        let (code, out, _) = r.replicas[2].cli(&["get", "proxies", "-o", "json"]);
        let Ok(list) = serde_json::from_str::<serde_json::Value>(&out) else {
            return false;
        };
        code == 0
            && ["orders", "frontend"].iter().all(|w| {
                list.as_array().unwrap().iter().any(|p| {
                    p["workload"] == *w && p["replica"] == id0.as_str() && p["connected"] == true
                })
            })
    });
    // The flows orders' proxy reported to replica 0 are in replica 2's graph.
    eventually(WAIT, "replica 0's edges in replica 2's graph", || {
        let (code, out, _) = r.replicas[2].cli(&["graph", "-o", "json"]);
        let g: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        code == 0
            && g.as_array().is_some_and(|edges| {
                edges.iter().any(|e| {
                    e["source"] == bulkhead_testkit::mesh::id("frontend").as_str()
                        && e["destination"] == "shop/orders"
                        && e["decided"] == "ingress"
                        && e["denied"].as_u64() > Some(0)
                })
            })
    });
    // The anomalies replica 0 found in those flows are in replica 2's `events`, naming
    // replica 0.
    eventually(WAIT, "replica 0's events listed by replica 2", || {
        let (code, out, _) = r.replicas[2].cli(&["events", "-o", "json"]);
        let events: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        code == 0
            && events.as_array().is_some_and(|all| {
                all.iter().any(|e| {
                    e["kind"] == "new-edge"
                        && e["sourceIdentity"] == bulkhead_testkit::mesh::id("frontend").as_str()
                        && e["replica"] == id0.as_str()
                })
            })
    });
    let (_, table, _) = r.replicas[2].cli(&["events"]);
    assert!(
        table.contains(&format!("(found by replica {id0})")),
        "{table}"
    );
    let (_, table, _) = r.replicas[1].cli(&["get", "proxies"]);
    assert!(table.starts_with("REPLICA"), "{table}");
    // Every replica says so, at the same revision.
    let revs: Vec<serde_json::Value> = r
        .replicas
        .iter()
        .map(|m| revisions(m)[0]["revision"].clone())
        .collect();
    assert!(revs.iter().all(|v| v == &revs[0]), "{revs:?}");
}

/// Sends `signal` (`-STOP`, `-CONT`) to process `pid`.
fn signal(signal: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// Replica 1 stopped (SIGSTOP: still listed in etcd for up to its lease, its port accepting
/// connections but nothing answering): `graph` on replica 2 answers after the wait for it
/// (3 to 5 s), with the edges reported to replica 0, and names replica 1 as missing; once
/// replica 1 runs again, no replica is named.
fn graph_names_a_replica_that_does_not_answer(r: &Replicas) {
    let stopped = replica_id(&r.replicas[1]);
    let pid = r.replicas[1].control.id();
    signal("-STOP", pid);
    let asked = std::time::Instant::now();
    let (code, out, err) = r.replicas[2].cli(&["graph", "-o", "json"]);
    let took = asked.elapsed();
    signal("-CONT", pid);
    assert_eq!(code, 0, "{err}");
    // Named, with its address and why (the dial's own 3 s bound, or the 5 s one on the call).
    assert!(
        err.contains(&format!("warning: replica {stopped} (")) && err.contains("no answer within"),
        "{err}"
    );
    let g: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        g.as_array()
            .unwrap()
            .iter()
            .any(|e| e["destination"] == "shop/orders"),
        "replica 0's edges are missing: {out}"
    );
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(9),
        "graph took {took:?}"
    );
    eprintln!(
        "graph with replica 1 stopped: {} ms, replica 1 named missing",
        took.as_millis()
    );
    eventually(WAIT, "graph with every replica answering", || {
        let (code, _, err) = r.replicas[2].cli(&["graph"]);
        code == 0 && !err.contains("warning: replica")
    });
}

/// `promote` on one replica checks the flows reported to the others: an audit deny that
/// would deny requests a sidecar on replica 0 reports is refused on replica 2, naming the
/// flow; with a replica stopped, a promotion it cannot check is refused naming that
/// replica, and goes through once it answers.
fn promote_checks_every_replicas_flows(r: &Replicas) {
    let a = &r.replicas[0];
    let (_procs, to_orders) = a.orders_and_frontend(&["--flow-interval-secs", "1"]);
    let frontend = bulkhead_testkit::mesh::id("frontend");
    let policy = |name: &str, action: &str, mode: &str| {
        format!(
            "apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{workload: orders}}\n  action: {action}\n  mode: {mode}\n  rules:\n    - name: nine\n      from: {{identities: [\"{frontend}\"]}}\n      to: {{methods: [GET], paths: [\"/orders/9\"]}}\n"
        )
    };
    let text = [
        policy("promote-allow", "allow", "enforce"),
        policy("promote-audit", "deny", "audit"),
        policy("promote-quiet", "deny", "audit").replace("/orders/9", "/quiet"),
    ]
    .join("---\n");
    let (code, _, err) = apply_file(a, "promote.yaml", &text);
    assert_eq!(code, 0, "{err}");
    eventually(WAIT, "GET /orders/9 allowed, would be denied", || {
        let got = http(to_orders, "GET", "/orders/9");
        got.status == 200
            && got
                .header("x-bulkhead-decision")
                .is_some_and(|h| h.contains("audit=would-deny"))
    });

    // Replica 2 refuses to enforce what replica 0's sidecars saw it would deny, once that
    // flow is reported (replica 2's graph shows it).
    let c = &r.replicas[2];
    eventually(WAIT, "the would-deny flow in replica 2's graph", || {
        let (code, out, _) = c.cli(&["graph", "-o", "json"]);
        let g: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        code == 0
            && g.as_array().is_some_and(|edges| {
                edges.iter().any(|e| {
                    e["destination"] == "shop/orders"
                        && e["decided"] == "ingress"
                        && e["would_deny"].as_u64() > Some(0)
                })
            })
    });
    let (code, _, err) = c.cli(&["promote", "shop/promote-audit"]);
    assert_ne!(code, 0, "promoted over a flow reported to replica 0");
    assert!(
        err.contains("would have denied 1 requests")
            && err.contains(&format!("{frontend} → shop/orders:8080 GET /orders/")),
        "{err}"
    );

    // With replica 1 stopped, one nothing was seen for cannot be checked there: refused,
    // naming replica 1; promoted once it answers.
    let stopped = replica_id(&r.replicas[1]);
    let pid = r.replicas[1].control.id();
    signal("-STOP", pid);
    let (code, _, err) = c.cli(&["promote", "shop/promote-quiet"]);
    signal("-CONT", pid);
    assert_ne!(code, 0, "promoted unchecked: {err}");
    assert!(
        err.contains("could not be checked")
            && err.contains(&format!("{stopped} ("))
            && err.contains("--force"),
        "{err}"
    );
    eventually(
        WAIT,
        "promote-quiet promoted with every replica answering",
        || {
            let (code, out, _) = c.cli(&["promote", "shop/promote-quiet"]);
            code == 0 && out.contains("is enforced")
        },
    );
    // Forced over the flow: enforced at replica 0's sidecars.
    let (code, out, err) = c.cli(&["promote", "shop/promote-audit", "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is enforced"), "{out}");
    eventually(Duration::from_secs(5), "GET /orders/9 denied", || {
        status(to_orders, "/orders/9") == 403
    });

    // Leave the set as it was for the scenarios after this one.
    let (code, _, err) = a.cli(&[
        "delete",
        "AuthorizationPolicy/shop/promote-allow",
        "AuthorizationPolicy/shop/promote-audit",
        "AuthorizationPolicy/shop/promote-quiet",
    ]);
    assert_eq!(code, 0, "{err}");
}

/// What `etcdctl get --prefix PREFIX` prints from the test's etcd cluster.
fn etcd_get_prefix(r: &Replicas, prefix: &str) -> String {
    let (code, stored, err) = bulkhead_testkit::run(
        &tool("etcdctl", "etcdctl").unwrap(),
        &[
            "--endpoints",
            &r.etcd.endpoints(),
            "get",
            "--prefix",
            prefix,
        ],
        &[("ETCDCTL_API", "3")],
    );
    assert_eq!(code, 0, "{err}");
    stored
}

fn deny_path(name: &str, path: &str) -> String {
    deny(name).replace(&format!("/blocked/{name}"), path)
}

/// One of three etcd members killed: the other two are a majority, and every replica
/// still applies, and sees the others' applies.
fn applies_succeed_with_one_etcd_member_down(r: &mut Replicas) {
    r.etcd.kill(2);
    for (i, mesh) in r.replicas.iter().enumerate() {
        let name = format!("after-loss-{i}");
        let (code, out, err) = apply_file(mesh, &format!("{name}.yaml"), &deny(&name));
        assert_eq!(
            code, 0,
            "apply on replica {i} with etcd member m2 down failed: {err}"
        );
        assert!(out.contains("created"), "{out}");
    }
    for (i, mesh) in r.replicas.iter().enumerate() {
        eventually(WAIT, &format!("replica {i} seeing every apply"), || {
            let names = policy_names(mesh);
            (0..3).all(|k| names.contains(&format!("after-loss-{k}")))
        });
    }
    let history = revisions(&r.replicas[0]);
    for mesh in &r.replicas[1..] {
        assert_eq!(revisions(mesh), history);
    }
    // Keep the temporary directory alive to the end (logs for a failure message).
    let _: &TempDir = &r.etcd.dir;
}

/// `apply --wait` on replica 0 waits for the affected proxies of every live replica: an
/// `ewait` sidecar on replica 0, one on replica 1 and an `ewaitnack` one on replica 1 all
/// put the revision declaring their workloads in force; then the `ewaitnack` sidecar, which
/// takes at most 2 rules, refuses a revision with 3, reported as refused, with its reason
/// and its replica, while the others acknowledge it.
fn apply_wait_follows_every_replicas_proxies(r: &Replicas) {
    let (a, b) = (&r.replicas[0], &r.replicas[1]);
    let (id_a, id_b) = (replica_id(a), replica_id(b));
    let nowhere = |name: &str| {
        format!(
            "name={name},listen=127.0.0.1:0,address=127.0.0.1:9,identity={}",
            bulkhead_testkit::mesh::id(name)
        )
    };
    let sidecar = |mesh: &Mesh, name: &str, extra: &[&str]| {
        let token = mesh.token(&bulkhead_testkit::mesh::id(name));
        let upstream = nowhere("x");
        let mut args = vec!["--upstream", upstream.as_str()];
        args.extend_from_slice(extra);
        mesh.proxy(name, &token, &args).0
    };
    let _on_a = sidecar(a, "ewait", &[]);
    let _on_b = sidecar(b, "ewait", &[]);
    let _nack_b = sidecar(b, "ewaitnack", &["--max-policy-rules", "2"]);
    // All three listed in etcd, connected, on their replicas.
    eventually(WAIT, "the three sidecars listed on their replicas", || {
        let (code, out, _) = a.cli(&["get", "proxies", "-o", "json"]);
        let Ok(list) = serde_json::from_str::<serde_json::Value>(&out) else {
            return false;
        };
        let on = |w: &str, replica: &str| {
            list.as_array()
                .unwrap()
                .iter()
                .any(|p| p["workload"] == w && p["replica"] == replica && p["connected"] == true)
        };
        code == 0 && on("ewait", &id_a) && on("ewait", &id_b) && on("ewaitnack", &id_b)
    });

    let file = a.dir.path().join("ewait.yaml");
    // The two workloads, declared, and deny policies `(name, workload)` on them.
    let policies = |names: &[(&str, &str)]| {
        ["ewait", "ewaitnack"]
            .iter()
            .map(|w| {
                format!(
                    "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {w}, namespace: shop}}\nspec:\n  identity: {}\n  ports: [{{port: 8080, protocol: http}}]\n",
                    bulkhead_testkit::mesh::id(w)
                )
            })
            .chain(names.iter().map(|(name, workload)| {
                deny(name).replace("{workload: orders}", &format!("{{workload: {workload}}}"))
            }))
            .collect::<Vec<_>>()
            .join("---\n")
    };
    std::fs::write(&file, policies(&[("ewait-1", "ewait")])).unwrap();
    let file = file.to_str().unwrap();
    let (code, out, err) = a.cli(&["apply", "-f", file, "--wait", "--timeout", "30s"]);
    assert_eq!(code, 0, "{out}{err}");
    let revision: u64 = out
        .trim_end()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {out}"));
    let (first, second) = match id_a < id_b {
        true => (&id_a, &id_b),
        false => (&id_b, &id_a),
    };
    assert!(
        err.contains(&format!(
            "revision {revision} is in force at all 3 proxies (on replicas {first}, {second})"
        )),
        "{err}"
    );

    // Three rules for ewaitnack, over the 2 its sidecar on replica 1 takes.
    std::fs::write(
        file,
        policies(&[
            ("ewait-1", "ewait"),
            ("ewait-2", "ewait"),
            ("ewaitnack-1", "ewaitnack"),
            ("ewaitnack-2", "ewaitnack"),
            ("ewaitnack-3", "ewaitnack"),
        ]),
    )
    .unwrap();
    let (code, out, err) = a.cli(&["apply", "-f", file, "--wait", "--timeout", "30s"]);
    assert_eq!(code, 1, "{out}{err}");
    let revision = revision + 1;
    assert!(out.ends_with(&format!("revision {revision}\n")), "{out}");
    assert!(
        err.contains(&format!(
            "error: revision {revision} is not in force at 1 of 3 proxies:\n  {} (shop/ewaitnack) on replica {id_b} refused revision {revision}: revision {revision} has 3 rules for this proxy; it accepts at most 2 (--max-policy-rules)\n",
            bulkhead_testkit::mesh::id("ewaitnack")
        )),
        "{err}"
    );

    // Leave the set as it was for the scenarios after this one.
    let (code, _, err) = a.cli(&[
        "delete",
        "AuthorizationPolicy/shop/ewait-1",
        "AuthorizationPolicy/shop/ewait-2",
        "AuthorizationPolicy/shop/ewaitnack-1",
        "AuthorizationPolicy/shop/ewaitnack-2",
        "AuthorizationPolicy/shop/ewaitnack-3",
        "Workload/shop/ewait",
        "Workload/shop/ewaitnack",
    ]);
    assert_eq!(code, 0, "{err}");
}
