//! Following the control plane: one long-lived stream of configurations for our workload.
//!
//! A revision may come in several pieces (`bulkhead_api::pieces`); it is put together whole
//! before any of it is used, so a large configuration is never stalled by a message limit
//! and never half applied. A configuration that does not decode, compile or fit is refused
//! whole (NACK, with the reason) and the last good one stays in force; so is one the stream
//! broke in the middle of. A lost stream is re-opened promptly — the first retry within
//! about 100 ms, then jittered exponential waits capped at one second, so a fleet neither
//! waits long for a returning control plane nor comes back in lockstep — while enforcement
//! continues unchanged. On re-opening, the proxy names the revision it holds and its
//! digest, and the control plane sends only the trust bundle when nothing changed.
//!
//! A lost stream (ended, broken, or no answer) marks the control-plane replica in use lost
//! ([`bulkhead_api::channel::Replicas::lost`]): with several `--control` replicas the next
//! connection, for every call the proxy makes, goes to the next one (`docs/restarts.md`).

use crate::Shared;
use crate::credentials::{control_channel, take_bundle};
use bulkhead_api::pieces::Assembler;
use bulkhead_api::v1::config_client::ConfigClient;
use bulkhead_api::v1::{AckRequest, ProxyConfig, WatchRequest};
use bulkhead_policy::PolicySet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The largest single message taken from the control plane: a piece holds about 1 MiB, or
/// one resource alone, and one resource comes from a policy file of at most 16 MiB.
const MAX_MESSAGE_BYTES: usize = 17 * 1024 * 1024;

/// Waits between attempts to reach the control plane: the first within `first`, each next
/// up to twice as long, capped; every wait is drawn between half and all of its step, so
/// proxies that lost the control plane together do not return together.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    cap: Duration,
    step: Duration,
}

impl Backoff {
    /// While the control plane is unreachable: 100 ms, then up to 1 s.
    pub(crate) fn reconnect() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// While the control plane refuses (this proxy is not allowed, or asked for something it
    /// cannot have): a person must act, so no hurry; up to 30 s.
    pub(crate) fn refused() -> Backoff {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
    }

    pub(crate) fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            step: first,
        }
    }

    /// Starts over: the next wait is short again.
    pub(crate) fn reset(&mut self) {
        self.step = self.first;
    }

    /// The next wait, jittered, and the step after it doubled (up to the cap).
    pub(crate) fn next_wait(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.cap);
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Whether a failed call is the control plane refusing this proxy, rather than not being
/// there: then retrying soon helps nobody.
pub(crate) fn is_refusal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
    )
}

/// Starts following; the receiver reports the revision in force once one has arrived.
pub(crate) fn spawn(
    control: Arc<bulkhead_api::channel::Replicas>,
    shared: Arc<Shared>,
    max_rules: usize,
    admin: Option<std::net::SocketAddr>,
) -> watch::Receiver<Option<u64>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut client = ConfigClient::new(control_channel(control.clone(), &shared))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let mut follower = Follower {
            shared,
            max_rules,
            held: None,
            in_force: tx,
            admin: admin.map(|a| a.to_string()).unwrap_or_default(),
        };
        let mut unreachable = Backoff::reconnect();
        let mut refused = Backoff::refused();
        loop {
            let wait = match client.watch(follower.request()).await {
                Ok(response) => {
                    unreachable.reset();
                    refused.reset();
                    let lost = follower.follow(&mut client, response.into_inner()).await;
                    replica_lost(&control, &follower.shared, lost);
                    unreachable.next_wait()
                }
                Err(status) if is_refusal(status.code()) => {
                    tracing::warn!(
                        code = ?status.code(),
                        error = %status.message(),
                        "the control plane refuses to send this proxy its configuration; keeping the policy in force"
                    );
                    refused.next_wait()
                }
                Err(status) => {
                    tracing::warn!(
                        code = ?status.code(),
                        error = %status.message(),
                        "cannot watch configuration; keeping the policy in force"
                    );
                    if status.code() == tonic::Code::Unavailable {
                        let why = format!("no answer: {}", status.message());
                        replica_lost(&control, &follower.shared, Loss::Unreachable(why));
                    }
                    unreachable.next_wait()
                }
            };
            tokio::time::sleep(wait).await;
        }
    });
    rx
}

/// Why a configuration stream stopped.
enum Loss {
    /// The control plane ended it.
    Ended,
    /// It broke (the connection reset, or no answer within the keepalive).
    Broke(String),
    /// The control plane could not be reached.
    Unreachable(String),
    /// This proxy dropped it, or could not read a message, and asks again: not the
    /// replica's loss.
    Retry,
}

