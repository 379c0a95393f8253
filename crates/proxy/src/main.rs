//! `bulkhead-proxy`: the sidecar binary. Flags become a typed [`Config`]; everything else is
//! in the library.

use anyhow::{Context, bail};
use bulkhead_identity::SpiffeId;
use bulkhead_proxy::capture;
use bulkhead_proxy::config::{InboundSpec, InboundTarget, JoinToken};
use bulkhead_proxy::{Config, UpstreamSpec};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The Bulkhead sidecar: mTLS with SPIFFE identities and per-request authorization.
#[derive(Parser, Debug)]
#[command(
    name = "bulkhead-proxy",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = LOGGING_HELP
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Without a subcommand: run the proxy.
    #[command(flatten)]
    run: Option<Args>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Install the rules that redirect this network namespace's TCP traffic (IPv4 and IPv6)
    /// through the proxy, drop the UDP the mesh cannot carry and close the admin port to the
    /// app (run as root in the workload's namespace, before the app starts), or remove them.
    /// The mesh carries TCP only: UDP is dropped (--udp drop, the default) or goes around it
    /// (--udp allow, --allow-udp-ports).
    Init(capture::InitArgs),
}

#[derive(clap::Args, Debug)]
struct Args {
    /// The control plane's address: IP:PORT, or HOST:PORT with a DNS name (resolved at every
    /// connection), e.g. bulkhead-control.bulkhead.svc:7443. Several replicas: comma-separated
    /// or the flag repeated; a name that resolves to several addresses counts as several. The
    /// proxy stays on one replica and, when it is lost, moves to the next (keeping its
    /// policy meanwhile; docs/restarts.md).
    #[arg(long, env = "BULKHEAD_CONTROL", value_delimiter = ',', required = true)]
    control: Vec<bulkhead_api::channel::ControlAddr>,
    /// PEM file with the mesh's root certificate(s), e.g. DATA_DIR/ca.pem of the control plane.
    #[arg(long, env = "BULKHEAD_TRUST_BUNDLE")]
    trust_bundle: PathBuf,
    /// File holding the join token from `bulkhead token create`. Without it the token is read
    /// from the BULKHEAD_JOIN_TOKEN environment variable (never from a flag, to keep it out
    /// of `ps`).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Join by presenting this pod's projected service-account token (audience `bulkhead`;
    /// what an injected sidecar is given) instead of a join token: the control plane
    /// (`bulkhead control --kubernetes-attest`) checks it with a TokenReview and issues the
    /// identity spiffe://TD/ns/NAMESPACE/sa/ACCOUNT. Read again at every join, so a rotated
    /// token is used.
    #[arg(long, value_name = "PATH", conflicts_with = "token_file")]
    service_account_token_file: Option<PathBuf>,
    /// Where this proxy keeps its own key and certificate (0600, rewritten at every
    /// renewal) so that, killed and started again with the same command, it rejoins by
    /// renewing with them instead of spending a new token. Default: the token file's path
    /// with `.credential` appended; none when the token comes from BULKHEAD_JOIN_TOKEN.
    #[arg(
        long,
        env = "BULKHEAD_CREDENTIAL_FILE",
        conflicts_with = "no_credential_file"
    )]
    credential_file: Option<PathBuf>,
    /// Serve the SPIFFE Workload API on this Unix socket (made 0600, replacing a stale
    /// socket): the app gets an X.509-SVID for this proxy's identity with a key of its own,
    /// and the trust bundle, both pushed again on every renewal or bundle change
    /// (docs/spiffe.md). Set SPIFFE_ENDPOINT_SOCKET=unix:PATH for the app.
    #[arg(long, value_name = "PATH")]
    workload_api: Option<PathBuf>,
    /// Keep no credential: a restarted proxy needs a new join token.
    #[arg(long)]
    no_credential_file: bool,
    /// The SPIFFE ID this proxy expects to hold; joining fails if the token is bound to another.
    #[arg(long)]
    identity: Option<String>,
    /// Inbound mTLS listener (IP:PORT; port 0 picks one). Needs --app, or --transparent.
    /// `[::]:PORT` listens on IPv6 and IPv4 alike (one dual-stack socket).
    #[arg(long)]
    inbound: Option<SocketAddr>,
    /// The local app the inbound listener protects (IP:PORT).
    #[arg(long, requires = "inbound", conflicts_with = "transparent")]
    app: Option<SocketAddr>,
    /// The workload's declared port that inbound traffic is for, as policy sees it
    /// (default: the app's port).
    #[arg(long, requires = "app")]
    port: Option<u16>,
    /// Transparent mode: the inbound listener receives connections redirected by
    /// `bulkhead-proxy init` and forwards each, once allowed, to the workload address and port
    /// it was sent to (never to loopback: what the app bound to 127.0.0.1 or ::1 stays
    /// local). If the workload declares ports, connections to other ports are reset before
    /// policy.
    #[arg(long, requires = "inbound")]
    transparent: bool,
    /// Transparent mode: the listener for the app's redirected outbound connections
    /// (IP:PORT, the port given to `init --outbound-port`): `[::]:15001` takes IPv6 and IPv4,
    /// `127.0.0.1:15001` IPv4 only (enough where the namespace has no IPv6; where init
    /// captures IPv6, the app's IPv6 connections are then refused). Only
    /// connections redirected from this namespace (arriving on loopback) are served.
    #[arg(long)]
    outbound: Option<SocketAddr>,
    /// A port (of the app) that also accepts plaintext, for migrating callers into the mesh;
    /// such connections are counted and labelled and policy sees them without an identity.
    /// Repeatable.
    #[arg(long = "permissive-port")]
    permissive_ports: Vec<u16>,
    /// A declared upstream: name=N,listen=IP:PORT,address=IP:PORT,identity=spiffe://…  (repeatable)
    #[arg(long = "upstream")]
    upstreams: Vec<UpstreamSpec>,
    /// Admin port: /metrics, /ready, /live, /config (IP:PORT; port 0 picks one; `[::]:PORT`
    /// for IPv6 and IPv4). In transparent mode `init` closes it to the app's uid.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: Option<SocketAddr>,
    /// Write the bound addresses and identity here as JSON once ready.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Refuse (NACK) any configuration with more compiled rules than this, keeping the last
    /// good one: a bound on the memory the control plane can make this proxy use.
    #[arg(long, default_value_t = 100_000)]
    max_policy_rules: usize,
    /// Largest request head (request line + headers) in bytes; larger gets 431.
    #[arg(long, default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// Seconds a client has, from a request head's first byte, to send the whole head
    /// (slowloris protection); the connection is closed after it.
    #[arg(long, default_value_t = 10)]
    header_read_timeout_secs: u64,
    /// Seconds an HTTP/1.1 keep-alive connection may wait for its next request before it is
    /// closed (a new connection waits as long for its first).
    #[arg(long, default_value_t = 300)]
    keepalive_timeout_secs: u64,
    /// Seconds a request body on its way to the app or an upstream may stall between two
    /// pieces; then the request gets 408 and its stream or app connection is freed.
    #[arg(long, default_value_t = 30)]
    body_idle_timeout_secs: u64,
    /// Seconds a whole request body may take to arrive; then 408.
    #[arg(long, default_value_t = 600)]
    body_timeout_secs: u64,
    /// Seconds the app or upstream has to send the response head, counted from the end of
    /// the request; then 504 and the stream is dropped. Streaming responses are not cut once
    /// their head has come.
    #[arg(long, default_value_t = 60)]
    response_timeout_secs: u64,
    /// Most connections open at once per listener.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Seconds an opaque TCP or upgraded connection may go without traffic before it is closed.
    #[arg(long, default_value_t = 3600)]
    idle_timeout_secs: u64,
    /// Milliseconds to wait for a new connection's first bytes to tell its protocol; a client
    /// that says nothing for this long is treated as opaque TCP.
    #[arg(long, default_value_t = 1000)]
    detect_timeout_ms: u64,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Send a span for every sampled request to this OTLP/gRPC collector (`http://HOST:PORT`,
    /// usually an OpenTelemetry Collector beside the proxy). Unset: the standard
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then OTEL_EXPORTER_OTLP_ENDPOINT; neither: no
    /// spans. A slow or dead collector drops spans, never requests.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// The share of requests without a sampled `traceparent` that start a trace (0 to 1); a
    /// request whose `traceparent` says sampled is always traced, one that says not sampled
    /// never is.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", default_value_t = 1.0, value_parser = bulkhead_api::otlp::parse_ratio)]
    trace_sampling_ratio: f64,
    /// Seconds between reports of the traffic seen (edges) to the control plane. 0 turns
    /// flow reporting off: no request is counted and nothing is reported, so `bulkhead
    /// graph`, `recommend`, `impact` and `promote` see no traffic decided by this proxy.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3600))]
    flow_interval_secs: u64,
    /// Worker threads. With 1 (the default) everything runs on one thread and a forwarded
    /// request never crosses threads; raise it for a workload that needs more than a core
    /// of proxying.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
}

