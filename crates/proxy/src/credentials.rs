//! The proxy's credentials: its SVID and every TLS configuration built from it, swapped as a
//! whole when the SVID is renewed. New connections use the new set; open ones keep theirs.
//!
//! Renewal runs at about half the SVID's remaining life (with jitter, so a fleet does not
//! renew in lockstep), over mTLS with the current SVID; the new key is made here. If the
//! control plane cannot be reached the proxy retries with backoff and keeps serving; once the
//! SVID has expired it says so loudly: peers refuse an expired certificate, so it fails closed.
//!
//! The trust bundle comes from the configuration stream: a new one is swapped in with the
//! current SVID, for new connections only. When the control plane says another CA signs now,
//! the proxy renews soon (with jitter), so the old CA can be retired after a short wait.

use crate::{ProxyError, Shared};
use bulkhead_api::channel::{self, CONTROL_ID_PATH};
use bulkhead_api::v1::RenewRequest;
use bulkhead_api::v1::TrustBundle as WireBundle;
use bulkhead_api::v1::identity_client::IdentityClient;
use bulkhead_identity::tls::{ClientAuth, ExpectedServer, client_config, server_config};
use bulkhead_identity::{IdentityError, LocalKey, SpiffeId, Svid, TrustBundle};
use rustls::{ClientConfig, ServerConfig};
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
    pub control: Arc<ClientConfig>,
    /// SHA-256 (hex) of the CA certificate that signed the SVID.
    pub signer: Option<String>,
    /// SHA-256 (hex) of each root of the bundle.
    pub roots: Vec<String>,
}

impl TlsSet {
    pub(crate) fn build(svid: Svid, bundle: &TrustBundle) -> Result<TlsSet, IdentityError> {
        let server = Arc::new(server_config(
            &svid,
            bundle,
            ClientAuth::Required,
            &crate::clients::Alpn::ALL,
        )?);
        let control = Arc::new(client_config(
            Some(&svid),
            bundle,
            ExpectedServer::Exact(control_identity(bundle)?),
            &[b"h2"],
        )?);
        Ok(TlsSet {
            signer: svid.issuer_fingerprint(),
            roots: bundle.fingerprints(),
            svid,
            bundle: bundle.clone(),
            server,
            control,
        })
    }

    /// The same bundle around a new SVID.
    fn with_svid(&self, svid: Svid) -> Result<TlsSet, IdentityError> {
        TlsSet::build(svid, &self.bundle)
    }

    /// The same SVID with a new bundle.
    fn with_bundle(&self, bundle: &TrustBundle) -> Result<TlsSet, IdentityError> {
        TlsSet::build(self.svid.clone(), bundle)
    }
}

/// Replaces the TLS set with `f(current)`. Renewal and a new bundle may race: if the set
/// changed while `f` ran, `f` runs again on the newer one, so neither change is lost.
fn replace(
    shared: &Shared,
    f: impl Fn(&TlsSet) -> Result<TlsSet, IdentityError>,
) -> Result<Arc<TlsSet>, IdentityError> {
    loop {
        let current = shared.tls.load_full();
        let next = Arc::new(f(&current)?);
        let previous = shared.tls.compare_and_swap(&current, next.clone());
        if Arc::ptr_eq(&previous, &current) {
            return Ok(next);
        }
    }
}

/// Takes the trust bundle of a configuration message: swaps it in if it differs (new
/// connections verify peers against it; open ones are untouched), and notes which CA signs.
/// Refused (with the reason for the NACK) if it is unusable or for another trust domain; the
/// current bundle then stays. A message without a bundle keeps the current one.
pub(crate) fn take_bundle(shared: &Shared, wire: Option<&WireBundle>) -> Result<(), String> {
    let Some(wire) = wire else {
        return Ok(());
    };
    let ours = shared.tls.load().bundle.trust_domain().to_string();
    if wire.trust_domain != ours {
        return Err(format!(
            "the trust bundle is for trust domain {:?}, but this proxy is in {ours:?}",
            wire.trust_domain
        ));
    }
    if let Some(app) = &shared.workload_api {
        let mut jwt = std::collections::BTreeMap::new();
        jwt.insert(ours.clone(), jwt_bundle(&wire.jwt_keys));
        for f in &wire.federated {
            if f.trust_domain != ours {
                jwt.insert(f.trust_domain.clone(), jwt_bundle(&f.jwt_keys));
            }
        }
        app.jwt_keys(jwt);
    }
    let federated = wire
        .federated
        .iter()
        .map(|f| {
            (
                f.trust_domain.clone(),
                f.roots_der.iter().map(|r| r.clone().into()).collect(),
            )
        })
        .collect();
    let bundle = TrustBundle::for_trust_domain(
        &ours,
        wire.roots_der.iter().map(|r| r.clone().into()).collect(),
    )
    .map_err(|e| e.to_string())?
    .with_federated(federated)
    .map_err(|e| format!("a federated trust domain's bundle is unusable: {e}"))?
    .with_revocations(shared.revoked.clone());
    let roots = bundle.fingerprints();
    let held = shared.tls.load().roots.clone();
    let federated_changed = shared.tls.load().bundle.federated() != bundle.federated();
    if roots.len() != held.len() || roots.iter().any(|r| !held.contains(r)) || federated_changed {
        let set = replace(shared, |current| current.with_bundle(&bundle))
            .map_err(|e| format!("cannot use the new trust bundle: {e}"))?;
        if let Some(app) = &shared.workload_api {
            app.bundle_changed(&set.bundle);
        }
        tracing::info!(
            roots = ?roots.iter().map(|r| short(r)).collect::<Vec<_>>(),
            signer = set.signer.as_deref().map(short),
            federated = ?set.bundle.federated().iter().map(|(td, r)| (td.as_str(), r.iter().map(|c| short_of(c)).collect::<Vec<_>>())).collect::<Vec<_>>(),
            "new trust bundle; new connections verify peers against it"
        );
    }
    if !wire.signing_ca_sha256.is_empty() {
        shared
            .rotation
            .signing_ca_is(&shared.tls.load(), &wire.signing_ca_sha256);
    }
    Ok(())
}

