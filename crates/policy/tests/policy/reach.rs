//! Reachability and blast radius on known topologies, asserted as the exact edge lists and
//! paths an operator would read.

use super::wref;
use bulkhead_policy::{
    PolicySet, PolicyView, ReachError, ReachOptions, SourceEgress, blast_radius, can_reach, load,
    reachable_from, who_can_reach,
};

const SHOP: &str = include_str!("../../../../examples/shop.yaml");

/// A bank: egress deny for the namespace with egress allow rules, CIDR rules (one caller
/// without declared addresses), a deny that covers an allow and one that does not, egress
/// and ingress rules that admit no common request, a cycle (web ⇄ api) and a self-edge
/// (api → api on 9000). `ops/admin` is reachable by nobody and reaches nothing.
const BANK: &str = include_str!("../fixtures/bank.yaml");

/// Audit-mode additions: an audit deny keeps batch out of api; an audit posture opens ops.
const BANK_STAGED: &str = include_str!("../fixtures/bank-staged.yaml");

fn set(text: &str) -> PolicySet {
    let files = vec![("topology.yaml".to_string(), text.to_string())];
    load(&files, 1)
        .unwrap_or_else(|e| panic!("refused: {e:?}"))
        .1
}

fn lines<T: std::fmt::Display>(items: &[T]) -> Vec<String> {
    items.iter().map(|i| i.to_string()).collect()
}

const ENFORCED: ReachOptions = ReachOptions {
    view: PolicyView::Enforced,
    egress: SourceEgress::Enforced,
};

const BANK_EDGES: [&str; 7] = [
    "bank/api -> bank/api:9000 (tcp); egress: policy bank/api-egress rule self; ingress: policy bank/api-allow rule self",
    "bank/api -> bank/db:5432 (tcp); egress: policy bank/api-egress rule db; ingress: policy bank/db-allow rule bank",
    "bank/api -> bank/web:8080 (http); egress: policy bank/api-egress rule web; ingress: policy bank/web-allow rule from-api",
    // batch declares no address: `from-net` (a CIDR) may match it, and `outside-app-net`
    // (a deny on addresses) is not assumed to.
    "bank/batch -> bank/api:8080 (http); egress: policy bank/batch-egress rule api; ingress: policy bank/api-allow rule from-net",
    "bank/batch -> bank/api:9000 (tcp); egress: policy bank/batch-egress rule api; ingress: policy bank/api-allow rule from-net",
    "bank/batch -> bank/db:5432 (tcp); egress: policy bank/batch-egress rule db; ingress: policy bank/db-allow rule bank",
    // `api-writes` (POST) is no part of it: api admits only GET from web.
    "bank/web -> bank/api:8080 (http); egress: policy bank/web-egress rule api-reads; ingress: policy bank/api-allow rule from-web",
];

#[test]
fn shop_example_edges_and_blast_radius() {
    let shop = set(SHOP);
    assert_eq!(
        lines(&can_reach(&shop, ReachOptions::default())),
        [
            "shop/frontend -> shop/orders:8080 (http); egress: built-in posture; ingress: policy shop/orders-allow-frontend rule frontend-manages-orders",
            // payments-deny-admin (/admin, /admin/*) does not cover /charge.
            "shop/orders -> shop/payments:8080 (http); egress: built-in posture; ingress: policy shop/payments-allow-orders rule orders-charges",
        ]
    );
    let radius = blast_radius(&shop, &wref("shop/frontend"), ENFORCED).expect("declared");
    assert_eq!(
        lines(&radius.reached),
        [
            "shop/orders, 1 hop: shop/frontend -> shop/orders:8080",
            "shop/payments, 2 hops: shop/frontend -> shop/orders:8080 -> shop/payments:8080",
        ]
    );
    let payments = blast_radius(&shop, &wref("shop/payments"), ENFORCED).expect("declared");
    assert!(payments.reached.is_empty());
    assert_eq!(
        lines(&who_can_reach(&shop, &wref("shop/payments"), ENFORCED).expect("declared")),
        [
            "shop/orders -> shop/payments:8080 (http); egress: built-in posture; ingress: policy shop/payments-allow-orders rule orders-charges"
        ]
    );
}

#[test]
fn bank_edges_are_exact() {
    let bank = set(BANK);
    assert_eq!(lines(&can_reach(&bank, ENFORCED)), BANK_EDGES);
    // Per workload, the same edges.
    assert_eq!(
        lines(&who_can_reach(&bank, &wref("bank/db"), ENFORCED).expect("declared")),
        [BANK_EDGES[1], BANK_EDGES[5]]
    );
    assert_eq!(
        lines(&reachable_from(&bank, &wref("bank/web"), ENFORCED).expect("declared")),
        [BANK_EDGES[6]]
    );
    assert!(
        who_can_reach(&bank, &wref("ops/admin"), ENFORCED)
            .expect("declared")
            .is_empty()
    );
    assert!(
        reachable_from(&bank, &wref("ops/admin"), ENFORCED)
            .expect("declared")
            .is_empty()
    );
}

