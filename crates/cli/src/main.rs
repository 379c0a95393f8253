//! `bulkhead`: the control plane, the admin verbs and the demo, in one binary.

mod admin_cmd;
mod ca_cmd;
mod client;
mod contexts;
mod credentials_cmd;
mod demo;
mod events_cmd;
mod flows_cmd;
mod jsonstyle;
mod k8s_cmd;
mod policy_cmd;
mod reach_cmd;
mod table;
mod tap_cmd;

use anyhow::{Context, Result, bail};
use bulkhead_api::v1::CreateTokenRequest;
use bulkhead_sample_app as sample_app;
use clap::{Parser, Subcommand};
use std::io::{stderr, stdout};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "bulkhead",
    version,
    about = "Bulkhead: a zero-trust service mesh for micro-segmentation",
    after_help = LOGGING_HELP
)]
struct Cli {
    /// Which control plane to talk to: a context's name (`bulkhead config get-contexts`) or
    /// the admin context file a control plane wrote (DATA_DIR/admin.yaml). Without it, the
    /// current context of ~/.config/bulkhead/config, else bulkhead-data/admin.yaml.
    #[arg(long, global = true, env = "BULKHEAD_CONTEXT")]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the control plane: CA, join tokens, policy store and push.
    Control {
        /// Where the CA, the admin credential and the state live (created on first start).
        #[arg(long, default_value = "bulkhead-data")]
        data_dir: PathBuf,
        /// gRPC listen address for proxies and the CLI.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// The SPIFFE trust domain of this mesh.
        #[arg(long, default_value = "bulkhead.local")]
        trust_domain: String,
        /// Lifetime of the workload certificates the CA signs (e.g. 1h, 30m).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        svid_lifetime: Duration,
        /// For this many seconds after the first flow report, new edges and identities are
        /// learned as the baseline, not reported (`bulkhead events`). 0: report from the
        /// start.
        #[arg(long, default_value_t = 3600)]
        anomaly_learning_secs: u64,
        /// A denial spike: at least this many denied requests to one workload in a minute…
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
        denial_spike_min: u64,
        /// …and at least this many times its usual rate (the mean per minute over the hour
        /// before).
        #[arg(long, default_value_t = 5.0, value_parser = parse_factor)]
        denial_spike_factor: f64,
        /// Serve Prometheus metrics (plain HTTP, GET /metrics) on this address, e.g.
        /// 127.0.0.1:7444; off when not given.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
        /// Write a Prometheus file_sd file here: every connected proxy's /metrics address
        /// (labels job, namespace, workload, instance) and this control plane's --metrics,
        /// rewritten atomically as proxies connect and disconnect (docs/observability.md).
        #[arg(long, value_name = "PATH")]
        prometheus_sd_file: Option<PathBuf>,
        /// Serve the web console on this address, e.g. 127.0.0.1:7445; off when not given.
        /// HTTPS with a certificate the control plane issues from the mesh's CA (trust
        /// DATA_DIR/ca.pem in the browser); log in with `bulkhead console token`. Read-only.
        #[arg(long, value_name = "ADDR")]
        console: Option<SocketAddr>,
        /// A host name or address browsers use to reach the console besides ADDR: it goes
        /// into the console's certificate, and requests naming any other host are refused.
        /// Repeatable; needed when ADDR is 0.0.0.0 or `[::]`.
        #[arg(long = "console-host", value_name = "NAME", requires = "console")]
        console_hosts: Vec<String>,
        /// Serve the console over plain HTTP instead of HTTPS, so that a browser needs no
        /// trusted root. Refused unless ADDR is a loopback address.
        #[arg(long, requires = "console")]
        console_insecure_http: bool,
        /// Serve the trust bundle as a SPIFFE bundle (JWK Set) over HTTPS at `/` on this
        /// address, for other trust domains to federate with (`https_spiffe` profile: the
        /// certificate is an SVID for spiffe://TRUST_DOMAIN/bulkhead/bundle-endpoint);
        /// off when not given (docs/spiffe.md).
        #[arg(long, value_name = "ADDR")]
        bundle_endpoint: Option<SocketAddr>,
        /// How often federating trust domains should fetch this mesh's SPIFFE bundle again
        /// (its `spiffe_refresh_hint`, e.g. 5m; at least 1s).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        bundle_refresh_hint: Duration,
        /// Federate with the trust domains this file declares (YAML `FederatedTrustDomain`
        /// documents: trust domain, bundle endpoint URL and SPIFFE ID, bootstrap bundle):
        /// their bundles are fetched, refreshed and pushed to every proxy, which then
        /// accepts their identities, each chained to its own domain's roots
        /// (docs/spiffe.md).
        #[arg(long, value_name = "FILE")]
        federation: Option<PathBuf>,
        #[command(flatten)]
        bounds: ControlBounds,
        #[command(flatten)]
        traces: ControlTraces,
        #[command(flatten)]
        etcd: Box<ControlEtcd>,
        #[command(flatten)]
        webhook: Box<k8s_cmd::ControlWebhook>,
        #[command(flatten)]
        attest: Box<k8s_cmd::ControlAttest>,
        #[command(flatten)]
        controller: Box<k8s_cmd::ControlController>,
        /// Log format: text, or one JSON object per line.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// The web console (`bulkhead control --console ADDR`; docs/console.md).
    Console {
        #[command(subcommand)]
        command: ConsoleCommand,
    },
    /// Join tokens, which let one proxy obtain one identity.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// This CLI's version, the control plane's, and the version every proxy reported.
    Version {
        /// Only this CLI's version; do not ask the control plane.
        #[arg(long)]
        client: bool,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Revoke an identity or one proxy instance, at once, everywhere.
    Revoke {
        #[command(subcommand)]
        command: RevokeCommand,
    },
    /// Lift an identity's revocation.
    Unrevoke {
        #[command(subcommand)]
        command: UnrevokeCommand,
    },
    /// Apply resources from a YAML file (several documents per file, at most 16 MiB). The
    /// whole resulting set is type-checked, and each affected workload's configuration is
    /// checked against the proxies' bounds; any error refuses the apply and changes nothing.
    Apply {
        /// A file, a directory (its .yaml, .yml and .json files), or `-` for standard input.
        /// Repeatable: everything given is applied as one revision.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Also the files in subdirectories of the directories given.
        #[arg(short = 'R', long)]
        recursive: bool,
        /// Have the control plane check everything a real apply checks (parse, type-check
        /// of the resulting set, per-proxy bounds, --expect-revision) and print what would
        /// change; nothing is committed.
        #[arg(long, conflicts_with = "wait")]
        dry_run: bool,
        #[command(flatten)]
        change: ChangeFlags,
    },
    /// Delete the resources a file names, or Kind/namespace/name keys.
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
        keys: Vec<String>,
        #[command(flatten)]
        change: ChangeFlags,
    },
    /// Show resources (all, policies, workloads, services, postures), proxies or
    /// revocations: `get KIND [NAME]` or `get KIND/NAME`, NAME as `name` or
    /// `namespace/name`; every namespace unless `-n`. `-o wide` adds each proxy's instance;
    /// `-o name` prints keys only.
    Get {
        #[arg(default_value = "all")]
        what: String,
        name: Option<String>,
        /// Only this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "wide", "json", "yaml", "name"])]
        output: String,
    },
    /// The audit log: every revision, who made it, when, and what changed; then every change
    /// to join tokens, revocations and CAs.
    History {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Restore the resource set exactly as it was at REVISION (as a new revision). The
    /// control plane keeps the whole set of recent revisions only (`bulkhead control
    /// --history-revisions`, `--history-max-age`).
    Rollback {
        revision: u64,
        #[command(flatten)]
        change: ChangeFlags,
    },
    /// The mesh's certificate authorities: status, and rotation (add-root → switch →
    /// retire; docs/ca.md has the procedure).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The service graph from observed traffic: who called whom, on which port, and what was
    /// decided (the destination sidecar's view where it reported).
    Graph {
        /// Only traffic seen within this long (e.g. 15m, 24h); default: all that is kept.
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Only lines whose caller or destination is in this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "dot", "json"])]
        output: String,
    },
    /// The requests a workload's sidecars decide, live: caller, method and path, status,
    /// verdict and the rule behind it. Filters run in the sidecars; nothing is stored.
    Tap(tap_cmd::TapArgs),
    /// Anomalies found in observed traffic: a caller reaching a workload it never reached
    /// before, an identity never seen before, a spike of denied requests.
    Events(events_cmd::EventsArgs),
    /// Least-privilege policies from observed traffic, in audit mode, with the evidence for
    /// each rule; `--diff` shows what changed against the recommendation applied now.
    Recommend {
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Only for workloads in this namespace (the traffic they received).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(long)]
        diff: bool,
    },
    /// Replay observed traffic against the applied set with CANDIDATE files applied and
    /// enforced (audit policies and postures included): every flow that would newly be
    /// denied or allowed, with counts and when it was last seen.
    Impact {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Exit 1 (after the report) when a flow that is allowed today would be denied: a
        /// gate for pipelines.
        #[arg(long)]
        fail_on_new_deny: bool,
    },
    /// Enforce an audit-mode policy or posture (`namespace/name`, or
    /// `DefaultPosture/namespace/name`). The control plane refuses while it would have
    /// denied traffic seen within --window, unless --force, and commits it as one revision.
    Promote {
        target: String,
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        window: Duration,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        change: ChangeFlags,
    },
    /// Offline policy tools for CI: lint, test, diff, explain. They read files only.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Who can reach a workload, or (--blast-radius) everything it could reach if
    /// compromised, from policy alone: the applied policy, or files with -f.
    Reach(reach_cmd::ReachArgs),
    /// Print a shell completion script: `source <(bulkhead completion bash)`, or for zsh
    /// `bulkhead completion zsh > "${fpath[1]}/_bulkhead"`, or for fish
    /// `bulkhead completion fish > ~/.config/fish/completions/bulkhead.fish`.
    Completion { shell: clap_complete::Shell },
    /// The CLI's contexts, kubectl's way: named control planes in ~/.config/bulkhead/config
    /// (or $BULKHEAD_CONFIG), one of them current.
    Config {
        #[command(subcommand)]
        command: contexts::ConfigCommand,
    },
    /// Bulkhead on Kubernetes (docs/kubernetes.md).
    K8s {
        #[command(subcommand)]
        command: k8s_cmd::K8sCommand,
    },
    /// Start a local mesh of three services, send legitimate traffic and a lateral-movement
    /// attempt, and show what was allowed and denied, and why.
    Demo {
        /// Run one round of traffic and exit (non-zero if any verdict was not as expected).
        #[arg(long)]
        once: bool,
    },
    /// A small HTTP service to put behind a sidecar when trying the mesh by hand (the
    /// demo's and the tests' apps): it answers every request with its name, the method,
    /// the path and the caller's identity as its sidecar passed it (`x-bulkhead-source`).
    SampleApp {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: SocketAddr,
        /// URL to POST to on every POST received (through a sidecar's upstream port).
        #[arg(long)]
        downstream: Option<http::Uri>,
        /// Write the bound address here once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Be a TCP echo server instead of an HTTP service.
        #[arg(long)]
        tcp_echo: bool,
    },
}

