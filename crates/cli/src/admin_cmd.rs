//! The admin verbs: they talk to the control plane with the admin credential and print for a
//! person (table) or a program (json, yaml).

use crate::client;
use anyhow::{Context, Result, bail};
use bulkhead_api::v1::admin_client::AdminClient;
use bulkhead_api::v1::{
    ApplyFile, ApplyRequest, ApplyResponse, AwaitRevisionRequest, DeleteRequest, GetRequest,
    HistoryRequest, ListProxiesRequest, ProxyProgress, RollbackRequest,
};
use bulkhead_policy::model::Resource;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

type Admin = AdminClient<Channel>;

/// A request carrying the operator's login name for the audit log.
pub fn request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default();
    if let Ok(v) = user.parse() {
        req.metadata_mut().insert("x-bulkhead-user", v);
    }
    req
}

/// The control plane's answer to a change (apply, delete, rollback): prints what it changed
/// and its revision (for a dry run, what it would change) and, with `--wait`, waits until it
/// is in force.
async fn changed(
    admin: &mut Admin,
    answer: Result<tonic::Response<ApplyResponse>, tonic::Status>,
    wait: Option<Duration>,
) -> Result<()> {
    let resp = answer.map_err(client::status)?.into_inner();
    if resp.dry_run {
        for line in &resp.applied {
            println!("{line} (dry run)");
        }
        println!(
            "revision {} (dry run: nothing was changed; {} workload(s) would get a new configuration)",
            resp.revision,
            resp.affected_workloads.len()
        );
        return Ok(());
    }
    for line in &resp.applied {
        println!("{line}");
    }
    println!("revision {}", resp.revision);
    wait_if_asked(admin, &resp, wait).await
}

/// How a change is made: against which revision, and whether to wait until it is in force.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChangeOptions {
    /// Refuse unless the set is at this revision (`--expect-revision`).
    pub expect_revision: Option<u64>,
    /// Wait this long at most for every affected proxy to acknowledge (`--wait`).
    pub wait: Option<Duration>,
}

/// Reads what `apply -f` names: files, `-` (standard input), and directories (their
/// `.yaml`, `.yml` and `.json` files in name order; with `recursive`, their subdirectories'
/// too). Said here, before anything crosses the wire, when it is over the bound.
pub fn read_apply_files(paths: &[PathBuf], recursive: bool) -> Result<Vec<ApplyFile>> {
    fn walk(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                if recursive {
                    walk(&path, recursive, out)?;
                }
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
            {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut yaml = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut yaml)
                .context("cannot read standard input")?;
            files.push(ApplyFile {
                file: "<stdin>".into(),
                yaml,
            });
        } else if path.is_dir() {
            let mut found = Vec::new();
            walk(path, recursive, &mut found)?;
            if found.is_empty() {
                bail!(
                    "{} holds no .yaml, .yml or .json file{}",
                    path.display(),
                    if recursive {
                        ""
                    } else {
                        " (-R looks in its subdirectories)"
                    }
                );
            }
            for f in found {
                let yaml = std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                files.push(ApplyFile {
                    file: f.display().to_string(),
                    yaml,
                });
            }
        } else {
            let name = path.display().to_string();
            let yaml =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {name}"))?;
            files.push(ApplyFile { file: name, yaml });
        }
    }
    let total: usize = files.iter().map(|f| f.yaml.len()).sum();
    if total > bulkhead_control::MAX_APPLY_BYTES {
        let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
        let name = match files.as_slice() {
            [one] => one.file.clone(),
            many => format!("{} files", many.len()),
        };
        bail!(
            "{name} is {:.1} MiB; one apply may carry at most {:.1} MiB: split it into several files and apply each",
            mib(total as f64),
            mib(bulkhead_control::MAX_APPLY_BYTES as f64)
        );
    }
    Ok(files)
}

/// `apply -f …`: every file in one revision; with `dry_run`, checked by the control plane
/// and nothing committed.
pub async fn apply(
    admin: &mut Admin,
    files: Vec<ApplyFile>,
    dry_run: bool,
    opts: ChangeOptions,
) -> Result<()> {
    let answer = admin
        .apply(request(ApplyRequest {
            files,
            dry_run,
            expect_revision: opts.expect_revision,
            ..Default::default()
        }))
        .await;
    changed(admin, answer, opts.wait).await
}