impl Args {
    fn into_config(self) -> anyhow::Result<Config> {
        let trust_bundle_pem = std::fs::read_to_string(&self.trust_bundle).with_context(|| {
            format!("cannot read --trust-bundle {}", self.trust_bundle.display())
        })?;
        let credential_file = match (&self.credential_file, &self.token_file) {
            _ if self.no_credential_file => None,
            (Some(path), _) => Some(path.clone()),
            (None, Some(token)) => {
                let mut name = token.as_os_str().to_owned();
                name.push(".credential");
                Some(PathBuf::from(name))
            }
            (None, None) => None,
        };
        let has_credential = credential_file.as_ref().is_some_and(|p| p.exists());
        let token = match (&self.token_file, std::env::var("BULKHEAD_JOIN_TOKEN").ok()) {
            // Joins by the service-account token, read at the join.
            _ if self.service_account_token_file.is_some() => String::new(),
            // Spent and deleted after the first join: the credential rejoins without it.
            (Some(path), _) if has_credential && !path.exists() => String::new(),
            (Some(path), _) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --token-file {}", path.display()))?
                .trim()
                .to_string(),
            (None, Some(t)) if !t.trim().is_empty() => t.trim().to_string(),
            _ if has_credential => String::new(),
            _ => bail!(
                "no join token: pass --token-file FILE or set BULKHEAD_JOIN_TOKEN (create one with `bulkhead token create`)"
            ),
        };
        let identity = self
            .identity
            .as_deref()
            .map(SpiffeId::parse)
            .transpose()
            .context("--identity")?;
        let target = match (self.app, self.transparent) {
            (Some(app), _) => Some(InboundTarget::App {
                app,
                port: self.port.unwrap_or(app.port()),
            }),
            (None, true) => Some(InboundTarget::Transparent),
            (None, false) => None,
        };
        let inbound = match (self.inbound, target) {
            (Some(listen), Some(target)) => Some(InboundSpec {
                listen,
                target,
                permissive_ports: self.permissive_ports,
            }),
            (Some(_), None) => bail!("--inbound needs --app IP:PORT, or --transparent"),
            _ => None,
        };
        if inbound.is_none()
            && self.upstreams.is_empty()
            && self.outbound.is_none()
            && self.workload_api.is_none()
        {
            bail!(
                "nothing to do: pass --inbound with --app or --transparent, --outbound, at least one --upstream, or --workload-api"
            );
        }
        Ok(Config {
            control: bulkhead_api::channel::ControlAddrs::new(self.control)
                .context("--control needs at least one address")?,
            trust_bundle_pem,
            token: JoinToken(token),
            service_account_token_file: self.service_account_token_file,
            identity,
            inbound,
            upstreams: self.upstreams,
            outbound: self.outbound,
            ready_file: self.ready_file,
            admin: self.admin,
            first_config_wait: Duration::from_secs(10),
            max_policy_rules: self.max_policy_rules,
            flow_interval: Duration::from_secs(self.flow_interval_secs),
            credential_file,
            workload_api: self.workload_api,
            traces: self
                .otlp_endpoint
                .or_else(|| bulkhead_api::otlp::endpoint_from_env(|k| std::env::var(k).ok()))
                .map(|endpoint| bulkhead_proxy::config::Traces {
                    endpoint,
                    sampling_ratio: self.trace_sampling_ratio,
                }),
            limits: bulkhead_proxy::Limits {
                max_header_bytes: self.max_header_bytes,
                header_read_timeout: Duration::from_secs(self.header_read_timeout_secs.max(1)),
                max_connections: self.max_connections.max(1),
                idle_timeout: Duration::from_secs(self.idle_timeout_secs.max(1)),
                detect_timeout: Duration::from_millis(self.detect_timeout_ms.max(10)),
                keepalive_timeout: Duration::from_secs(self.keepalive_timeout_secs.max(1)),
                body_idle_timeout: Duration::from_secs(self.body_idle_timeout_secs.max(1)),
                body_timeout: Duration::from_secs(self.body_timeout_secs.max(1)),
                response_timeout: Duration::from_secs(self.response_timeout_secs.max(1)),
                ..bulkhead_proxy::Limits::default()
            },
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = match Cli::parse() {
        Cli {
            cmd: Some(Cmd::Init(init)),
            ..
        } => {
            init_logging("text");
            return Ok(capture::init(&init)?);
        }
        Cli {
            run: Some(args), ..
        } => args,
        // Unreachable: without a subcommand clap demands the run flags.
        Cli { run: None, .. } => {
            bail!("nothing to do: pass --control …, or a subcommand (see --help)")
        }
    };
    init_logging(&args.log_format);
    let runtime = match args.threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(usize::from(n));
            b
        }
    }
    .enable_all()
    .build()
    .context("starting the async runtime")?;
    let config = args.into_config()?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let running = bulkhead_proxy::start(config).await?;
    tracing::info!(
        spiffe_id = running.spiffe_id,
        revision = running.revision,
        "proxy ready"
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    tracing::info!("shutting down");
    Ok(())
}

const LOGGING_HELP: &str = "Logging: BULKHEAD_LOG sets what is logged, as a filter in RUST_LOG's syntax, e.g. BULKHEAD_LOG=debug or BULKHEAD_LOG=info,bulkhead_proxy=debug,h2=warn; RUST_LOG is read when BULKHEAD_LOG is unset. The default is info; logs go to stderr (--log-format text or json).";

fn init_logging(format: &str) {
    bulkhead_proxy::init_logging("info", format == "json");
}