/// How a change is made (apply, delete, rollback, promote).
#[derive(clap::Args, Debug, Clone, Copy)]
struct ChangeFlags {
    /// Refuse the change unless the resource set is at exactly this revision (as `bulkhead
    /// get` shows it): for pipelines that read, decide, then change.
    #[arg(long, value_name = "REVISION")]
    expect_revision: Option<u64>,
    /// Wait until every connected proxy of each workload the change affected has put the
    /// new revision in force, printing progress; exit non-zero naming each proxy that
    /// refused it (with its reason) or did not answer in time.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "30s", value_parser = parse_duration, requires = "wait")]
    timeout: Duration,
}

impl ChangeFlags {
    fn options(self) -> admin_cmd::ChangeOptions {
        admin_cmd::ChangeOptions {
            expect_revision: self.expect_revision,
            wait: self.wait.then_some(self.timeout),
        }
    }
}

/// `bulkhead control`'s spans (docs/tracing.md).
#[derive(clap::Args, Debug)]
struct ControlTraces {
    /// Send spans of admin and proxy calls, commits and pushes to this OTLP/gRPC collector
    /// (`http://HOST:PORT`). Unset: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then
    /// OTEL_EXPORTER_OTLP_ENDPOINT; neither: no spans.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// The share of calls without a sampled `traceparent` that start a trace (0 to 1).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", default_value_t = 1.0, value_parser = bulkhead_api::otlp::parse_ratio)]
    trace_sampling_ratio: f64,
}