impl Loss {
    /// A fixed word for the metric label and the reason in words, unless it is no loss.
    fn reason(self) -> Option<(&'static str, String)> {
        match self {
            Loss::Ended => Some((
                "stream_ended",
                "the control plane closed the configuration stream".into(),
            )),
            Loss::Broke(why) => Some((
                "stream_broke",
                format!("the configuration stream broke: {why}"),
            )),
            Loss::Unreachable(why) => Some(("unreachable", why)),
            Loss::Retry => None,
        }
    }
}

/// Tells the replicas the one in use is lost, so the next connection goes to the next one
/// (every call follows), and counts it once per replica lost, however many attempts fail
/// after.
fn replica_lost(control: &bulkhead_api::channel::Replicas, shared: &Shared, loss: Loss) {
    if let Some((reason, why)) = loss.reason()
        && control.lost(&why)
    {
        shared.metrics.control_lost(reason);
    }
}

/// The watch task's state across streams.
struct Follower {
    shared: Arc<Shared>,
    max_rules: usize,
    /// The revision in force and the digest it came with: named when re-opening.
    held: Option<(u64, String)>,
    in_force: watch::Sender<Option<u64>>,
    /// Where `/metrics` is served, told to the control plane for Prometheus' discovery.
    admin: String,
}

impl Follower {
    fn request(&self) -> WatchRequest {
        let (held_revision, held_digest) = self.held.clone().unwrap_or_default();
        WatchRequest {
            namespace: self.shared.workload.namespace.clone(),
            workload: self.shared.workload.name.clone(),
            held_revision,
            held_digest,
            accepts_pieces: true,
            proxy_version: crate::VERSION.to_string(),
            admin_address: self.admin.clone(),
        }
    }

    /// Follows one stream until it ends or breaks.
    async fn follow(
        &mut self,
        client: &mut ConfigClient<tonic::transport::Channel>,
        mut stream: tonic::Streaming<ProxyConfig>,
    ) -> Loss {
        let mut pieces = Assembler::default();
        loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    let revision = message.revision;
                    let count = message.pieces;
                    let config = match pieces.push(message) {
                        Ok(Some(config)) => {
                            if count > 1 {
                                tracing::info!(
                                    revision,
                                    pieces = count,
                                    "configuration put together from its pieces"
                                );
                            }
                            config
                        }
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::error!(revision, error = %e, "refused configuration pieces; keeping the last good configuration");
                            self.report(client, revision, Err(e.to_string())).await;
                            continue;
                        }
                    };
                    if config.unchanged && !self.holds(&config) {
                        // Told to keep a revision it does not hold: ask again, from scratch.
                        let e = format!(
                            "the control plane said revision {} is unchanged, but this proxy holds {}; asking for the whole configuration",
                            config.revision,
                            self.held.as_ref().map_or(0, |h| h.0)
                        );
                        tracing::warn!(error = %e, "configuration stream out of step");
                        self.report(client, config.revision, Err(e)).await;
                        self.held = None;
                        return Loss::Retry;
                    }
                    let outcome = self.take(config.clone());
                    self.report(client, config.revision, outcome).await;
                }
                Ok(None) => {
                    tracing::warn!("control plane closed the configuration stream");
                    return Loss::Ended;
                }
                Err(status) => {
                    tracing::warn!(code = ?status.code(), error = %status.message(), "configuration stream broke");
                    // A message this proxy could not read (not a control plane going away):
                    // say so, or the control plane would think it is still on its way.
                    let gone = matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
                    );
                    if !gone {
                        let e = format!(
                            "the configuration stream broke while receiving it: {}",
                            status.message()
                        );
                        let revision = pieces.receiving().unwrap_or(0);
                        self.report(client, revision, Err(e)).await;
                    }
                    return match gone {
                        true => Loss::Broke(status.message().to_string()),
                        false => Loss::Retry,
                    };
                }
            }
        }
    }

    fn holds(&self, config: &ProxyConfig) -> bool {
        self.held
            .as_ref()
            .is_some_and(|(r, d)| *r == config.revision && *d == config.digest)
    }

    /// Puts a whole configuration in force, or refuses it with the reason.
    fn take(&mut self, config: ProxyConfig) -> Result<(), String> {
        let revision = config.revision;
        let digest = config.digest.clone();
        // Revocations hold whatever becomes of the revision: a refused policy never keeps a
        // revoked peer in.
        self.shared.revoked.take(config.revocations.as_ref());
        let outcome = if config.unchanged {
            take_bundle(&self.shared, config.trust_bundle.as_ref()).inspect_err(|e| {
                tracing::error!(revision, error = %e, "refused the trust bundle; keeping the current one");
            })
        } else {
            apply(&self.shared, config, self.max_rules)
        };
        if outcome.is_ok() {
            self.held = Some((revision, digest));
            self.in_force.send_replace(Some(revision));
        }
        outcome
    }

    /// Counts the outcome and tells the control plane: ACK, or NACK with the reason.
    async fn report(
        &self,
        client: &mut ConfigClient<tonic::transport::Channel>,
        revision: u64,
        outcome: Result<(), String>,
    ) {
        let shared = &self.shared;
        let result = if outcome.is_ok() { "ack" } else { "nack" };
        shared
            .metrics
            .config_updates
            .get_or_create(&crate::metrics::ResultLabels { result })
            .inc();
        shared
            .metrics
            .revision
            .set(shared.snapshot.load().revision() as i64);
        let ack = AckRequest {
            namespace: shared.workload.namespace.clone(),
            workload: shared.workload.name.clone(),
            revision,
            accepted: outcome.is_ok(),
            error: outcome.err().unwrap_or_default(),
            bundle_sha256: shared.tls.load().roots.clone(),
            proxy_version: crate::VERSION.to_string(),
        };
        if let Err(status) = client.ack(ack).await {
            tracing::warn!(revision, error = %status.message(), "could not report the configuration's status");
        }
    }
}

