//! Scale benchmark for a running control plane (see `bench/control_scale.sh`).
//!
//! Connects N simulated proxies, each with its own join token, key, SVID and mTLS connection,
//! each holding a real `Config.Watch` stream and answering every configuration with a real
//! `Config.Ack`. Then applies M policy changes that concern every proxy and measures, for each,
//! the time from just before the `Admin.Apply` RPC is sent until the last proxy's ACK has been
//! answered by the control plane. Also reports the control plane's resident memory per
//! connected proxy (from `/proc/PID/status`).
//!
//! ```text
//! target/release/examples/scale --data-dir DIR --control-pid PID
//!     [--proxies 1000] [--applies 30] [--join-concurrency 50] [--pause-ms 250]
//!     [--extra-declarations 0]
//! ```
//!
//! `--extra-declarations E` declares E more workloads that no proxy connects for (to tell
//! costs that grow with the declared set from those that grow with connected proxies).
//! Exit status: 0 if every target is met, 3 if the run completed but a target was missed.
//!
//! The simulated proxies decode each configuration message (tonic does that) but, unlike a
//! real proxy, do not compile it into a policy set before acknowledging it.

use bulkhead_api::channel::{self, CONTROL_ID_PATH};
use bulkhead_api::v1::admin_client::AdminClient;
use bulkhead_api::v1::config_client::ConfigClient;
use bulkhead_api::v1::identity_client::IdentityClient;
use bulkhead_api::v1::{
    AckRequest, ApplyRequest, CreateTokenRequest, GetRequest, JoinRequest, ListProxiesRequest,
    ProxyConfig, WatchRequest,
};
use bulkhead_control::{AdminContext, CONTEXT_FILE};
use bulkhead_identity::tls::{ExpectedServer, client_config};
use bulkhead_identity::{LocalKey, SpiffeId, Svid, TrustBundle};
use bulkhead_policy::model::ResourceName;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};
use tonic::Code;
use tonic::transport::Channel;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

const NAMESPACE: &str = "scale";
/// How long one apply may take to reach every proxy before the run is declared failed.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the connected proxies sit idle before the memory reading.
const SETTLE: Duration = Duration::from_secs(3);
/// Targets from the product requirements.
const TARGET_P99: Duration = Duration::from_millis(250);
const TARGET_KB_PER_PROXY: f64 = 50.0;