/// Replicas sharing their state in etcd (docs/replicas.md).
#[derive(clap::Args, Debug)]
struct ControlEtcd {
    /// Keep the resource set and its revision log in etcd, shared with every replica
    /// started with the same members: `http://HOST:PORT`, or `https://` with --etcd-ca;
    /// several comma-separated. Unset: the embedded store in --data-dir (one replica).
    #[arg(long, value_name = "URL[,URL…]", value_delimiter = ',')]
    etcd: Vec<String>,
    /// The PEM CA that signed the etcd members' serving certificates.
    #[arg(long, value_name = "PATH", requires = "etcd")]
    etcd_ca: Option<PathBuf>,
    /// A PEM client certificate to present to etcd (with --etcd-key).
    #[arg(long, value_name = "PATH", requires_all = ["etcd", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// The PEM key of --etcd-cert.
    #[arg(long, value_name = "PATH", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// A file of 32 random bytes (`head -c 32 /dev/urandom > FILE; chmod 600 FILE`), the
    /// same for every replica: the CA keys are kept in etcd sealed under it
    /// (AES-256-GCM), never in clear. Required with --etcd.
    #[arg(long, value_name = "PATH", requires = "etcd")]
    etcd_secret_key_file: Option<PathBuf>,
}

impl ControlEtcd {
    fn options(self) -> Result<Option<bulkhead_control::EtcdOptions>> {
        if self.etcd.is_empty() {
            return Ok(None);
        }
        let Some(secret_key_file) = self.etcd_secret_key_file else {
            bail!(
                "--etcd needs --etcd-secret-key-file: the CA keys are kept in etcd sealed under it. Make one with `head -c 32 /dev/urandom > FILE; chmod 600 FILE` and give every replica the same file"
            );
        };
        Ok(Some(bulkhead_control::EtcdOptions {
            endpoints: self.etcd,
            ca: self.etcd_ca,
            client_cert: self.etcd_cert.zip(self.etcd_key),
            secret_key_file,
        }))
    }
}