#[test]
fn blast_radius_follows_cycles_once() {
    let bank = set(BANK);
    let radius = |w: &str| {
        lines(
            &blast_radius(&bank, &wref(w), ENFORCED)
                .expect("declared")
                .reached,
        )
    };
    // web -> api -> web is a cycle; web itself is not listed.
    assert_eq!(
        radius("bank/web"),
        [
            "bank/api, 1 hop: bank/web -> bank/api:8080",
            "bank/db, 2 hops: bank/web -> bank/api:8080 -> bank/db:5432",
        ]
    );
    assert_eq!(
        radius("bank/api"),
        [
            "bank/db, 1 hop: bank/api -> bank/db:5432",
            "bank/web, 1 hop: bank/api -> bank/web:8080",
        ]
    );
    assert_eq!(
        radius("bank/batch"),
        [
            "bank/api, 1 hop: bank/batch -> bank/api:8080",
            "bank/db, 1 hop: bank/batch -> bank/db:5432",
            "bank/web, 2 hops: bank/batch -> bank/api:8080 -> bank/web:8080",
        ]
    );
    assert!(radius("bank/db").is_empty());
    assert!(radius("ops/admin").is_empty());
    // Each path is made of the edges themselves, with what allows each hop.
    let path = &blast_radius(&bank, &wref("bank/web"), ENFORCED)
        .expect("declared")
        .reached[1]
        .path;
    assert_eq!(lines(path), [BANK_EDGES[6], BANK_EDGES[1]]);
}

#[test]
fn a_stolen_key_bypasses_its_own_egress() {
    let bank = set(BANK);
    let stolen = ReachOptions {
        egress: SourceEgress::Bypassed,
        ..ReachOptions::default()
    };
    // From anywhere, `from-net` may match any caller of api; db's `outside-app-net` is then
    // not assumed to apply, so db's own namespace rule admits db itself.
    assert_eq!(
        lines(&who_can_reach(&bank, &wref("bank/db"), stolen).expect("declared")),
        [
            "bank/api -> bank/db:5432 (tcp); egress: not enforced; ingress: policy bank/db-allow rule bank",
            "bank/batch -> bank/db:5432 (tcp); egress: not enforced; ingress: policy bank/db-allow rule bank",
            "bank/db -> bank/db:5432 (tcp); egress: not enforced; ingress: policy bank/db-allow rule bank",
        ]
    );
    // The egress rule that admits no request web accepts no longer matters.
    assert_eq!(
        lines(&who_can_reach(&bank, &wref("bank/web"), stolen).expect("declared")),
        [
            "bank/api -> bank/web:8080 (http); egress: not enforced; ingress: policy bank/web-allow rule from-api",
            "bank/batch -> bank/web:8080 (http); egress: not enforced; ingress: policy bank/web-allow rule batch-puts",
        ]
    );
    let radius = blast_radius(&bank, &wref("ops/admin"), stolen).expect("declared");
    assert_eq!(
        lines(&radius.reached),
        [
            "bank/api, 1 hop: ops/admin -> bank/api:8080",
            "bank/db, 2 hops: ops/admin -> bank/api:8080 -> bank/db:5432",
            "bank/web, 2 hops: ops/admin -> bank/api:8080 -> bank/web:8080",
        ]
    );
}

#[test]
fn staged_view_previews_audit_policies_and_postures() {
    let text = BANK.to_string() + BANK_STAGED;
    let staged_set = set(&text);
    // Enforced: the audit additions change nothing.
    assert_eq!(lines(&can_reach(&staged_set, ENFORCED)), BANK_EDGES);
    let staged = ReachOptions {
        view: PolicyView::Staged,
        ..ReachOptions::default()
    };
    assert_eq!(
        lines(&can_reach(&staged_set, staged)),
        [
            BANK_EDGES[0],
            BANK_EDGES[1],
            BANK_EDGES[2],
            // batch -> api is gone: the audit deny covers every request from batch.
            BANK_EDGES[5],
            BANK_EDGES[6],
            "ops/admin -> ops/admin:8080 (http); egress: built-in posture; ingress: audit namespace posture ops/staged",
        ]
    );
}

#[test]
fn unknown_workloads_are_an_error_not_an_empty_answer() {
    let bank = set(BANK);
    let ghost = wref("bank/ghost");
    let err = blast_radius(&bank, &ghost, ENFORCED).expect_err("undeclared");
    assert_eq!(err, ReachError::UnknownWorkload(ghost.clone()));
    assert_eq!(
        err.to_string(),
        "no Workload bank/ghost is declared; reachability is computed between declared workloads only"
    );
    assert!(who_can_reach(&bank, &ghost, ENFORCED).is_err());
    assert!(reachable_from(&bank, &ghost, ENFORCED).is_err());
}