/// Decodes and compiles a configuration and takes its trust bundle; on any error keeps the
/// current policy and bundle.
fn apply(shared: &Shared, config: ProxyConfig, max_rules: usize) -> Result<(), String> {
    let current = shared.snapshot.load().revision();
    if current != 0 && config.revision == current {
        // The revision in force, sent again (a new bundle, or a new stream): a revision
        // never changes, so only the bundle can be new.
        return take_bundle(shared, config.trust_bundle.as_ref()).inspect_err(|e| {
            tracing::error!(revision = config.revision, error = %e, "refused the trust bundle; keeping the current one");
        });
    }
    let outcome = config
        .resources
        .iter()
        .map(bulkhead_api::resource_from_wire)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
        .and_then(|resources| {
            PolicySet::compile(&resources, config.revision)
                .map(|set| (set, resources.len()))
                .map_err(|errors| {
                    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                    text.join("; ")
                })
        })
        .and_then(|(set, count)| match set.rule_count() {
            n if n > max_rules => Err(format!(
                "revision {} has {n} rules for this proxy; it accepts at most {max_rules} (--max-policy-rules)",
                config.revision
            )),
            _ => Ok((set, count)),
        })
        .and_then(|(set, count)| {
            let endpoints = bulkhead_api::endpoints_from_wire(&config.endpoints)?;
            Ok((set, endpoints, count))
        })
        // Last, as nothing after it can fail: the message is taken or refused whole.
        .and_then(|ok| take_bundle(shared, config.trust_bundle.as_ref()).map(|()| ok));
    match outcome {
        Ok((set, endpoints, count)) => {
            // One store: no decision can see this revision's rules with another's addresses.
            shared
                .snapshot
                .store(Arc::new(crate::authz::Snapshot::new(set, endpoints)));
            crate::tcp::recheck(shared);
            tracing::info!(
                revision = config.revision,
                resources = count,
                "policy revision in force"
            );
            Ok(())
        }
        Err(e) => {
            tracing::error!(revision = config.revision, error = %e, kept = current, "refused configuration; keeping the last good one");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_start_short_grow_jittered_and_stay_capped() {
        let mut b = Backoff::reconnect();
        let waits: Vec<Duration> = (0..8).map(|_| b.next_wait()).collect();
        assert!(waits[0] <= Duration::from_millis(100), "{waits:?}");
        assert!(waits[0] >= Duration::from_millis(50), "{waits:?}");
        for w in &waits {
            assert!(*w <= Duration::from_secs(1), "capped: {waits:?}");
        }
        assert!(waits[7] >= Duration::from_millis(500), "{waits:?}");
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
        // Jittered: a fleet does not retry in lockstep.
        let spread: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| {
                let mut b = Backoff::reconnect();
                (0..5).map(|_| b.next_wait()).sum()
            })
            .collect();
        assert!(spread.len() > 10, "{spread:?}");
        let mut r = Backoff::refused();
        let long = (0..10).map(|_| r.next_wait()).max().unwrap_or_default();
        assert!(long <= Duration::from_secs(30) && long >= Duration::from_secs(15));
    }
}
