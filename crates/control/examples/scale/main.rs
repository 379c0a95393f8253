//! Scale benchmark for running control planes (see `bench/control_scale.sh`).
//!
//! Connects N simulated proxies, each with its own join token, key, SVID and mTLS connection,
//! each holding a real `Config.Watch` stream and answering every configuration with a real
//! `Config.Ack`. Then applies M policy changes that concern every proxy and measures, for each,
//! the time from just before the `Admin.Apply` RPC is sent until the last proxy's ACK has been
//! answered. Also measures Join and Renew throughput (each a real RPC) and reports each
//! control plane's resident memory per proxy connected to it (from `/proc/PID/status`).
//!
//! ```text
//! target/release/examples/scale --data-dir DIR --control-pid PID [--data-dir DIR --control-pid PID …]
//!     [--store embedded|etcd] [--proxies 1000] [--applies 30] [--join-concurrency 50]
//!     [--pause-ms 250] [--extra-declarations 0]
//! ```
//!
//! Given several control planes (replicas on etcd, each with its data directory and PID, in
//! the same order), proxy `i` joins and watches replica `i mod R`, the tokens are made on the
//! replicas in turn, and apply `k` is made on replica `k mod R`: the clock stops at the last
//! ACK of every proxy, on every replica.
//!
//! `--extra-declarations E` declares E more workloads that no proxy connects for (to tell
//! costs that grow with the declared set from those that grow with connected proxies).
//! Exit status: 0 if every target is met, 3 if the run completed but a target was missed.
//!
//! The simulated proxies decode each configuration message (tonic does that) but, unlike a
//! real proxy, do not compile it into a policy set before acknowledging it.

mod figures;
mod proxy;

use bulkhead_api::channel::CONTROL_ID_PATH;
use bulkhead_api::v1::admin_client::AdminClient;
use bulkhead_api::v1::{
    ApplyRequest, CreateTokenRequest, GetRequest, ListProxiesRequest, ProxyConfig,
};
use bulkhead_control::{AdminContext, CONTEXT_FILE};
use bulkhead_identity::tls::ExpectedServer;
use bulkhead_identity::{SpiffeId, Svid, TrustBundle};
use bulkhead_policy::model::ResourceName;
use figures::{dist, encoded_len, figure, ms, proc_cpu, proc_status_kb, row, verdict};
use proxy::{Control, Tracker, Unjoined, retry};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::transport::Channel;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

const NAMESPACE: &str = "scale";
/// How long one apply may take to reach every proxy before the run is declared failed.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the connected proxies sit idle before the memory reading.
const SETTLE: Duration = Duration::from_secs(3);
/// How long the replicas may take to see the declarations another replica committed, and
/// to list each other's proxies (each replica writes its list to etcd every 0.5 s).
const CONVERGE: Duration = Duration::from_secs(10);
/// Targets from the product requirements.
const TARGET_P99: Duration = Duration::from_millis(250);
const TARGET_KB_PER_PROXY: f64 = 50.0;

struct Args {
    data_dirs: Vec<PathBuf>,
    control_pids: Vec<u32>,
    store: String,
    proxies: usize,
    applies: usize,
    join_concurrency: usize,
    pause: Duration,
    /// Workloads declared beyond those with a proxy (no proxy connects for them).
    extra_declarations: usize,
}

const USAGE: &str = "usage: scale --data-dir DIR --control-pid PID [--data-dir DIR --control-pid PID …] [--store LABEL] [--proxies N] [--applies M] [--join-concurrency C] [--pause-ms MS] [--extra-declarations E]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        data_dirs: Vec::new(),
        control_pids: Vec::new(),
        store: "embedded".into(),
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
            "--data-dir" => args.data_dirs.push(PathBuf::from(value()?)),
            "--control-pid" => args.control_pids.push(value()?.parse()?),
            "--store" => args.store = value()?,
            "--proxies" => args.proxies = value()?.parse()?,
            "--applies" => args.applies = value()?.parse()?,
            "--join-concurrency" => args.join_concurrency = value()?.parse()?,
            "--extra-declarations" => args.extra_declarations = value()?.parse()?,
            "--pause-ms" => args.pause = Duration::from_millis(value()?.parse()?),
            other => return Err(format!("unknown argument {other}\n{USAGE}").into()),
        }
    }
    if args.data_dirs.is_empty() || args.data_dirs.len() != args.control_pids.len() {
        return Err(
            format!("give each control plane's --data-dir and --control-pid\n{USAGE}").into(),
        );
    }
    if args.proxies == 0 || args.applies == 0 || args.join_concurrency == 0 {
        return Err("--proxies, --applies and --join-concurrency must be positive".into());
    }
    Ok(args)
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()).into())
}