/// What the control plane keeps and what one proxy's configuration may hold.
#[derive(clap::Args, Debug)]
struct ControlBounds {
    /// Keep the whole resource set of this many newest revisions, for rollback (the
    /// current one always stays). Who changed what is kept apart, for a year.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    history_revisions: u64,
    /// …and none older than this (e.g. 30d, 12h).
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    history_max_age: Duration,
    /// Refuse a change that would give one workload's proxies more compiled rules than
    /// this. Keep it at or under every proxy's --max-policy-rules.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_proxy_rules: u64,
    /// Refuse a change that would make one workload's configuration larger than this on
    /// the wire (e.g. 16MiB, 512KiB). It travels in pieces of about 1 MiB either way.
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes)]
    max_proxy_config_bytes: usize,
    /// Most stored traffic-edge rows (one per edge and hour); over it, the oldest hours go.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    flow_max_rows: u64,
    /// Most stored traffic-edge rows one workload's reports may keep; over it, that
    /// workload's oldest hours go, so one noisy app cannot push out the others' history.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    flow_max_rows_per_workload: u64,
    /// Most distinct path templates kept per edge; past it, new paths are counted into the
    /// edge's `/*` template (`bulkhead_flow_paths_folded_total`).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    flow_max_paths_per_edge: u64,
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Every CA with its state (active signs; trusted is in the bundle; retired is gone),
    /// and how many proxies hold the current bundle and certificates from the signing CA.
    Status {
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// The trust bundle: every root not retired, as PEM (the default, what DATA_DIR/ca.pem
    /// holds) or as a SPIFFE bundle, the JWK Set document other trust domains federate with
    /// (`-o spiffe`; docs/spiffe.md).
    Bundle {
        #[arg(short = 'o', long, default_value = "pem", value_parser = ["pem", "spiffe"])]
        output: String,
    },
    /// Add a CA, trusted but not signing: a new generated root, or (with --import-cert,
    /// --import-key and --chain) your own intermediate CA. Its root joins the bundle, which
    /// is pushed to every proxy.
    AddRoot {
        /// PEM certificate of the CA to import (an intermediate of your PKI, or a root).
        #[arg(long, requires = "import_key")]
        import_cert: Option<PathBuf>,
        /// PEM private key of that CA (unencrypted PKCS#8, SEC1 or PKCS#1). It is sent to the
        /// control plane only, which keeps it in its data directory (0600).
        #[arg(long, requires = "import_cert")]
        import_key: Option<PathBuf>,
        /// PEM certificates above the imported CA, up to and including the self-signed root.
        #[arg(long, requires = "import_cert")]
        chain: Option<PathBuf>,
    },
    /// Make a trusted CA the one that signs: proxies renew soon, and the control plane's
    /// certificate and the admin credential are re-issued from it.
    Switch {
        /// The CA's SHA-256, or a unique prefix (as `bulkhead ca status` shows it).
        id: String,
        /// Switch even if connected proxies have not confirmed holding its root.
        #[arg(long)]
        force: bool,
    },
    /// Remove a CA that no longer signs from the bundle and delete its key. Refused while
    /// certificates it signed may still be valid, unless --force.
    Retire {
        id: String,
        /// Retire it even though certificates it signed may still be in use: proxies
        /// presenting one are refused until they renew.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ConsoleCommand {
    /// Mint a login token for the web console: single use, short-lived, bound to this admin
    /// credential. Prints the console's address with the token in its fragment; opening it
    /// logs in (the token is exchanged for a session cookie and leaves the address bar).
    Token {
        /// How long the token may wait to be used (at most 1h); the session it opens lasts
        /// 8 hours.
        #[arg(long, default_value = "15m", value_parser = parse_duration)]
        ttl: Duration,
        /// Print only the token, to paste into the console's login form.
        #[arg(long)]
        token_only: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Mint a join token bound to one SPIFFE ID and workload. Prints only the token.
    Create {
        /// The identity the token grants, e.g. spiffe://bulkhead.local/ns/shop/sa/orders.
        #[arg(long)]
        identity: String,
        /// Workload namespace (default: the ID's /ns/NAMESPACE).
        #[arg(long)]
        namespace: Option<String>,
        /// Workload name (default: the ID's /sa/ACCOUNT).
        #[arg(long)]
        workload: Option<String>,
        /// How long the token is valid.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many times it can be used.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// Every join token the control plane holds, used or not (never a secret).
    List {
        /// Only the tokens for this namespace's workloads.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "wide", "json", "yaml", "name"])]
        output: String,
    },
    /// Delete a join token (by the ID `token list` shows): it can no longer be redeemed.
    Delete {
        /// Tokens made before ids were kept from starting with '-' may start with one.
        #[arg(allow_hyphen_values = true)]
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum RevokeCommand {
    /// Revoke a SPIFFE ID: every proxy refuses every certificate of it (new handshakes and
    /// open connections), and its joins, renewals and unused join tokens are refused.
    Identity {
        spiffe_id: String,
        /// Why, for `bulkhead history` and `get revocations`.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Revoke one proxy instance (the INSTANCE column of `bulkhead get proxies -o wide`): the
    /// certificates it holds are refused everywhere and it cannot renew; other proxies of
    /// the same workload are untouched. Permanent.
    Proxy {
        instance: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
enum UnrevokeCommand {
    /// Lift an identity's revocation, once every certificate issued to it before has
    /// expired (so none of them becomes valid again).
    Identity { spiffe_id: String },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Parse and type-check policy files (or directories of .yaml); every error with
    /// file:line:column; non-zero exit on any. Warns (on stderr) about selectors that select
    /// no declared Workload, caller labels no Workload has, and paths that look like regular
    /// expressions.
    Lint {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Treat warnings as errors (non-zero exit).
        #[arg(long)]
        strict: bool,
    },
    /// Run a table of requests and expected verdicts against the policy files; non-zero exit
    /// on any mismatch. Requests are judged as a sidecar judges them (canonical path,
    /// method and host), and a case naming an undeclared workload, port, method or caller
    /// identity is an error.
    ///
    /// The table is YAML: `cases: [{name, from, to, …}]`. Each case: `name`; `direction`
    /// (ingress, the default, or egress); `from` (ingress: the caller's SPIFFE ID; egress:
    /// the sending namespace/workload); `to` (namespace/workload:port); `caller` (ingress:
    /// declared, the default; undeclared, for an identity no Workload declares;
    /// unauthenticated, for a caller without a certificate, with no `from`); `toIdentity`
    /// (egress; default: the destination's declared identity); `ip`; `protocol` (default:
    /// the port's declared one); `method` (GET); `path` (/, a query allowed); `host`;
    /// `headers` (name: value, or name: a list of values for a repeated header); `expect` (allow;
    /// deny, which a refusal also meets; or refuse, for a 400 before any policy); and
    /// optionally `policy` (namespace/name) and `rule`.
    Test {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        cases: PathBuf,
    },
    /// Show which requests of a cases table change verdict from OLD to NEW.
    Diff {
        old: PathBuf,
        new: PathBuf,
        #[arg(long)]
        cases: PathBuf,
    },
    /// Explain the decision for one request, judged as a sidecar judges it (a request a
    /// sidecar refuses with 400 is shown as refused).
    Explain {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Ingress: the caller's SPIFFE ID (a declared Workload's, unless --undeclared).
        /// Egress: the sending namespace/workload.
        #[arg(long, required_unless_present = "unauthenticated")]
        from: Option<String>,
        /// namespace/workload:port
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "ingress", value_parser = ["ingress", "egress"])]
        direction: String,
        /// Ingress: the caller has no certificate (a plaintext caller on a permissive port).
        #[arg(long, conflicts_with_all = ["from", "undeclared"])]
        unauthenticated: bool,
        /// Ingress: --from is an identity no Workload declares, on purpose.
        #[arg(long)]
        undeclared: bool,
        /// Egress: the SPIFFE ID the destination presents (default: its declared one).
        #[arg(long)]
        to_identity: Option<String>,
        #[arg(long, default_value = "GET")]
        method: String,
        /// The request target: a path, with a query if you like.
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long)]
        host: Option<String>,
        /// name=value (repeatable; the same name twice is a header sent twice)
        #[arg(long = "header")]
        headers: Vec<String>,
        /// The peer's IP address.
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
        /// Default: the protocol the destination declares for the port.
        #[arg(long, value_parser = ["http", "http2", "grpc", "tcp"])]
        protocol: Option<String>,
    },
}

#[tokio::main]
async fn main() {
    exit_quietly_on_closed_pipe();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        if closed_pipe(&e) {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `bulkhead … | head -1`: once the reader of our output has gone, writing fails with a
/// broken pipe. That is the reader's choice, not an error: every verb exits 0, quietly.
/// `println!` panics on it (std ignores SIGPIPE), so the panic is caught here, for every
/// verb at once; a verb that writes with `write!` returns the error, caught in `main`.
fn exit_quietly_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        // std's words: "failed printing to stdout: Broken pipe (os error 32)".
        if message.starts_with("failed printing to std") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

fn closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

async fn run(cli: Cli) -> Result<()> {
    // The admin context file, found only by the commands that talk to a control plane.
    let context = || contexts::resolve(cli.context.as_deref(), &contexts::Env::process());
    match cli.command {
        Command::Control {
            data_dir,
            listen,
            trust_domain,
            svid_lifetime,
            anomaly_learning_secs,
            denial_spike_min,
            denial_spike_factor,
            metrics,
            prometheus_sd_file,
            console,
            console_hosts,
            console_insecure_http,
            bundle_endpoint,
            bundle_refresh_hint,
            federation,
            bounds,
            traces,
            etcd,
            webhook,
            attest,
            controller,
            log_format,
        } => {
            bulkhead_proxy::init_logging("info", log_format == "json");
            let config = bulkhead_control::ControlConfig {
                data_dir,
                listen,
                trust_domain,
                svid_lifetime,
            };
            let options = bulkhead_control::ControlOptions {
                anomalies: bulkhead_control::Anomalies {
                    learning: Duration::from_secs(anomaly_learning_secs),
                    spike_min_denials: denial_spike_min,
                    spike_factor: denial_spike_factor,
                },
                metrics,
                prometheus_sd_file,
                console: console.map(|listen| bulkhead_control::ConsoleOptions {
                    listen,
                    transport: match console_insecure_http {
                        true => bulkhead_control::ConsoleTransport::InsecureHttpOnLoopback,
                        false => bulkhead_control::ConsoleTransport::Https,
                    },
                    hosts: console_hosts,
                }),
                history: bulkhead_control::HistoryRetention {
                    max_revisions: bounds.history_revisions,
                    max_age: bounds.history_max_age,
                },
                proxy_bounds: bulkhead_control::ProxyBounds {
                    max_rules: usize::try_from(bounds.max_proxy_rules).unwrap_or(usize::MAX),
                    max_config_bytes: bounds.max_proxy_config_bytes,
                },
                flow_retention: bulkhead_control::FlowRetention {
                    max_rows: bounds.flow_max_rows,
                    max_rows_per_workload: bounds.flow_max_rows_per_workload,
                    max_paths_per_edge: bounds.flow_max_paths_per_edge,
                    ..Default::default()
                },
                traces: traces
                    .otlp_endpoint
                    .or_else(|| bulkhead_api::otlp::endpoint_from_env(|k| std::env::var(k).ok()))
                    .map(|endpoint| bulkhead_control::TraceOptions {
                        endpoint,
                        sampling_ratio: traces.trace_sampling_ratio,
                    }),
                bundle_endpoint,
                bundle_refresh_hint: Some(bundle_refresh_hint),
                federation_file: federation,
                attestor: (*attest).attestor()?,
                etcd: (*etcd).options()?,
            };
            let controller = (*controller).prepare().await?;
            let running = bulkhead_control::start_with(config, options).await?;
            eprintln!(
                "bulkhead control plane listening on {}\nadmin context: {} (the CLI reads it with --context or BULKHEAD_CONTEXT)",
                running.addr,
                running.context_file.display()
            );
            if let Some(addr) = running.metrics_addr {
                eprintln!("metrics: http://{addr}/metrics");
            }
            if let Some(url) = &running.console_url {
                eprintln!("console: {url} (log in with `bulkhead console token`)");
            }
            if let Some(addr) = (*webhook).start(running.issuer.clone()).await? {
                eprintln!("injection webhook: https://{addr}/inject");
            }
            if let Some(addr) = running.bundle_endpoint {
                eprintln!("SPIFFE bundle endpoint: https://{addr}/");
            }
            if let Some(controller) = controller {
                controller.start(&running);
                eprintln!("kubernetes controller: watching the cluster");
            }
            tokio::select! {
                r = tokio::signal::ctrl_c() => { r.context("waiting for Ctrl-C")?; }
                r = running.wait() => { r?; bail!("control plane stopped"); }
            }
            Ok(())
        }
        Command::Token { command } => {
            let mut c = client::credentials(&context()?).await?;
            let out = &mut std::io::stdout();
            match command {
                TokenCommand::List { namespace, output } => {
                    credentials_cmd::list_tokens(&mut c, namespace.as_deref(), &output, out).await
                }
                TokenCommand::Delete { id } => {
                    credentials_cmd::delete_token(&mut c, &id, out).await
                }
                TokenCommand::Create {
                    identity,
                    namespace,
                    workload,
                    ttl,
                    uses,
                } => {
                    let mut admin = client::admin(&context()?).await?;
                    let resp = admin
                        .create_token(admin_cmd::request(CreateTokenRequest {
                            spiffe_id: identity,
                            namespace: namespace.unwrap_or_default(),
                            workload: workload.unwrap_or_default(),
                            ttl_seconds: ttl.as_secs(),
                            max_uses: uses,
                        }))
                        .await
                        .map_err(client::status)?
                        .into_inner();
                    println!("{}", resp.token);
                    Ok(())
                }
            }
        }
        Command::Version {
            client: true,
            output,
        } => {
            if output == "json" {
                println!("{}", serde_json::json!({ "client": VERSION }));
            } else {
                println!("client         {VERSION}");
            }
            Ok(())
        }
        Command::Version { output, .. } => {
            admin_cmd::version(&mut client::admin(&context()?).await?, &output).await
        }
        Command::Revoke { command } => {
            let mut c = client::credentials(&context()?).await?;
            let out = &mut std::io::stdout();
            match command {
                RevokeCommand::Identity { spiffe_id, reason } => {
                    credentials_cmd::revoke(&mut c, "identity", &spiffe_id, &reason, out).await
                }
                RevokeCommand::Proxy { instance, reason } => {
                    credentials_cmd::revoke(&mut c, "proxy", &instance, &reason, out).await
                }
            }
        }
        Command::Unrevoke {
            command: UnrevokeCommand::Identity { spiffe_id },
        } => {
            let mut c = client::credentials(&context()?).await?;
            credentials_cmd::unrevoke(&mut c, &spiffe_id, &mut std::io::stdout()).await
        }
        Command::Get { what, output, .. } if what.eq_ignore_ascii_case("revocations") => {
            let mut c = client::credentials(&context()?).await?;
            credentials_cmd::list_revocations(&mut c, &output, &mut std::io::stdout()).await
        }
        Command::Console {
            command: ConsoleCommand::Token { ttl, token_only },
        } => {
            let mut admin = client::admin(&context()?).await?;
            let resp = admin
                .create_console_token(admin_cmd::request(
                    bulkhead_api::v1::CreateConsoleTokenRequest {
                        ttl_seconds: ttl.as_secs(),
                    },
                ))
                .await
                .map_err(client::status)?
                .into_inner();
            if token_only {
                println!("{}", resp.token);
            } else {
                println!("{}", resp.login_url);
                eprintln!(
                    "open it within {}s to log in to {} (single use)",
                    ttl.as_secs(),
                    resp.console_url
                );
            }
            Ok(())
        }
        Command::Apply {
            files,
            recursive,
            dry_run,
            change,
        } => {
            let files = admin_cmd::read_apply_files(&files, recursive)?;
            admin_cmd::apply(
                &mut client::admin(&context()?).await?,
                files,
                dry_run,
                change.options(),
            )
            .await
        }
        Command::Delete { file, keys, change } => {
            admin_cmd::delete(
                &mut client::admin(&context()?).await?,
                file.as_deref(),
                keys,
                change.options(),
            )
            .await
        }
        Command::Get {
            what,
            name,
            namespace,
            output,
        } => {
            // `get policy/NAME`, as kubectl takes it.
            let (what, name) = match (what.split_once('/'), name) {
                (Some((kind, rest)), None) => (kind.to_string(), Some(rest.to_string())),
                (_, name) => (what, name),
            };
            let select = admin_cmd::Selection {
                name: name.as_deref(),
                namespace: namespace.as_deref(),
            };
            admin_cmd::get(
                &mut client::admin(&context()?).await?,
                &what.to_lowercase(),
                &select,
                &output,
            )
            .await
        }
        Command::History { limit, output } => {
            admin_cmd::history(&mut client::admin(&context()?).await?, limit, &output).await
        }
        Command::Ca { command } => {
            let mut admin = client::admin(&context()?).await?;
            match command {
                CaCommand::Status { output } => ca_cmd::status(&mut admin, &output).await,
                CaCommand::Bundle { output } => ca_cmd::bundle(&mut admin, &output).await,
                CaCommand::AddRoot {
                    import_cert,
                    import_key,
                    chain,
                } => {
                    ca_cmd::add_root(
                        &mut admin,
                        import_cert.as_deref(),
                        import_key.as_deref(),
                        chain.as_deref(),
                    )
                    .await
                }
                CaCommand::Switch { id, force } => ca_cmd::switch(&mut admin, &id, force).await,
                CaCommand::Retire { id, force } => ca_cmd::retire(&mut admin, &id, force).await,
            }
        }
        Command::Rollback { revision, change } => {
            admin_cmd::rollback(
                &mut client::admin(&context()?).await?,
                revision,
                change.options(),
            )
            .await
        }
        Command::Graph {
            since,
            namespace,
            output,
        } => {
            let admin = &mut client::admin(&context()?).await?;
            flows_cmd::graph(admin, since, namespace.as_deref(), &output).await
        }
        Command::Recommend {
            since,
            namespace,
            diff,
        } => {
            let admin = &mut client::admin(&context()?).await?;
            flows_cmd::recommend(admin, since, namespace.as_deref(), diff).await
        }
        Command::Impact {
            files,
            since,
            fail_on_new_deny,
        } => {
            let admin = &mut client::admin(&context()?).await?;
            flows_cmd::impact(admin, &files, since, fail_on_new_deny).await
        }
        Command::Promote {
            target,
            window,
            force,
            change,
        } => {
            flows_cmd::promote(
                &mut client::admin(&context()?).await?,
                &target,
                window,
                force,
                change.options(),
            )
            .await
        }
        Command::Config { command } => {
            contexts::run(command, &contexts::Env::process(), &mut stdout())
        }
        Command::Completion { shell } => {
            use clap::CommandFactory;
            // Generated whole first: the generator panics on a write error, and a closed
            // pipe (`| head`) must stay a quiet exit.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "bulkhead", &mut script);
            std::io::Write::write_all(&mut stdout(), &script)?;
            Ok(())
        }
        Command::K8s { command } => k8s_cmd::run(&context()?, command, &mut stdout()),
        Command::Demo { once } => demo::run(once).await,
        Command::Reach(args) => reach_cmd::run(&context()?, args).await,
        Command::Tap(args) => tap_cmd::run(&context()?, args).await,
        Command::Events(args) => events_cmd::run(&context()?, args).await,
        Command::Policy { command } => match command {
            PolicyCommand::Lint { files, strict } => {
                policy_cmd::lint(&files, strict, &mut stdout(), &mut stderr())
            }
            PolicyCommand::Test { files, cases } => {
                policy_cmd::test(&files, &cases, &mut stdout(), &mut stderr())
            }
            PolicyCommand::Diff { old, new, cases } => {
                policy_cmd::diff(&[old], &[new], &cases, &mut stdout(), &mut stderr())
            }
            PolicyCommand::Explain {
                files,
                from,
                to,
                direction,
                unauthenticated,
                undeclared,
                to_identity,
                method,
                path,
                host,
                headers,
                ip,
                protocol,
            } => {
                let mut by_name: std::collections::BTreeMap<String, Vec<String>> =
                    std::collections::BTreeMap::new();
                for h in &headers {
                    let (k, v) = h
                        .split_once('=')
                        .with_context(|| format!("--header {h:?}: expected name=value"))?;
                    by_name
                        .entry(k.to_string())
                        .or_default()
                        .push(v.to_string());
                }
                let case = bulkhead_policy::cases::Case {
                    name: String::new(),
                    direction: if direction == "egress" {
                        bulkhead_policy::model::Direction::Egress
                    } else {
                        bulkhead_policy::model::Direction::Ingress
                    },
                    from,
                    to,
                    to_identity,
                    caller: match (unauthenticated, undeclared) {
                        (true, _) => policy_cmd::Caller::Unauthenticated,
                        (false, true) => policy_cmd::Caller::Undeclared,
                        (false, false) => policy_cmd::Caller::Declared,
                    },
                    ip,
                    protocol: protocol
                        .map(|p| serde_json::from_value(serde_json::Value::String(p)))
                        .transpose()?,
                    method: Some(method),
                    path: Some(path),
                    host,
                    headers: by_name
                        .into_iter()
                        .map(|(k, v)| (k, policy_cmd::HeaderValues::Many(v)))
                        .collect(),
                    expect: None,
                    policy: None,
                    rule: None,
                };
                policy_cmd::explain(&files, &case, &mut stdout(), &mut stderr())
            }
        },
        Command::SampleApp {
            name,
            listen,
            downstream,
            ready_file,
            tcp_echo,
        } => {
            init_logging("info");
            let addr = sample_app::serve(
                sample_app::AppSpec {
                    name,
                    downstream,
                    tcp_echo,
                },
                sample_app::bind(listen).await?,
            )?;
            if let Some(path) = ready_file {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, serde_json::json!({ "addr": addr }).to_string())?;
                std::fs::rename(&tmp, &path)?;
            }
            tokio::signal::ctrl_c().await?;
            Ok(())
        }
    }
}

const LOGGING_HELP: &str = "Logging (`control`, `demo`): BULKHEAD_LOG sets what is logged, as a filter in RUST_LOG's syntax, e.g. BULKHEAD_LOG=debug or BULKHEAD_LOG=info,bulkhead_control=debug; RUST_LOG is read when BULKHEAD_LOG is unset. The default is info for `control` and warn for `demo`; logs go to stderr.";

pub(crate) fn init_logging(default: &str) {
    bulkhead_proxy::init_logging(default, false);
}

/// A spike factor: a finite number, at least 1.
fn parse_factor(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 1.0 => Ok(f),
        Ok(_) => Err(format!(
            "{s:?}: the factor must be at least 1 (below, the usual rate would count as a spike)"
        )),
        Err(_) => Err(format!("{s:?} is not a number like 5 or 2.5")),
    }
}

/// Now, in Unix seconds (0 if the clock is before 1970).
/// This CLI's version.
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The Unix second a `--since` window starts at; 0 (everything kept) without one.
fn since(window: Option<Duration>) -> u64 {
    window.map_or(0, |w| unix_now().saturating_sub(w.as_secs()))
}

/// `16MiB`, `512KiB`, `2GiB`, or a bare number of bytes.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 16MiB, 512KiB or 1048576"))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1024,
        "MiB" => 1024 * 1024,
        "GiB" => 1024 * 1024 * 1024,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?}; use KiB, MiB or GiB"
            ));
        }
    };
    match n.checked_mul(scale) {
        Some(0) => Err("a size must be more than zero".into()),
        Some(bytes) => Ok(bytes),
        None => Err(format!("{s:?} is too large")),
    }
}