/// With `--wait`: waits until every connected proxy of the workloads the change affected has
/// put its revision in force, printing progress on stderr; an error names each proxy that
/// refused it (with its reason) or did not answer in time.
pub(crate) async fn wait_if_asked(
    admin: &mut Admin,
    resp: &ApplyResponse,
    wait: Option<Duration>,
) -> Result<()> {
    let Some(timeout) = wait else {
        return Ok(());
    };
    let workloads = &resp.affected_workloads;
    if workloads.is_empty() {
        eprintln!("no workload's configuration changed; nothing to wait for");
        return Ok(());
    }
    let revision = resp.revision;
    eprintln!(
        "waiting up to {}s for the proxies of {} to put revision {revision} in force",
        timeout.as_secs(),
        workloads.join(", ")
    );
    let mut stream = admin
        .await_revision(request(AwaitRevisionRequest {
            revision,
            workloads: workloads.clone(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }))
        .await
        .map_err(client::status)?
        .into_inner();
    let mut last = Vec::new();
    // The server ends the wait at the timeout; a little more here covers the answer's trip.
    let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(5);
    loop {
        let next = tokio::time::timeout_at(deadline, stream.message()).await;
        let msg = match next {
            Ok(msg) => msg.map_err(client::status)?,
            Err(_) => None,
        };
        let Some(msg) = msg else { break };
        eprintln!("  {}", progress_line(&msg.proxies));
        last = msg.proxies;
        if msg.done {
            break;
        }
    }
    let laggards: Vec<String> = last
        .iter()
        .filter(|p| p.state != "acked")
        .map(|p| {
            let mut who = format!("{} ({}/{})", p.spiffe_id, p.namespace, p.workload);
            if !p.replica.is_empty() {
                who.push_str(&format!(" on replica {}", p.replica));
            }
            match p.state.as_str() {
                "nacked" => format!("  {who} refused revision {}: {}", p.revision, p.error),
                "disconnected" => format!("  {who} disconnected before it answered"),
                _ => format!("  {who} did not answer within {}s", timeout.as_secs()),
            }
        })
        .collect();
    if last.is_empty() {
        eprintln!(
            "no proxy of {} is connected; nothing to wait for",
            workloads.join(", ")
        );
        return Ok(());
    }
    if !laggards.is_empty() {
        bail!(
            "revision {revision} is not in force at {} of {} proxies:
{}",
            laggards.len(),
            last.len(),
            laggards.join("\n")
        );
    }
    // With replicas on etcd, the replicas those proxies are on.
    let replicas: std::collections::BTreeSet<&str> = last
        .iter()
        .map(|p| p.replica.as_str())
        .filter(|r| !r.is_empty())
        .collect();
    let on = match replicas.len() {
        0 => String::new(),
        1 => format!(" (on replica {})", join(&replicas)),
        _ => format!(" (on replicas {})", join(&replicas)),
    };
    eprintln!(
        "revision {revision} is in force at all {} proxies{on}",
        last.len()
    );
    Ok(())
}

fn join(names: &std::collections::BTreeSet<&str>) -> String {
    names.iter().copied().collect::<Vec<_>>().join(", ")
}

/// `2 acknowledged, 1 refused, 1 pending` of the proxies waited for.
fn progress_line(proxies: &[ProxyProgress]) -> String {
    let count = |state: &str| proxies.iter().filter(|p| p.state == state).count();
    let mut parts = vec![format!(
        "{} of {} acknowledged",
        count("acked"),
        proxies.len()
    )];
    for (state, word) in [
        ("nacked", "refused"),
        ("disconnected", "disconnected"),
        ("pending", "pending"),
    ] {
        let n = count(state);
        if n > 0 {
            parts.push(format!("{n} {word}"));
        }
    }
    parts.join(", ")
}

/// Deletes the resources a file names, or `Kind/namespace/name` keys.
pub async fn delete(
    admin: &mut Admin,
    file: Option<&Path>,
    keys: Vec<String>,
    opts: ChangeOptions,
) -> Result<()> {
    let mut keys = keys;
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let resources = bulkhead_policy::parse_documents(&file.display().to_string(), &text)?;
        keys.extend(resources.iter().map(|r| r.key()));
    }
    if keys.is_empty() {
        bail!("nothing to delete: pass -f FILE or Kind/namespace/name keys");
    }
    let answer = admin
        .delete(request(DeleteRequest {
            keys,
            expect_revision: opts.expect_revision,
        }))
        .await;
    changed(admin, answer, opts.wait).await
}

/// What `get` selects: a kind, optionally one name, optionally one namespace.
#[derive(Debug, Default)]
pub struct Selection<'a> {
    pub name: Option<&'a str>,
    pub namespace: Option<&'a str>,
}

