//! `bulkhead events`: the anomalies the control plane found in the flows sidecars report (a
//! caller reaching something new, an identity never seen before, a spike of denials),
//! oldest first; `--follow` keeps printing new ones as they are found.

use crate::admin_cmd::request;
use crate::client;
use anyhow::{Context, Result};
use bulkhead_api::v1::ListEventsRequest;
use bulkhead_api::v1::admin_client::AdminClient;
use bulkhead_insight::events::Event;
use bulkhead_insight::rfc3339;
use std::path::Path;
use std::time::Duration;
use tonic::transport::Channel;

/// The time fields of an event, Unix seconds on the wire, RFC 3339 when printed.
const EVENT_TIMES: [&str; 1] = ["at"];

/// Events asked for per call (the server's maximum).
const PAGE: u32 = 1_000;
/// How often `--follow` asks for new events.
const POLL: Duration = Duration::from_secs(2);

#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    /// Only events found within this long (e.g. 15m, 24h); default: all that are kept (7
    /// days, at most 10,000).
    #[arg(long, value_parser = crate::parse_duration)]
    since: Option<Duration>,
    /// Keep printing new events as they are found (checking every 2 s) until interrupted.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only events whose caller or destination workload is in this namespace (as `graph
    /// -n`).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// table; or json: one JSON array (with --follow, one JSON object per line).
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
}

/// What the control plane answered, across as many pages as it took.
struct Batch {
    events: Vec<Event>,
    /// Where to follow on from.
    last: u64,
    learning_until: u64,
}

pub async fn run(context: &Path, args: EventsArgs) -> Result<()> {
    let mut admin = client::admin(context).await?;
    let since = crate::since(args.since);
    let mut batch = fetch(&mut admin, 0, since).await?;
    let namespace = args.namespace.as_deref();
    keep_namespace(&mut batch.events, namespace);
    let out = Output::new(&args);
    if batch.learning_until > 0 {
        eprintln!(
            "learning the baseline until {}: new edges and identities seen before then are not reported",
            rfc3339(batch.learning_until)
        );
    }
    out.print(&batch.events, true)?;
    if !args.follow {
        return Ok(());
    }
    let (mut last, mut learning) = (batch.last, batch.learning_until > 0);
    loop {
        tokio::time::sleep(POLL).await;
        let mut batch = fetch(&mut admin, last, 0).await?;
        keep_namespace(&mut batch.events, namespace);
        if learning && batch.learning_until == 0 {
            eprintln!("the baseline is learned: new edges and identities are reported from now on");
        }
        learning = batch.learning_until > 0;
        last = batch.last;
        out.print(&batch.events, false)?;
    }
}

/// Every event numbered above `after` and found from `since` on.
async fn fetch(admin: &mut AdminClient<Channel>, mut after: u64, since: u64) -> Result<Batch> {
    let mut events = Vec::new();
    loop {
        let resp = admin
            .list_events(request(ListEventsRequest {
                after,
                since,
                limit: PAGE,
            }))
            .await
            .map_err(client::status)?
            .into_inner();
        let page: Vec<Event> = serde_json::from_str(&resp.events_json)
            .context("the control plane sent events this CLI cannot read (versions differ?)")?;
        let more = page.len() >= PAGE as usize && resp.last > after;
        events.extend(page);
        after = resp.last;
        if !more {
            // With replicas on etcd the first page holds the others' events too.
            events.sort_by_key(|e| e.at);
            return Ok(Batch {
                events,
                last: resp.last,
                learning_until: resp.learning_until,
            });
        }
    }
}

enum Output {
    Table,
    Json,
    JsonLines,
}

impl Output {
    fn new(args: &EventsArgs) -> Output {
        match (args.output.as_str(), args.follow) {
            ("json", false) => Output::Json,
            ("json", true) => Output::JsonLines,
            _ => Output::Table,
        }
    }