/// `90s`, `30m`, `1h`, `2d`, or a bare number of seconds.
/// A duration as kubectl and Go write them: one or more `<number><unit>` parts, units `s`,
/// `m`, `h`, `d` (`90s`, `30m`, `1h30m`, `2d12h`); a bare number is seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let like = "a duration like 90s, 30m, 1h30m or 2d";
    let mut rest = s;
    let mut secs: u64 = 0;
    let mut last_unit = u64::MAX;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?} is not {like}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            // A bare number is seconds.
            "" if digits == s.len() => 1,
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            other => return Err(format!("{s:?}: unknown unit {other:?}; use s, m, h or d")),
        };
        if unit >= last_unit {
            return Err(format!(
                "{s:?}: write the larger units first, each once (like 1h30m)"
            ));
        }
        last_unit = unit;
        rest = &rest[unit_len..];
        secs = n
            .checked_mul(unit)
            .and_then(|part| secs.checked_add(part))
            .ok_or_else(|| format!("{s:?} is too long a duration"))?;
    }
    match secs {
        0 => Err("a duration must be more than zero".into()),
        // Beyond any window or lifetime the mesh keeps, and beyond what clocks can subtract.
        n if n > 100 * 365 * 86_400 => Err(format!("{s:?} is more than 100 years")),
        n => Ok(Duration::from_secs(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn factors() {
        assert_eq!(super::parse_factor("2.5"), Ok(2.5));
        assert!(super::parse_factor("0.5").is_err());
        assert!(super::parse_factor("NaN").is_err());
        assert!(super::parse_factor("x").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(super::parse_bytes("16MiB"), Ok(16 * 1024 * 1024));
        assert_eq!(super::parse_bytes("512KiB"), Ok(512 * 1024));
        assert_eq!(super::parse_bytes("1000"), Ok(1000));
        assert!(super::parse_bytes("16MB").is_err());
        assert!(super::parse_bytes("0").is_err());
        assert!(super::parse_bytes("MiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d12h"), Ok(Duration::from_secs(216_000)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("1w"),
            Err("\"1w\": unknown unit \"w\"; use s, m, h or d".into())
        );
        assert_eq!(
            parse_duration("30m1h"),
            Err("\"30m1h\": write the larger units first, each once (like 1h30m)".into())
        );
        assert!(parse_duration("1h1h").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("0h0m").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(parse_duration("213503982334602d").is_err());
        assert!(parse_duration("36501d").is_err());
        assert_eq!(
            parse_duration("36500d"),
            Ok(Duration::from_secs(36500 * 86_400))
        );
    }
}