impl Selection<'_> {
    /// Whether a resource (or proxy) in `namespace` named `name` is selected. A NAME may be
    /// `namespace/name`.
    fn admits(&self, namespace: &str, name: &str) -> bool {
        if self.namespace.is_some_and(|n| n != namespace) {
            return false;
        }
        match self.name {
            None => true,
            Some(wanted) => match wanted.split_once('/') {
                Some((ns, n)) => ns == namespace && n == name,
                None => wanted == name,
            },
        }
    }
}

/// The kind a `get` word names (`""`: every kind), kubectl-style: plural, singular or the
/// Kind itself, in any case.
fn kind_of(what: &str) -> Option<&'static str> {
    Some(match what {
        "all" => "",
        "policies" | "policy" | "authorizationpolicies" | "authorizationpolicy" => {
            "AuthorizationPolicy"
        }
        "workloads" | "workload" => "Workload",
        "services" | "service" => "Service",
        "postures" | "posture" | "defaultpostures" | "defaultposture" => "DefaultPosture",
        _ => return None,
    })
}

/// `get KIND [NAME]` (also `get KIND/NAME`): all, policies, workloads, services, postures, or
/// proxies; `-n` keeps one namespace. A NAME that matches nothing is an error, as kubectl's.
pub async fn get(
    admin: &mut Admin,
    what: &str,
    select: &Selection<'_>,
    output: &str,
) -> Result<()> {
    if matches!(what, "proxies" | "proxy") {
        return get_proxies(admin, select, output).await;
    }
    if matches!(what, "replicas" | "replica") {
        return get_replicas(admin, output).await;
    }
    let Some(kind) = kind_of(what) else {
        bail!(
            "unknown resource type {what:?}; use all, policies, workloads, services, postures, proxies or revocations"
        );
    };
    let (mut resources, revision) = applied(admin, kind).await?;
    resources.retain(|r| {
        let n = r.name();
        select.admits(&n.namespace, &n.name)
    });
    if let Some(name) = select.name
        && resources.is_empty()
    {
        bail!(
            "{} {name:?} not found{} (revision {revision}); `bulkhead get {what}` lists them",
            if kind.is_empty() { "resource" } else { kind },
            select
                .namespace
                .map(|n| format!(" in namespace {n}"))
                .unwrap_or_default()
        );
    }
    match output {
        "json" => println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "revision": revision, "items": resources })
            )?
        ),
        "yaml" => {
            for r in &resources {
                print!("---\n{}", r.to_yaml().map_err(|e| anyhow::anyhow!(e))?);
            }
        }
        "name" => {
            for r in &resources {
                println!("{}", r.key());
            }
        }
        _ => {
            let rows: Vec<[String; 4]> = resources
                .iter()
                .map(|r| {
                    let name = r.name();
                    [r.kind().to_string(), name.namespace, name.name, r.summary()]
                })
                .collect();
            print!(
                "{}",
                crate::table::render(&["KIND", "NAMESPACE", "NAME", "SUMMARY"], &rows)
            );
            println!("revision {revision}");
        }
    }
    Ok(())
}

/// The applied resources of `kind` (`""` for every kind) and the revision they are at.
pub(crate) async fn applied(admin: &mut Admin, kind: &str) -> Result<(Vec<Resource>, u64)> {
    let resp = admin
        .get(request(GetRequest { kind: kind.into() }))
        .await
        .map_err(client::status)?
        .into_inner();
    let resources = resp
        .resources
        .iter()
        .map(bulkhead_api::resource_from_wire)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| {
            format!(
                "the control plane sent revision {} in a form this bulkhead cannot read; is it older than the control plane?",
                resp.revision
            )
        })?;
    Ok((resources, resp.revision))
}

pub(crate) fn ago(unix: u64) -> String {
    let now = crate::unix_now();
    match unix {
        0 => "-".into(),
        t if t > now => format!("in {}", human(t - now)),
        t => format!("{} ago", human(now - t)),
    }
}

