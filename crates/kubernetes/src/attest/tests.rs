//! The rule on TokenReview answers, and the client against an HTTPS server speaking the
//! TokenReview API with the answers in `tests/fixtures/tokenreview-*.json` (written to the
//! API's documented shape; never captured from a live API server).
#![allow(clippy::unwrap_used)]

use super::*;
use bulkhead_identity::Ca;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::SystemTime;

const TD: &str = "cluster.local";
const OWN_TOKEN: &str = "control-plane-service-account-token";

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

/// An API server for TokenReviews only: HTTPS under its own CA, answering each token with
/// its fixture (the request's spec echoed, as the API server does), 401 for a wrong bearer
/// token, 403 when `forbidden`.
async fn api_server(forbidden: bool) -> (InCluster, bulkhead_testkit::TempDir) {
    let ca = Ca::generate(TD, SystemTime::now()).unwrap();
    let id = SpiffeId::parse("spiffe://cluster.local/kube-apiserver").unwrap();
    let svid = ca
        .issue_local_for_hosts(
            &id,
            &["127.0.0.1".into()],
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap();
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(
        bulkhead_identity::tls::provider(),
    )
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(svid.chain().to_vec(), svid.private_key())
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let answers: BTreeMap<&str, Value> = [
        ("orders-token", fixture("orders")),
        ("other-audience-token", fixture("other-audience")),
        ("expired-token", fixture("expired")),
        ("pod-deleted-token", fixture("pod-deleted")),
    ]
    .into_iter()
    .collect();
    let answers = Arc::new(answers);
    tokio::spawn(async move {
        loop {
            let (stream, _) = tcp.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let answers = answers.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| {
                        let answers = answers.clone();
                        async move {
                            let reply = |code: StatusCode, v: Value| {
                                let mut r =
                                    http::Response::new(Full::new(Bytes::from(v.to_string())));
                                *r.status_mut() = code;
                                Ok::<_, std::convert::Infallible>(r)
                            };
                            let bearer = req
                                .headers()
                                .get(header::AUTHORIZATION)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            if bearer.as_deref() != Some(&format!("Bearer {OWN_TOKEN}")) {
                                return reply(
                                    StatusCode::UNAUTHORIZED,
                                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401}),
                                );
                            }
                            if forbidden {
                                return reply(
                                    StatusCode::FORBIDDEN,
                                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "message": "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:bulkhead-system:bulkhead-control\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
                                    "reason": "Forbidden", "code": 403}),
                                );
                            }
                            assert_eq!(path, TOKEN_REVIEW_PATH);
                            let review: Value = serde_json::from_slice(&body).unwrap();
                            assert_eq!(review["apiVersion"], "authentication.k8s.io/v1");
                            assert_eq!(review["kind"], "TokenReview");
                            assert_eq!(review["spec"]["audiences"], json!(["bulkhead"]));
                            let token = review["spec"]["token"].as_str().unwrap();
                            let mut answer = answers.get(token).cloned().unwrap_or_else(|| {
                            json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                                "status": {"user": {}, "error": "[invalid bearer token, token lookup failed]"}})
                        });
                            answer["spec"] = review["spec"].clone();
                            reply(StatusCode::CREATED, answer)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let dir = bulkhead_testkit::TempDir::new().unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("token"), format!("{OWN_TOKEN}\n")).unwrap();
    let port = port.to_string();
    let cluster = InCluster::load(
        |k| match k {
            "KUBERNETES_SERVICE_HOST" => Some("127.0.0.1".into()),
            "KUBERNETES_SERVICE_PORT" => Some(port.clone()),
            _ => None,
        },
        dir.path(),
    )
    .unwrap();
    (cluster, dir)
}

#[tokio::test]
async fn token_reviews_over_https_give_the_identity_or_the_reason() {
    let (cluster, _dir) = api_server(false).await;
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
    let (cluster, _dir) = api_server(true).await;
    let reviewer = TokenReviewer::new(cluster, "bulkhead").unwrap();
    let e = reviewer.review("orders-token").await.unwrap_err();
    assert!(matches!(e, ReviewError::Status { status: 403, .. }), "{e}");
    assert!(e.to_string().contains("cannot create resource"), "{e}");
}
