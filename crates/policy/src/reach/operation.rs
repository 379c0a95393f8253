//! The operation part of a rule (methods, paths, hosts, gRPC, headers) as a set of requests,
//! with two proofs the reachability analysis needs: that one such set lies within another
//! (a deny rule covers an allow rule) and that two are disjoint (no request passes both an
//! egress and an ingress rule).
//!
//! Both answers are proofs, never guesses: `false` means "could not prove it", and the
//! analysis then assumes the edge exists. Every function here must stay on that side: a
//! `true` that is not certain would hide a reachable edge.

use crate::model::HeaderCondition;
use crate::pattern::{HostPattern, Method, PathPattern};
use std::collections::BTreeSet;

/// The HTTP requests a rule's operation conditions admit. A missing field places no
/// condition; a rule with none admits every request, HTTP or not.
#[derive(Clone, Debug, Default)]
pub(crate) struct Operation<'r> {
    methods: Option<Values<'r>>,
    paths: Option<Listed<'r, PathPattern>>,
    hosts: Option<Listed<'r, HostPattern>>,
    grpc: Option<Grpc<'r>>,
    headers: Vec<Header<'r>>,
}

impl<'r> Operation<'r> {
    pub(crate) fn methods(&mut self, any: &'r [Method], none: &'r [Method]) {
        let none: BTreeSet<&str> = none.iter().map(Method::as_str).collect();
        self.methods = Some(match any.is_empty() {
            true => Values::AllBut(none),
            false => Values::Only(
                any.iter()
                    .map(Method::as_str)
                    .filter(|m| !none.contains(m))
                    .collect(),
            ),
        });
    }

    pub(crate) fn paths(&mut self, any: &'r [PathPattern], none: &'r [PathPattern]) {
        self.paths = Some(Listed { any, none });
    }

    pub(crate) fn hosts(&mut self, any: &'r [HostPattern], none: &'r [HostPattern]) {
        self.hosts = Some(Listed { any, none });
    }

    pub(crate) fn grpc(&mut self, services: &'r [String], methods: &'r [String]) {
        self.grpc = Some(Grpc { services, methods });
    }

    pub(crate) fn header(&mut self, c: &'r HeaderCondition) {
        let bare = c.values.is_empty() && c.not_values.is_empty() && c.present.is_none();
        let not: BTreeSet<&str> = c.not_values.iter().map(String::as_str).collect();
        let present = match (c.present, c.values.is_empty()) {
            (Some(false), _) => Values::Only(BTreeSet::new()),
            (_, false) => Values::Only(
                c.values
                    .iter()
                    .map(String::as_str)
                    .filter(|v| !not.contains(v))
                    .collect(),
            ),
            (_, true) => Values::AllBut(not),
        };
        self.headers.push(Header {
            name: c.header.as_str(),
            absent: c.present != Some(true) && !bare && c.values.is_empty(),
            present,
        });
    }

    /// Whether it places no condition at all.
    pub(crate) fn is_any(&self) -> bool {
        self.methods.is_none()
            && self.paths.is_none()
            && self.hosts.is_none()
            && self.grpc.is_none()
            && self.headers.is_empty()
    }

    /// Provably admits no request: an empty method list after `notMethods`, a header
    /// condition nothing satisfies, a `grpc` that lists nothing.
    pub(crate) fn admits_nothing(&self) -> bool {
        self.methods.as_ref().is_some_and(Values::is_empty)
            || self
                .grpc
                .as_ref()
                .is_some_and(|g| g.services.is_empty() && g.methods.is_empty())
            || self
                .headers
                .iter()
                .any(|h| !h.absent && h.present.is_empty())
    }

    /// Provably every request `self` admits, `other` admits too. Each condition of `other`
    /// must be matched by a condition of `self` on the same attribute that lies within it;
    /// an attribute `other` leaves free needs nothing.
    pub(crate) fn within(&self, other: &Operation<'_>) -> bool {
        fn field<T>(mine: &Option<T>, theirs: &Option<T>, within: impl Fn(&T, &T) -> bool) -> bool {
            match (mine, theirs) {
                (_, None) => true,
                (Some(a), Some(b)) => within(a, b),
                (None, Some(_)) => false,
            }
        }
        field(&self.methods, &other.methods, Values::within)
            && field(&self.paths, &other.paths, Listed::within)
            && field(&self.hosts, &other.hosts, Listed::within)
            && field(&self.grpc, &other.grpc, Grpc::within)
            && other.headers.iter().all(|theirs| {
                self.headers
                    .iter()
                    .any(|mine| mine.name == theirs.name && mine.within(theirs))
            })
    }