fn human(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// `get replicas`: the control-plane replicas, which one leads, and whether each is
/// healthy (docs/replicas.md).
async fn get_replicas(admin: &mut Admin, output: &str) -> Result<()> {
    let resp = admin
        .list_replicas(request(bulkhead_api::v1::ListReplicasRequest {}))
        .await
        .map_err(client::status)?
        .into_inner();
    if output == "name" {
        for r in &resp.replicas {
            println!("replica/{}", r.id);
        }
        return Ok(());
    }
    if output != "table" && output != "wide" {
        let rows: Vec<serde_json::Value> = resp
            .replicas
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id, "address": r.address, "version": r.version,
                    "started": crate::jsonstyle::time(r.started_unix),
                    "lastSeen": crate::jsonstyle::time(r.seen_unix),
                    "leader": r.leader, "healthy": r.healthy, "proxies": r.proxies,
                    "answering": r.answering,
                })
            })
            .collect();
        let doc = serde_json::json!({"store": resp.store, "replicas": rows});
        match output {
            "yaml" => print!("{}", serde_saphyr::to_string(&doc)?),
            _ => println!("{}", serde_json::to_string_pretty(&doc)?),
        }
        return Ok(());
    }
    let rows: Vec<[String; 7]> = resp
        .replicas
        .iter()
        .map(|r| {
            [
                match r.answering {
                    true => format!("{} (this)", r.id),
                    false => r.id.clone(),
                },
                r.address.clone(),
                if r.leader { "leader" } else { "-" }.to_string(),
                if r.healthy { "healthy" } else { "UNHEALTHY" }.to_string(),
                r.proxies.to_string(),
                ago(r.started_unix),
                ago(r.seen_unix),
            ]
        })
        .collect();
    print!(
        "{}",
        crate::table::render(
            &[
                "REPLICA",
                "ADDRESS",
                "ROLE",
                "HEALTH",
                "PROXIES",
                "STARTED",
                "LAST SEEN"
            ],
            &rows
        )
    );
    println!("store: {}", resp.store);
    Ok(())
}

async fn get_proxies(admin: &mut Admin, select: &Selection<'_>, output: &str) -> Result<()> {
    let mut resp = admin
        .list_proxies(request(ListProxiesRequest {}))
        .await
        .map_err(client::status)?
        .into_inner();
    resp.proxies
        .retain(|p| select.admits(&p.namespace, &p.workload));
    if output == "name" {
        for p in &resp.proxies {
            println!("proxy/{}/{}", p.namespace, p.workload);
        }
        return Ok(());
    }
    if output != "table" && output != "wide" {
        let rows: Vec<serde_json::Value> = resp
            .proxies
            .iter()
            .map(|p| {
                serde_json::json!({
                    "spiffeId": p.spiffe_id, "namespace": p.namespace, "workload": p.workload,
                    "connected": p.connected, "sentRevision": p.sent_revision,
                    "ackedRevision": p.acked_revision, "nackedRevision": p.nacked_revision,
                    "nackError": p.nack_error, "lastContact": crate::jsonstyle::time(p.last_contact_unix),
                    "certNotAfter": crate::jsonstyle::time(p.cert_not_after_unix), "remote": p.remote,
                    "certCaSha256": p.cert_ca_sha256, "bundleSha256": p.bundle_sha256,
                    "bundleCurrent": p.bundle_current, "instance": p.instance,
                    "revoked": p.revoked, "replica": p.replica,
                })
            })
            .collect();
        match output {
            "yaml" => print!("{}", serde_saphyr::to_string(&rows)?),
            _ => println!("{}", serde_json::to_string_pretty(&rows)?),
        }
        return Ok(());
    }
    let wide = output == "wide";
    let replicas = resp.proxies.iter().any(|p| !p.replica.is_empty());
    if replicas {
        print!("{:<9} ", "REPLICA");
    }
    if wide {
        print!("{:<13} ", "INSTANCE");
    }
    println!(
        "{:<46} {:<22} {:<10} {:<22} {:<12} {:<13} {:<17} BUNDLE",
        "IDENTITY", "WORKLOAD", "STREAM", "REVISION", "LAST SEEN", "CERT EXPIRES", "CERT CA"
    );
    for p in &resp.proxies {
        if replicas {
            print!("{:<9} ", p.replica);
        }
        if wide {
            print!(
                "{:<13} ",
                if p.instance.is_empty() {
                    "-"
                } else {
                    &p.instance
                }
            );
        }
        let state = match (p.nacked_revision, p.acked_revision == p.sent_revision) {
            (0, true) => format!("{} ACK", p.acked_revision),
            (0, false) => format!("{} sent, {} ACK", p.sent_revision, p.acked_revision),
            (n, _) => format!("{n} NACK, {} ACK", p.acked_revision),
        };
        let bundle = match (p.bundle_sha256.len(), p.bundle_current) {
            (0, _) => "-".to_string(),
            (n, true) => format!("current ({n} roots)"),
            (n, false) => format!("STALE ({n} roots)"),
        };
        println!(
            "{:<46} {:<22} {:<10} {:<22} {:<12} {:<13} {:<17} {}",
            p.spiffe_id,
            format!("{}/{}", p.namespace, p.workload),
            if p.connected { "open" } else { "closed" },
            state,
            ago(p.last_contact_unix),
            ago(p.cert_not_after_unix),
            p.cert_ca_sha256.get(..16).unwrap_or("-"),
            bundle,
        );
        if p.nacked_revision != 0 {
            println!("  NACK of revision {}: {}", p.nacked_revision, p.nack_error);
        }
        if !p.revoked.is_empty() {
            println!("  REVOKED: {}", p.revoked);
        }
    }
    Ok(())
}

