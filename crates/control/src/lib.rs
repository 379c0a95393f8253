//! The control plane: holds the CA, join tokens and policies; signs proxies' CSRs; streams
//! each proxy the policy for its workload; serves the admin API to the CLI.
//!
//! It never sees a proxy's private key, and a proxy can read only the configuration of a
//! workload its identity was bound to by a join token.

mod admin;
mod anomaly;
mod attestation;
mod cas;
mod change;
mod console;
mod credentials;
mod datadir;
mod delivery;
mod discovery;
mod error;
mod federation;
mod flows;
mod issuer;
mod jwt_svid;
mod listener;
mod metrics;
mod promote;
mod proxies;
mod replicas;
mod resources;
mod service;
mod spans;
mod spiffe_bundle;
mod store;
mod tap;
#[cfg(test)]
mod testing;
mod tokens;

pub use admin::MAX_APPLY_BYTES;
pub use anomaly::Anomalies;
pub use attestation::{Attestation, AttestationError, Attested, Attestor};
pub use change::ProxyBounds;
pub use console::{ConsoleOptions, ConsoleTransport};
pub use datadir::{AdminContext, CONTEXT_FILE};
pub use error::ControlError;
pub use federation::{FederatedTrustDomain, ForeignBundle};
pub use flows::{FlowRetention, MAX_EDGES_PER_REPORT, MAX_REPORT_JSON_BYTES};
pub use issuer::{BundleUpdates, Issuer, ServingTls};
pub use listener::tls_handshake;
pub use resources::{Committed, Refused, Resources};
pub use store::etcd::EtcdOptions;
pub use store::{HistoryRetention, LOG_CHANGES_PER_ENTRY, LOG_MAX_AGE, LOG_MAX_ENTRIES};

use bulkhead_api::v1::{
    admin_server::AdminServer, config_server::ConfigServer, credentials_server::CredentialsServer,
    identity_server::IdentityServer,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The resolved configuration of `bulkhead control`.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub trust_domain: String,
    pub svid_lifetime: Duration,
}

/// What [`start`] leaves at its defaults.
#[derive(Clone, Debug, Default)]
pub struct ControlOptions {
    /// How long reported traffic edges are kept, and how many.
    pub flow_retention: FlowRetention,
    /// How anomalies are found in flow reports (`bulkhead events`).
    pub anomalies: Anomalies,
    /// Serve `/metrics` (plain HTTP) on this address; `None`: no metrics listener.
    pub metrics: Option<SocketAddr>,
    /// Serve the web console (issue 21); `None`: no console.
    pub console: Option<ConsoleOptions>,
    /// How many snapshots of the whole set are kept for rollback, and how long.
    pub history: HistoryRetention,
    /// What one proxy's configuration may hold; a change over it is refused.
    pub proxy_bounds: ProxyBounds,
    /// Spans of calls, commits and pushes to an OTLP collector; `None`: no spans.
    pub traces: Option<TraceOptions>,
    /// Write a Prometheus `file_sd` file here listing every connected proxy's `/metrics`
    /// and this control plane's, rewritten at every connect and disconnect.
    pub prometheus_sd_file: Option<PathBuf>,
    /// Serve the trust bundle as a SPIFFE bundle over HTTPS (`https_spiffe`) on this
    /// address; `None`: no bundle endpoint.
    pub bundle_endpoint: Option<SocketAddr>,
    /// The `spiffe_refresh_hint` the bundle (endpoint and `ca bundle -o spiffe`) gives
    /// federating trust domains; `None`: 300 seconds.
    pub bundle_refresh_hint: Option<Duration>,
    /// The `--federation` file: trust domains to federate with; `None`: none.
    pub federation_file: Option<PathBuf>,
    /// Accept joins by a credential this attestor checks (a Kubernetes service-account
    /// token) instead of a join token; `None`: such joins are refused.
    pub attestor: Option<Arc<dyn Attestor>>,
    /// Keep the resource set and its revision log in etcd, shared with other replicas
    /// (`--etcd`); `None`: the embedded store holds them (one replica).
    pub etcd: Option<EtcdOptions>,
}

/// Where the control plane's spans go (`bulkhead control --otlp-endpoint`).
#[derive(Clone, Debug)]
pub struct TraceOptions {
    /// `http://HOST:PORT` of an OTLP/gRPC collector.
    pub endpoint: String,
    /// The probability that a call without a sampled `traceparent` starts a trace.
    pub sampling_ratio: f64,
}

