//! `bulkhead`: the control plane, the admin verbs and the demo, in one binary.

mod admin_cmd;
mod ca_cmd;
mod client;
mod demo;
mod events_cmd;
mod flows_cmd;
mod policy_cmd;
mod reach_cmd;
mod sample_app;
mod tap_cmd;

use anyhow::{Context, Result, bail};
use bulkhead_api::v1::CreateTokenRequest;
use clap::{Parser, Subcommand};
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
    /// Admin context written by `bulkhead control` (DATA_DIR/admin.yaml).
    #[arg(
        long,
        global = true,
        env = "BULKHEAD_CONTEXT",
        default_value = "bulkhead-data/admin.yaml"
    )]
    context: PathBuf,
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
    },
    /// Join tokens, which let one proxy obtain one identity.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Apply resources from a YAML file (several documents per file). The whole resulting
    /// set is type-checked; any error refuses the apply and changes nothing.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete the resources a file names, or Kind/namespace/name keys.
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
        keys: Vec<String>,
    },
    /// Show resources (all, policies, workloads, services, postures) or proxies.
    Get {
        #[arg(default_value = "all")]
        what: String,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json", "yaml"])]
        output: String,
    },
    /// The audit log: every revision, who made it, when, and what changed.
    History {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Restore the resource set exactly as it was at REVISION (as a new revision).
    Rollback { revision: u64 },
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
    },
    /// Enforce an audit-mode policy or posture (`namespace/name`, or
    /// `DefaultPosture/namespace/name`). Refused while it would have denied traffic seen
    /// within --window, unless --force.
    Promote {
        target: String,
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        window: Duration,
        #[arg(long)]
        force: bool,
    },
    /// Offline policy tools for CI: lint, test, diff, explain. They read files only.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Who can reach a workload, or (--blast-radius) everything it could reach if
    /// compromised, from policy alone: the applied policy, or files with -f.
    Reach(reach_cmd::ReachArgs),
    /// Start a local mesh of three services, send legitimate traffic and a lateral-movement
    /// attempt, and show what was allowed and denied, and why.
    Demo {
        /// Run one round of traffic and exit (non-zero if any verdict was not as expected).
        #[arg(long)]
        once: bool,
    },
    /// A small HTTP service for demos and tests.
    #[command(hide = true)]
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

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Every CA with its state (active signs; trusted is in the bundle; retired is gone),
    /// and how many proxies hold the current bundle and certificates from the signing CA.
    Status {
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
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
enum TokenCommand {
    /// Mint a join token bound to one SPIFFE ID and workload. Prints only the token.
    Create {
        /// The identity the token grants, e.g. spiffe://bulkhead.local/ns/shop/sa/orders.
        #[arg(long)]
        identity: String,
        /// Workload namespace (default: the ID's /ns/<namespace>).
        #[arg(long)]
        namespace: Option<String>,
        /// Workload name (default: the ID's /sa/<account>).
        #[arg(long)]
        workload: Option<String>,
        /// How long the token is valid.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many times it can be used.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Parse and type-check policy files (or directories of .yaml); every error with
    /// file:line:column; non-zero exit on any.
    Lint {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run a table of requests and expected verdicts (YAML: `cases: [{name, from, to, method,
    /// path, expect, …}]`) against the policy files; non-zero exit on any mismatch.
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
    /// Explain the decision for one request.
    Explain {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Ingress: the caller's SPIFFE ID. Egress: the sending namespace/workload.
        #[arg(long)]
        from: String,
        /// namespace/workload:port
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "ingress", value_parser = ["ingress", "egress"])]
        direction: String,
        /// Egress: the SPIFFE ID the destination presents.
        #[arg(long)]
        to_identity: Option<String>,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long)]
        host: Option<String>,
        /// name=value (repeatable)
        #[arg(long = "header")]
        headers: Vec<String>,
        /// The peer's IP address.
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
        #[arg(long, default_value = "http", value_parser = ["http", "http2", "grpc", "tcp"])]
        protocol: String,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
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
        } => {
            init_logging("info");
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
                ..Default::default()
            };
            let running = bulkhead_control::start_with(config, options).await?;
            eprintln!(
                "bulkhead control plane listening on {}\nadmin context: {} (the CLI reads it with --context or BULKHEAD_CONTEXT)",
                running.addr,
                running.context_file.display()
            );
            if let Some(addr) = running.metrics_addr {
                eprintln!("metrics: http://{addr}/metrics");
            }
            tokio::select! {
                r = tokio::signal::ctrl_c() => { r.context("waiting for Ctrl-C")?; }
                r = running.wait() => { r?; bail!("control plane stopped"); }
            }
            Ok(())
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    identity,
                    namespace,
                    workload,
                    ttl,
                    uses,
                },
        } => {
            let mut admin = client::admin(&cli.context).await?;
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
        Command::Apply { file } => {
            admin_cmd::apply(&mut client::admin(&cli.context).await?, &file).await
        }
        Command::Delete { file, keys } => {
            admin_cmd::delete(
                &mut client::admin(&cli.context).await?,
                file.as_deref(),
                keys,
            )
            .await
        }
        Command::Get { what, output } => {
            admin_cmd::get(
                &mut client::admin(&cli.context).await?,
                &what.to_lowercase(),
                &output,
            )
            .await
        }
        Command::History { limit, output } => {
            admin_cmd::history(&mut client::admin(&cli.context).await?, limit, &output).await
        }
        Command::Ca { command } => {
            let mut admin = client::admin(&cli.context).await?;
            match command {
                CaCommand::Status { output } => ca_cmd::status(&mut admin, &output).await,
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
        Command::Rollback { revision } => {
            admin_cmd::rollback(&mut client::admin(&cli.context).await?, revision).await
        }
        Command::Graph { since, output } => {
            flows_cmd::graph(&mut client::admin(&cli.context).await?, since, &output).await
        }
        Command::Recommend { since, diff } => {
            flows_cmd::recommend(&mut client::admin(&cli.context).await?, since, diff).await
        }
        Command::Impact { files, since } => {
            flows_cmd::impact(&mut client::admin(&cli.context).await?, &files, since).await
        }
        Command::Promote {
            target,
            window,
            force,
        } => {
            flows_cmd::promote(
                &mut client::admin(&cli.context).await?,
                &target,
                window,
                force,
            )
            .await
        }
        Command::Demo { once } => demo::run(once).await,
        Command::Reach(args) => reach_cmd::run(&cli.context, args).await,
        Command::Tap(args) => tap_cmd::run(&cli.context, args).await,
        Command::Events(args) => events_cmd::run(&cli.context, args).await,
        Command::Policy { command } => match command {
            PolicyCommand::Lint { files } => policy_cmd::lint(&files),
            PolicyCommand::Test { files, cases } => policy_cmd::test(&files, &cases),
            PolicyCommand::Diff { old, new, cases } => policy_cmd::diff(&[old], &[new], &cases),
            PolicyCommand::Explain {
                files,
                from,
                to,
                direction,
                to_identity,
                method,
                path,
                host,
                headers,
                ip,
                protocol,
            } => {
                let headers = headers
                    .iter()
                    .map(|h| {
                        h.split_once('=')
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .with_context(|| format!("--header {h:?}: expected name=value"))
                    })
                    .collect::<Result<_>>()?;
                let case = policy_cmd::Case {
                    name: "explain".into(),
                    direction: if direction == "egress" {
                        bulkhead_policy::model::Direction::Egress
                    } else {
                        bulkhead_policy::model::Direction::Ingress
                    },
                    from,
                    to,
                    to_identity,
                    ip,
                    protocol: serde_json::from_value(serde_json::Value::String(protocol))?,
                    method: Some(method),
                    path: Some(path),
                    host,
                    headers,
                    expect: None,
                    policy: None,
                    rule: None,
                };
                policy_cmd::explain(&files, case)
            }
        },
        Command::SampleApp {
            name,
            listen,
            downstream,
            ready_file,
            tcp_echo,
        } => {
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

/// The log filter: `BULKHEAD_LOG`, else `RUST_LOG` (both in `RUST_LOG`'s syntax), else
/// `default`. A filter that does not parse is reported and the default used.
fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
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

pub(crate) fn init_logging(default: &str) {
    let filter = log_filter(default);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The Unix second a `--since` window starts at; 0 (everything kept) without one.
fn since(window: Option<Duration>) -> u64 {
    window.map_or(0, |w| unix_now().saturating_sub(w.as_secs()))
}

/// `90s`, `30m`, `1h`, `2d`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 1h or 2d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use s, m, h or d")),
    };
    if secs == 0 {
        return Err("a duration must be more than zero".into());
    }
    Ok(Duration::from_secs(secs))
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
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("h").is_err());
    }
}
