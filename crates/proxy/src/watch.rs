//! Following the control plane: one long-lived stream of configurations for our workload.
//! A configuration that does not decode is refused whole and the last good one stays in
//! force; a lost stream is re-opened with backoff while enforcement continues unchanged.

use crate::Shared;
use crate::credentials::{control_channel, take_bundle};
use bulkhead_api::v1::config_client::ConfigClient;
use bulkhead_api::v1::{AckRequest, ProxyConfig, WatchRequest};
use bulkhead_policy::PolicySet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Starts following; the receiver reports the revision in force once one has arrived.
pub(crate) fn spawn(
    control: SocketAddr,
    shared: Arc<Shared>,
    max_rules: usize,
) -> watch::Receiver<Option<u64>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut client = ConfigClient::new(control_channel(control, &shared));
        let request = WatchRequest {
            namespace: shared.workload.namespace.clone(),
            workload: shared.workload.name.clone(),
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            match client.watch(request.clone()).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(config)) => {
                                backoff = Duration::from_millis(200);
                                let revision = config.revision;
                                let outcome = apply(&shared, config, max_rules);
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
                                if outcome.is_ok() {
                                    tx.send_replace(Some(revision));
                                }
                                let ack = AckRequest {
                                    namespace: request.namespace.clone(),
                                    workload: request.workload.clone(),
                                    revision,
                                    accepted: outcome.is_ok(),
                                    error: outcome.err().unwrap_or_default(),
                                    bundle_sha256: shared.tls.load().roots.clone(),
                                };
                                if let Err(status) = client.clone().ack(ack).await {
                                    tracing::warn!(revision, error = %status.message(), "could not report the configuration's status");
                                }
                            }
                            Ok(None) => {
                                tracing::warn!("control plane closed the configuration stream");
                                break;
                            }
                            Err(status) => {
                                tracing::warn!(error = %status.message(), "configuration stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(status) => tracing::warn!(
                    code = ?status.code(),
                    error = %status.message(),
                    "cannot watch configuration; keeping the policy in force"
                ),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
    rx
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