    /// Provably no request is admitted by both.
    pub(crate) fn disjoint(&self, other: &Operation<'_>) -> bool {
        fn field<T>(a: &Option<T>, b: &Option<T>, disjoint: impl Fn(&T, &T) -> bool) -> bool {
            matches!((a, b), (Some(a), Some(b)) if disjoint(a, b))
        }
        self.admits_nothing()
            || other.admits_nothing()
            || field(&self.methods, &other.methods, Values::disjoint)
            || field(&self.paths, &other.paths, Listed::disjoint)
            || field(&self.hosts, &other.hosts, Listed::disjoint)
            || field(&self.grpc, &other.grpc, Grpc::disjoint)
            || self.headers.iter().any(|a| {
                other
                    .headers
                    .iter()
                    .any(|b| a.name == b.name && a.disjoint(b))
            })
    }
}

/// A set of strings from an open domain (methods, header values): only these, or all but
/// these.
#[derive(Clone, Debug)]
enum Values<'r> {
    Only(BTreeSet<&'r str>),
    AllBut(BTreeSet<&'r str>),
}

impl Values<'_> {
    fn is_empty(&self) -> bool {
        matches!(self, Values::Only(s) if s.is_empty())
    }

    fn within(&self, other: &Values<'_>) -> bool {
        match (self, other) {
            (Values::Only(a), Values::Only(b)) => a.is_subset(b),
            (Values::Only(a), Values::AllBut(x)) => a.is_disjoint(x),
            (Values::AllBut(y), Values::AllBut(x)) => x.is_subset(y),
            // The domain is open: all but finitely many is never within finitely many.
            (Values::AllBut(_), Values::Only(_)) => false,
        }
    }

    fn disjoint(&self, other: &Values<'_>) -> bool {
        match (self, other) {
            (Values::Only(a), Values::Only(b)) => a.is_disjoint(b),
            (Values::Only(a), Values::AllBut(x)) | (Values::AllBut(x), Values::Only(a)) => {
                a.is_subset(x)
            }
            (Values::AllBut(_), Values::AllBut(_)) => false,
        }
    }
}

/// One header condition: whether an absent header satisfies it, and which values do.
#[derive(Clone, Debug)]
struct Header<'r> {
    name: &'r str,
    absent: bool,
    present: Values<'r>,
}

impl Header<'_> {
    fn within(&self, other: &Header<'_>) -> bool {
        (!self.absent || other.absent) && self.present.within(&other.present)
    }

    fn disjoint(&self, other: &Header<'_>) -> bool {
        !(self.absent && other.absent) && self.present.disjoint(&other.present)
    }
}

/// Patterns that can be compared: [`PathPattern`] and [`HostPattern`].
trait Pattern {
    /// Provably every value `self` matches, `other` matches.
    fn within(&self, other: &Self) -> bool;
    /// Provably no value matches both.
    fn disjoint(&self, other: &Self) -> bool;
}

/// A `paths`/`notPaths` or `hosts`/`notHosts` pair: one of `any` (anything if empty) and none
/// of `none`. For hosts, an absent host passes only when `any` is empty, which the proofs
/// below respect: they never call a set with an empty `any` within or disjoint from one
/// with a non-empty `any` on account of `any` alone.
#[derive(Clone, Debug)]
struct Listed<'r, P> {
    any: &'r [P],
    none: &'r [P],
}

impl<P: Pattern> Listed<'_, P> {
    fn within(&self, other: &Listed<'_, P>) -> bool {
        let positive = other.any.is_empty()
            || (!self.any.is_empty()
                && self
                    .any
                    .iter()
                    .all(|a| other.any.iter().any(|o| a.within(o))));
        // Each value `other` excludes is excluded by `self` too, or never admitted by it.
        let negative = other.none.iter().all(|n| {
            self.none.iter().any(|m| n.within(m))
                || (!self.any.is_empty() && self.any.iter().all(|a| a.disjoint(n)))
        });
        positive && negative
    }

    fn disjoint(&self, other: &Listed<'_, P>) -> bool {
        let excluded_by = |a: &Listed<'_, P>, b: &Listed<'_, P>| {
            !a.any.is_empty() && a.any.iter().all(|x| b.none.iter().any(|n| x.within(n)))
        };
        (!self.any.is_empty()
            && !other.any.is_empty()
            && self
                .any
                .iter()
                .all(|a| other.any.iter().all(|b| a.disjoint(b))))
            || excluded_by(self, other)
            || excluded_by(other, self)
    }
}

impl PathPattern {
    /// A string every path this pattern matches starts with. For a glob, its leading
    /// wildcard-free segments and the `/` after them (`/users/*/profile` gives `/users/`),
    /// except before a final `**`, which also matches nothing (`/admin/**` gives `/admin`,
    /// since it matches `/admin`).
    fn floor(&self) -> &str {
        match self {
            PathPattern::Exact(s) | PathPattern::Prefix(s) => s,
            PathPattern::Glob(g) => {
                let g = g.as_str();
                let star = g.find('*').unwrap_or(g.len());
                let slash = g[..star].rfind('/').unwrap_or(0);
                match &g[slash..] {
                    "/**" => &g[..slash],
                    _ => &g[..=slash],
                }
            }
        }
    }
}

