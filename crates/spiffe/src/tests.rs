//! One test per rule of the grammar, each with the inputs it refuses and the error it names.
#![allow(clippy::unwrap_used)]

use super::*;

fn refused(id: &str) -> Rule {
    SpiffeId::parse(id).expect_err(id).rule()
}

/// Each of `ids` is refused for breaking `rule`.
fn refuses_each(rule: Rule, ids: &[&str]) {
    for id in ids {
        assert_eq!(refused(id), rule, "{id}");
    }
}

fn rule<T: std::fmt::Debug>(r: Result<T, SpiffeIdError>) -> Rule {
    r.unwrap_err().rule()
}

#[test]
fn a_workload_id_has_its_parts() {
    let id = SpiffeId::parse("spiffe://bulkhead.local/ns/shop/sa/orders").unwrap();
    assert_eq!(id.as_str(), "spiffe://bulkhead.local/ns/shop/sa/orders");
    assert_eq!(id.trust_domain(), "bulkhead.local");
    assert_eq!(id.path(), "/ns/shop/sa/orders");
    assert_eq!(
        id.segments().collect::<Vec<_>>(),
        ["ns", "shop", "sa", "orders"]
    );
    assert_eq!(id.namespace(), Some("shop"));
    assert_eq!(id.service_account(), Some("orders"));
    assert_eq!(id.namespace_segment(), Some("shop"));
    assert_eq!(id.to_string(), id.as_str());
    assert_eq!(
        SpiffeId::for_service_account("bulkhead.local", "shop", "orders").unwrap(),
        id
    );
}

#[test]
fn kubernetes_shapes() {
    let id = |s| SpiffeId::parse(s).unwrap();
    let control = id("spiffe://td/bulkhead/control");
    assert_eq!(
        (control.namespace(), control.service_account()),
        (None, None)
    );
    assert_eq!(control.namespace_segment(), None);
    // `/ns/<ns>` alone or with more after it names a namespace, but no service account.
    let short = id("spiffe://td/ns/shop");
    assert_eq!(
        (short.namespace(), short.namespace_segment()),
        (None, Some("shop"))
    );
    let long = id("spiffe://td/ns/shop/sa/orders/extra");
    assert_eq!(
        (long.namespace(), long.namespace_segment()),
        (None, Some("shop"))
    );
    assert_eq!(namespace_of("spiffe://td/ns/shop/x"), Some("shop"));
    assert_eq!(namespace_of("spiffe://TD/ns/shop/x"), None);
    assert_eq!(namespace_of("spiffe://td/nsx/shop"), None);
}

#[test]
fn the_scheme_is_spiffe() {
    refuses_each(
        Rule::Scheme,
        &["http://td/x", "SPIFFE://td/x", "spiffe:/td/x", "td/x", ""],
    );
}

#[test]
fn the_trust_domain_is_lowercase_letters_digits_dot_dash_underscore() {
    assert_eq!(refused("spiffe:///x"), Rule::EmptyTrustDomain);
    assert_eq!(refused("spiffe://"), Rule::EmptyTrustDomain);
    refuses_each(
        Rule::TrustDomainChar,
        &[
            "spiffe://TD/x",
            "spiffe://td:80/x",
            "spiffe://u@td/x",
            "spiffe://t d/x",
            "spiffe://td?x",
            "spiffe://td#x",
        ],
    );
    assert!(SpiffeId::parse("spiffe://a-b.c_d.09/x").is_ok());
}

#[test]
fn the_trust_domain_has_at_most_255_bytes() {
    let at_most = "a".repeat(MAX_TRUST_DOMAIN_LEN);
    assert!(SpiffeId::parse(&format!("spiffe://{at_most}/x")).is_ok());
    assert_eq!(
        refused(&format!("spiffe://{at_most}a/x")),
        Rule::TrustDomainTooLong
    );
    assert_eq!(
        rule(TrustDomain::parse(&format!("{at_most}a"))),
        Rule::TrustDomainTooLong
    );
}

#[test]
fn a_workload_id_needs_a_path() {
    assert_eq!(refused("spiffe://td"), Rule::NoPath);
    // The trust domain's own ID is still an ID, in its parts.
    let (td, path) = parse_parts("spiffe://td").unwrap();
    assert_eq!(
        (td.as_str(), path.as_str(), path.is_root()),
        ("td", "", true)
    );
    assert_eq!(path.segments().count(), 0);
}

#[test]
fn path_segments_are_never_empty_and_there_is_no_trailing_slash() {
    refuses_each(
        Rule::EmptySegment,
        &[
            "spiffe://td/",
            "spiffe://td/a//b",
            "spiffe://td/a/",
            "spiffe://td//a",
        ],
    );
    assert_eq!(rule(parse_parts("spiffe://td/")), Rule::EmptySegment);
}

