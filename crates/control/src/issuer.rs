//! Server certificates the control plane issues to listeners outside this crate (the
//! Kubernetes injection webhook), from the mesh's signing CA, with the current trust bundle.
//!
//! It exists so that a caller such as `bulkhead-kubernetes` can serve HTTPS under the mesh's
//! CA without ever holding a CA key: it gets a TLS configuration that this module re-issues
//! at half its lifetime and at every CA change, and the bundle as PEM. It never issues
//! anything but the mesh's own reserved identities (`/bulkhead/...`), and never asks the
//! caller for a client certificate.

use crate::error::ControlError;
use crate::service::State;
use arc_swap::ArcSwap;
use bulkhead_identity::SpiffeId;
use rustls::ServerConfig;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A handle on the running control plane's CA, for serving certificates.
#[derive(Clone)]
pub struct Issuer {
    state: Arc<State>,
}

/// A TLS server configuration kept current: take [`ServingTls::config`] for each new
/// connection.
#[derive(Clone)]
pub struct ServingTls {
    current: Arc<ArcSwap<ServerConfig>>,
}

impl ServingTls {
    /// The configuration with the newest certificate.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }
}

/// The trust bundle's changes, from [`Issuer::bundle_updates`].
pub struct BundleUpdates {
    cas: tokio::sync::watch::Receiver<Arc<crate::cas::CaSet>>,
}

impl BundleUpdates {
    /// Waits for the CAs to change and returns the new bundle (PEM); `None` once the
    /// control plane has stopped.
    pub async fn changed(&mut self) -> Option<String> {
        self.cas.changed().await.ok()?;
        let pem = self.cas.borrow_and_update().bundle().to_pem();
        Some(pem)
    }
}

impl Issuer {
    pub(crate) fn new(state: Arc<State>) -> Issuer {
        Issuer { state }
    }

    pub fn trust_domain(&self) -> &str {
        self.state.trust_domain()
    }

    /// The current trust bundle (every root not retired), as PEM: what a client of a
    /// [`ServingTls`] listener must trust.
    pub fn bundle_pem(&self) -> String {
        self.state.cas.borrow().bundle().to_pem()
    }

    /// The trust bundle as it changes: [`BundleUpdates::changed`] waits for the next CA
    /// change (a rotation begun, completed or rolled back) and returns the new bundle.
    pub fn bundle_updates(&self) -> BundleUpdates {
        BundleUpdates {
            cas: self.state.cas.subscribe(),
        }
    }

    /// A TLS 1.3 server configuration for `spiffe://<td>/bulkhead/<name>` and the DNS names or
    /// addresses `hosts`, offering `alpn`, re-issued at half its lifetime and whenever the CAs
    /// change. No client certificate is asked for; no session is resumed.
    pub fn serving(
        &self,
        name: &str,
        hosts: &[String],
        alpn: &[&[u8]],
    ) -> Result<ServingTls, ControlError> {
        let id = SpiffeId::parse(&format!(
            "spiffe://{}/bulkhead/{name}",
            self.state.trust_domain()
        ))?;
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let first = config(&self.state, &id, hosts, &alpn)?;
        let current = Arc::new(ArcSwap::from_pointee(first));
        let hosts = hosts.to_vec();
        keep_current(
            self.state.clone(),
            id.to_string(),
            move |state| config(state, &id, &hosts, &alpn),
            current.clone(),
        );
        Ok(ServingTls { current })
    }
}

fn config(
    state: &State,
    id: &SpiffeId,
    hosts: &[String],
    alpn: &[Vec<u8>],
) -> Result<ServerConfig, ControlError> {
    let svid = state.signer().issue_local_for_hosts(
        id,
        hosts,
        state.svid_lifetime(),
        SystemTime::now(),
    )?;
    let provider = bulkhead_identity::tls::provider();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ControlError::Serve(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(svid.chain().to_vec(), svid.private_key())
        .map_err(|e| ControlError::Serve(e.to_string()))?;
    config.alpn_protocols = alpn.to_vec();
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Keeps `current` holding a fresh configuration from `make`: re-made at half the SVID
/// lifetime and whenever the CAs change, every 30 s after a failure. `what` names the
/// certificate in the logs. The webhook's and the console's serving certificates both live
/// on it.
pub(crate) fn keep_current(
    state: Arc<State>,
    what: String,
    make: impl Fn(&State) -> Result<ServerConfig, ControlError> + Send + 'static,
    current: Arc<ArcSwap<ServerConfig>>,
) {
    let mut cas = state.cas.subscribe();
    tokio::spawn(async move {
        let mut wait = state.svid_lifetime() / 2;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                changed = cas.changed() => if changed.is_err() { return },
            }
            wait = match make(&state) {
                Ok(c) => {
                    current.store(Arc::new(c));
                    tracing::info!(certificate = what, "re-issued a serving certificate");
                    state.svid_lifetime() / 2
                }
                Err(e) => {
                    tracing::error!(certificate = what, error = %e, "could not re-issue a serving certificate; retrying in 30s");
                    Duration::from_secs(30)
                }
            };
        }
    });
}
