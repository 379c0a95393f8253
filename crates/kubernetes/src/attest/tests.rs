//! The rule on TokenReview answers, and the client against an HTTPS server speaking the
//! TokenReview API (`bulkhead_testkit::tokenreview`, shared with the end-to-end tests) with
//! the answers in `tests/fixtures/tokenreview-*.json` (written to the API's documented
//! shape; never captured from a live API server).
#![allow(clippy::unwrap_used)]

use super::*;
use bulkhead_identity::Ca;
use serde_json::Value;
use std::time::SystemTime;

const TD: &str = "cluster.local";

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/tokenreview-{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn status(name: &str) -> TokenReviewStatus {
    serde_json::from_value(fixture(name)["status"].clone()).unwrap()
}

#[test]
fn a_bound_service_account_token_for_bulkhead_is_exactly_its_ns_and_sa() {
    let a = identity_of(TD, "bulkhead", &status("orders")).unwrap();
    assert_eq!(a.id.as_str(), "spiffe://cluster.local/ns/shop/sa/orders");
    assert_eq!(a.pod_name, "orders-7c9d8f6b5-x2x9k");
    assert_eq!(
        a.pod_uid.as_deref(),
        Some("3d9b6f21-8c4e-4a7b-b5d2-1e0f9a8c7b6d")
    );
}

#[test]
fn everything_the_api_server_did_not_affirm_is_refused() {
    for (name, words) in [
        ("other-audience", "is invalid for the target audiences"),
        ("expired", "has expired"),
        ("pod-deleted", "has been invalidated"),
    ] {
        let e = identity_of(TD, "bulkhead", &status(name)).unwrap_err();
        assert!(matches!(e, Refusal::Unauthenticated(_)), "{name}: {e:?}");
        assert!(e.to_string().contains(words), "{name}: {e}");
    }
    assert!(matches!(
        identity_of(TD, "bulkhead", &status("secret-token")),
        Err(Refusal::NotBoundToPod(_))
    ));
    // Authenticated, but for another audience than ours.
    let mut other = status("orders");
    other.audiences = Some(vec!["https://kubernetes.default.svc".into()]);
    assert!(matches!(
        identity_of(TD, "bulkhead", &other),
        Err(Refusal::Audience { .. })
    ));
    other.audiences = None;
    assert!(matches!(
        identity_of(TD, "bulkhead", &other),
        Err(Refusal::Audience { .. })
    ));
    // A person, not a service account.
    let mut person = status("orders");
    person.user.as_mut().unwrap().username = Some("alice@example.com".into());
    assert!(matches!(
        identity_of(TD, "bulkhead", &person),
        Err(Refusal::NotServiceAccount(_))
    ));
    // A name that would smuggle another path into the ID.
    let mut odd = status("orders");
    odd.user.as_mut().unwrap().username = Some("system:serviceaccount:shop:orders:x".into());
    assert!(identity_of(TD, "bulkhead", &odd).is_err());
    let mut odd = status("orders");
    odd.user.as_mut().unwrap().username = Some("system:serviceaccount:a/b:orders".into());
    assert!(identity_of(TD, "bulkhead", &odd).is_err());
}

#[test]
fn in_cluster_configuration_comes_from_the_standard_variables_and_files() {
    let dir = bulkhead_testkit::TempDir::new().unwrap();
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let e = InCluster::load(env(&[]), dir.path()).unwrap_err();
    assert!(e.to_string().contains("KUBERNETES_SERVICE_HOST"), "{e}");
    let vars = &[
        ("KUBERNETES_SERVICE_HOST", "fd00::1"),
        ("KUBERNETES_SERVICE_PORT", "443"),
    ];
    let e = InCluster::load(env(vars), dir.path()).unwrap_err();
    assert!(e.to_string().contains("ca.crt"), "{e}");
    std::fs::write(dir.path().join("ca.crt"), "x").unwrap();
    let c = InCluster::load(env(vars), dir.path()).unwrap();
    assert_eq!(c.server, "[fd00::1]:443");
    assert_eq!(c.token_file, dir.path().join("token"));
    assert!(TokenReviewer::new(c, "bulkhead").is_err(), "no certificate");
}

/// The testkit's API server for TokenReviews (HTTPS under its own CA, our bearer token
/// checked, 401 otherwise), answering each token with its fixture.
fn api_server() -> (InCluster, bulkhead_testkit::tokenreview::TokenReviewServer) {
    let server = bulkhead_testkit::tokenreview::TokenReviewServer::start();
    for (token, name) in [
        ("orders-token", "orders"),
        ("other-audience-token", "other-audience"),
        ("expired-token", "expired"),
        ("pod-deleted-token", "pod-deleted"),
    ] {
        server.answer(token, fixture(name));
    }
    let cluster =
        InCluster::explicit(&server.url(), &server.ca_file(), &server.token_file()).unwrap();
    (cluster, server)
}

#[test]
fn an_explicit_api_server_is_an_https_url() {
    let dir = bulkhead_testkit::TempDir::new().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, "x").unwrap();
    let token = dir.path().join("token");
    for (url, server, host) in [
        ("https://10.0.0.1:6443", "10.0.0.1:6443", "10.0.0.1"),
        (
            "https://api.example.com/",
            "api.example.com:443",
            "api.example.com",
        ),
        ("https://[fd00::1]:6443", "[fd00::1]:6443", "fd00::1"),
        ("https://[fd00::1]", "[fd00::1]:443", "fd00::1"),
    ] {
        let c = InCluster::explicit(url, &ca, &token).unwrap();
        assert_eq!(
            (c.server.as_str(), c.host.as_str()),
            (server, host),
            "{url}"
        );
        assert_eq!(c.token_file, token);
    }
    for url in [
        "http://10.0.0.1",
        "https://",
        "https://h:port",
        "https://h:70000",
        "https://h/api",
        "https://u@h",
        "https://[fd00::1",
        "https://[fd00::1]x",
        "https://:443",
    ] {
        assert!(InCluster::explicit(url, &ca, &token).is_err(), "{url}");
    }
    let e = InCluster::explicit("https://h", &dir.path().join("none"), &token).unwrap_err();
    assert!(e.to_string().contains("none"), "{e}");
}

