//! Waiting for a revision to be in force (`bulkhead apply --wait`, `Admin.AwaitRevision`):
//! every connected proxy of the affected workloads acknowledges it (or a later one), or the
//! caller is told which proxy refused it and why, or did not answer in time.
//!
//! It reads the proxy registry only, and wakes on its changes; it never changes anything,
//! and a wait that ends early (the caller hangs up) costs nothing more.

use crate::proxies::Registry;
use bulkhead_api::v1::{AwaitRevisionResponse, ProxyProgress, ProxyStatus};
use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
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
    }
}

/// The proxies a wait follows: those of the workloads that are connected when it starts,
/// and those that connect while it lasts.
struct Wait {
    registry: Arc<Registry>,
    changes: tokio::sync::watch::Receiver<u64>,
    revision: u64,
    workloads: BTreeSet<String>,
    watched: BTreeSet<(String, String)>,
    deadline: Instant,
    last: Option<Vec<ProxyProgress>>,
    done: bool,
}

impl Wait {
    fn now(&mut self) -> Vec<ProxyProgress> {
        let mut out = BTreeMap::new();
        for p in self.registry.list(&[]) {
            let workload = format!("{}/{}", p.namespace, p.workload);
            if !self.workloads.contains(&workload) {
                continue;
            }
            let key = (p.spiffe_id.clone(), workload);
            if p.connected {
                self.watched.insert(key.clone());
            }
            if self.watched.contains(&key) {
                out.insert(key, progress(&p, self.revision));
            }
        }
        out.into_values().collect()
    }
}

/// Follows the registry until every proxy of `workloads` connected now (or later) has
/// acknowledged or refused `revision`, or `timeout` passes: one message at once, one at
/// every change, the last with `done`.
pub(crate) fn await_revision(
    registry: Arc<Registry>,
    revision: u64,
    workloads: Vec<String>,
    timeout: Duration,
) -> AwaitStream {
    let wait = Wait {
        changes: registry.subscribe(),
        registry,
        revision,
        workloads: workloads.into_iter().collect(),
        watched: BTreeSet::new(),
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
            tokio::select! {
                r = w.changes.changed() => {
                    if r.is_err() {
                        return None;
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

    fn states(msg: &AwaitRevisionResponse) -> Vec<(&str, &str)> {
        msg.proxies
            .iter()
            .map(|p| (p.spiffe_id.as_str(), p.state.as_str()))
            .collect()
    }

    #[tokio::test]
    async fn a_wait_ends_when_every_proxy_answered_and_names_a_refusal() {
        let registry = Arc::new(Registry::default());
        let a = registry.connect(
            "spiffe://td/a",
            &orders(),
            crate::proxies::Connecting::default(),
        );
        let _b = registry.connect(
            "spiffe://td/b",
            &orders(),
            crate::proxies::Connecting::default(),
        );
        let other = ResourceName {
            namespace: "shop".into(),
            name: "other".into(),
        };
        let _c = registry.connect(
            "spiffe://td/c",
            &other,
            crate::proxies::Connecting::default(),
        );
        let mut stream = await_revision(
            registry.clone(),
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
        let a = registry.connect(
            "spiffe://td/a",
            &orders(),
            crate::proxies::Connecting::default(),
        );
        let _b = registry.connect(
            "spiffe://td/b",
            &orders(),
            crate::proxies::Connecting::default(),
        );
        let mut stream = await_revision(
            registry.clone(),
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
            registry,
            3,
            vec!["shop/orders".into()],
            Duration::from_secs(30),
        );
        let msg = stream.next().await.unwrap().unwrap();
        assert!(msg.done && msg.proxies.is_empty());
    }
}
