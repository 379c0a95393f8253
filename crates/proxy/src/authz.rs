//! Authorization: the configuration every decision is made from, and the permit that
//! forwarding requires.
//!
//! Why it exists: a request must be judged against one revision — its rules and the mesh's
//! address table together — and nothing may reach the app or an upstream unjudged. So the
//! configuration lives in one immutable [`Snapshot`], swapped whole by `watch` in one store
//! and loaded once per request (one atomic load); and every function that sends to the app
//! or an upstream takes a [`Permit`], which only [`Snapshot::judge`] makes, and only for a
//! decision that allows. No path can forward a request nobody judged, because no path can
//! make a permit without a judgement.
//!
//! It must never hand out a permit for a denial, and a decision must never read two
//! snapshots.

use bulkhead_policy::model::WorkloadRef;
use bulkhead_policy::{Decision, Endpoints, PolicySet, Protocol, Request};

/// One revision of everything a decision reads: the compiled policy and the mesh's address
/// table, with the revision they came in. Never changed in place: a new revision is a new
/// snapshot.
#[derive(Default)]
pub(crate) struct Snapshot {
    revision: u64,
    policy: PolicySet,
    endpoints: Endpoints,
}

impl Snapshot {
    /// The policy's revision is the snapshot's: both came in one configuration message.
    pub(crate) fn new(policy: PolicySet, endpoints: Endpoints) -> Snapshot {
        Snapshot {
            revision: policy.revision(),
            policy,
            endpoints,
        }
    }

    /// The revision in force; 0 before the first configuration (everything inbound denied).
    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    /// Where the mesh's workloads are (transparent routing).
    pub(crate) fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Whether `workload` declares any port (then a port it does not declare is refused).
    pub(crate) fn declares_ports(&self, workload: &WorkloadRef) -> bool {
        self.policy.declares_ports(workload)
    }

    /// The protocol `workload` declares for `port`, if this proxy was told.
    pub(crate) fn declared_protocol(&self, workload: &WorkloadRef, port: u16) -> Option<Protocol> {
        self.policy.declared_protocol(workload, port)
    }

    /// The declared workloads whose Workload names `identity`.
    pub(crate) fn workloads_with_identity(&self, identity: &str) -> &[WorkloadRef] {
        self.policy.workloads_with_identity(identity)
    }

    /// Decides one request or connection. The permit comes only with an allowing decision
    /// (an audit-mode would-deny still allows: audit never changes a verdict).
    pub(crate) fn judge(&self, req: &Request<'_>) -> Judgement {
        let decision = self.policy.evaluate(req);
        let permit = decision.is_allow().then_some(Permit { _judged: () });
        Judgement { decision, permit }
    }
}

/// What [`Snapshot::judge`] found: the decision, and the permit if it allows.
pub(crate) struct Judgement {
    decision: Decision,
    permit: Option<Permit>,
}

impl Judgement {
    pub(crate) fn decision(&self) -> &Decision {
        &self.decision
    }

    pub(crate) fn into_parts(self) -> (Decision, Option<Permit>) {
        (self.decision, self.permit)
    }
}

/// Leave to forward one request or relay one connection, made only by [`Snapshot::judge`]
/// for a decision that allows. Its field is private to this module, it is neither `Clone`
/// nor `Default`, and the functions that send to the app or an upstream take it by value:
/// holding one is proof that a decision allowed what is being sent. It costs nothing at run
/// time: it has no size.
#[must_use = "a permit exists to be given to the function that forwards"]
#[derive(Debug)]
pub(crate) struct Permit {
    _judged: (),
}

impl Permit {
    /// A permit for unit tests of the forwarding plumbing, which have no policy to ask.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Permit {
        Permit { _judged: () }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bulkhead_policy::model::ResourceName;

    const SET: &str = r#"apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: orders, namespace: shop}
spec:
  identity: spiffe://td/ns/shop/sa/orders
  ports: [{port: 8080, protocol: http}]
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: shop}
spec:
  selector: {workload: orders}
  action: allow
  rules:
    - name: reads
      from: {identities: ["spiffe://td/ns/shop/sa/frontend"]}
      to: {methods: [GET], paths: ["/orders/*"]}
---
apiVersion: bulkhead.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: audit-deny, namespace: shop}
spec:
  selector: {workload: orders}
  mode: audit
  action: deny
  rules:
    - name: would-deny-7
      to: {paths: ["/orders/7"]}
"#;

    fn snapshot() -> Snapshot {
        let (_, set) = bulkhead_policy::load(&[("set.yaml".into(), SET.into())], 4).unwrap();
        Snapshot::new(set, Endpoints::default())
    }

    fn get(s: &Snapshot, path: &str) -> Judgement {
        let orders = ResourceName {
            namespace: "shop".into(),
            name: "orders".into(),
        };
        s.judge(&crate::testing::get(
            &orders,
            "spiffe://td/ns/shop/sa/frontend",
            path,
        ))
    }

    #[test]
    fn a_permit_comes_only_with_an_allowing_decision() {
        let s = snapshot();
        assert_eq!(s.revision(), 4);
        let (decision, permit) = get(&s, "/orders/1").into_parts();
        assert!(decision.is_allow());
        assert!(permit.is_some());
        let (decision, permit) = get(&s, "/admin").into_parts();
        assert!(!decision.is_allow());
        assert!(permit.is_none(), "a denial must not come with a permit");
        // Audit mode reports a would-deny but never changes the verdict, nor the permit.
        let (decision, permit) = get(&s, "/orders/7").into_parts();
        assert!(decision.is_allow() && decision.would_deny());
        assert!(permit.is_some());
    }

    #[test]
    fn before_any_configuration_nothing_inbound_is_permitted() {
        let s = Snapshot::default();
        assert_eq!(s.revision(), 0);
        assert!(get(&s, "/orders/1").into_parts().1.is_none());
    }
}
