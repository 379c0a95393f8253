//! The Bulkhead sidecar.
//!
//! Explicit mode: an inbound mTLS listener in front of the local app's port, and one plain
//! local listener per declared upstream that forwards over mTLS to that upstream's sidecar.
//! Inbound requests are authorized against the policy the control plane streams; outbound
//! connections are only made to a server presenting the SPIFFE ID the upstream declares.
//!
//! The proxy's private key is made here and never leaves the process; it never holds a CA key.

mod admin;
mod authz;
mod bootstrap;
pub mod capture;
mod clients;
pub mod config;
mod credentials;
mod deadline;
mod detect;
mod flows;
mod http;
mod inbound;
mod metrics;
mod mux;
mod outbound;
mod refusal;
mod revoked;
mod sealed;
mod tap;
mod tcp;
#[cfg(test)]
mod testing;
mod trace;
mod upgrade;
mod watch;
mod workload_api;

use bulkhead_api::otlp::Value;
pub use config::{Config, Limits, UpstreamSpec};

use arc_swap::ArcSwap;
use bulkhead_identity::SpiffeId;
use bulkhead_policy::model::ResourceName;
use credentials::TlsSet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("trust bundle: {0}")]
    Bundle(bulkhead_identity::IdentityError),
    #[error("could not join the control plane at {addr}: {message}")]
    Join {
        addr: bulkhead_api::channel::ControlAddrs,
        message: String,
    },
    #[error("identity: {0}")]
    Identity(#[from] bulkhead_identity::IdentityError),
    #[error("SVID renewal refused: {0}")]
    Renew(String),
    #[error(transparent)]
    Traces(#[from] bulkhead_api::otlp::EndpointError),
    #[error("credential file {path}: {message}")]
    Credential {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve the SPIFFE Workload API on {path}: {source}")]
    WorkloadApi {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write ready file {path}: {source}")]
    ReadyFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// State every connection handler reads: who we are and the policy in force.
pub(crate) struct Shared {
    /// The current SVID and TLS configurations; replaced whole on renewal.
    pub tls: ArcSwap<TlsSet>,
    pub workload: ResourceName,
    /// This proxy's SPIFFE ID as a metric label (it never changes across renewals).
    pub identity: metrics::LabelText,
    /// The same SPIFFE ID, typed: what flow reports and tap events carry.
    pub spiffe_id: SpiffeId,
    /// This proxy's namespace and workload as metric labels.
    pub place: metrics::Place,
    /// Everything a decision reads from the configuration (revision, compiled policy, the
    /// mesh's address table), swapped whole; a request loads it once.
    pub snapshot: ArcSwap<authz::Snapshot>,
    pub rotation: credentials::Rotation,
    /// Open opaque TCP relays, judged again on every policy change.
    pub relays: tcp::Relays,
    /// TLS client configurations per destination identity, for the current credentials.
    pub clients: clients::ClientConfigs,
    /// Outbound: one shared connection per mesh destination for HTTP/1.1 requests.
    pub mux: mux::Mux,
    /// Inbound: pooled HTTP/1.1 connections to the app for multiplexed streams.
    pub app_pool: mux::AppPool,
    /// Decisions counted per edge, reported to the control plane on an interval.
    pub flows: flows::Flows,
    /// Decided requests sent live to operators tapping this workload.
    pub tap: tap::Tap,
    pub metrics: metrics::Metrics,
    /// Rate limits for the log lines of refusals (every one is counted).
    pub refusal_logs: refusal::LogGates,
    pub limits: config::Limits,
    /// Identities and certificates the control plane revoked: refused at every handshake.
    pub revoked: Arc<revoked::Revoked>,
    /// Request spans, when an OTLP endpoint is set.
    pub tracer: Option<trace::Tracer>,
    /// Where this proxy keeps its credential to rejoin after a restart (rewritten at each
    /// renewal), and the instance its join made.
    pub sealed: Option<sealed::Sealed>,
    pub instance: String,
    /// The app's own SVID and bundle, when the sidecar serves the SPIFFE Workload API.
    pub workload_api: Option<Arc<workload_api::AppIdentity>>,
    /// The control plane's replicas and the one in use (`/config`, `/metrics`).
    pub control: Arc<bulkhead_api::channel::Replicas>,
}

/// What a started proxy bound and who it is.
#[derive(Clone, Debug, Serialize)]
pub struct Running {
    pub spiffe_id: String,
    pub workload: String,
    pub inbound: Option<SocketAddr>,
    pub upstreams: BTreeMap<String, SocketAddr>,
    /// The transparent outbound listener, if any.
    pub outbound: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The SPIFFE Workload API's Unix socket, if served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_api: Option<std::path::PathBuf>,
    pub revision: u64,
}

impl Shared {
    /// Every decided request or TCP connection passes here once it is done: it is counted
    /// into its flow edge, and shown to operators tapping this workload.
    pub(crate) fn observe(&self, seen: &flows::Seen<'_>) {
        self.flows.record(seen);
        self.tap.offer(seen);
    }

    /// Counts a refusal; `Some(n)` if it should also be logged now (`n` of its kind went
    /// unlogged since the last line), `None` if a line for its kind was written recently.
    pub(crate) fn refuse(&self, direction: &'static str, reason: refusal::Refusal) -> Option<u64> {
        self.metrics.refusal(direction, reason);
        self.refusal_logs.admit(reason)
    }
}

pub(crate) fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Joins the control plane, binds every listener, waits for the first configuration (up to
/// `first_config_wait`; until then everything is denied) and serves in the background.
pub async fn start(config: Config) -> Result<Running, ProxyError> {
    let sealed = config
        .credential_file
        .as_deref()
        .map(sealed::Sealed::claim)
        .transpose()?;
    let replicas = bulkhead_api::channel::Replicas::new(config.control.clone());
    let joined = bootstrap::join(&config, sealed.as_ref(), &replicas).await?;
    let id: SpiffeId = joined.svid.id().clone();
    tracing::info!(spiffe_id = %id, workload = %joined.workload, instance = joined.instance, serial = joined.svid.serial(), "joined the mesh");
    let revoked = Arc::new(revoked::Revoked::default());
    let bundle = joined.bundle.with_revocations(revoked.clone());
    let tls = TlsSet::build(joined.svid, &bundle)?;
    let metrics = metrics::Metrics::new();
    metrics.svid_expiry.set(unix_seconds(tls.svid.not_after()));
    let tracer = match &config.traces {
        Some(t) => Some(trace::Tracer::start(
            &t.endpoint,
            t.sampling_ratio,
            vec![
                ("service.name", Value::Str(joined.workload.name.clone())),
                (
                    "service.namespace",
                    Value::Str(joined.workload.namespace.clone()),
                ),
                ("bulkhead.identity", Value::Str(id.to_string())),
                (
                    "service.version",
                    Value::Str(env!("CARGO_PKG_VERSION").into()),
                ),
            ],
            metrics.traces.clone(),
        )?),
        None => None,
    };
    if let Some(t) = &config.traces {
        tracing::info!(
            endpoint = t.endpoint,
            sampling_ratio = t.sampling_ratio,
            "request spans go to an OTLP collector"
        );
    }
    let shared = Arc::new(Shared {
        tracer,
        sealed,
        instance: joined.instance.clone(),
        flows: flows::Flows::for_interval(config.flow_interval, metrics.flows_dropped.clone()),
        tap: tap::Tap::default(),
        metrics,
        refusal_logs: refusal::LogGates::default(),
        limits: config.limits,
        tls: ArcSwap::from_pointee(tls),
        place: metrics::Place::of(None, Some(&joined.workload)),
        workload: joined.workload,
        identity: metrics::LabelText::new(id.as_str()),
        spiffe_id: id.clone(),
        snapshot: ArcSwap::from_pointee(authz::Snapshot::default()),
        rotation: credentials::Rotation::default(),
        relays: tcp::Relays::default(),
        clients: clients::ClientConfigs::default(),
        mux: mux::Mux::new(config.limits.max_concurrent_streams),
        app_pool: mux::AppPool::new(config.limits.idle_timeout.min(Duration::from_secs(90))),
        workload_api: config
            .workload_api
            .as_ref()
            .map(|_| Arc::new(workload_api::AppIdentity::new(bundle.clone()))),
        revoked,
        control: replicas.clone(),
    });
    metrics::follow_replica(&shared);

    let admin = match config.admin {
        Some(listen) => Some(admin::spawn(listen, shared.clone()).await?),
        None => None,
    };
    let inbound = match &config.inbound {
        Some(ib) => Some(inbound::spawn(ib, shared.clone()).await?),
        None => None,
    };
    let mut upstreams = BTreeMap::new();
    for up in &config.upstreams {
        let addr = outbound::spawn(up, shared.clone()).await?;
        upstreams.insert(up.name.clone(), addr);
    }
    let outbound = match config.outbound {
        Some(listen) => Some(outbound::spawn_transparent(listen, shared.clone()).await?),
        None => None,
    };

    let workload_api = match (&config.workload_api, &shared.workload_api) {
        (Some(path), Some(app)) => {
            Some(workload_api::spawn(path, replicas.clone(), shared.clone(), app.clone()).await?)
        }
        _ => None,
    };
    credentials::spawn_rotation(replicas.clone(), shared.clone());
    let mut first = watch::spawn(
        replicas.clone(),
        shared.clone(),
        config.max_policy_rules,
        admin,
    );
    flows::spawn_reporter(replicas.clone(), shared.clone(), config.flow_interval);
    tap::spawn(replicas.clone(), shared.clone());
    let revision = match tokio::time::timeout(
        config.first_config_wait,
        first.wait_for(|r| r.is_some()),
    )
    .await
    {
        Ok(Ok(r)) => r.unwrap_or(0),
        _ => {
            tracing::warn!(
                "no configuration from the control plane yet; denying every inbound request until one arrives"
            );
            0
        }
    };
    let running = Running {
        spiffe_id: id.to_string(),
        workload: shared.workload.to_string(),
        inbound,
        upstreams,
        outbound,
        admin,
        workload_api,
        revision,
    };
    if let Some(path) = &config.ready_file {
        write_ready_file(path, &running)?;
    }
    Ok(running)
}

fn write_ready_file(path: &std::path::Path, running: &Running) -> Result<(), ProxyError> {
    let err = |source| ProxyError::ReadyFile {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec_pretty(running).map_err(|e| err(std::io::Error::other(e)))?;
    std::fs::write(&tmp, json).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// This proxy's version, reported to the control plane (`bulkhead version`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long a peer may take to finish a TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The log filter both binaries use: `BULKHEAD_LOG`, else `RUST_LOG` (both in `RUST_LOG`'s syntax), else
/// `default`. A filter that does not parse is reported and the default used.
pub fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
    for var in ["BULKHEAD_LOG", "RUST_LOG"] {
        let Ok(text) = std::env::var(var) else {
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        return tracing_subscriber::EnvFilter::try_new(&text).unwrap_or_else(|e| {
            eprintln!("warning: {var}={text:?} is not a log filter ({e}); logging at {default}");
            tracing_subscriber::EnvFilter::new(default)
        });
    }
    tracing_subscriber::EnvFilter::new(default)
}

/// Logging for both binaries: to stderr, filtered by [`log_filter`], as text or as one JSON
/// object per line (`--log-format json`; fields flattened, so an access line's fields are
/// top-level keys beside `timestamp`, `level`, `target` and `message`).
pub fn init_logging(default: &str, json: bool) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter(default))
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}
