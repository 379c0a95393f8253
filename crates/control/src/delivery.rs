//! Waiting for a revision to be in force (`bulkhead apply --wait`, `Admin.AwaitRevision`):
//! every connected proxy of the affected workloads acknowledges it (or a later one), or the
//! caller is told which proxy refused it and why, or did not answer in time.
//!
//! It reads the proxy registry only, and wakes on its changes; it never changes anything,
//! and a wait that ends early (the caller hangs up) costs nothing more. With replicas on
//! etcd it also follows the proxies of every other live replica, as each reports them in
//! etcd ([`crate::replicas::follow_others_proxies`]), and names the replica each proxy is
//! on. A proxy that moves from one replica to another is one proxy (its instance); one
//! whose replica is lost before it answered stays pending until it shows up on another
//! replica, or the time runs out.

use crate::proxies::Registry;
use bulkhead_api::v1::{AwaitRevisionResponse, ProxyProgress, ProxyStatus};
use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;

/// How long a wait lasts when the caller does not say.
pub(crate) const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// The longest wait a caller may ask for.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(600);

pub(crate) type AwaitStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<AwaitRevisionResponse, Status>> + Send>>;

/// Where one proxy stands with a revision.
fn progress(p: &ProxyStatus, revision: u64) -> ProxyProgress {
    let (state, at, error) = if p.acked_revision >= revision {
        ("acked", p.acked_revision, String::new())
    } else if p.nacked_revision >= revision {
        ("nacked", p.nacked_revision, p.nack_error.clone())
    } else if !p.connected {
        ("disconnected", 0, String::new())
    } else {
        ("pending", 0, String::new())
    };
    ProxyProgress {
        spiffe_id: p.spiffe_id.clone(),
        namespace: p.namespace.clone(),
        workload: p.workload.clone(),
        state: state.to_string(),
        revision: at,
        error,
        replica: p.replica.clone(),
    }
}

/// Which of two entries for one proxy (listed by two replicas while it moves) counts: the
/// one furthest along.
fn rank(p: &ProxyProgress) -> u8 {
    match p.state.as_str() {
        "acked" => 3,
        "nacked" => 2,
        "pending" => 1,
        _ => 0,
    }
}

/// One proxy: its identity and workload, and, with replicas, its instance (the same on
/// every replica it moves to), or the replica for a proxy with no instance.
type Key = (String, String, String);

/// Where the proxies a wait follows are listed.
pub(crate) struct Sources {
    /// This control plane's own, live.
    pub(crate) registry: Arc<Registry>,
    /// With replicas on etcd: this replica's id, and the other live replicas' proxies
    /// (each with its `replica`) as they last reported them.
    pub(crate) others: Option<(String, watch::Receiver<Vec<ProxyStatus>>)>,
}

/// The proxies a wait follows: those of the workloads that are connected when it starts,
/// and those that connect while it lasts.
struct Wait {
    registry: Arc<Registry>,
    changes: watch::Receiver<u64>,
    here: String,
    others: Option<watch::Receiver<Vec<ProxyStatus>>>,
    revision: u64,
    workloads: BTreeSet<String>,
    watched: BTreeSet<Key>,
    /// Each watched proxy as last seen on another replica.
    elsewhere: BTreeMap<Key, ProxyProgress>,
    deadline: Instant,
    last: Option<Vec<ProxyProgress>>,
    done: bool,
}

impl Wait {
    fn now(&mut self) -> Vec<ProxyProgress> {
        let mut listed: Vec<ProxyStatus> = self.registry.list(&[]);
        if let Some(others) = &self.others {
            for p in &mut listed {
                p.replica = self.here.clone();
            }
            listed.extend(others.borrow().iter().cloned());
        }
        let mut out: BTreeMap<Key, ProxyProgress> = BTreeMap::new();
        for p in listed {
            let workload = format!("{}/{}", p.namespace, p.workload);
            if !self.workloads.contains(&workload) {
                continue;
            }
            let one = match (&self.others, p.instance.is_empty()) {
                (None, _) => String::new(),
                (Some(_), false) => format!("instance {}", p.instance),
                (Some(_), true) => format!("replica {}", p.replica),
            };
            let key = (p.spiffe_id.clone(), workload, one);
            if p.connected {
                self.watched.insert(key.clone());
            }
            if !self.watched.contains(&key) {
                continue;
            }
            let now = progress(&p, self.revision);
            match out.get(&key) {
                Some(had) if rank(had) >= rank(&now) => {}
                _ => {
                    out.insert(key, now);
                }
            }
        }
        if self.others.is_some() {
            // A proxy listed by no replica now was on one that was lost: it keeps its last
            // answer, or stays pending (never "disconnected": it has not said so) until it
            // shows up on another replica or the time runs out.
            for key in &self.watched {
                if out.contains_key(key) {
                    continue;
                }
                if let Some(last) = self.elsewhere.get(key) {
                    let mut kept = last.clone();
                    if kept.state == "disconnected" {
                        kept.state = "pending".to_string();
                    }
                    out.insert(key.clone(), kept);
                }
            }
            for (key, p) in &out {
                if p.replica != self.here {
                    self.elsewhere.insert(key.clone(), p.clone());
                }
            }
        }
        out.into_values().collect()
    }
}

