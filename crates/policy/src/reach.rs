//! Reachability and blast radius: which declared workloads can send requests to which, on
//! which ports, under a compiled [`PolicySet`].
//!
//! It exists to answer two operator questions from policy alone: "who can reach W?" and "if
//! W is compromised, what can an attacker reach from it, hop by hop?". Both are security
//! questions, so the analysis must never under-report: wherever it cannot decide (an
//! unknown address, path patterns it cannot compare, a union of deny rules), it assumes the
//! request gets through. It may report an edge no request can use; it must never miss one
//! that a request can. It only reads the set: no I/O, no change to any decision.
//!
//! The semantics are documented in `docs/policy.md`, "Reachability and blast radius".

mod operation;

use crate::decision::PostureSource;
use crate::eval::{CompiledRule, Cond, DeclaredWorkload, PolicySet, PolicyView, RuleList, slot};
use crate::model::{Action, Direction, Mode, ResourceName, WorkloadRef};
use crate::pattern::Protocol;
use core::net::IpAddr;
use operation::Operation;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

/// Whose egress decision counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SourceEgress {
    /// The source's own sidecar judges each request on egress. This is the case of a
    /// compromised app whose sidecar still runs, with the app's traffic leaving from the
    /// workload's declared addresses.
    #[default]
    Enforced,
    /// Only the destination's ingress decision counts, and the source may connect from any
    /// address. This is the case of an attacker who holds the workload's key and certificate
    /// and uses them outside its sidecar.
    Bypassed,
}

/// What the analysis assumes; the default is the enforced policy with egress enforced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReachOptions {
    /// Enforced policy, or as if every audit-mode policy and posture were enforced.
    pub view: PolicyView,
    pub egress: SourceEgress,
}

/// What allows one side of an edge: an allow rule, or an allow posture.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Grant {
    Rule {
        policy: Arc<ResourceName>,
        rule: Arc<str>,
        /// `Audit` only with [`PolicyView::Staged`].
        mode: Mode,
    },
    /// The posture allows requests no rule decides.
    Posture(PostureSource),
}

/// `from` can send requests to `to` on `port`: its egress decision and `to`'s ingress
/// decision can both allow one and the same request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReachEdge {
    pub from: WorkloadRef,
    pub to: WorkloadRef,
    pub port: u16,
    /// The protocol `to` declares for `port`.
    pub protocol: Protocol,
    /// What lets `from` send such a request, sorted. Empty with [`SourceEgress::Bypassed`].
    pub egress: Vec<Grant>,
    /// What lets `to` accept it, sorted.
    pub ingress: Vec<Grant>,
}

/// One workload within a blast radius.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reached {
    pub workload: WorkloadRef,
    /// The fewest edges from the start.
    pub hops: usize,
    /// One shortest path: `hops` edges, the first from the start, the last to `workload`.
    pub path: Vec<ReachEdge>,
}

/// Everything reachable from `start` by following edges, transitively.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlastRadius {
    pub start: WorkloadRef,
    /// Every other workload reached, sorted by hops, then by name. The start itself is not
    /// listed, even if it can reach itself.
    pub reached: Vec<Reached>,
}

/// Why a reachability question has no answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReachError {
    #[error(
        "no Workload {0} is declared; reachability is computed between declared workloads only"
    )]
    UnknownWorkload(WorkloadRef),
}

/// Every edge between declared workloads, sorted by source, destination and port.
pub fn can_reach(set: &PolicySet, options: ReachOptions) -> Vec<ReachEdge> {
    let a = Analysis { set, options };
    set.declared.iter().flat_map(|s| a.edges_from(s)).collect()
}

/// The edges into `target`: who can reach it, on which port, and what allows it. Sorted by
/// source and port.
pub fn who_can_reach(
    set: &PolicySet,
    target: &WorkloadRef,
    options: ReachOptions,
) -> Result<Vec<ReachEdge>, ReachError> {
    let a = Analysis { set, options };
    let to = a.declared(target)?;
    Ok(set
        .declared
        .iter()
        .flat_map(|from| a.edges_between(from, to))
        .collect())
}

/// The edges out of `source`, sorted by destination and port.
pub fn reachable_from(
    set: &PolicySet,
    source: &WorkloadRef,
    options: ReachOptions,
) -> Result<Vec<ReachEdge>, ReachError> {
    let a = Analysis { set, options };
    Ok(a.edges_from(a.declared(source)?))
}