impl Pattern for PathPattern {
    fn within(&self, other: &Self) -> bool {
        match (self, other) {
            (PathPattern::Exact(a), PathPattern::Exact(b)) => a == b,
            (_, PathPattern::Exact(_)) => false,
            (PathPattern::Exact(e), _) => other.matches(e),
            (_, PathPattern::Prefix(p)) => self.floor().starts_with(p.as_str()),
            (PathPattern::Glob(a), PathPattern::Glob(b)) => a == b,
            (PathPattern::Prefix(_), PathPattern::Glob(_)) => false,
        }
    }

    fn disjoint(&self, other: &Self) -> bool {
        match (self, other) {
            (PathPattern::Exact(a), PathPattern::Exact(b)) => a != b,
            (PathPattern::Exact(e), p) | (p, PathPattern::Exact(e)) => !p.matches(e),
            // Every match of each starts with its floor: two floors neither of which starts
            // with the other leave no path in common.
            (a, b) => {
                let (x, y) = (a.floor(), b.floor());
                !x.starts_with(y) && !y.starts_with(x)
            }
        }
    }
}

impl Pattern for HostPattern {
    fn within(&self, other: &Self) -> bool {
        match (self, other) {
            (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
            (HostPattern::Exact(a), HostPattern::Suffix(_)) => other.matches(a),
            (HostPattern::Suffix(s), HostPattern::Suffix(t)) => s.ends_with(t.as_str()),
            (HostPattern::Suffix(_), HostPattern::Exact(_)) => false,
        }
    }

    fn disjoint(&self, other: &Self) -> bool {
        match (self, other) {
            (HostPattern::Exact(a), HostPattern::Exact(b)) => a != b,
            (HostPattern::Exact(h), s) | (s, HostPattern::Exact(h)) => !s.matches(h),
            (HostPattern::Suffix(s), HostPattern::Suffix(t)) => {
                !s.ends_with(t.as_str()) && !t.ends_with(s.as_str())
            }
        }
    }
}

/// `grpc: {services, methods}`: any method of a listed service, or a listed
/// `service/method`.
#[derive(Clone, Debug)]
struct Grpc<'r> {
    services: &'r [String],
    methods: &'r [String],
}