pub async fn history(admin: &mut Admin, limit: u32, output: &str) -> Result<()> {
    let resp = admin
        .history(request(HistoryRequest { limit }))
        .await
        .map_err(client::status)?
        .into_inner();
    if output == "json" {
        let revisions: Vec<serde_json::Value> = resp
            .revisions
            .iter()
            .map(|r| serde_json::json!({"revision": r.revision, "time": crate::jsonstyle::time(r.time_unix), "actor": r.actor, "action": r.action, "changes": r.changes}))
            .collect();
        let audit: Vec<serde_json::Value> = resp
            .audit
            .iter()
            .map(|e| serde_json::json!({"seq": e.seq, "time": crate::jsonstyle::time(e.time_unix), "actor": e.actor, "action": e.action, "detail": e.detail}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"revisions": revisions, "credentials": audit})
            )?
        );
        return Ok(());
    }
    println!("{:<9} {:<10} {:<30} ACTOR", "REVISION", "WHEN", "ACTION");
    for r in &resp.revisions {
        println!(
            "{:<9} {:<10} {:<30} {}",
            r.revision,
            ago(r.time_unix),
            r.action,
            r.actor
        );
        for c in &r.changes {
            println!("          {c}");
        }
    }
    if !resp.audit.is_empty() {
        println!();
        println!(
            "{:<9} {:<10} {:<30} ACTOR",
            "CHANGE", "WHEN", "CREDENTIALS AND CAS"
        );
        for e in &resp.audit {
            println!(
                "{:<9} {:<10} {:<30} {}",
                e.seq,
                ago(e.time_unix),
                e.action,
                e.actor
            );
            for d in &e.detail {
                println!("          {d}");
            }
        }
    }
    Ok(())
}

pub async fn rollback(admin: &mut Admin, revision: u64, opts: ChangeOptions) -> Result<()> {
    let answer = admin
        .rollback(request(RollbackRequest {
            revision,
            expect_revision: opts.expect_revision,
        }))
        .await;
    changed(admin, answer, opts.wait).await
}

/// `bulkhead version`: this CLI's, the control plane's and every proxy's version.
pub async fn version(admin: &mut Admin, output: &str) -> Result<()> {
    let resp = admin
        .version(request(bulkhead_api::v1::VersionRequest {}))
        .await
        .map_err(client::status)?
        .into_inner();
    if output == "json" {
        let proxies: Vec<serde_json::Value> = resp
            .proxies
            .iter()
            .map(|p| {
                serde_json::json!({
                    "spiffeId": p.spiffe_id, "namespace": p.namespace, "workload": p.workload,
                    "connected": p.connected, "version": p.version,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "client": crate::VERSION,
                "controlPlane": resp.control_version,
                "proxies": proxies,
            }))?
        );
        return Ok(());
    }
    println!("client         {}", crate::VERSION);
    println!("control plane  {}", resp.control_version);
    let mut versions: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for p in resp.proxies.iter().filter(|p| p.connected) {
        *versions
            .entry(if p.version.is_empty() {
                "unknown"
            } else {
                &p.version
            })
            .or_default() += 1;
    }
    let summary: Vec<String> = versions
        .iter()
        .map(|(v, n)| format!("{n} at {v}"))
        .collect();
    println!(
        "proxies        {}",
        if summary.is_empty() {
            "none connected".to_string()
        } else {
            summary.join(", ")
        }
    );
    if !resp.proxies.is_empty() {
        println!();
        println!(
            "{:<46} {:<22} {:<8} VERSION",
            "IDENTITY", "WORKLOAD", "STREAM"
        );
        for p in &resp.proxies {
            println!(
                "{:<46} {:<22} {:<8} {}",
                p.spiffe_id,
                format!("{}/{}", p.namespace, p.workload),
                if p.connected { "open" } else { "closed" },
                if p.version.is_empty() {
                    "unknown"
                } else {
                    &p.version
                }
            );
        }
    }
    Ok(())
}