/// Everything an attacker who controls `start` can reach, following edges breadth first;
/// each workload reached becomes a new starting point.
pub fn blast_radius(
    set: &PolicySet,
    start: &WorkloadRef,
    options: ReachOptions,
) -> Result<BlastRadius, ReachError> {
    let a = Analysis { set, options };
    let first = a.declared(start)?;
    let mut seen: BTreeSet<&WorkloadRef> = BTreeSet::from([first.0]);
    let mut reached: Vec<Reached> = Vec::new();
    // Entries: a workload and the index in `reached` of the path to it (None: the start).
    let mut queue: VecDeque<(&WorkloadRef, &DeclaredWorkload, Option<usize>)> =
        VecDeque::from([(first.0, first.1, None)]);
    while let Some((name, workload, via)) = queue.pop_front() {
        for edge in a.edges_from((name, workload)) {
            let Some((to, to_workload)) = set.declared.get_key_value(&edge.to) else {
                continue;
            };
            if !seen.insert(to) {
                continue;
            }
            let mut path = via.map(|i| reached[i].path.clone()).unwrap_or_default();
            path.push(edge);
            queue.push_back((to, to_workload, Some(reached.len())));
            reached.push(Reached {
                workload: to.clone(),
                hops: path.len(),
                path,
            });
        }
    }
    reached.sort_by(|x, y| (x.hops, &x.workload).cmp(&(y.hops, &y.workload)));
    Ok(BlastRadius {
        start: start.clone(),
        reached,
    })
}

type Declared<'a> = (&'a WorkloadRef, &'a DeclaredWorkload);

struct Analysis<'a> {
    set: &'a PolicySet,
    options: ReachOptions,
}

/// One side's view of a request between two declared workloads: everything but the
/// operation, which stays free.
struct Side<'a> {
    direction: Direction,
    subject: &'a WorkloadRef,
    peer_identity: &'a str,
    /// `None`: unknown, so any address.
    peer_ip: Option<IpAddr>,
    /// Egress: the destination as the sidecar knows it; `None` when it knows only the
    /// identity the server must present.
    peer_workload: Option<&'a WorkloadRef>,
    port: u16,
    protocol: Protocol,
}

/// Whether a rule applies to a side's requests, apart from their operation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Applies {
    Always,
    /// Depends on an address the analysis does not know.
    Maybe,
    Never,
}