/// A running control plane. Dropping it does not stop it; call [`RunningControl::shutdown`].
pub struct RunningControl {
    pub addr: SocketAddr,
    pub context_file: PathBuf,
    /// Where `/metrics` is served, if it is (also in the context file).
    pub metrics_addr: Option<SocketAddr>,
    /// The web console's address (`https://127.0.0.1:7445/`), if it is served.
    pub console_url: Option<String>,
    /// Serving certificates from the mesh's CA for listeners outside this crate (the
    /// Kubernetes injection webhook).
    pub issuer: Issuer,
    /// The resource set, for a controller that changes it as revisions of its own
    /// (the Kubernetes controller).
    pub resources: Resources,
    /// Where the SPIFFE bundle endpoint listens, if it does.
    pub bundle_endpoint: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ControlError>>,
}

impl RunningControl {
    pub async fn shutdown(self) -> Result<(), ControlError> {
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|e| ControlError::Serve(e.to_string()))?
    }

    /// Waits until the server stops on its own (an error) or forever.
    pub async fn wait(self) -> Result<(), ControlError> {
        self.task
            .await
            .map_err(|e| ControlError::Serve(e.to_string()))?
    }
}

/// Opens (or initialises) the data directory, binds, and serves in the background, with
/// every [`ControlOptions`] at its default.
pub async fn start(config: ControlConfig) -> Result<RunningControl, ControlError> {
    start_with(config, ControlOptions::default()).await
}

/// [`start`], keeping reported traffic edges for `flow_retention`.
pub async fn start_with_flow_retention(
    config: ControlConfig,
    flow_retention: FlowRetention,
) -> Result<RunningControl, ControlError> {
    let options = ControlOptions {
        flow_retention,
        ..ControlOptions::default()
    };
    start_with(config, options).await
}

/// Opens the data directory. With replicas on etcd, the CA set is etcd's: taken from there
/// if a replica stored it, else this replica's (made now, if new) is stored for the others;
/// two first replicas racing agree on the one stored first.
async fn open_data_dir(
    config: &ControlConfig,
    shared: Option<&store::etcd::EtcdStore>,
) -> Result<(datadir::DataDir, cas::CaSet), ControlError> {
    let open =
        || datadir::DataDir::open(&config.data_dir, &config.trust_domain, config.svid_lifetime);
    let Some(etcd) = shared else {
        return open();
    };
    if etcd.fetch_cas(&config.data_dir).await? {
        let (dir, cas) = open()?;
        tracing::info!("took the CA set from etcd");
        etcd.share_jwt_key(dir.path(), &cas.file()).await?;
        return Ok((dir, cas));
    }
    let (dir, cas) = open()?;
    // The JWT-SVID key goes to etcd with the CA set: one for every replica.
    jwt_svid::load_or_create(dir.path())?;
    if etcd.store_cas(dir.path(), &cas.file(), true).await? {
        tracing::info!("stored this replica's CA set in etcd, keys sealed, for the other replicas");
        return Ok((dir, cas));
    }
    // Another replica stored its set first: that one is the mesh's.
    etcd.fetch_cas(&config.data_dir).await?;
    drop(dir);
    // This replica's own JWT key, made above, was replaced by the shared one (or is
    // shared now, if the set stored first holds none).
    let (dir, cas) = open()?;
    etcd.share_jwt_key(dir.path(), &cas.file()).await?;
    drop(dir);
    let (dir, cas) = open()?;
    tracing::info!("took the CA set another replica stored first from etcd");
    Ok((dir, cas))
}

