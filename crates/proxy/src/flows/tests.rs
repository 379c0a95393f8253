#![allow(clippy::unwrap_used)]
use super::*;
use bulkhead_policy::PolicySet;
use bulkhead_policy::model::ResourceName;

const POLICY: &str = include_str!("../../testdata/flows-policy.yaml");

fn orders() -> WorkloadRef {
    ResourceName {
        namespace: "shop".into(),
        name: "orders".into(),
    }
}

fn decide(set: &PolicySet, caller: &str, path: &str) -> Decision {
    set.evaluate(&crate::testing::get(&orders(), caller, path))
}

fn id(caller: &str) -> SpiffeId {
    caller.parse().unwrap()
}

fn record(flows: &Flows, d: &Decision, caller: &str, path: &str) {
    flows.record(&Seen {
        direction: Direction::Ingress,
        source_identity: Some(&id(caller)),
        source_workload: None,
        destination: &orders(),
        port: 8080,
        protocol: Protocol::Http,
        method: Some("GET"),
        path: Some(path),
        decision: d,
        bytes_in: 10,
        bytes_out: 20,
        latency: Duration::from_micros(300),
        status: Some(200),
        grpc_status: None,
    });
}

#[test]
fn an_interval_of_zero_counts_nothing() {
    let (_, set) = bulkhead_policy::load(&[("p.yaml".into(), POLICY.into())], 1).unwrap();
    let front = "spiffe://t.local/ns/shop/sa/frontend";
    let flows = Flows::for_interval(Duration::ZERO, Default::default());
    record(
        &flows,
        &decide(&set, front, "/orders/1"),
        front,
        "/orders/1",
    );
    assert_eq!(flows.held(), 0);
    let (edges, dropped) = flows.take();
    assert!(edges.is_empty());
    assert_eq!(dropped, 0, "off is not a drop");
    assert_eq!(flows.dropped_total.get(), 0);

    let flows = Flows::for_interval(Duration::from_secs(1), Default::default());
    record(
        &flows,
        &decide(&set, front, "/orders/1"),
        front,
        "/orders/1",
    );
    assert_eq!(flows.held(), 1);
}

/// A namespace posture that allows, so that posture edges name a resource too.
const POSTURE: &str = include_str!("../../testdata/flows-posture.yaml");

/// Requests of every kind of decision (rule, audit rule, built-in and namespace posture),
/// callers, paths and methods.
fn variety() -> Vec<(
    Decision,
    SpiffeId,
    Option<&'static str>,
    Option<&'static str>,
)> {
    let (_, strict) = bulkhead_policy::load(&[("p.yaml".into(), POLICY.into())], 1).unwrap();
    let posture = format!("{POLICY}---\n{POSTURE}");
    let (_, open) = bulkhead_policy::load(&[("p.yaml".into(), posture)], 2).unwrap();
    let callers = [
        "spiffe://t.local/ns/shop/sa/frontend",
        "spiffe://t.local/ns/shop/sa/payments",
    ];
    let paths = [
        "/orders/1",
        "/orders/22",
        "/orders/1/items",
        "/admin/x",
        "/admin/x?y=1",
        "/orders",
        "/",
    ];
    let mut out = Vec::new();
    for set in [&strict, &open] {
        for caller in callers {
            for path in paths {
                out.push((
                    decide(set, caller, path),
                    id(caller),
                    Some("GET"),
                    Some(path),
                ));
            }
            out.push((
                decide(set, caller, "/orders/1"),
                id(caller),
                Some("POST"),
                Some("/orders/9"),
            ));
            out.push((decide(set, caller, "/"), id(caller), None, None));
        }
    }
    out
}

fn seen<'a>(
    (decision, caller, method, path): &'a (
        Decision,
        SpiffeId,
        Option<&'static str>,
        Option<&'static str>,
    ),
    destination: &'a WorkloadRef,
) -> Seen<'a> {
    Seen {
        direction: Direction::Ingress,
        source_identity: Some(caller),
        source_workload: None,
        destination,
        port: 8080,
        protocol: Protocol::Http,
        method: *method,
        path: *path,
        decision,
        bytes_in: 1,
        bytes_out: 2,
        latency: Duration::from_micros(3),
        status: Some(200),
        grpc_status: None,
    }
}

