//! `bulkhead reach`: who can reach a workload, or what an attacker who controls it could reach
//! hop by hop, computed from policy alone (`docs/reach.md`). The set is the one the control
//! plane enforces, or policy files given with `-f`; either way nothing is changed.
//!
//! The analysis is `bulkhead_policy::reach`; this module only chooses the set and the
//! assumptions, and prints the answer for a person (table) or a program (json). It must never
//! print less than the analysis found: every edge, every grant, every workload reached.

use crate::{admin_cmd, client, policy_cmd};
use anyhow::{Context, Result, anyhow, bail};
use bulkhead_policy::model::{Resource, WorkloadRef};
use bulkhead_policy::{
    BlastRadius, EdgeView, PolicySet, PolicyView, ReachError, ReachOptions, SourceEgress,
};
use serde::Serialize;
use std::io::{Write, stderr, stdout};
use std::path::{Path, PathBuf};

/// How many declared workloads an unknown-workload error lists.
const LISTED: usize = 8;

/// The flags, as clap reads them.
#[derive(clap::Args, Debug)]
pub struct ReachArgs {
    /// The workload, as namespace/name (e.g. shop/payments).
    workload: String,
    /// Instead of who can reach WORKLOAD: everything it could reach, transitively, if it
    /// were compromised.
    #[arg(long)]
    blast_radius: bool,
    /// Policy files or directories of .yaml to analyse instead of the policy applied to the
    /// control plane (repeatable). The files must make a complete set, as for `policy lint`.
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    /// Treat audit-mode policies and DefaultPostures as if they were enforced.
    #[arg(long)]
    staged: bool,
    /// Assume the attacker holds the source's key and certificate and uses them outside its
    /// sidecar: egress policy is not enforced and requests may come from any address.
    #[arg(long)]
    stolen_key: bool,
    /// Answer from the traffic the sidecars reported instead of from policy: who actually
    /// reached WORKLOAD, or (with --blast-radius) what it actually reached, hop by hop,
    /// through requests that got through.
    #[arg(long, conflicts_with_all = ["files", "staged", "stolen_key"])]
    observed: bool,
    /// With --observed: only traffic seen within this long (e.g. 1h, 7d); default: all kept.
    #[arg(long, requires = "observed", value_parser = crate::parse_duration)]
    since: Option<std::time::Duration>,
    /// Output format: table for a person, json for a program.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// The question, resolved from the flags.
struct Query {
    workload: WorkloadRef,
    question: Question,
    options: ReachOptions,
    files: Vec<PathBuf>,
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Question {
    WhoCanReach,
    BlastRadius,
}

impl TryFrom<ReachArgs> for Query {
    type Error = anyhow::Error;