struct Args {
    data_dir: PathBuf,
    control_pid: u32,
    proxies: usize,
    applies: usize,
    join_concurrency: usize,
    pause: Duration,
    /// Workloads declared beyond those with a proxy (no proxy connects for them).
    extra_declarations: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        data_dir: PathBuf::new(),
        control_pid: 0,
        proxies: 1000,
        applies: 30,
        join_concurrency: 50,
        extra_declarations: 0,
        pause: Duration::from_millis(250),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--data-dir" => args.data_dir = PathBuf::from(value()?),
            "--control-pid" => args.control_pid = value()?.parse()?,
            "--proxies" => args.proxies = value()?.parse()?,
            "--applies" => args.applies = value()?.parse()?,
            "--join-concurrency" => args.join_concurrency = value()?.parse()?,
            "--extra-declarations" => args.extra_declarations = value()?.parse()?,
            "--pause-ms" => args.pause = Duration::from_millis(value()?.parse()?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if args.data_dir.as_os_str().is_empty() || args.control_pid == 0 {
        return Err("usage: scale --data-dir DIR --control-pid PID [--proxies N] [--applies M] [--join-concurrency C] [--pause-ms MS] [--extra-declarations E]".into());
    }
    if args.proxies == 0 || args.applies == 0 || args.join_concurrency == 0 {
        return Err("--proxies, --applies and --join-concurrency must be positive".into());
    }
    Ok(args)
}

// ---------------------------------------------------------------------------------------------
// /proc readings

/// A `kB` field of `/proc/PID/status` (VmRSS, VmHWM …).
fn proc_status_kb(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}

/// User + system CPU time of a process, from `/proc/PID/stat` (USER_HZ is 100 on Linux).
fn proc_cpu(pid: &str) -> Result<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = text.rsplit_once(')').ok_or("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let ticks: u64 = fields.get(11).ok_or("short stat")?.parse::<u64>()?
        + fields.get(12).ok_or("short stat")?.parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

// ---------------------------------------------------------------------------------------------
// What the simulated proxies saw

#[derive(Default, Clone, Copy)]
struct Seen {
    received: usize,
    acked: usize,
    first_received: Option<Instant>,
    last_received: Option<Instant>,
    last_acked: Option<Instant>,
}

#[derive(Default)]
struct Tracker {
    revisions: Mutex<HashMap<u64, Seen>>,
    changed: Notify,
    stream_errors: AtomicUsize,
    ack_errors: AtomicUsize,
}

impl Tracker {
    fn received(&self, revision: u64, at: Instant) {
        let mut map = self.revisions.lock().unwrap_or_else(|e| e.into_inner());
        let s = map.entry(revision).or_default();
        s.received += 1;
        s.first_received.get_or_insert(at);
        s.last_received = Some(at);
    }

    fn acked(&self, revision: u64, at: Instant) {
        {
            let mut map = self.revisions.lock().unwrap_or_else(|e| e.into_inner());
            let s = map.entry(revision).or_default();
            s.acked += 1;
            s.last_acked = Some(at);
        }
        self.changed.notify_waiters();
    }

    fn get(&self, revision: u64) -> Seen {
        let map = self.revisions.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&revision).copied().unwrap_or_default()
    }

    /// Waits until `count` proxies have had their ACK of `revision` answered.
    async fn wait_acked(&self, revision: u64, count: usize, timeout: Duration) -> Option<Seen> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let seen = self.get(revision);
            if seen.acked >= count {
                return Some(seen);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Talking to the control plane

struct Control {
    addr: SocketAddr,
    bundle: TrustBundle,
    expected: ExpectedServer,
}

impl Control {
    fn channel(&self, svid: Option<&Svid>) -> Result<Channel> {
        let tls = client_config(svid, &self.bundle, self.expected.clone(), &[b"h2"])?;
        Ok(channel::connect(self.addr, tls))
    }
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()).into())
}

fn admin_client(data_dir: &Path) -> Result<(AdminClient<Channel>, Arc<Control>)> {
    let ctx: AdminContext = serde_saphyr::from_str(&read(&data_dir.join(CONTEXT_FILE))?)?;
    let svid = Svid::from_pem(&read(&ctx.cert_file)?, &read(&ctx.key_file)?)?;
    let bundle = TrustBundle::from_pem(&read(&ctx.ca_file)?)?;
    let control = Arc::new(Control {
        addr: ctx.server,
        expected: ExpectedServer::Exact(SpiffeId::parse(&format!(
            "spiffe://{}{CONTROL_ID_PATH}",
            ctx.trust_domain
        ))?),
        bundle,
    });
    let admin = AdminClient::new(control.channel(Some(&svid))?);
    Ok((admin, control))
}

/// Retries a call while the server says it is unavailable (still starting, or overloaded).
/// Each attempt gets its own clone of `client` (tonic clients are cheap handles).
async fn retry<C, T, F, Fut>(what: &str, client: &C, mut call: F) -> Result<T>
where
    C: Clone,
    F: FnMut(C) -> Fut,
    Fut: Future<Output = std::result::Result<T, tonic::Status>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match call(client.clone()).await {
            Ok(v) => return Ok(v),
            Err(s) if s.code() == Code::Unavailable && delay < Duration::from_secs(10) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(s) => return Err(format!("{what}: {:?}: {}", s.code(), s.message()).into()),
        }
    }
}

fn workload_name(i: usize) -> String {
    format!("w{i}")
}

fn trust_domain(control: &Control) -> &str {
    control.bundle.trust_domain()
}

fn declarations_yaml(n: usize, extra: usize, td: &str) -> String {
    let mut y = String::new();
    let names = (0..n)
        .map(workload_name)
        .chain((0..extra).map(|i| format!("idle{i}")));
    for w in names {
        y.push_str(&format!(
            "apiVersion: bulkhead.dev/v1alpha1\nkind: Workload\n\
             metadata: {{name: {w}, namespace: {NAMESPACE}, labels: {{app: {w}, bench: scale}}}}\n\
             spec:\n  identity: spiffe://{td}/ns/{NAMESPACE}/sa/{w}\n  ports: [{{port: 8080, protocol: http}}]\n---\n"
        ));
    }
    // The baseline: every workload of the namespace accepts its neighbours on its HTTP port.
    y.push_str(&format!(
        "apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: baseline, namespace: {NAMESPACE}}}\n\
         spec:\n  action: allow\n  rules:\n    - name: neighbours\n      from: {{namespaces: [{NAMESPACE}]}}\n      to: {{ports: [8080], methods: [GET]}}\n"
    ));
    y
}