/// Follows the registry (and, with replicas, the others' proxies) until every proxy of
/// `workloads` connected now (or later) has acknowledged or refused `revision`, or
/// `timeout` passes: one message at once, one at every change, the last with `done`.
pub(crate) fn await_revision(
    sources: Sources,
    revision: u64,
    workloads: Vec<String>,
    timeout: Duration,
) -> AwaitStream {
    let Sources { registry, others } = sources;
    let (here, others) = match others {
        Some((here, rx)) => (here, Some(rx)),
        None => (String::new(), None),
    };
    let wait = Wait {
        changes: registry.subscribe(),
        registry,
        here,
        others,
        revision,
        workloads: workloads.into_iter().collect(),
        watched: BTreeSet::new(),
        elsewhere: BTreeMap::new(),
        deadline: Instant::now() + timeout.min(MAX_WAIT),
        last: None,
        done: false,
    };
    Box::pin(futures_util::stream::unfold(wait, |mut w| async move {
        if w.done {
            return None;
        }
        loop {
            w.changes.borrow_and_update();
            if let Some(others) = w.others.as_mut() {
                others.borrow_and_update();
            }
            let proxies = w.now();
            let answered = proxies.iter().all(|p| p.state != "pending");
            let out_of_time = Instant::now() >= w.deadline;
            if answered || out_of_time {
                w.done = true;
                let msg = AwaitRevisionResponse {
                    proxies,
                    done: true,
                };
                return Some((Ok(msg), w));
            }
            if w.last.as_ref() != Some(&proxies) {
                w.last = Some(proxies.clone());
                let msg = AwaitRevisionResponse {
                    proxies,
                    done: false,
                };
                return Some((Ok(msg), w));
            }
            let others_changed = async {
                match w.others.as_mut() {
                    Some(others) => others.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = w.changes.changed() => {
                    if r.is_err() {
                        return None;
                    }
                }
                alive = others_changed => {
                    if !alive {
                        // The others' picture is no longer kept up to date: say so rather
                        // than wait on a frozen one.
                        w.done = true;
                        return Some((Err(Status::aborted(
                            "lost track of the other replicas' proxies in etcd; the revision is committed: see `bulkhead get proxies`",
                        )), w));
                    }
                }
                _ = tokio::time::sleep_until(w.deadline) => {}
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bulkhead_policy::model::ResourceName;
    use futures_util::StreamExt;

    fn orders() -> ResourceName {
        ResourceName {
            namespace: "shop".into(),
            name: "orders".into(),
        }
    }

    /// A proxy of `workload` connected to this replica, with nothing seen yet.
    fn connect(
        registry: &Arc<Registry>,
        id: &str,
        workload: &ResourceName,
    ) -> crate::proxies::Connection {
        registry.connect(id, workload, crate::proxies::Connecting::default())
    }

    fn local(registry: Arc<Registry>) -> Sources {
        Sources {
            registry,
            others: None,
        }
    }

    fn states(msg: &AwaitRevisionResponse) -> Vec<(&str, &str)> {
        msg.proxies
            .iter()
            .map(|p| (p.spiffe_id.as_str(), p.state.as_str()))
            .collect()
    }

    #[tokio::test]
    async fn a_wait_ends_when_every_proxy_answered_and_names_a_refusal() {
        let registry = Arc::new(Registry::default());
        let a = connect(&registry, "spiffe://td/a", &orders());
        let _b = connect(&registry, "spiffe://td/b", &orders());
        let other = ResourceName {
            namespace: "shop".into(),
            name: "other".into(),
        };
        let _c = connect(&registry, "spiffe://td/c", &other);
        let mut stream = await_revision(
            local(registry.clone()),
            5,
            vec!["shop/orders".into()],
            Duration::from_secs(30),
        );
        let first = stream.next().await.unwrap().unwrap();
        assert!(!first.done);
        assert_eq!(
            states(&first),
            vec![("spiffe://td/a", "pending"), ("spiffe://td/b", "pending")],
            "only the affected workload's proxies"
        );
        registry.ack("spiffe://td/a", &orders(), 6, None);
        let second = stream.next().await.unwrap().unwrap();
        assert_eq!(
            states(&second)[0],
            ("spiffe://td/a", "acked"),
            "a later revision counts"
        );
        registry.ack("spiffe://td/b", &orders(), 5, Some("too many rules".into()));
        let last = stream.next().await.unwrap().unwrap();
        assert!(last.done);
        assert_eq!(last.proxies[1].state, "nacked");
        assert_eq!(last.proxies[1].error, "too many rules");
        assert!(stream.next().await.is_none());
        drop(a);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_runs_out_of_time_and_a_closed_stream_is_no_answer() {
        let registry = Arc::new(Registry::default());
        let a = connect(&registry, "spiffe://td/a", &orders());
        let _b = connect(&registry, "spiffe://td/b", &orders());
        let mut stream = await_revision(
            local(registry.clone()),
            3,
            vec!["shop/orders".into()],
            Duration::from_secs(2),
        );
        assert!(!stream.next().await.unwrap().unwrap().done);
        drop(a);
        let msg = stream.next().await.unwrap().unwrap();
        assert_eq!(
            states(&msg),
            vec![
                ("spiffe://td/a", "disconnected"),
                ("spiffe://td/b", "pending")
            ]
        );
        let last = stream.next().await.unwrap().unwrap();
        assert!(last.done, "the time ran out");
        assert_eq!(states(&last)[1], ("spiffe://td/b", "pending"));
    }

    #[tokio::test]
    async fn nothing_to_wait_for_ends_at_once() {
        let registry = Arc::new(Registry::default());
        let mut stream = await_revision(
            local(registry),
            3,
            vec!["shop/orders".into()],
            Duration::from_secs(30),
        );
        let msg = stream.next().await.unwrap().unwrap();
        assert!(msg.done && msg.proxies.is_empty());
    }

    /// A proxy of `orders` on another replica, as that replica reports it in etcd.
    fn remote(id: &str, instance: &str, replica: &str, acked: u64) -> ProxyStatus {
        ProxyStatus {
            spiffe_id: id.into(),
            namespace: "shop".into(),
            workload: "orders".into(),
            connected: true,
            acked_revision: acked,
            instance: instance.into(),
            replica: replica.into(),
            ..ProxyStatus::default()
        }
    }

    fn states_on(msg: &AwaitRevisionResponse) -> Vec<(&str, &str, &str)> {
        msg.proxies
            .iter()
            .map(|p| (p.spiffe_id.as_str(), p.state.as_str(), p.replica.as_str()))
            .collect()
    }

    #[tokio::test]
    async fn a_wait_follows_the_other_replicas_proxies_and_names_their_replica() {
        let registry = Arc::new(Registry::default());
        let _a = connect(&registry, "spiffe://td/a", &orders());
        let (others, rx) = watch::channel(vec![remote("spiffe://td/b", "ib", "bbbb", 4)]);
        let sources = Sources {
            registry: registry.clone(),
            others: Some(("aaaa".into(), rx)),
        };
        let mut stream = await_revision(
            sources,
            5,
            vec!["shop/orders".into()],
            Duration::from_secs(30),
        );
        let first = stream.next().await.unwrap().unwrap();
        assert!(!first.done);
        assert_eq!(
            states_on(&first),
            vec![
                ("spiffe://td/a", "pending", "aaaa"),
                ("spiffe://td/b", "pending", "bbbb")
            ]
        );
        registry.ack("spiffe://td/a", &orders(), 5, None);
        let second = stream.next().await.unwrap().unwrap();
        assert!(!second.done, "b has not answered yet");
        // b refuses on its replica; the replica it left still lists it, disconnected: it
        // is one proxy (one instance), counted once, where it answered.
        let mut refused = remote("spiffe://td/b", "ib", "bbbb", 4);
        refused.nacked_revision = 5;
        refused.nack_error = "too many rules".into();
        let mut left = remote("spiffe://td/b", "ib", "cccc", 3);
        left.connected = false;
        others.send(vec![left, refused]).unwrap();
        let last = stream.next().await.unwrap().unwrap();
        assert!(last.done);
        assert_eq!(
            states_on(&last),
            vec![
                ("spiffe://td/a", "acked", "aaaa"),
                ("spiffe://td/b", "nacked", "bbbb")
            ]
        );
        assert_eq!(last.proxies[1].error, "too many rules");
    }

    #[tokio::test(start_paused = true)]
    async fn a_proxy_of_a_lost_replica_is_awaited_where_it_shows_up_until_the_timeout() {
        let registry = Arc::new(Registry::default());
        let (others, rx) = watch::channel(vec![
            remote("spiffe://td/b", "ib", "bbbb", 0),
            remote("spiffe://td/c", "ic", "bbbb", 0),
        ]);
        let sources = Sources {
            registry,
            others: Some(("aaaa".into(), rx)),
        };
        let mut stream = await_revision(
            sources,
            5,
            vec!["shop/orders".into()],
            Duration::from_secs(30),
        );
        assert!(!stream.next().await.unwrap().unwrap().done);
        // Replica bbbb is lost: its entry leaves etcd. Its proxies have not answered, and
        // have not disconnected either: nothing changes, the wait goes on.
        others.send(Vec::new()).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), stream.next())
                .await
                .is_err(),
            "a lost replica neither ends the wait nor changes its proxies' state"
        );
        // b shows up on replica cccc, in force there; c never shows up.
        others
            .send(vec![remote("spiffe://td/b", "ib", "cccc", 5)])
            .unwrap();
        let moved = stream.next().await.unwrap().unwrap();
        assert!(!moved.done);
        assert_eq!(
            states_on(&moved),
            vec![
                ("spiffe://td/b", "acked", "cccc"),
                ("spiffe://td/c", "pending", "bbbb")
            ]
        );
        let last = stream.next().await.unwrap().unwrap();
        assert!(last.done, "the time ran out");
        assert_eq!(states_on(&last)[1], ("spiffe://td/c", "pending", "bbbb"));
    }
}