/// One control plane, through the admin credential it wrote.
struct Replica {
    admin: AdminClient<Channel>,
    control: Arc<Control>,
    pid: u32,
    data_dir: PathBuf,
}

fn replica(data_dir: &Path, pid: u32) -> Result<Replica> {
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
    Ok(Replica {
        admin,
        control,
        pid,
        data_dir: data_dir.to_path_buf(),
    })
}

pub(crate) fn workload_name(i: usize) -> String {
    format!("w{i}")
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

/// Runs `work(i)` for every `i` in `0..n`, `concurrency` at a time; the time it took and the
/// errors.
async fn each<T, F, Fut>(n: usize, concurrency: usize, work: F) -> (Duration, Vec<T>, Vec<String>)
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
{
    let t = Instant::now();
    let limit = Arc::new(Semaphore::new(concurrency));
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..n {
        let limit = limit.clone();
        let fut = work(i);
        pending.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            fut.await
                .map_err(|e| Error::from(format!("proxy {i}: {e}")))
        });
    }
    let (mut done, mut errors) = (Vec::new(), Vec::new());
    while let Some(r) = pending.join_next().await {
        match r {
            Ok(Ok(v)) => done.push(v),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    (t.elapsed(), done, errors)
}

fn report_errors(what: &str, errors: &[String]) {
    for e in errors.iter().take(5) {
        eprintln!("scale: {what}: {e}");
    }
}

/// Waits until every replica serves `revision` (replicas on etcd follow one another).
async fn converge(replicas: &[Replica], revision: u64) -> Result<Duration> {
    let t = Instant::now();
    for r in replicas {
        loop {
            let got = r
                .admin
                .clone()
                .get(GetRequest::default())
                .await
                .map_err(|s| format!("get: {}", s.message()))?
                .into_inner()
                .revision;
            if got >= revision {
                break;
            }
            if t.elapsed() > CONVERGE {
                return Err(format!(
                    "control plane {} still serves revision {got} of {revision} after {} s",
                    r.control.addr,
                    CONVERGE.as_secs()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(t.elapsed())
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
    let replicas = args
        .data_dirs
        .iter()
        .zip(&args.control_pids)
        .map(|(d, &pid)| replica(d, pid))
        .collect::<Result<Vec<_>>>()?;
    let r_count = replicas.len();
    let on = |i: usize| i % r_count;
    let td = replicas[0].control.bundle.trust_domain().to_string();
    eprintln!(
        "scale: store {}, {r_count} control plane(s) {}, {n} proxies, {} applies",
        args.store,
        replicas
            .iter()
            .map(|r| format!("{} (pid {})", r.control.addr, r.pid))
            .collect::<Vec<_>>()
            .join(", "),
        args.applies
    );

    // 1. Declarations (one Workload per proxy) and the baseline policy, on the first.
    let t = Instant::now();
    let yaml = declarations_yaml(n, args.extra_declarations, &td);
    let base = retry("apply declarations", &replicas[0].admin, |mut c| {
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
    let seen_everywhere = converge(&replicas, base.revision).await?;
    eprintln!(
        "scale: declared {} workloads at revision {} in {:.0} ms; every control plane served it {:.0} ms later",
        n + args.extra_declarations,
        base.revision,
        ms(declare_time),
        ms(seen_everywhere)
    );

    // 2. One join token per proxy, made on the replica it joins.
    let admins: Vec<_> = replicas.iter().map(|r| r.admin.clone()).collect();
    let (token_time, mut tokens, errors) = each(n, 16, |i| {
        let admin = admins[on(i)].clone();
        let spiffe_id = format!("spiffe://{td}/ns/{NAMESPACE}/sa/{}", workload_name(i));
        async move {
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
            Ok((i, r.into_inner().token))
        }
    })
    .await;
    if let Some(e) = errors.first() {
        return Err(format!("cannot create the join tokens: {e}").into());
    }
    tokens.sort();
    eprintln!("scale: created {n} tokens in {:.0} ms", ms(token_time));

    // 3. Memory before any proxy connects.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = |r: &Replica| proc_status_kb(r.pid, "VmRSS");
    let rss_before = replicas.iter().map(rss).collect::<Result<Vec<_>>>()?;
    let file_size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let stores_size = || {
        replicas
            .iter()
            .map(|r| file_size(&r.data_dir.join("state.redb")))
            .sum::<u64>()
    };
    let store_empty = stores_size();

    // 4. Join (keys and CSRs made first), then watch and the first ACK, `join_concurrency`
    //    at a time.
    let unjoined = (0..n).map(Unjoined::new).collect::<Result<Vec<_>>>()?;
    let slots: Vec<_> = unjoined
        .into_iter()
        .zip(tokens)
        .map(|(u, (_, token))| std::sync::Mutex::new(Some((u, token))))
        .collect();
    let controls: Vec<_> = replicas.iter().map(|r| r.control.clone()).collect();
    let (join_time, mut joined, join_errors) = each(n, args.join_concurrency, |i| {
        let taken = slots[i].lock().ok().and_then(|mut s| s.take());
        let control = controls[on(i)].clone();
        async move {
            let (u, token) = taken.ok_or("no key")?;
            u.join(token, &control).await
        }
    })
    .await;
    report_errors("join", &join_errors);
    joined.sort_by_key(|j| j.i);
    let joined: Vec<_> = joined
        .into_iter()
        .map(|j| std::sync::Mutex::new(Some(j)))
        .collect();
    let tracker = Arc::new(Tracker::default());
    let (watch_time, mut watching, watch_errors) = each(joined.len(), args.join_concurrency, |k| {
        let taken = joined[k].lock().ok().and_then(|mut s| s.take());
        let (controls, tracker) = (controls.clone(), tracker.clone());
        async move {
            let j = taken.ok_or("not joined")?;
            let i = j.i;
            let channel = j.watch(&controls[i % controls.len()], tracker).await?;
            Ok((i, channel))
        }
    })
    .await;
    report_errors("watch", &watch_errors);
    watching.sort_by_key(|(i, _)| *i);
    let connected = watching.len();
    let failed_to_connect = join_errors.len() + watch_errors.len();
    eprintln!(
        "scale: {} proxies joined in {:.1} s, {connected} of them watched and ACKed their first configuration in {:.1} s",
        n - join_errors.len(),
        join_time.as_secs_f64(),
        watch_time.as_secs_f64()
    );
    if connected == 0 {
        return Err("no proxy connected".into());
    }
    let per_replica = |r: usize| watching.iter().filter(|(i, _)| on(*i) == r).count();

    // 5. Memory with every proxy connected and idle.
    tokio::time::sleep(SETTLE).await;
    let rss_connected = replicas.iter().map(rss).collect::<Result<Vec<_>>>()?;
    let store_before = stores_size();
    let kb_per_proxy: Vec<f64> = (0..r_count)
        .map(|r| (rss_connected[r] as f64 - rss_before[r] as f64) / per_replica(r).max(1) as f64)
        .collect();

    // 6. Changes that concern every proxy, made on the replicas in turn.
    let mut to_first = Vec::new();
    let mut to_all_received = Vec::new();
    let mut to_all_acked = Vec::new();
    let mut apply_rpc = Vec::new();
    let mut last_revision = base.revision;
    let mut failures = 0;
    let pids: Vec<String> = replicas.iter().map(|r| r.pid.to_string()).collect();
    let control_cpu_now = || -> Result<Duration> { pids.iter().map(|p| proc_cpu(p)).sum() };
    let cpu_start = (control_cpu_now()?, proc_cpu("self")?);
    for step in 1..=args.applies {
        let yaml = change_yaml(step, &td);
        let target = on(step - 1);
        let t0 = Instant::now();
        let r = replicas[target]
            .admin
            .clone()
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
                    "scale: apply {step:>2} on {target} -> revision {}: first {:.1} ms, all received {:.1} ms, all ACKed {:.1} ms (Apply RPC {:.1} ms)",
                    r.revision,
                    ms(since(seen.first_received)),
                    ms(since(seen.last_received)),
                    ms(since(seen.last_acked)),
                    ms(rpc),
                );
            }
            None => {
                failures += 1;
                let seen = tracker.get(r.revision);
                eprintln!(
                    "scale: apply {step} on {target} -> revision {}: only {}/{connected} ACKs after {} s",
                    r.revision,
                    seen.acked,
                    ACK_TIMEOUT.as_secs()
                );
            }
        }
        tokio::time::sleep(args.pause).await;
    }
    let cpu_end = (control_cpu_now()?, proc_cpu("self")?);
    let per_apply = |a: Duration, b: Duration| ms(a.saturating_sub(b)) / args.applies as f64;
    let control_cpu = per_apply(cpu_end.0, cpu_start.0);
    let bench_cpu = per_apply(cpu_end.1, cpu_start.1);
    let rss_after = replicas.iter().map(rss).collect::<Result<Vec<_>>>()?;
    let store_after = stores_size();
    let hwm = replicas
        .iter()
        .map(|r| proc_status_kb(r.pid, "VmHWM"))
        .collect::<Result<Vec<_>>>()?;

    // 7. Renewal of every connected proxy's SVID over its own connection (CSRs made first).
    let csrs = (0..connected)
        .map(|_| proxy::renewal_csr())
        .collect::<Result<Vec<_>>>()?;
    let renewals: Vec<_> = watching
        .iter()
        .zip(csrs)
        .map(|((i, channel), csr)| std::sync::Mutex::new(Some((*i, channel.clone(), csr))))
        .collect();
    let (renew_time, _, renew_errors) = each(connected, args.join_concurrency, |k| {
        let taken = renewals[k].lock().ok().and_then(|mut s| s.take());
        async move {
            let (i, channel, csr) = taken.ok_or("taken")?;
            proxy::renew(i, channel, csr).await
        }
    })
    .await;
    report_errors("renew", &renew_errors);

    // 8. The control planes' own view (the other replicas' lists reach etcd every 0.5 s).
    let t = Instant::now();
    let (listed, up_to_date) = loop {
        let proxies = replicas[0]
            .admin
            .clone()
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
        if up_to_date == n || t.elapsed() > CONVERGE {
            break (ours.len(), up_to_date);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // 9. What one push costs a control plane, done here the way it does it: the distribution
    //    index and the wire encoding once per revision, then one cut per proxy.
    let snapshot = replicas[0]
        .admin
        .clone()
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

    // 10. Report.
    let applied = to_all_acked.len();
    println!();
    println!(
        "Bulkhead control-plane scale benchmark, store {}: {connected}/{n} proxies over {r_count} control plane(s), {applies} applies ({applied} fully ACKed)",
        args.store,
        applies = args.applies
    );
    let rate = |count: usize, d: Duration| count as f64 / d.as_secs_f64();
    println!(
        "  join: {} Join RPCs in {:.1} s = {:.0}/s; watch + first ACK: {connected} in {:.1} s = {:.0}/s (concurrency {}); tokens {:.1} s; declarations {:.0} ms",
        n - join_errors.len(),
        join_time.as_secs_f64(),
        rate(n - join_errors.len(), join_time),
        watch_time.as_secs_f64(),
        rate(connected, watch_time),
        args.join_concurrency,
        token_time.as_secs_f64(),
        ms(declare_time)
    );
    println!(
        "  renew: {} Renew RPCs in {:.1} s = {:.0}/s (concurrency {})",
        connected - renew_errors.len(),
        renew_time.as_secs_f64(),
        rate(connected - renew_errors.len(), renew_time),
        args.join_concurrency
    );
    figure("control planes", r_count.to_string());
    figure("proxies connected", connected.to_string());
    figure(
        "Join RPCs per second",
        format!("{:.0}", rate(n - join_errors.len(), join_time)),
    );
    figure(
        "Renew RPCs per second",
        format!("{:.0}", rate(connected - renew_errors.len(), renew_time)),
    );
    figure(
        "watch + first ACK per second",
        format!("{:.0}", rate(connected, watch_time)),
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
        let rpc = dist(&apply_rpc);
        row("Apply RPC alone", &rpc);
        figure("apply -> all ACKed p50 (ms)", format!("{:.1}", ms(all.p50)));
        figure("apply -> all ACKed p90 (ms)", format!("{:.1}", ms(all.p90)));
        figure("apply -> all ACKed p99 (ms)", format!("{:.1}", ms(all.p99)));
        figure(
            "apply -> first received p50 (ms)",
            format!("{:.1}", ms(dist(&to_first).p50)),
        );
        figure("Apply RPC p50 (ms)", format!("{:.1}", ms(rpc.p50)));
        println!(
            "  CPU per apply (mean over the apply phase): control plane(s) {control_cpu:.0} ms, simulated proxies {bench_cpu:.0} ms"
        );
        figure(
            "control-plane CPU per apply (ms)",
            format!("{control_cpu:.0}"),
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
    for r in 0..r_count {
        println!(
            "  control plane {r} ({} proxies): RSS {:.1} MB before proxies, {:.1} MB connected and idle = {:.1} KB per proxy, {:.1} MB after the applies (peak {:.1} MB); {:+.0} KB per apply",
            per_replica(r),
            rss_before[r] as f64 / 1024.0,
            rss_connected[r] as f64 / 1024.0,
            kb_per_proxy[r],
            rss_after[r] as f64 / 1024.0,
            hwm[r] as f64 / 1024.0,
            (rss_after[r] as f64 - rss_connected[r] as f64) / args.applies as f64,
        );
    }
    let worst_kb = kb_per_proxy.iter().copied().fold(f64::MIN, f64::max);
    figure(
        "memory per proxy, worst replica (KB)",
        format!("{worst_kb:.1}"),
    );
    println!(
        "  state.redb (all data dirs) during the joins: {:.1} MB -> {:.1} MB; during the applies -> {:.1} MB ({:+.0} KB per apply)",
        store_empty as f64 / 1048576.0,
        store_before as f64 / 1048576.0,
        store_after as f64 / 1048576.0,
        (store_after as f64 - store_before as f64) / 1024.0 / args.applies as f64
    );
    let mem_ok = worst_kb < TARGET_KB_PER_PROXY;
    println!(
        "  target memory < {TARGET_KB_PER_PROXY:.0} KB per connected proxy (each control plane): {} ({worst_kb:.1} KB at most)",
        verdict(mem_ok)
    );
    println!(
        "  ListProxies on control plane 0: {listed} proxies in namespace {NAMESPACE}, {up_to_date} connected with acked_revision == {last_revision}: {}",
        if up_to_date == n { "OK" } else { "MISMATCH" }
    );
    println!(
        "  stream errors {}, ACK errors {}, join/watch errors {failed_to_connect}, renew errors {}",
        tracker.stream_errors.load(Ordering::Relaxed),
        tracker.ack_errors.load(Ordering::Relaxed),
        renew_errors.len()
    );
    println!(
        "  one push, as config_for builds it, for {connected} proxies: {:.0} ms on one core here, {per_proxy_resources} resources and {:.0} KB per proxy, {:.1} MB in all",
        ms(cut_time),
        bytes as f64 / connected as f64 / 1024.0,
        bytes as f64 / 1024.0 / 1024.0
    );
    let ok =
        p99_ok && mem_ok && up_to_date == n && failed_to_connect == 0 && renew_errors.is_empty();
    println!("  result: {}", if ok { "PASS" } else { "FAIL" });
    if !ok {
        std::process::exit(3);
    }
    Ok(())
}