#[test]
fn path_segments_are_never_dot_or_dot_dot() {
    refuses_each(
        Rule::DotSegment,
        &[
            "spiffe://td/./a",
            "spiffe://td/../a",
            "spiffe://td/a/..",
            "spiffe://td/.",
        ],
    );
    // Dots inside a segment are letters like any other.
    assert!(SpiffeId::parse("spiffe://td/a.b/..c/...").is_ok());
}

#[test]
fn path_segments_are_letters_digits_dot_dash_underscore() {
    refuses_each(
        Rule::PathChar,
        &[
            "spiffe://td/a?b",
            "spiffe://td/a#b",
            "spiffe://td/a b",
            "spiffe://td/a%20b",
            "spiffe://td/a:b",
            "spiffe://td/é",
        ],
    );
    assert!(SpiffeId::parse("spiffe://td/Ns/A-b_c.D/9").is_ok());
}

#[test]
fn an_id_has_at_most_2048_bytes() {
    let path = |n: usize| format!("/{}", "a".repeat(n - "spiffe://td/".len()));
    assert!(SpiffeId::parse(&format!("spiffe://td{}", path(MAX_ID_LEN))).is_ok());
    assert_eq!(
        refused(&format!("spiffe://td{}", path(MAX_ID_LEN + 1))),
        Rule::TooLong
    );
    let td = TrustDomain::parse("td").unwrap();
    let long = SpiffePath::parse(&path(MAX_ID_LEN + 1)).unwrap();
    assert_eq!(rule(SpiffeId::new(&td, &long)), Rule::TooLong);
}

#[test]
fn the_parts_make_the_id() {
    let td = TrustDomain::parse("td.test").unwrap();
    let path = SpiffePath::parse("/ns/a/sa/b").unwrap();
    let id = SpiffeId::new(&td, &path).unwrap();
    assert_eq!(id.as_str(), "spiffe://td.test/ns/a/sa/b");
    assert_eq!(id.trust_domain(), "td.test");
    assert_eq!(td.id(), "spiffe://td.test");
    assert_eq!(
        rule(SpiffeId::new(&td, &SpiffePath::parse("").unwrap())),
        Rule::NoPath
    );
    assert_eq!(rule(SpiffePath::parse("a")), Rule::PathChar);
}

#[test]
fn a_trust_domain_from_its_own_id() {
    for ok in ["spiffe://td.test", "spiffe://td.test/"] {
        assert_eq!(TrustDomain::from_id(ok).unwrap().as_str(), "td.test");
    }
    assert_eq!(
        rule(TrustDomain::from_id("spiffe://td.test/x")),
        Rule::NotTrustDomainId
    );
    assert_eq!(rule(TrustDomain::from_id("td.test")), Rule::Scheme);
}

#[test]
fn serde_is_the_string_itself() {
    let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(json, r#""spiffe://td/ns/a/sa/b""#);
    assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    let err = serde_json::from_str::<SpiffeId>(r#""spiffe://TD/x""#).unwrap_err();
    assert!(
        err.to_string().contains("trust domain may hold only"),
        "{err}"
    );
}

#[test]
fn errors_say_which_part_is_wrong() {
    assert!(refused("spiffe://TD/x").is_trust_domain());
    assert!(refused("spiffe://td/a//b").is_path());
    assert!(!refused("spiffe://td").is_path());
    assert_eq!(
        SpiffeId::parse("spiffe://td/a b").unwrap_err().to_string(),
        r#"invalid SPIFFE ID "spiffe://td/a b": path segments may hold only letters, digits, '.', '-' and '_'"#
    );
    let long = format!("spiffe://td/{}", "a".repeat(3000));
    assert_eq!(SpiffeId::parse(&long).unwrap_err().input().len(), 200);
}

#[test]
fn the_mesh_reserves_everything_under_its_own_segment() {
    for reserved in [
        "spiffe://td/bulkhead",
        "spiffe://td/bulkhead/control",
        "spiffe://td/bulkhead/admin",
        "spiffe://td/bulkhead/anything/deeper",
    ] {
        let id = SpiffeId::parse(reserved).unwrap();
        assert!(id.is_reserved(), "{reserved}");
        assert!(id.reserved_for().is_some(), "{reserved}");
        assert!(id.refuse_reserved().is_err(), "{reserved}");
    }
    assert!(
        SpiffeId::parse("spiffe://td/bulkhead/admin")
            .unwrap()
            .reserved_for()
            .unwrap()
            .contains("admin credential")
    );
    for workload in [
        "spiffe://td/ns/bulkhead/sa/admin",
        "spiffe://td/bulkheads/admin",
        "spiffe://td/bulkhead-x",
        "spiffe://bulkhead/ns/a/sa/b",
    ] {
        let id = SpiffeId::parse(workload).unwrap();
        assert!(!id.is_reserved(), "{workload}");
        assert_eq!(id.reserved_for(), None);
        assert_eq!(id.refuse_reserved(), Ok(()));
    }
}