    /// Prints `events`; a table starts with its header when `first`, even without events.
    fn print(&self, events: &[Event], first: bool) -> Result<()> {
        match self {
            Output::Json => {
                let mut v = serde_json::to_value(events)?;
                crate::jsonstyle::times(&mut v, &EVENT_TIMES, &[]);
                println!("{}", serde_json::to_string_pretty(&v)?)
            }
            Output::JsonLines => {
                for e in events {
                    let mut v = serde_json::to_value(e)?;
                    crate::jsonstyle::times(&mut v, &EVENT_TIMES, &[]);
                    println!("{}", serde_json::to_string(&v)?);
                }
            }
            Output::Table => {
                let rows: Vec<(&Event, String)> = events.iter().map(|e| (e, parties(e))).collect();
                let header = "CALLER → DESTINATION";
                let width = rows
                    .iter()
                    .map(|(_, p)| p.chars().count())
                    .fold(header.chars().count(), usize::max);
                if first {
                    println!("{:<20}  {:<12}  {header:<width$}  DETAIL", "TIME", "KIND");
                }
                for (e, parties) in rows {
                    let (at, kind) = (rfc3339(e.at), e.kind.as_str());
                    match &e.replica {
                        Some(r) => println!(
                            "{at:<20}  {kind:<12}  {parties:<width$}  {} (found by replica {r})",
                            e.detail
                        ),
                        None => println!("{at:<20}  {kind:<12}  {parties:<width$}  {}", e.detail),
                    }
                }
            }
        }
        Ok(())
    }
}

/// Keeps the events whose caller's or destination's workload is in `namespace`, if given; a
/// caller known only by its SPIFFE ID is in no namespace, as in `graph -n`.
fn keep_namespace(events: &mut Vec<Event>, namespace: Option<&str>) {
    if let Some(ns) = namespace {
        events.retain(|e| {
            [&e.source_workload, &e.destination]
                .into_iter()
                .flatten()
                .any(|w| w.namespace == ns)
        });
    }
}

/// `caller → destination:port`, or what of it an event names.
fn parties(e: &Event) -> String {
    let caller = match (&e.source_identity, &e.source_workload) {
        (Some(id), _) => Some(id.to_string()),
        (None, Some(w)) => Some(w.to_string()),
        (None, None) if e.port.is_some() => Some("unauthenticated".to_string()),
        (None, None) => None,
    };
    let destination = match (&e.destination, e.port) {
        (Some(d), Some(port)) => format!("{d}:{port}"),
        (Some(d), None) => d.to_string(),
        (None, _) => "-".to_string(),
    };
    match caller {
        Some(c) => format!("{c} → {destination}"),
        None => format!("→ {destination}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_insight::events::EventKind;
    use bulkhead_policy::model::WorkloadRef;

    fn event(kind: EventKind) -> Event {
        Event {
            seq: 1,
            at: 0,
            kind,
            source_identity: Some("spiffe://t/ns/shop/sa/frontend".parse().unwrap()),
            source_workload: None,
            destination: Some(WorkloadRef {
                namespace: "shop".into(),
                name: "orders".into(),
            }),
            port: Some(8080),
            requests: 1,
            denied: 0,
            detail: String::new(),
            replica: None,
        }
    }

    #[test]
    fn parties_name_what_an_event_knows() {
        assert_eq!(
            parties(&event(EventKind::NewEdge)),
            "spiffe://t/ns/shop/sa/frontend → shop/orders:8080"
        );
        let plaintext = Event {
            source_identity: None,
            ..event(EventKind::NewEdge)
        };
        assert_eq!(parties(&plaintext), "unauthenticated → shop/orders:8080");
        let spike = Event {
            source_identity: None,
            port: None,
            ..event(EventKind::DenialSpike)
        };
        assert_eq!(parties(&spike), "→ shop/orders");
    }

    #[test]
    fn namespace_keeps_events_with_a_side_in_it() {
        let at = |ns: &str, name: &str| {
            Some(WorkloadRef {
                namespace: ns.into(),
                name: name.into(),
            })
        };
        let into_shop = event(EventKind::NewEdge);
        let from_shop = Event {
            source_workload: at("shop", "frontend"),
            destination: at("billing", "ledger"),
            ..event(EventKind::NewEdge)
        };
        // The caller's SPIFFE ID names shop, but no workload of shop takes part.
        let elsewhere = Event {
            destination: at("billing", "ledger"),
            ..event(EventKind::NewIdentity)
        };
        let all = vec![into_shop.clone(), from_shop.clone(), elsewhere.clone()];
        let kept = |ns: Option<&str>| {
            let mut events = all.clone();
            keep_namespace(&mut events, ns);
            events
        };
        assert_eq!(kept(None), all);
        assert_eq!(kept(Some("shop")), vec![into_shop, from_shop.clone()]);
        assert_eq!(kept(Some("billing")), vec![from_shop, elsewhere]);
        assert_eq!(kept(Some("other")), Vec::<Event>::new());
    }
}