/// A trust domain's JWT keys as pushed; a key that does not read as a JWK would is left out.
fn jwt_bundle(keys: &[bulkhead_api::v1::JwtPublicKey]) -> bulkhead_identity::jwt::JwtBundle {
    use bulkhead_identity::jwt::JwtPublicKey;
    bulkhead_identity::jwt::JwtBundle::new(keys.iter().filter_map(|k| {
        let key = JwtPublicKey {
            kid: k.kid.clone(),
            x: k.x.clone(),
            y: k.y.clone(),
        };
        JwtPublicKey::from_json(&key.to_json()).ok()
    }))
}

fn short_of(cert: &[u8]) -> String {
    short(&bulkhead_identity::fingerprint(cert)).to_string()
}

fn short(sha256: &str) -> &str {
    sha256.get(..16).unwrap_or(sha256)
}

/// Wakes the renewal loop early when the control plane signs with another CA than the one
/// that signed this proxy's SVID.
#[derive(Default)]
pub(crate) struct Rotation {
    wake: tokio::sync::Notify,
    /// The CA the control plane last said signs.
    signing_ca: std::sync::Mutex<Option<String>>,
}

impl Rotation {
    fn signing_ca_is(&self, current: &TlsSet, ca: &str) {
        *self.signing_ca.lock().unwrap_or_else(|p| p.into_inner()) = Some(ca.to_string());
        if self.wants_renewal(current) {
            self.wake.notify_one();
        }
    }

    /// Whether the current SVID is from another CA than the one that signs now.
    fn wants_renewal(&self, current: &TlsSet) -> bool {
        let signing = self.signing_ca.lock().unwrap_or_else(|p| p.into_inner());
        matches!(&*signing, Some(ca) if current.signer.as_deref() != Some(ca.as_str()))
    }
}

/// The control plane's expected identity in the bundle's trust domain.
pub(crate) fn control_identity(bundle: &TrustBundle) -> Result<SpiffeId, IdentityError> {
    Ok(SpiffeId::parse(&format!(
        "spiffe://{}{CONTROL_ID_PATH}",
        bundle.trust_domain()
    ))?)
}

/// A channel to the control plane that always presents the current SVID.
pub(crate) fn control_channel(
    control: Arc<bulkhead_api::channel::Replicas>,
    shared: &Arc<Shared>,
) -> tonic::transport::Channel {
    let shared = shared.clone();
    channel::connect_dynamic(control, move || shared.tls.load().control.clone())
}

/// How long to wait before renewing: about half of what is left, ± 10 %.
pub(crate) fn renew_after(svid: &Svid, now: SystemTime) -> Duration {
    let left = svid.not_after().duration_since(now).unwrap_or_default();
    (left / 2)
        .mul_f64(rand::random_range(0.9..1.1))
        .max(MIN_WAIT)
}

/// How long to wait before renewing once another CA signs: a random part of a quarter of
/// what is left, at most 30 s, so that a fleet does not renew all at once.
fn switch_jitter(svid: &Svid, now: SystemTime) -> Duration {
    let left = svid.not_after().duration_since(now).unwrap_or_default();
    (left / 4)
        .min(MAX_SWITCH_JITTER)
        .mul_f64(rand::random_range(0.0..1.0))
}

const MAX_SWITCH_JITTER: Duration = Duration::from_secs(30);