    fn try_from(a: ReachArgs) -> Result<Query> {
        Ok(Query {
            workload: parse_workload(&a.workload)?,
            question: match a.blast_radius {
                true => Question::BlastRadius,
                false => Question::WhoCanReach,
            },
            options: ReachOptions {
                view: match a.staged {
                    true => PolicyView::Staged,
                    false => PolicyView::Enforced,
                },
                egress: match a.stolen_key {
                    true => SourceEgress::Bypassed,
                    false => SourceEgress::Enforced,
                },
            },
            files: a.files,
            output: a.output,
        })
    }
}

fn parse_workload(s: &str) -> Result<WorkloadRef> {
    bulkhead_policy::model::parse_workload(s).map_err(anyhow::Error::msg)
}

pub async fn run(context: &Path, args: ReachArgs) -> Result<()> {
    if args.observed {
        return observed(context, args).await;
    }
    from_policy(context, args, &mut stdout(), &mut stderr()).await
}

/// The answer from policy (the applied set, or `-f` files), written to `out`; the errors of
/// files that do not compile to `err`.
async fn from_policy(
    context: &Path,
    args: ReachArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<()> {
    let query = Query::try_from(args)?;
    let loaded = match query.files.is_empty() {
        true => load_applied(context).await?,
        false => load_files(&query.files, err)?,
    };
    let report = answer(&query, &loaded)?;
    match query.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
        Output::Table => write!(out, "{}", render_table(&report))?,
    }
    Ok(())
}

/// A compiled set, its declared workloads (sorted) and where it came from.
struct Loaded {
    set: PolicySet,
    workloads: Vec<WorkloadRef>,
    source: SetSource,
}

#[derive(Clone, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
enum SetSource {
    /// The set the control plane enforces, at this revision.
    ControlPlane {
        revision: u64,
    },
    Files {
        files: Vec<String>,
    },
}

fn declared(resources: &[Resource]) -> Vec<WorkloadRef> {
    let mut w: Vec<WorkloadRef> = resources
        .iter()
        .filter(|r| matches!(r, Resource::Workload(_)))
        .map(Resource::name)
        .collect();
    w.sort();
    w
}

async fn load_applied(context: &Path) -> Result<Loaded> {
    const HINT: &str = "cannot read the applied policy from the control plane (pass -f FILE to analyse policy files instead)";
    let mut admin = client::admin(context).await.context(HINT)?;
    let (resources, revision) = admin_cmd::applied(&mut admin, "").await.context(HINT)?;
    let set = PolicySet::compile(&resources, revision).map_err(|errors| {
        let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow!(
            "the applied policy (revision {revision}) does not compile in this bulkhead: {}; is it older than the control plane?",
            list.join("; ")
        )
    })?;
    Ok(Loaded {
        set,
        workloads: declared(&resources),
        source: SetSource::ControlPlane { revision },
    })
}

fn load_files(files: &[PathBuf], err: &mut dyn Write) -> Result<Loaded> {
    let texts = policy_cmd::read_files(files)?;
    if texts.is_empty() {
        let dirs: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        bail!(
            "no policy files in {}: -f reads a directory's .yaml and .yml files",
            dirs.join(", ")
        );
    }
    let (resources, set) = bulkhead_policy::load(&texts, 0).map_err(|errors| {
        for e in &errors {
            if let Err(closed) = writeln!(err, "{e}") {
                return closed.into();
            }
        }
        anyhow!(
            "{} error(s) in the policy files, so there is no set to analyse; fix them (`bulkhead policy lint` checks the same)",
            errors.len()
        )
    })?;
    Ok(Loaded {
        set,
        workloads: declared(&resources),
        source: SetSource::Files {
            files: texts.into_iter().map(|(name, _)| name).collect(),
        },
    })
}

/// The answer, in the one shape both outputs print.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    question: Question,
    workload: String,
    source: SetSource,
    assumptions: Assumptions,
    #[serde(flatten)]
    answer: Answer,
    #[serde(skip)]
    options: ReachOptions,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Assumptions {
    /// `enforced`, or `staged`: audit policies and postures as if enforced.
    view: &'static str,
    /// `enforced`, or `bypassed`: the source's sidecar does not judge egress (stolen key).
    egress: &'static str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Answer {
    #[serde(rename_all = "camelCase")]
    WhoCanReach {
        /// The distinct sources, sorted.
        sources: Vec<String>,
        edges: Vec<EdgeView>,
    },
    #[serde(rename_all = "camelCase")]
    BlastRadius {
        /// How many declared workloads there are besides the start.
        other_workloads: usize,
        reached: Vec<ReachedView>,
    },
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReachedView {
    workload: String,
    hops: usize,
    path: Vec<EdgeView>,
}

fn answer(q: &Query, loaded: &Loaded) -> Result<Report> {
    let unknown = |e: ReachError| unknown_workload(e, &q.workload, loaded);
    let answer = match q.question {
        Question::WhoCanReach => {
            let edges = bulkhead_policy::who_can_reach(&loaded.set, &q.workload, q.options)
                .map_err(unknown)?;
            let mut sources: Vec<String> = edges.iter().map(|e| e.from.to_string()).collect();
            sources.dedup(); // sorted by source already
            Answer::WhoCanReach {
                sources,
                edges: edges.iter().map(EdgeView::from).collect(),
            }
        }
        Question::BlastRadius => {
            let BlastRadius { reached, .. } =
                bulkhead_policy::blast_radius(&loaded.set, &q.workload, q.options)
                    .map_err(unknown)?;
            Answer::BlastRadius {
                // The start is declared, or blast_radius would have refused it.
                other_workloads: loaded.workloads.len().saturating_sub(1),
                reached: reached
                    .iter()
                    .map(|r| ReachedView {
                        workload: r.workload.to_string(),
                        hops: r.hops,
                        path: r.path.iter().map(EdgeView::from).collect(),
                    })
                    .collect(),
            }
        }
    };
    Ok(Report {
        question: q.question,
        workload: q.workload.to_string(),
        source: loaded.source.clone(),
        assumptions: Assumptions {
            view: match q.options.view {
                PolicyView::Enforced => "enforced",
                PolicyView::Staged => "staged",
            },
            egress: match q.options.egress {
                SourceEgress::Enforced => "enforced",
                SourceEgress::Bypassed => "bypassed",
            },
        },
        answer,
        options: q.options,
    })
}

/// The analysis's error, with what the set does declare, so the next try can be right.
fn unknown_workload(e: ReachError, target: &WorkloadRef, loaded: &Loaded) -> anyhow::Error {
    let (place, declares) = match &loaded.source {
        SetSource::ControlPlane { revision } => (
            format!("the applied policy (revision {revision})"),
            "declares",
        ),
        SetSource::Files { .. } => ("the policy files".to_string(), "declare"),
    };
    if loaded.workloads.is_empty() {
        return anyhow!(
            "{e}; {place} {declares} no Workload at all: declare each workload (kind: Workload, with its identity and ports) for reach to analyse it"
        );
    }
    let namesakes: Vec<String> = loaded
        .workloads
        .iter()
        .filter(|w| w.name == target.name)
        .map(ToString::to_string)
        .collect();
    let hint = match namesakes.is_empty() {
        true => String::new(),
        false => format!(" (did you mean {}?)", namesakes.join(" or ")),
    };
    let mut listed: Vec<String> = loaded
        .workloads
        .iter()
        .take(LISTED)
        .map(ToString::to_string)
        .collect();
    let more = loaded.workloads.len().saturating_sub(LISTED);
    if more > 0 {
        listed.push(format!("and {more} more"));
    }
    anyhow!(
        "{e}{hint}; {place} {declares} {}: {}",
        count(loaded.workloads.len(), "workload"),
        listed.join(", ")
    )
}

fn count(n: usize, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// The report for a person: the table, then a summary line with the assumptions.
fn render_table(r: &Report) -> String {
    let table;
    let summary = match &r.answer {
        Answer::WhoCanReach { sources, edges } => {
            let rows: Vec<Vec<String>> = edges
                .iter()
                .map(|e| {
                    vec![
                        e.from.clone(),
                        e.port.to_string(),
                        e.protocol.as_str().to_string(),
                        e.allowed_by(),
                    ]
                })
                .collect();
            table = columns(&["SOURCE", "PORT", "PROTOCOL", "ALLOWED BY"], &rows);
            match sources.len() {
                0 => format!("no workload can reach {}", r.workload),
                1 => format!("1 workload can reach {}", r.workload),
                n => format!("{n} workloads can reach {}", r.workload),
            }
        }
        Answer::BlastRadius {
            other_workloads,
            reached,
        } => {
            let rows: Vec<Vec<String>> = reached
                .iter()
                .map(|w| vec![w.workload.clone(), w.hops.to_string(), path(w)])
                .collect();
            table = columns(&["WORKLOAD", "HOPS", "PATH"], &rows);
            let verb = if reached.len() == 1 { "is" } else { "are" };
            format!(
                "if {} is compromised, {} of {} {verb} reachable",
                r.workload,
                reached.len(),
                count(*other_workloads, "other workload")
            )
        }
    };
    let mut notes = Vec::new();
    if let SetSource::ControlPlane { revision } = r.source {
        notes.push(format!("revision {revision}"));
    }
    if r.options.view == PolicyView::Staged {
        notes.push("staged: audit policies and postures as if enforced".to_string());
    }
    if r.options.egress == SourceEgress::Bypassed {
        notes.push("stolen key: egress not enforced, any source address".to_string());
    }
    match notes.is_empty() {
        true => format!("{table}{summary}\n"),
        false => format!("{table}{summary} ({})\n", notes.join("; ")),
    }
}

/// `reach WORKLOAD --blast-radius` under the applied policy, as the table prints it.
pub(crate) async fn blast_radius_table(context: &Path, workload: &str) -> Result<String> {
    let query = Query {
        workload: parse_workload(workload)?,
        question: Question::BlastRadius,
        options: ReachOptions::default(),
        files: Vec::new(),
        output: Output::Table,
    };
    let loaded = load_applied(context).await?;
    Ok(render_table(&answer(&query, &loaded)?))
}

/// A header and rows in columns as wide as their widest cell, each line ending in a
/// newline; empty if there are no rows.
fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        return out;
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or_default()
        })
        .collect();
    let mut line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// `shop/frontend -> shop/orders:8080 -> shop/payments:8080`
fn path(r: &ReachedView) -> String {
    let mut s = r.path.first().map(|e| e.from.clone()).unwrap_or_default();
    for e in &r.path {
        s.push_str(&format!(" -> {}:{}", e.to, e.port));
    }
    s
}

/// What traffic shows, as opposed to what policy allows.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ObservedReport {
    question: Question,
    workload: String,
    source: &'static str,
    /// Unix seconds; 0: every edge kept.
    since: u64,
    reached: Vec<ObservedView>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ObservedView {
    party: String,
    hops: usize,
    /// From the start to the end, both included.
    path: Vec<String>,
}

/// `reach --observed`: the same questions answered from the reported flows.
async fn observed(context: &Path, args: ReachArgs) -> Result<()> {
    let workload = parse_workload(&args.workload)?;
    let question = match args.blast_radius {
        true => Question::BlastRadius,
        false => Question::WhoCanReach,
    };
    let mut admin = client::admin(context).await?;
    let (resources, _) = crate::admin_cmd::applied(&mut admin, "").await?;
    let edges = crate::flows_cmd::edges(&mut admin, args.since).await?;
    let edges = bulkhead_insight::with_declared_callers(edges, &resources);
    let since = crate::since(args.since);
    let window = bulkhead_insight::Window {
        since,
        until: u64::MAX,
    };
    let found = match question {
        Question::BlastRadius => bulkhead_insight::observed_reach(&edges, &workload, window),
        Question::WhoCanReach => bulkhead_insight::who_reached(&edges, &workload, window),
    };
    let report = ObservedReport {
        question,
        workload: workload.to_string(),
        source: "observed",
        since,
        reached: found
            .iter()
            .map(|r| ObservedView {
                party: r.party.to_string(),
                hops: r.hops,
                path: r.path.iter().map(ToString::to_string).collect(),
            })
            .collect(),
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print_observed(&report, args.since),
    }
    Ok(())
}

fn print_observed(r: &ObservedReport, since: Option<std::time::Duration>) {
    let rows: Vec<Vec<String>> = r
        .reached
        .iter()
        .map(|v| vec![v.party.clone(), v.hops.to_string(), v.path.join(" -> ")])
        .collect();
    let first = match r.question {
        Question::BlastRadius => "WORKLOAD",
        Question::WhoCanReach => "SOURCE",
    };
    print!("{}", columns(&[first, "HOPS", "PATH"], &rows));
    let window = since.map_or_else(
        || "in all kept traffic".to_string(),
        |d| format!("in traffic seen within {}s", d.as_secs()),
    );
    let n = r.reached.len();
    match r.question {
        Question::BlastRadius => println!(
            "{window}, {} reached {} through requests that got through (observed, not what policy allows)",
            r.workload,
            count(n, "workload")
        ),
        Question::WhoCanReach => println!(
            "{window}, {} reached {} through requests that got through (observed, not what policy allows)",
            count(n, "caller"),
            r.workload
        ),
    }
}

#[cfg(test)]
mod tests;
