#![allow(clippy::unwrap_used)]
use super::*;
use crate::testing::{Plane, from};
use bulkhead_api::pieces::{Assembler, PIECE_BYTES, resource_bytes};
use bulkhead_api::v1::admin_server::Admin;
use futures_util::StreamExt;

const ORDERS: &str = "spiffe://td.test/ns/shop/sa/orders";

/// Orders declared, and `n` deny policies for it with paths of about 200 bytes.
async fn applied(p: &Plane, n: usize) -> u64 {
    let mut yaml = String::from(
        "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {name: orders, namespace: shop}\nspec:\n  identity: spiffe://td.test/ns/shop/sa/orders\n  ports: [{port: 8080, protocol: http}]\n",
    );
    for i in 0..n {
        yaml.push_str(&format!(
            "---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: d{i}, namespace: shop}}\nspec:\n  selector: {{workload: orders}}\n  action: deny\n  rules:\n    - name: r\n      to: {{paths: [\"/{i}/{}\"]}}\n",
            "x".repeat(200)
        ));
    }
    let r = p
        .state
        .apply(from(
            "spiffe://td.test/bulkhead/admin",
            pb::ApplyRequest {
                file: "t.yaml".into(),
                yaml,
                expect_revision: None,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    p.state
        .store
        .bind(
            ORDERS,
            &ResourceName {
                namespace: "shop".into(),
                name: "orders".into(),
            },
            0,
        )
        .unwrap();
    r.revision
}

fn watch_request(held: Option<(u64, String)>, accepts_pieces: bool) -> pb::WatchRequest {
    let (held_revision, held_digest) = held.unwrap_or_default();
    pb::WatchRequest {
        namespace: "shop".into(),
        workload: "orders".into(),
        held_revision,
        held_digest,
        accepts_pieces,
        ..Default::default()
    }
}

/// The messages of the first revision a new stream sends.
async fn first_revision(p: &Plane, request: pb::WatchRequest) -> Vec<pb::ProxyConfig> {
    let mut stream = p
        .state
        .watch(from(ORDERS, request))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        let last = msg.pieces <= 1 || msg.piece + 1 == msg.pieces;
        out.push(msg);
        if last {
            return out;
        }
    }
    out
}

#[tokio::test]
async fn a_large_revision_goes_in_bounded_pieces_and_a_proxy_holding_it_gets_only_the_bundle() {
    let p = Plane::new("service-pieces");
    let revision = applied(&p, 12_000).await;
    let pieces = first_revision(&p, watch_request(None, true)).await;
    assert!(pieces.len() >= 3, "about 3 MB: {} pieces", pieces.len());
    for piece in &pieces {
        let bytes: usize = piece.resources.iter().map(resource_bytes).sum();
        assert!(bytes <= PIECE_BYTES, "{bytes} bytes in one piece");
        assert_eq!(piece.revision, revision);
    }
    let mut assembler = Assembler::default();
    let mut whole = None;
    for piece in pieces {
        whole = assembler.push(piece).unwrap();
    }
    let whole = whole.unwrap();
    assert_eq!(whole.resources.len(), 12_001);
    assert_eq!(
        whole.digest,
        bulkhead_api::pieces::digest(&whole.resources, &whole.endpoints)
    );

    // Reconnecting with exactly that revision: only the trust bundle comes back.
    let held = Some((revision, whole.digest.clone()));
    let again = first_revision(&p, watch_request(held, true)).await;
    assert_eq!(again.len(), 1);
    assert!(again[0].unchanged && again[0].resources.is_empty());
    assert!(again[0].trust_bundle.is_some());
    // Holding something else (another store's revision of that number): all of it.
    let wrong = Some((revision, "0".repeat(64)));
    assert_eq!(
        first_revision(&p, watch_request(wrong, true)).await.len(),
        whole_pieces(&p).await
    );
    // A proxy that does not take pieces gets one message, as before.
    let one = first_revision(&p, watch_request(None, false)).await;
    assert_eq!((one.len(), one[0].resources.len()), (1, 12_001));
}

async fn whole_pieces(p: &Plane) -> usize {
    first_revision(p, watch_request(None, true)).await.len()
}

#[tokio::test]
async fn a_nack_without_a_revision_counts_against_the_one_sent() {
    let p = Plane::new("service-nack");
    let revision = applied(&p, 1).await;
    let mut stream = p
        .state
        .watch(from(ORDERS, watch_request(None, true)))
        .await
        .unwrap()
        .into_inner();
    // Sent, but (say) too large for this proxy to read.
    assert_eq!(stream.next().await.unwrap().unwrap().revision, revision);
    p.state
        .ack(from(
            ORDERS,
            pb::AckRequest {
                namespace: "shop".into(),
                workload: "orders".into(),
                revision: 0,
                accepted: false,
                error: "the configuration stream broke while receiving it".into(),
                bundle_sha256: Vec::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let status = p.state.proxies.list(&[]);
    assert_eq!(status[0].nacked_revision, revision);
    assert!(status[0].nack_error.contains("broke while receiving"));
}

/// An attestor that vouches for one identity, or refuses as told.
#[derive(Debug)]
struct Vouches(Result<&'static str, crate::AttestationError>);

impl crate::Attestor for Vouches {
    fn describe(&self) -> &str {
        "a test's attestor"
    }

    fn attest<'a>(&'a self, _td: &'a str, _credential: &'a str) -> crate::Attestation<'a> {
        let answer = self.0.clone().map(|id| crate::Attested {
            id: SpiffeId::parse(id).unwrap(),
            subject: "pod shop/x-1".into(),
        });
        Box::pin(async move { answer })
    }
}

fn attested_join(token: &str, sa_token: &str) -> Request<pb::JoinRequest> {
    let key = bulkhead_identity::LocalKey::generate().unwrap();
    Request::new(pb::JoinRequest {
        token: token.into(),
        service_account_token: sa_token.into(),
        csr_der: key.csr_der(None).unwrap(),
        ..Default::default()
    })
}

#[tokio::test]
async fn a_join_by_attestation_gets_exactly_the_vouched_identity_and_its_one_workload() {
    let mut p = Plane::new("service-attested");
    let workload = |name: &str, ns: &str, sa: &str| {
        format!(
            "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  identity: spiffe://td.test/ns/shop/sa/{sa}\n---\n"
        )
    };
    let yaml = [
        workload("orders", "shop", "orders"),
        workload("orders-mirror", "other", "orders"),
        workload("twin-a", "shop", "twin"),
        workload("twin-b", "shop", "twin"),
    ]
    .concat();
    p.state
        .apply(from(
            "spiffe://td.test/bulkhead/admin",
            pb::ApplyRequest {
                file: "t.yaml".into(),
                yaml,
                ..Default::default()
            },
        ))
        .await
        .unwrap();

    // Not configured: refused in words, whatever the token.
    let e = p.state.join(attested_join("", "t")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("--kubernetes-attest"), "{e:?}");

    let mut join_as = async |answer: Result<&'static str, crate::AttestationError>| {
        p.state.attestor = Some(Arc::new(Vouches(answer)));
        p.state
            .join(attested_join("", "t"))
            .await
            .map(Response::into_inner)
    };
    // Declared in two namespaces: the one of the identity's own namespace.
    let joined = join_as(Ok(ORDERS)).await.unwrap();
    assert_eq!(joined.spiffe_id, ORDERS);
    assert_eq!(
        (joined.namespace.as_str(), joined.workload.as_str()),
        ("shop", "orders")
    );
    assert!(!joined.cert_chain_der.is_empty());

    for (answer, code, words) in [
        (
            Ok("spiffe://td.test/ns/shop/sa/nobody"),
            tonic::Code::FailedPrecondition,
            "no Workload declares spiffe://td.test/ns/shop/sa/nobody",
        ),
        (
            Ok("spiffe://td.test/ns/shop/sa/twin"),
            tonic::Code::FailedPrecondition,
            "several Workloads declare",
        ),
        (
            Ok("spiffe://elsewhere.test/ns/shop/sa/orders"),
            tonic::Code::PermissionDenied,
            "outside this control plane's trust domain",
        ),
        (
            Ok("spiffe://td.test/bulkhead/control"),
            tonic::Code::PermissionDenied,
            "reserved",
        ),
        (
            Err(crate::AttestationError::Refused {
                reason: "expired".into(),
            }),
            tonic::Code::Unauthenticated,
            "the service-account token was refused: expired",
        ),
        (
            Err(crate::AttestationError::Unreachable {
                reason: "connection refused".into(),
            }),
            tonic::Code::Unavailable,
            "could not check the service-account token: connection refused",
        ),
    ] {
        let e = join_as(answer).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(words), "{e:?}");
    }

    // Both kinds of token, or an outsized one: refused before anyone is asked.
    let e = p
        .state
        .join(attested_join("bhj.x.y", "t"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let huge = "x".repeat(65 * 1024);
    let e = p.state.join(attested_join("", &huge)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
}