impl Grpc<'_> {
    fn has_service(&self, svc: &str) -> bool {
        self.services.iter().any(|s| s == svc)
    }

    fn within(&self, other: &Grpc<'_>) -> bool {
        self.services.iter().all(|s| other.has_service(s))
            && self.methods.iter().all(|m| {
                other.methods.contains(m)
                    || m.split_once('/')
                        .is_some_and(|(svc, _)| other.has_service(svc))
            })
    }

    fn disjoint(&self, other: &Grpc<'_>) -> bool {
        let overlaps = |a: &Grpc<'_>, b: &Grpc<'_>| {
            a.services.iter().any(|s| b.has_service(s))
                || a.methods.iter().any(|m| {
                    b.methods.contains(m)
                        || m.split_once('/').is_some_and(|(svc, _)| b.has_service(svc))
                })
        };
        !overlaps(self, other) && !overlaps(other, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(v: &[&str]) -> Vec<PathPattern> {
        v.iter()
            .map(|p| PathPattern::try_from(p.to_string()).expect("path"))
            .collect()
    }

    fn hosts(v: &[&str]) -> Vec<HostPattern> {
        v.iter()
            .map(|p| HostPattern::try_from(p.to_string()).expect("host"))
            .collect()
    }

    fn methods(v: &[&str]) -> Vec<Method> {
        v.iter()
            .map(|m| Method::try_from(m.to_string()).expect("method"))
            .collect()
    }

    #[test]
    fn path_proofs() {
        let p = |s: &str| paths(&[s]).remove(0);
        // within
        for (a, b, want) in [
            ("/orders/1", "/orders/*", true),
            ("/orders/*", "/orders/*", true),
            ("/orders/1/*", "/orders/*", true),
            ("/orders/*", "/admin/*", false),
            ("/orders*", "/orders/*", false),
            ("/orders/*/items", "/orders/*", true),
            ("/admin/**", "/admin/*", false),
            ("/api/**/health", "/api/*", true),
            ("/**", "/a*", false),
            ("/admin/**", "/admin*", true),
            ("/users/7/profile", "/users/*/profile", true),
            ("/users/*", "/users/*/profile", false),
            ("/a/*/b", "/a/*/b", true),
        ] {
            assert_eq!(p(a).within(&p(b)), want, "{a} within {b}");
        }
        // disjoint
        for (a, b, want) in [
            ("/orders/*", "/admin/*", true),
            ("/orders/*", "/orders/1", false),
            ("/orders", "/orders/*", true),
            ("/orders*", "/orders/*", false),
            ("/admin/**", "/admin", false),
            ("/admin/**", "/administrator", true),
            ("/admin/**", "/adm*", false),
            ("/users/*/profile", "/orders/*", true),
            ("/*/x", "/orders/*", false),
            ("/charge", "/refund", true),
        ] {
            assert_eq!(p(a).disjoint(&p(b)), want, "{a} disjoint {b}");
            assert_eq!(p(b).disjoint(&p(a)), want, "{b} disjoint {a}");
        }
    }

    #[test]
    fn host_proofs() {
        let h = |s: &str| hosts(&[s]).remove(0);
        assert!(h("api.shop.local").within(&h("*.shop.local")));
        assert!(h("*.eu.shop.local").within(&h("*.shop.local")));
        assert!(!h("*.shop.local").within(&h("api.shop.local")));
        assert!(h("*.a.local").disjoint(&h("*.b.local")));
        assert!(!h("*.a.local").disjoint(&h("*.x.a.local")));
        assert!(h("shop.local").disjoint(&h("*.shop.local")));
    }

    #[test]
    fn operations_cover_and_separate() {
        let (admin, orders, all_but_public) = (
            paths(&["/admin/*"]),
            paths(&["/orders/*"]),
            paths(&["/public/*"]),
        );
        let (get, post) = (methods(&["GET"]), methods(&["POST"]));
        let mut deny_admin = Operation::default();
        deny_admin.paths(&admin, &[]);
        let mut allow_orders = Operation::default();
        allow_orders.paths(&orders, &[]);
        allow_orders.methods(&get, &[]);
        let everything = Operation::default();
        // A deny without operation conditions covers everything; one for /admin/* does not
        // cover /orders/*.
        assert!(allow_orders.within(&everything));
        assert!(!allow_orders.within(&deny_admin));
        assert!(!everything.within(&allow_orders));
        // Deny everything but /public/* covers /orders/*.
        let mut deny_not_public = Operation::default();
        deny_not_public.paths(&[], &all_but_public);
        assert!(allow_orders.within(&deny_not_public));
        // GET vs POST: disjoint whatever the paths.
        let mut post_orders = Operation::default();
        post_orders.methods(&post, &[]);
        assert!(allow_orders.disjoint(&post_orders));
        assert!(!allow_orders.disjoint(&everything));
        // notMethods: [GET] alone admits every other method, POST included.
        let mut not_get = Operation::default();
        not_get.methods(&[], &get);
        assert!(!not_get.disjoint(&post_orders));
        assert!(not_get.disjoint(&allow_orders));
        // A method list emptied by its own negation admits nothing.
        let mut nothing = Operation::default();
        nothing.methods(&get, &get);
        assert!(nothing.admits_nothing());
    }

    #[test]
    fn header_proofs() {
        let cond = |yaml: &str| -> HeaderCondition {
            serde_saphyr::from_str(yaml).expect("header condition")
        };
        let prod = cond("{header: x-env, values: [prod]}");
        let not_prod = cond("{header: x-env, notValues: [prod]}");
        let bare = cond("{header: x-env}");
        let absent = cond("{header: x-env, present: false}");
        fn op(c: &HeaderCondition) -> Operation<'_> {
            let mut o = Operation::default();
            o.header(c);
            o
        }
        let (prod, not_prod, bare, absent) = (op(&prod), op(&not_prod), op(&bare), op(&absent));
        assert!(prod.within(&bare));
        assert!(
            !not_prod.within(&bare),
            "notValues alone also admits an absent header"
        );
        assert!(absent.within(&not_prod));
        assert!(prod.disjoint(&not_prod));
        assert!(prod.disjoint(&absent));
        assert!(!bare.disjoint(&not_prod));
        assert!(prod.within(&Operation::default()));
        assert!(Operation::default().is_any() && !prod.is_any());
    }

    #[test]
    fn host_lists_respect_absent_hosts() {
        let shop = hosts(&["*.shop.local"]);
        let evil = hosts(&["*.evil.local"]);
        let mut only_shop = Operation::default();
        only_shop.hosts(&shop, &[]);
        let mut not_evil = Operation::default();
        not_evil.hosts(&[], &evil);
        // notHosts alone admits requests without a host; hosts: [..] does not.
        assert!(!not_evil.within(&only_shop));
        assert!(only_shop.within(&not_evil));
        assert!(!not_evil.disjoint(&only_shop));
    }
}