impl<'a> Analysis<'a> {
    fn declared(&self, w: &WorkloadRef) -> Result<Declared<'a>, ReachError> {
        self.set
            .declared
            .get_key_value(w)
            .ok_or_else(|| ReachError::UnknownWorkload(w.clone()))
    }

    fn edges_from(&self, from: Declared<'a>) -> Vec<ReachEdge> {
        self.set
            .declared
            .iter()
            .flat_map(|to| self.edges_between(from, to))
            .collect()
    }

    /// The edges from one workload to another, one per declared port of `to`, by port.
    fn edges_between(&self, from: Declared<'a>, to: Declared<'a>) -> Vec<ReachEdge> {
        let mut ports = to.1.ports.clone();
        ports.sort_unstable();
        ports
            .into_iter()
            .filter_map(|(port, protocol)| self.edge(from, to, port, protocol))
            .collect()
    }

    fn edge(
        &self,
        from: Declared<'a>,
        to: Declared<'a>,
        port: u16,
        protocol: Protocol,
    ) -> Option<ReachEdge> {
        // Ingress at `to`: the caller is `from`, at one of its addresses.
        let sources: Vec<Option<IpAddr>> = match (self.options.egress, from.1.addresses.is_empty())
        {
            (SourceEgress::Enforced, false) => from.1.addresses.iter().copied().map(Some).collect(),
            _ => vec![None],
        };
        let mut ingress: BTreeMap<Grant, Operation<'a>> = BTreeMap::new();
        for ip in sources {
            ingress.extend(self.grants(&Side {
                direction: Direction::Ingress,
                subject: to.0,
                peer_identity: &from.1.identity,
                peer_ip: ip,
                peer_workload: None,
                port,
                protocol,
            }));
        }
        if ingress.is_empty() {
            return None;
        }
        let edge = |egress: Vec<Grant>, ingress: Vec<Grant>| ReachEdge {
            from: from.0.clone(),
            to: to.0.clone(),
            port,
            protocol,
            egress,
            ingress,
        };
        if self.options.egress == SourceEgress::Bypassed {
            return Some(edge(Vec::new(), ingress.into_keys().collect()));
        }
        // Egress at `from`: the server is `to`, at one of its addresses, known by name or
        // only by the identity it must present.
        let destinations: Vec<Option<IpAddr>> = match to.1.addresses.is_empty() {
            true => vec![None],
            false => to.1.addresses.iter().copied().map(Some).collect(),
        };
        let mut egress: BTreeMap<Grant, Operation<'a>> = BTreeMap::new();
        for ip in destinations {
            for known in [Some(to.0), None] {
                egress.extend(self.grants(&Side {
                    direction: Direction::Egress,
                    subject: from.0,
                    peer_identity: &to.1.identity,
                    peer_ip: ip,
                    peer_workload: known,
                    port,
                    protocol,
                }));
            }
        }
        // Only pairs that may admit one and the same request make the edge.
        let mut used_egress = BTreeSet::new();
        let mut used_ingress = BTreeSet::new();
        for (e, e_op) in &egress {
            for (i, i_op) in &ingress {
                if !e_op.disjoint(i_op) {
                    used_egress.insert(e);
                    used_ingress.insert(i);
                }
            }
        }
        (!used_egress.is_empty()).then(|| {
            edge(
                used_egress.into_iter().cloned().collect(),
                used_ingress.into_iter().cloned().collect(),
            )
        })
    }

    /// What can allow some request of `side`, with the operations each admits: every allow
    /// rule that may apply and that no deny rule surely covers, and the posture if it is
    /// allow and no deny rule surely denies everything.
    fn grants(&self, side: &Side<'_>) -> Vec<(Grant, Operation<'a>)> {
        let view = self.options.view;
        let (posture, source) = self.set.posture(side.subject, side.direction, view);
        let rules = self
            .set
            .subjects
            .get(side.subject)
            .and_then(|d| d[slot(side.direction)].as_ref());
        let mut deny: Vec<&'a RuleList> = Vec::new();
        let mut allow: Vec<(&'a RuleList, Mode)> = Vec::new();
        for g in rules.iter().flat_map(|r| r.groups()) {
            deny.push(&g.enforce.deny);
            allow.push((&g.enforce.allow, Mode::Enforce));
            if view == PolicyView::Staged {
                deny.push(&g.audit.deny);
                allow.push((&g.audit.allow, Mode::Audit));
            }
        }
        // Deny rules that surely apply; each covers the operations within its own.
        let sure_denies: Vec<Operation<'a>> = deny
            .iter()
            .flat_map(|list| list.iter())
            .filter_map(|rule| match self.applies(rule, side) {
                (Applies::Always, op) => Some(op),
                _ => None,
            })
            .collect();
        let covered = |op: &Operation<'_>| sure_denies.iter().any(|d| op.within(d));
        let mut out = Vec::new();
        for (list, mode) in allow {
            for rule in list.iter() {
                let (applies, op) = self.applies(rule, side);
                if applies == Applies::Never || op.admits_nothing() || covered(&op) {
                    continue;
                }
                let grant = Grant::Rule {
                    policy: rule.policy.clone(),
                    rule: rule.name.clone(),
                    mode,
                };
                out.push((grant, op));
            }
        }
        let any = Operation::default();
        if posture == Action::Allow && !covered(&any) {
            out.push((Grant::Posture(source), any));
        }
        out
    }

    /// Whether `rule` applies to `side`'s requests apart from their operation, and the
    /// operations it admits. On a TCP port a rule with operation conditions never applies.
    fn applies(&self, rule: &'a CompiledRule, side: &Side<'_>) -> (Applies, Operation<'a>) {
        let req = crate::eval::Request {
            direction: side.direction,
            subject: side.subject,
            peer: crate::eval::Peer {
                identity: Some(side.peer_identity),
                ip: side.peer_ip.map(crate::canonical::peer_ip),
                workload: side.peer_workload,
            },
            port: side.port,
            protocol: side.protocol,
            http: None,
        };
        let mut op = Operation::default();
        let mut applies = Applies::Always;
        for cond in &rule.conds {
            let holds = match cond {
                Cond::Method(any, none) => {
                    op.methods(any, none);
                    None
                }
                Cond::Path(any, none) => {
                    op.paths(any, none);
                    None
                }
                Cond::Host(any, none) => {
                    op.hosts(any, none);
                    None
                }
                Cond::Grpc(services, methods) => {
                    op.grpc(services, methods);
                    None
                }
                Cond::Header(h, _) => {
                    op.header(h);
                    None
                }
                Cond::Cidr(..) if side.peer_ip.is_none() => {
                    applies = match applies {
                        Applies::Never => Applies::Never,
                        _ => Applies::Maybe,
                    };
                    None
                }
                other => Some(other.holds(&req, self.set)),
            };
            if holds == Some(false) {
                applies = Applies::Never;
            }
        }
        if !side.protocol.is_http() && !op.is_any() {
            applies = Applies::Never;
        }
        (applies, op)
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Grant::Rule {
                policy,
                rule,
                mode: Mode::Enforce,
            } => write!(f, "policy {policy} rule {rule}"),
            Grant::Rule {
                policy,
                rule,
                mode: Mode::Audit,
            } => write!(f, "audit policy {policy} rule {rule}"),
            Grant::Posture(source) => write!(f, "{source}"),
        }
    }
}

fn grants(f: &mut fmt::Formatter<'_>, grants: &[Grant]) -> fmt::Result {
    for (i, g) in grants.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{g}")?;
    }
    Ok(())
}

/// `shop/frontend -> shop/orders:8080 (http); egress: built-in posture; ingress: policy …`
impl fmt::Display for ReachEdge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {}:{} ({}); egress: ",
            self.from,
            self.to,
            self.port,
            self.protocol.as_str()
        )?;
        match self.egress.is_empty() {
            true => f.write_str("not enforced")?,
            false => grants(f, &self.egress)?,
        }
        f.write_str("; ingress: ")?;
        grants(f, &self.ingress)
    }
}

/// `shop/payments, 2 hops: shop/frontend -> shop/orders:8080 -> shop/payments:8080`
impl fmt::Display for Reached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = if self.hops == 1 { "hop" } else { "hops" };
        write!(f, "{}, {} {unit}: ", self.workload, self.hops)?;
        match self.path.first() {
            Some(first) => write!(f, "{}", first.from)?,
            None => return Ok(()),
        }
        for e in &self.path {
            write!(f, " -> {}:{}", e.to, e.port)?;
        }
        Ok(())
    }
}
