//! The proxy's credentials: its SVID and every TLS configuration built from it, swapped as a
//! whole when the SVID is renewed. New connections use the new set; open ones keep theirs.
//!
//! Renewal runs at about half the SVID's remaining life (with jitter, so a fleet does not
//! renew in lockstep), over mTLS with the current SVID; the new key is made here. If the
//! control plane cannot be reached the proxy retries with backoff and keeps serving; once the
//! SVID has expired it says so loudly: peers refuse an expired certificate, so it fails closed.

use crate::config::UpstreamSpec;
use crate::{ProxyError, Shared};
use bulkhead_api::channel::{self, CONTROL_ID_PATH};
use bulkhead_api::v1::RenewRequest;
use bulkhead_api::v1::identity_client::IdentityClient;
use bulkhead_identity::tls::{ClientAuth, ExpectedServer, client_config, server_config};
use bulkhead_identity::{IdentityError, LocalKey, SpiffeId, Svid, TrustBundle};
use rustls::{ClientConfig, ServerConfig};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const MAX_BACKOFF: Duration = Duration::from_secs(30);
const MIN_WAIT: Duration = Duration::from_secs(1);

/// An SVID and the TLS configurations that present it.
pub(crate) struct TlsSet {
    pub svid: Svid,
    /// The roots peers must chain to; replaced with the set when the bundle changes.
    pub bundle: TrustBundle,
    pub server: Arc<ServerConfig>,
    pub upstreams: HashMap<String, Arc<ClientConfig>>,
    pub control: Arc<ClientConfig>,
}

impl TlsSet {
    pub(crate) fn build(
        svid: Svid,
        bundle: &TrustBundle,
        upstreams: &[UpstreamSpec],
    ) -> Result<TlsSet, IdentityError> {
        let server = Arc::new(server_config(
            &svid,
            bundle,
            ClientAuth::Required,
            &crate::clients::Alpn::ALL,
        )?);
        let mut by_name = HashMap::new();
        for up in upstreams {
            let c = client_config(
                Some(&svid),
                bundle,
                ExpectedServer::Exact(up.identity.clone()),
                &[b"http/1.1"],
            )?;
            by_name.insert(up.name.clone(), Arc::new(c));
        }
        let control = Arc::new(client_config(
            Some(&svid),
            bundle,
            ExpectedServer::Exact(control_identity(bundle)?),
            &[b"h2"],
        )?);
        Ok(TlsSet {
            svid,
            bundle: bundle.clone(),
            server,
            upstreams: by_name,
            control,
        })
    }
}

/// The control plane's expected identity in the bundle's trust domain.
pub(crate) fn control_identity(bundle: &TrustBundle) -> Result<SpiffeId, IdentityError> {
    SpiffeId::parse(&format!(
        "spiffe://{}{CONTROL_ID_PATH}",
        bundle.trust_domain()
    ))
}

/// A channel to the control plane that always presents the current SVID.
pub(crate) fn control_channel(
    control: SocketAddr,
    shared: &Arc<Shared>,
) -> tonic::transport::Channel {
    let shared = shared.clone();
    channel::connect_dynamic(control, move || shared.tls.load().control.clone())
}

/// How long to wait before renewing: about half of what is left, ± 10 %.
fn renew_after(svid: &Svid, now: SystemTime) -> Duration {
    let left = svid.not_after().duration_since(now).unwrap_or_default();
    (left / 2)
        .mul_f64(rand::random_range(0.9..1.1))
        .max(MIN_WAIT)
}

pub(crate) fn spawn_rotation(
    control: SocketAddr,
    shared: Arc<Shared>,
    upstreams: Vec<UpstreamSpec>,
) {
    tokio::spawn(async move {
        let mut client = IdentityClient::new(control_channel(control, &shared));
        loop {
            let wait = renew_after(&shared.tls.load().svid, SystemTime::now());
            tokio::time::sleep(wait).await;
            let mut backoff = Duration::from_secs(1);
            loop {
                let outcome = renew(&mut client, &shared, &upstreams).await;
                let result = if outcome.is_ok() { "ok" } else { "error" };
                shared
                    .metrics
                    .renewals
                    .get_or_create(&crate::metrics::ResultLabels { result })
                    .inc();
                match outcome {
                    Ok(()) => break,
                    Err(e) => {
                        let set = shared.tls.load();
                        let expired = set.svid.not_after() <= SystemTime::now();
                        if expired {
                            tracing::error!(error = %e, spiffe_id = %set.svid.id(), "SVID EXPIRED and renewal failed: peers will refuse this proxy (failing closed) until it renews; retrying");
                        } else {
                            let left = set
                                .svid
                                .not_after()
                                .duration_since(SystemTime::now())
                                .unwrap_or_default();
                            tracing::warn!(error = %e, expires_in_s = left.as_secs(), retry_in_s = backoff.as_secs(), "SVID renewal failed; still serving with the current one");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    });
}

async fn renew(
    client: &mut IdentityClient<tonic::transport::Channel>,
    shared: &Shared,
    upstreams: &[UpstreamSpec],
) -> Result<(), ProxyError> {
    let current = shared.tls.load();
    let key = LocalKey::generate()?;
    let csr_der = key.csr_der(Some(current.svid.id()))?;
    let response = client
        .renew(RenewRequest { csr_der })
        .await
        .map_err(|s| ProxyError::Renew(s.message().to_string()))?
        .into_inner();
    let svid = key.into_svid(
        response
            .cert_chain_der
            .into_iter()
            .map(Into::into)
            .collect(),
    )?;
    if svid.id() != current.svid.id() {
        return Err(ProxyError::Renew(format!(
            "control plane returned {} for {}",
            svid.id(),
            current.svid.id()
        )));
    }
    let serial = svid.serial().to_string();
    let not_after = svid.not_after();
    let set = TlsSet::build(svid, &shared.tls.load().bundle, upstreams)?;
    shared.tls.store(Arc::new(set));
    shared
        .metrics
        .svid_expiry
        .set(crate::unix_seconds(not_after));
    tracing::info!(serial, previous = current.svid.serial(), not_after = ?not_after, "renewed SVID; new connections use it");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_waits_about_half_the_remaining_life() {
        let now = SystemTime::now();
        let ca = bulkhead_identity::Ca::generate("td", now).unwrap();
        let id = SpiffeId::parse("spiffe://td/a").unwrap();
        let svid = ca.issue_local(&id, Duration::from_secs(3600), now).unwrap();
        for _ in 0..100 {
            let wait = renew_after(&svid, now).as_secs_f64();
            assert!((1620.0..=1980.0).contains(&wait), "{wait}");
        }
        let later = now + Duration::from_secs(4000);
        assert_eq!(
            renew_after(&svid, later),
            MIN_WAIT,
            "an expired SVID renews at once"
        );
    }
}