/// A change that concerns every proxy: an empty selector selects every declared workload of
/// the namespace, and the rule differs at each step.
fn change_yaml(step: usize, td: &str) -> String {
    format!(
        "apiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: rotating, namespace: {NAMESPACE}}}\n\
         spec:\n  action: allow\n  rules:\n    - name: step-{step}\n      from: {{identities: [\"spiffe://{td}/ns/clients/sa/c{step}\"]}}\n      to: {{ports: [8080], paths: [\"/v{step}/*\"]}}\n"
    )
}

// ---------------------------------------------------------------------------------------------
// One simulated proxy

/// Joins, opens the watch, ACKs the first configuration, then reports readiness and keeps
/// following (ACKing every configuration) on its own task.
async fn run_proxy(
    i: usize,
    token: String,
    control: Arc<Control>,
    tracker: Arc<Tracker>,
) -> Result<()> {
    let key = LocalKey::generate()?;
    let request = JoinRequest {
        token,
        csr_der: key.csr_der(None)?,
        ..Default::default()
    };
    let joined = {
        // Its own connection, without a client certificate, as a real proxy's first dial.
        let identity = IdentityClient::new(control.channel(None)?);
        retry("join", &identity, |mut c| {
            let r = request.clone();
            async move { c.join(r).await }
        })
        .await?
        .into_inner()
    };
    let chain = joined.cert_chain_der.into_iter().map(Into::into).collect();
    let svid = key.into_svid(chain)?;
    let workload = ResourceName {
        namespace: joined.namespace,
        name: joined.workload,
    };
    if workload.name != workload_name(i) {
        return Err(format!("proxy {i} was bound to {workload}").into());
    }
    // Its own mTLS connection with its new SVID.
    let mut client = ConfigClient::new(control.channel(Some(&svid))?);
    let watch = WatchRequest {
        namespace: workload.namespace.clone(),
        workload: workload.name.clone(),
        ..Default::default()
    };
    let mut stream = retry("watch", &client, |mut c| {
        let w = watch.clone();
        async move { c.watch(w).await }
    })
    .await?
    .into_inner();
    let ack = |config: &ProxyConfig| AckRequest {
        namespace: workload.namespace.clone(),
        workload: workload.name.clone(),
        revision: config.revision,
        accepted: true,
        error: String::new(),
        ..Default::default()
    };
    // The first configuration arrives at once; answer it before counting this proxy in.
    let first = stream
        .message()
        .await?
        .ok_or("stream closed before the first configuration")?;
    tracker.received(first.revision, Instant::now());
    client.ack(ack(&first)).await?;
    tracker.acked(first.revision, Instant::now());
    let ack_request = ack(&first);
    tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(config)) => {
                    tracker.received(config.revision, Instant::now());
                    let request = AckRequest {
                        revision: config.revision,
                        ..ack_request.clone()
                    };
                    match client.ack(request).await {
                        Ok(_) => tracker.acked(config.revision, Instant::now()),
                        Err(_) => {
                            tracker.ack_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(None) | Err(_) => {
                    tracker.stream_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    });
    Ok(())
}

/// The protobuf size of a configuration message (computed by hand: this crate does not
/// depend on prost directly).
fn encoded_len(m: &ProxyConfig) -> usize {
    fn varint(mut v: u64) -> usize {
        let mut n = 1;
        while v >= 0x80 {
            v >>= 7;
            n += 1;
        }
        n
    }
    fn field(len: usize) -> usize {
        if len == 0 {
            0
        } else {
            1 + varint(len as u64) + len
        }
    }
    let revision = if m.revision == 0 {
        0
    } else {
        1 + varint(m.revision)
    };
    revision
        + m.resources
            .iter()
            .map(|r| {
                let inner = field(r.kind.len())
                    + field(r.namespace.len())
                    + field(r.name.len())
                    + field(r.json.len());
                1 + varint(inner as u64) + inner
            })
            .sum::<usize>()
}

// ---------------------------------------------------------------------------------------------
// Figures

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Dist {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

fn dist(values: &[Duration]) -> Dist {
    let mut v = values.to_vec();
    v.sort();
    Dist {
        p50: percentile(&v, 50.0),
        p90: percentile(&v, 90.0),
        p99: percentile(&v, 99.0),
        max: *v.last().unwrap_or(&Duration::ZERO),
    }
}

fn row(name: &str, d: &Dist) {
    println!(
        "  {name:<34} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
        ms(d.p50),
        ms(d.p90),
        ms(d.p99),
        ms(d.max)
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

// ---------------------------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let Err(e) = run(parse_args().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    }))
    .await
    {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    let n = args.proxies;
    let pid = args.control_pid;
    let (mut admin, control) = admin_client(&args.data_dir)?;
    let td = trust_domain(&control).to_string();
    eprintln!(
        "scale: control plane {} (pid {pid}), {n} proxies, {} applies",
        control.addr, args.applies
    );

    // 1. Declarations (one Workload per proxy) and the baseline policy.
    let t = Instant::now();
    let yaml = declarations_yaml(n, args.extra_declarations, &td);
    let base = retry("apply declarations", &admin, |mut c| {
        let r = ApplyRequest {
            file: "scale-declarations.yaml".into(),
            yaml: yaml.clone(),
            ..Default::default()
        };
        async move { c.apply(r).await }
    })
    .await?
    .into_inner();
    let declare_time = t.elapsed();
    eprintln!(
        "scale: declared {} workloads at revision {} in {:.0} ms",
        n + args.extra_declarations,
        base.revision,
        ms(declare_time)
    );

    // 2. One join token per proxy.
    let t = Instant::now();
    let mut tokens = Vec::with_capacity(n);
    {
        let mut pending = tokio::task::JoinSet::new();
        let limit = Arc::new(Semaphore::new(16));
        for i in 0..n {
            let admin = admin.clone();
            let limit = limit.clone();
            let spiffe_id = format!("spiffe://{td}/ns/{NAMESPACE}/sa/{}", workload_name(i));
            pending.spawn(async move {
                let _permit = limit.acquire_owned().await?;
                let r = retry("create token", &admin, |mut c| {
                    let r = CreateTokenRequest {
                        spiffe_id: spiffe_id.clone(),
                        namespace: NAMESPACE.into(),
                        workload: workload_name(i),
                        ttl_seconds: 3600,
                        max_uses: 1,
                    };
                    async move { c.create_token(r).await }
                })
                .await?;
                Ok::<_, Error>((i, r.into_inner().token))
            });
        }
        let mut by_index = vec![String::new(); n];
        while let Some(r) = pending.join_next().await {
            let (i, token) = r??;
            by_index[i] = token;
        }
        tokens.extend(by_index);
    }
    let token_time = t.elapsed();
    eprintln!("scale: created {n} tokens in {:.0} ms", ms(token_time));

    // 3. Memory before any proxy connects.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = proc_status_kb(pid, "VmRSS")?;
    let store_file = args.data_dir.join("state.redb");
    let file_size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let store_empty = file_size(&store_file);

    // 4. Join and watch, `join_concurrency` at a time.
    let tracker = Arc::new(Tracker::default());
    let t = Instant::now();
    let limit = Arc::new(Semaphore::new(args.join_concurrency));
    let mut joining = tokio::task::JoinSet::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let (control, tracker, limit) = (control.clone(), tracker.clone(), limit.clone());
        joining.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            run_proxy(i, token, control, tracker)
                .await
                .map_err(|e| Error::from(format!("proxy {i}: {e}")))
        });
    }
    let mut join_errors = Vec::new();
    while let Some(r) = joining.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => join_errors.push(e.to_string()),
            Err(e) => join_errors.push(e.to_string()),
        }
    }
    let join_time = t.elapsed();
    let connected = n - join_errors.len();
    eprintln!(
        "scale: {connected}/{n} proxies joined and ACKed their first configuration in {:.1} s",
        join_time.as_secs_f64()
    );
    for e in join_errors.iter().take(5) {
        eprintln!("scale:   {e}");
    }
    if connected == 0 {
        return Err("no proxy connected".into());
    }

    // 5. Memory with every proxy connected and idle.
    tokio::time::sleep(SETTLE).await;
    let rss_connected = proc_status_kb(pid, "VmRSS")?;
    let store_before = file_size(&store_file);
    let kb_per_proxy = (rss_connected as f64 - rss_before as f64) / connected as f64;

    // 6. Changes that concern every proxy.
    let mut to_first = Vec::new();
    let mut to_all_received = Vec::new();
    let mut to_all_acked = Vec::new();
    let mut apply_rpc = Vec::new();
    let mut last_revision = base.revision;
    let mut failures = 0;
    let pid_text = pid.to_string();
    let cpu_start = (proc_cpu(&pid_text)?, proc_cpu("self")?);
    for step in 1..=args.applies {
        let yaml = change_yaml(step, &td);
        let t0 = Instant::now();
        let r = admin
            .apply(ApplyRequest {
                file: format!("scale-change-{step}.yaml"),
                yaml,
                ..Default::default()
            })
            .await
            .map_err(|s| format!("apply {step}: {}", s.message()))?
            .into_inner();
        let rpc = t0.elapsed();
        last_revision = r.revision;
        match tracker.wait_acked(r.revision, connected, ACK_TIMEOUT).await {
            Some(seen) => {
                let since = |at: Option<Instant>| at.map(|a| a - t0).unwrap_or_default();
                to_first.push(since(seen.first_received));
                to_all_received.push(since(seen.last_received));
                to_all_acked.push(since(seen.last_acked));
                apply_rpc.push(rpc);
                eprintln!(
                    "scale: apply {step:>2} -> revision {}: first {:.1} ms, all received {:.1} ms, all ACKed {:.1} ms (Apply RPC {:.1} ms); control RSS {:.1} MB",
                    r.revision,
                    ms(since(seen.first_received)),
                    ms(since(seen.last_received)),
                    ms(since(seen.last_acked)),
                    ms(rpc),
                    proc_status_kb(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0
                );
            }
            None => {
                failures += 1;
                let seen = tracker.get(r.revision);
                eprintln!(
                    "scale: apply {step} -> revision {}: only {}/{connected} ACKs after {} s",
                    r.revision,
                    seen.acked,
                    ACK_TIMEOUT.as_secs()
                );
            }
        }
        tokio::time::sleep(args.pause).await;
    }
    let cpu_end = (proc_cpu(&pid_text)?, proc_cpu("self")?);
    let per_apply = |a: Duration, b: Duration| ms(a.saturating_sub(b)) / args.applies as f64;
    let control_cpu = per_apply(cpu_end.0, cpu_start.0);
    let bench_cpu = per_apply(cpu_end.1, cpu_start.1);
    let rss_after = proc_status_kb(pid, "VmRSS")?;
    let store_after = file_size(&store_file);
    let hwm = proc_status_kb(pid, "VmHWM")?;

    // 7. The control plane's own view.
    let proxies = admin
        .list_proxies(ListProxiesRequest {})
        .await
        .map_err(|s| format!("list proxies: {}", s.message()))?
        .into_inner()
        .proxies;
    let ours: Vec<_> = proxies
        .iter()
        .filter(|p| p.namespace == NAMESPACE)
        .collect();
    let up_to_date = ours
        .iter()
        .filter(|p| p.connected && p.acked_revision == last_revision)
        .count();

    // 8. What one push costs the control plane, done here the way the control plane does it:
    //    the distribution index and the wire encoding once per revision, then one cut per proxy.
    let snapshot = admin
        .get(GetRequest::default())
        .await
        .map_err(|s| format!("get: {}", s.message()))?
        .into_inner();
    let resources = snapshot
        .resources
        .iter()
        .map(bulkhead_api::resource_from_wire)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let t = Instant::now();
    let distribution = bulkhead_policy::Distribution::new(&resources);
    let wire: Vec<_> = resources
        .iter()
        .map(bulkhead_api::resource_to_wire)
        .collect();
    let mut bytes = 0usize;
    let mut per_proxy_resources = 0usize;
    for i in 0..connected {
        let workload = ResourceName {
            namespace: NAMESPACE.into(),
            name: workload_name(i),
        };
        let cut = distribution.indices_for(&workload);
        per_proxy_resources = cut.len();
        let message = ProxyConfig {
            revision: snapshot.revision,
            resources: cut.iter().filter_map(|&i| wire.get(i).cloned()).collect(),
            ..Default::default()
        };
        bytes += encoded_len(&message);
    }
    let cut_time = t.elapsed();

    // 9. Report.
    let applied = to_all_acked.len();
    println!();
    println!(
        "Bulkhead control-plane scale benchmark: {connected}/{n} proxies, {applies} applies ({applied} fully ACKed)",
        applies = args.applies
    );
    println!(
        "  join: {connected} proxies in {:.1} s = {:.0} proxies/s (concurrency {}); tokens {:.1} s; declarations {:.0} ms",
        join_time.as_secs_f64(),
        connected as f64 / join_time.as_secs_f64(),
        args.join_concurrency,
        token_time.as_secs_f64(),
        ms(declare_time)
    );
    let mut p99_ok = false;
    if applied > 0 {
        println!(
            "  {:<34} {:>9} {:>9} {:>9} {:>9}",
            "latency over applies (ms)", "p50", "p90", "p99", "max"
        );
        let all = dist(&to_all_acked);
        row("apply -> first proxy received", &dist(&to_first));
        row("apply -> all proxies received", &dist(&to_all_received));
        row("apply -> all proxies ACKed", &all);
        row("Apply RPC alone", &dist(&apply_rpc));
        println!(
            "  CPU per apply (mean over the apply phase): control plane {control_cpu:.0} ms, simulated proxies {bench_cpu:.0} ms"
        );
        p99_ok = failures == 0 && all.p99 < TARGET_P99;
        println!(
            "  target p99 apply -> all ACKed < {} ms: {} ({:.1} ms{})",
            TARGET_P99.as_millis(),
            verdict(p99_ok),
            ms(all.p99),
            if failures > 0 {
                format!(", {failures} applies timed out")
            } else {
                String::new()
            }
        );
    } else {
        println!(
            "  no apply reached every proxy within {} s",
            ACK_TIMEOUT.as_secs()
        );
    }
    let mem_ok = kb_per_proxy < TARGET_KB_PER_PROXY;
    println!(
        "  control-plane RSS: {:.1} MB before proxies, {:.1} MB with {connected} connected and idle, {:.1} MB after the applies (peak {:.1} MB)",
        rss_before as f64 / 1024.0,
        rss_connected as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "  state.redb during the joins: {:.1} MB -> {:.1} MB ({:+.1} KB per proxy; redb caches what it writes)",
        store_empty as f64 / 1048576.0,
        store_before as f64 / 1048576.0,
        (store_before as f64 - store_empty as f64) / 1024.0 / connected as f64
    );
    println!(
        "  growth during the applies: RSS {:+.0} KB per apply; state.redb {:.1} MB -> {:.1} MB ({:+.0} KB per apply)",
        (rss_after as f64 - rss_connected as f64) / args.applies as f64,
        store_before as f64 / 1048576.0,
        store_after as f64 / 1048576.0,
        (store_after as f64 - store_before as f64) / 1024.0 / args.applies as f64
    );
    println!(
        "  target memory < {TARGET_KB_PER_PROXY:.0} KB per connected proxy: {} ({kb_per_proxy:.1} KB)",
        verdict(mem_ok)
    );
    println!(
        "  ListProxies: {} proxies in namespace {NAMESPACE}, {up_to_date} connected with acked_revision == {last_revision}: {}",
        ours.len(),
        if up_to_date == n { "OK" } else { "MISMATCH" }
    );
    println!(
        "  stream errors {}, ACK errors {}, join errors {}",
        tracker.stream_errors.load(Ordering::Relaxed),
        tracker.ack_errors.load(Ordering::Relaxed),
        join_errors.len()
    );
    println!(
        "  one push, as config_for builds it, for {connected} proxies: {:.0} ms on one core here, {per_proxy_resources} resources and {:.0} KB per proxy, {:.1} MB in all",
        ms(cut_time),
        bytes as f64 / connected as f64 / 1024.0,
        bytes as f64 / 1024.0 / 1024.0
    );
    let ok = p99_ok && mem_ok && up_to_date == n && join_errors.is_empty();
    println!("  result: {}", if ok { "PASS" } else { "FAIL" });
    if !ok {
        std::process::exit(3);
    }
    Ok(())
}