#[test]
fn a_request_finds_exactly_the_key_it_would_build() {
    let hasher = RandomState::new();
    let destination = orders();
    let requests = variety();
    let mut kinds = std::collections::BTreeSet::new();
    for a in &requests {
        let a_seen = seen(a, &destination);
        let a_ref = KeyRef::of(&a_seen);
        let a_key = a_ref.to_key();
        kinds.insert((a_key.policy.clone(), a_key.rule.is_some()));
        let found = a_ref.found(&hasher);
        assert_eq!(found, Found::of_key(&a_key, &hasher), "{a_key:?}");
        for b in &requests {
            let b_ref = KeyRef::of(&seen(b, &destination));
            let b_key = b_ref.to_key();
            // Found from the request or from its key: equal exactly for equal keys; and
            // keys that differ only in what decided them share a bucket.
            assert_eq!(
                b_ref.found(&hasher) == found,
                a_key == b_key,
                "{a_key:?} vs {b_key:?}"
            );
            assert_eq!(Found::of_key(&b_key, &hasher) == found, a_key == b_key);
            let same_shape = EdgeKey {
                policy: None,
                rule: None,
                ..a_key.clone()
            } == EdgeKey {
                policy: None,
                rule: None,
                ..b_key.clone()
            };
            assert_eq!(b_ref.found(&hasher).bucket == found.bucket, same_shape);
        }
    }
    // Rules, audit rules, the built-in posture and a namespace posture were all seen.
    assert!(
        kinds.contains(&(Some("shop/orders-allow".into()), true)),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(Some("shop/orders-staged".into()), true)),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(Some("built-in".into()), false)),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(Some("shop/open".into()), false)),
        "{kinds:?}"
    );
}

#[test]
fn a_restored_report_merges_into_the_edges_counted_since() {
    let destination = orders();
    let requests = variety();
    let flows = Flows::new(Default::default());
    for r in &requests {
        flows.record(&seen(r, &destination));
    }
    let (first, _) = flows.take();
    for r in &requests {
        flows.record(&seen(r, &destination));
    }
    let held = flows.held();
    assert_eq!(held, first.len());
    flows.restore(first, 0);
    assert_eq!(flows.held(), held, "no edge is held twice");
    let (edges, dropped) = flows.take();
    assert_eq!(dropped, 0);
    let counted: u64 = edges.iter().map(|e| e.stats.count).sum();
    assert_eq!(counted, 2 * requests.len() as u64);
}

#[test]
fn a_resource_name_hashes_as_it_prints() {
    let state = RandomState::new();
    let of_text = |text: &str| {
        let mut h = state.build_hasher();
        hash_names(Some(text), None, &mut h);
        h.finish()
    };
    let of_name = |n: &ResourceName| {
        let mut h = state.build_hasher();
        DecidedBy::Posture(Some(n)).hash(&mut h);
        h.finish()
    };
    let n = ResourceName {
        namespace: "shop".into(),
        name: "orders-allow".into(),
    };
    assert_eq!(of_name(&n), of_text(&n.to_string()));
    for other in [
        "shop/orders",
        "shop/orders-allowx",
        "shoporders-allow",
        "shop",
        "",
        "x/shop/orders-allow",
        "*/orders-allow",
    ] {
        assert_ne!(of_name(&n), of_text(other), "{other}");
    }
    let mesh = ResourceName {
        namespace: "*".into(),
        name: "default".into(),
    };
    assert_eq!(of_name(&mesh), of_text("*/default"));
}

#[test]
fn requests_become_edges_with_templates_verdicts_and_drops() {
    let (_, set) = bulkhead_policy::load(&[("p.yaml".into(), POLICY.into())], 1).unwrap();
    let front = "spiffe://t.local/ns/shop/sa/frontend";
    let flows = Flows::new(Default::default());
    for id in ["1", "22", "333"] {
        let path = format!("/orders/{id}");
        record(&flows, &decide(&set, front, &path), front, &path);
    }
    record(&flows, &decide(&set, front, "/admin/x"), front, "/admin/x");
    let other = "spiffe://t.local/ns/shop/sa/payments";
    record(
        &flows,
        &decide(&set, other, "/orders/1"),
        other,
        "/orders/1",
    );

    let (mut edges, dropped) = flows.take();
    edges.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(dropped, 0);
    let shown: Vec<String> = edges
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {} {}",
                e.key.path.as_deref().unwrap(),
                e.key.verdict,
                e.key.policy.as_deref().unwrap_or("-"),
                e.key.rule.as_deref().unwrap_or("-"),
                e.stats.count
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            // Allowed today; the audit policy would deny: the edge names the audit rule.
            "/admin/x allow-would-deny shop/orders-staged no-admin 1",
            // Three concrete paths, one template; allowed by the rule.
            "/orders/* allow shop/orders-allow frontend-reads 3",
            "/orders/* deny built-in - 1",
        ]
    );
    assert_eq!(edges[1].stats.bytes_in, 30);
    assert_eq!(edges[1].stats.latency_max_micros, 300);
    assert!(flows.take().0.is_empty(), "a report empties the buffer");

    // Past the bound, new edges are dropped and counted; known edges still count.
    let flows = Flows::new(Default::default());
    let d = decide(&set, front, "/orders/1");
    for i in 0..MAX_EDGES + 5 {
        record(&flows, &d, front, &format!("/p{i}"));
    }
    record(&flows, &d, front, "/p0");
    let (edges, dropped) = flows.take();
    assert_eq!(edges.len(), MAX_EDGES);
    assert_eq!(dropped, 5);
    assert_eq!(flows.dropped_total.get(), 5);
}