/// [`start`] with `options`.
pub async fn start_with(
    config: ControlConfig,
    options: ControlOptions,
) -> Result<RunningControl, ControlError> {
    let shared = match &options.etcd {
        Some(etcd) => {
            let shared = store::etcd::EtcdStore::connect(etcd, options.history.clone()).await?;
            tracing::info!(
                etcd = shared.endpoints(),
                "the resource set, its revision log, join tokens and the CA set are kept in etcd, shared with every replica"
            );
            Some(shared)
        }
        None => None,
    };
    let (dir, cas) = open_data_dir(&config, shared.as_ref()).await?;
    let store = store::Store::open_with(&config.data_dir.join("state.redb"), options.history)?;
    let (tcp, addr) = listener::bind(config.listen).await?;
    let metrics_tcp = match options.metrics {
        Some(listen) => Some(listener::bind(listen).await?),
        None => None,
    };
    let metrics_addr = metrics_tcp.as_ref().map(|(_, a)| *a);
    let context_file = dir.write_admin_context(cas.active(), addr, metrics_addr)?;
    let mut state = service::State::with_options(
        dir,
        cas,
        store,
        config.svid_lifetime,
        options.flow_retention,
        &options.anomalies,
        options.proxy_bounds,
        shared,
    )
    .await?;
    state.replica = Some(Arc::new(replicas::Replica::new(addr)));
    if let Some(hint) = options.bundle_refresh_hint {
        state.bundle_refresh_hint = hint.as_secs().max(1);
    }
    let federated = match &options.federation_file {
        Some(path) => federation::read(path, &config.trust_domain)?,
        None => Vec::new(),
    };
    if let Some(attestor) = &options.attestor {
        tracing::info!(
            accepts = attestor.describe(),
            "joins by attestation accepted besides join tokens"
        );
        state.attestor = Some(attestor.clone());
    }
    if let Some(path) = &options.prometheus_sd_file {
        state.discovery = Some(discovery::Discovery::start(path.clone(), metrics_addr)?);
        tracing::info!(path = %path.display(), "Prometheus file_sd file written; rewritten as proxies come and go");
    }
    if let Some(t) = &options.traces {
        let tracer = bulkhead_api::otlp::Tracer::start(
            &t.endpoint,
            t.sampling_ratio,
            vec![
                (
                    "service.name",
                    bulkhead_api::otlp::Value::Str("bulkhead-control".into()),
                ),
                (
                    "service.version",
                    bulkhead_api::otlp::Value::Str(env!("CARGO_PKG_VERSION").into()),
                ),
                (
                    "bulkhead.trust_domain",
                    bulkhead_api::otlp::Value::Str(config.trust_domain.clone()),
                ),
            ],
            state.metrics.traces.clone(),
        )
        .map_err(|e| ControlError::Serve(e.to_string()))?;
        tracing::info!(
            endpoint = t.endpoint,
            sampling_ratio = t.sampling_ratio,
            "spans of calls, commits and pushes go to an OTLP collector"
        );
        state.tracer = Some(Arc::new(tracer));
    }
    let state = Arc::new(state);
    change::spawn_follow(state.clone());
    replicas::spawn(state.clone());
    let incoming = listener::incoming(tcp, state.serving.clone(), state.trust_domain().to_string());
    listener::spawn_cert_renewal(state.clone());
    credentials::spawn_upkeep(state.clone());
    federation::spawn(state.clone(), federated);
    tracing::info!(%addr, trust_domain = state.trust_domain(), "control plane listening");

    let (stop, mut stopped) = watch::channel(false);
    let console_url = match &options.console {
        Some(console) => Some(
            console::spawn(state.clone(), console, stop.subscribe())
                .await?
                .url,
        ),
        None => None,
    };
    let bundle_endpoint = match options.bundle_endpoint {
        Some(listen) => Some(spiffe_bundle::spawn(state.clone(), listen, stop.subscribe()).await?),
        None => None,
    };
    if let Some((tcp, metrics_addr)) = metrics_tcp {
        tracing::info!(listen = %metrics_addr, "metrics listener ready (/metrics)");
        metrics::serve(tcp, state.clone(), stop.subscribe());
    }
    let issuer = Issuer::new(state.clone());
    let resources = Resources::new(state.clone());
    let router = tonic::transport::Server::builder()
        .layer(spans::CallSpans {
            tracer: state.tracer.clone(),
        })
        .add_service(IdentityServer::from_arc(state.clone()))
        .add_service(CredentialsServer::from_arc(state.clone()))
        // Room for a flow report at its bound, so that its own error names the bound.
        .add_service(
            ConfigServer::from_arc(state.clone())
                .max_decoding_message_size(MAX_REPORT_JSON_BYTES + 64 * 1024),
        )
        // Room for a policy file at its bound, so that its own error names the bound.
        .add_service(
            AdminServer::from_arc(state).max_decoding_message_size(MAX_APPLY_BYTES + 1024 * 1024),
        );
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
            .map_err(|e| ControlError::Serve(e.to_string()))
    });
    Ok(RunningControl {
        addr,
        context_file,
        metrics_addr,
        console_url,
        issuer,
        resources,
        bundle_endpoint,
        stop,
        task,
    })
}