#[tokio::test]
async fn token_reviews_over_https_give_the_identity_or_the_reason() {
    let (cluster, server) = api_server();
    let reviewer = TokenReviewer::new(cluster.clone(), "bulkhead").unwrap();
    let a = reviewer.attest(TD, "orders-token").await.unwrap().unwrap();
    assert_eq!(a.id.as_str(), "spiffe://cluster.local/ns/shop/sa/orders");
    for (token, words) in [
        ("other-audience-token", "target audiences"),
        ("expired-token", "has expired"),
        ("pod-deleted-token", "has been invalidated"),
        ("unknown-token", "token lookup failed"),
    ] {
        let refusal = reviewer.attest(TD, token).await.unwrap().unwrap_err();
        assert!(refusal.to_string().contains(words), "{token}: {refusal}");
    }

    // Each review as the API reads it: kind, version and our audience (the server refuses
    // another kind, version or path).
    let reviews = server.reviews();
    assert_eq!(reviews.len(), 5);
    for r in &reviews {
        assert_eq!(
            r["spec"]["audiences"],
            serde_json::json!(["bulkhead"]),
            "{r}"
        );
    }

    // Our own token is read at each call (the kubelet rotates it): a wrong one is a 401.
    std::fs::write(&cluster.token_file, "stale").unwrap();
    let e = reviewer.review("orders-token").await.unwrap_err();
    assert!(matches!(e, ReviewError::Status { status: 401, .. }), "{e}");

    // Another CA than the cluster's is not trusted.
    let foreign = Ca::generate(TD, SystemTime::now()).unwrap();
    let wrong = InCluster {
        ca_pem: foreign.cert_pem().to_string(),
        ..cluster
    };
    let e = TokenReviewer::new(wrong, "bulkhead")
        .unwrap()
        .review("orders-token")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
}

#[tokio::test]
async fn a_missing_rbac_grant_is_named() {
    let (cluster, server) = api_server();
    server.forbid(true);
    let reviewer = TokenReviewer::new(cluster, "bulkhead").unwrap();
    let e = reviewer.review("orders-token").await.unwrap_err();
    assert!(matches!(e, ReviewError::Status { status: 403, .. }), "{e}");
    assert!(e.to_string().contains("cannot create resource"), "{e}");
}