pub(crate) fn spawn_rotation(control: Arc<bulkhead_api::channel::Replicas>, shared: Arc<Shared>) {
    tokio::spawn(async move {
        let mut client = IdentityClient::new(control_channel(control, &shared));
        loop {
            let wait = renew_after(&shared.tls.load().svid, SystemTime::now());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shared.rotation.wake.notified() => {
                    let jitter = switch_jitter(&shared.tls.load().svid, SystemTime::now());
                    tracing::info!(in_ms = jitter.as_millis() as u64, "another CA signs now; renewing soon");
                    tokio::time::sleep(jitter).await;
                    if !shared.rotation.wants_renewal(&shared.tls.load()) {
                        continue;
                    }
                }
            }
            let mut backoff = Duration::from_secs(1);
            loop {
                let outcome = renew(&mut client, &shared).await;
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

/// A new key made here, certified for `id` by `Identity.Renew` over the sidecar's mTLS
/// channel; refused if the control plane answers for another identity. The sidecar's own
/// renewal and the Workload API's keys for its app both come from here.
pub(crate) async fn certified(
    client: &mut IdentityClient<tonic::transport::Channel>,
    id: &SpiffeId,
) -> Result<Svid, ProxyError> {
    let key = LocalKey::generate()?;
    let csr_der = key.csr_der(Some(id))?;
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
    if svid.id() != id {
        return Err(ProxyError::Renew(format!(
            "control plane returned {} for {id}",
            svid.id()
        )));
    }
    Ok(svid)
}

async fn renew(
    client: &mut IdentityClient<tonic::transport::Channel>,
    shared: &Shared,
) -> Result<(), ProxyError> {
    let current = shared.tls.load();
    let svid = certified(client, current.svid.id()).await?;
    let serial = svid.serial().to_string();
    let not_after = svid.not_after();
    let set = replace(shared, |current| current.with_svid(svid.clone()))?;
    if let Some(sealed) = &shared.sealed
        && let Err(e) = sealed.store(&svid, &shared.workload, &shared.instance)
    {
        // The proxy goes on with the new certificate; a restart would fall back to the
        // token while the kept one is still valid, and to nothing after.
        tracing::error!(error = %e, "could not keep the renewed credential; a restart may need a new join token");
    }
    shared
        .metrics
        .svid_expiry
        .set(crate::unix_seconds(not_after));
    if let Some(app) = &shared.workload_api {
        app.sidecar_renewed(set.signer.as_deref());
    }
    tracing::info!(serial, previous = current.svid.serial(), not_after = ?not_after, ca = set.signer.as_deref().map(short), "renewed SVID; new connections use it");
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
            // Half of 3600 s ± 10 %, less the sub-second part not_after loses to rounding.
            assert!((1619.0..=1980.0).contains(&wait), "{wait}");
        }
        let later = now + Duration::from_secs(4000);
        assert_eq!(
            renew_after(&svid, later),
            MIN_WAIT,
            "an expired SVID renews at once"
        );
    }

    #[test]
    fn another_signing_ca_asks_for_one_early_renewal() {
        let now = SystemTime::now();
        let old = bulkhead_identity::Ca::generate("td", now).unwrap();
        let new = bulkhead_identity::Ca::generate("td", now).unwrap();
        let id = SpiffeId::parse("spiffe://td/a").unwrap();
        let hour = Duration::from_secs(3600);
        let bundle = TrustBundle::for_trust_domain(
            "td",
            vec![old.cert_der().clone(), new.cert_der().clone()],
        )
        .unwrap();
        let set = TlsSet::build(old.issue_local(&id, hour, now).unwrap(), &bundle).unwrap();
        assert_eq!(set.signer, Some(old.fingerprint()));
        assert_eq!(set.roots, bundle.fingerprints());
        let rotation = Rotation::default();
        rotation.signing_ca_is(&set, &old.fingerprint());
        assert!(!rotation.wants_renewal(&set));
        rotation.signing_ca_is(&set, &new.fingerprint());
        assert!(rotation.wants_renewal(&set));
        let renewed = set
            .with_svid(new.issue_local(&id, hour, now).unwrap())
            .unwrap();
        assert!(!rotation.wants_renewal(&renewed), "renewed from the new CA");
        assert_eq!(renewed.roots, set.roots, "the bundle is kept");
        let smaller = TrustBundle::for_trust_domain("td", vec![new.cert_der().clone()]).unwrap();
        let swapped = renewed.with_bundle(&smaller).unwrap();
        assert_eq!(swapped.roots, vec![new.fingerprint()]);
        assert_eq!(
            swapped.svid.serial(),
            renewed.svid.serial(),
            "the SVID is kept"
        );
    }

    #[test]
    fn renewal_after_a_switch_waits_a_random_part_of_a_quarter_life_at_most_30s() {
        let now = SystemTime::now();
        let ca = bulkhead_identity::Ca::generate("td", now).unwrap();
        let id = SpiffeId::parse("spiffe://td/a").unwrap();
        let short = ca.issue_local(&id, Duration::from_secs(4), now).unwrap();
        let long = ca.issue_local(&id, Duration::from_secs(3600), now).unwrap();
        for _ in 0..100 {
            assert!(switch_jitter(&short, now) <= Duration::from_secs(1));
            assert!(switch_jitter(&long, now) <= MAX_SWITCH_JITTER);
        }
    }
}
