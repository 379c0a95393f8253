//! Control-plane replicas on etcd (issue #18): each replica's entry in the registry, the
//! leader, and the proxies each replica serves, all under the replica's etcd lease, so that
//! a replica that stops (killed, partitioned from etcd) drops out within [`LEASE_TTL`].
//!
//! | key (under `/bulkhead/`) | value |
//! |---|---|
//! | `replicas/<id>` | [`Entry`]: address, version, started, last seen (rewritten every 2 s) |
//! | `proxies/<id>` | the proxies connected to that replica (`ListProxiesResponse` bytes) |
//! | `events/<id>` | the anomaly events that replica found (JSON, the newest 1,000, at most 512 KiB), every 5 s |
//! | `leader` | the id of the leading replica |
//!
//! Flows are not copied into etcd: at the flow store's bound (200,000 edges, about 520 bytes
//! each in JSON) one replica's edges are a hundred times what one etcd value may hold.
//! `ListEdges` asks every other live replica for the edges reported to it, on demand, over
//! its admin API ([`others_edges`]), and names those that did not answer in time.
//!
//! The leader is elected by a transaction: put `leader` (with one's own lease) only if it
//! does not exist. When the leader's lease ends, the key goes with it and the next replica
//! to try takes it, within [`LEASE_TTL`] and one [`TICK`]. The leader runs the work that must
//! happen once ([`State::lead`]): trimming etcd's revision log and deleting expired join
//! tokens. Without etcd there is one replica and it leads.
//!
//! A replica that cannot renew its lease within a second stops calling itself leader. Two
//! replicas may still both believe they lead for a moment during a partition (until the cut-off
//! one's next renewal fails): the leader's work is therefore only work that is harmless twice
//! (trimming to a bound, deleting what expired), never work that must not run twice.

use crate::service::State;
use crate::store::etcd::{EtcdStore, PREFIX};
use crate::store::etcd_client::LeaseKeeper;
use bulkhead_api::v1 as pb;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// How long a replica's lease outlives its last renewal: the longest a dead replica stays
/// listed, or a dead leader leads.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often the lease is renewed, the entry rewritten and the leadership tried.
const TICK: Duration = Duration::from_millis(500);
/// A replica whose entry is older than this is shown unhealthy.
const HEALTHY_WITHIN: u64 = 10;
/// How often a replica shares its anomaly events.
const EVENTS_EVERY: Duration = Duration::from_secs(5);
/// The most anomaly events one replica shares (the newest), and their most bytes.
const MAX_SHARED_EVENTS: usize = 1_000;
const MAX_SHARED_EVENT_BYTES: usize = 512 * 1024;

/// How many of its newest credential audit entries a replica copies to etcd at start.
const AUDIT_AT_START: u64 = 1_000;
/// The most audit entries copied per tick (more wait for the next).
const AUDIT_PER_TICK: usize = 1_000;

/// How long `ListEdges` waits for another replica's edges before answering without them.
const PEER_EDGES_TIMEOUT: Duration = Duration::from_secs(5);
/// The lifetime of the certificate a replica makes itself to ask the others for their edges.
const PEER_CLIENT_LIFETIME: Duration = Duration::from_secs(300);
/// How often the leader does its upkeep.
const UPKEEP_EVERY: Duration = Duration::from_secs(60);

/// A replica's registry entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Entry {
    pub id: String,
    pub address: String,
    pub version: String,
    pub started_unix: u64,
    pub seen_unix: u64,
}

/// This replica, as the others see it.
pub(crate) struct Replica {
    pub(crate) entry: Entry,
    lease: AtomicI64,
    leader: AtomicBool,
}

fn entry_key(id: &str) -> String {
    format!("{PREFIX}replicas/{id}")
}

fn proxies_key(id: &str) -> String {
    format!("{PREFIX}proxies/{id}")
}

fn leader_key() -> String {
    format!("{PREFIX}leader")
}

impl Replica {
    /// A new replica serving on `address`, with a fresh id.
    pub(crate) fn new(address: std::net::SocketAddr) -> Replica {
        let id = format!("{:08x}", rand::random::<u32>());
        let now = crate::proxies::unix_now();
        Replica {
            entry: Entry {
                id,
                address: address.to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_unix: now,
                seen_unix: now,
            },
            lease: AtomicI64::new(0),
            leader: AtomicBool::new(false),
        }
    }

    pub(crate) fn id(&self) -> &str {
        &self.entry.id
    }
}

/// Starts this replica's registration, election and upkeep (with etcd), or makes it the
/// leader of one (without).
pub(crate) fn spawn(state: Arc<State>) {
    let Some(replica) = state.replica.clone() else {
        return;
    };
    let Some(etcd) = state.shared.clone() else {
        replica.leader.store(true, Ordering::SeqCst);
        return;
    };
    let weak = Arc::downgrade(&state);
    drop(state);
    tokio::spawn(async move {
        let mut keeper: Option<LeaseKeeper> = None;
        let mut last_upkeep: Option<std::time::Instant> = None;
        let mut last_events: Option<std::time::Instant> = None;
        let mut audit_shared: Option<u64> = None;
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(state) = weak.upgrade() else {
                return;
            };
            // A partitioned etcd may never answer: a renewal that takes over a second failed.
            let renewed = tokio::time::timeout(2 * TICK, renew(&etcd, &replica, &mut keeper)).await;
            if !matches!(renewed, Ok(true)) {
                if renewed.is_err() {
                    keeper = None;
                }
                lost_leadership(&replica);
                continue;
            }
            if let Err(e) = report(&state, &etcd, &replica).await {
                tracing::warn!(error = %e, "cannot report this replica in etcd");
            }
            if let Err(e) = share_audit(&state, &etcd, &mut audit_shared).await {
                tracing::warn!(error = %e, "cannot share this replica's credential audit entries in etcd");
            }
            if last_events.is_none_or(|t| t.elapsed() >= EVENTS_EVERY) {
                last_events = Some(std::time::Instant::now());
                if let Err(e) = share_events(&state, &etcd, &replica).await {
                    tracing::warn!(error = %e, "cannot share this replica's anomaly events in etcd");
                }
            }
            match elect(&etcd, &replica).await {
                Ok(true) => {
                    if !replica.leader.swap(true, Ordering::SeqCst) {
                        tracing::info!(replica = replica.id(), "this replica is now the leader");
                        last_upkeep = None;
                    }
                    if last_upkeep.is_none_or(|t| t.elapsed() >= UPKEEP_EVERY) {
                        last_upkeep = Some(std::time::Instant::now());
                        state.lead(&etcd).await;
                    }
                }
                Ok(false) => lost_leadership(&replica),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach etcd to hold or seek the leadership");
                    lost_leadership(&replica);
                }
            }
        }
    });
}

fn lost_leadership(replica: &Replica) {
    if replica.leader.swap(false, Ordering::SeqCst) {
        tracing::warn!(
            replica = replica.id(),
            "this replica is no longer the leader"
        );
    }
}

/// Keeps this replica's lease alive, granting a new one when there is none or it ended.
/// False when etcd cannot be reached.
async fn renew(etcd: &EtcdStore, replica: &Replica, keeper: &mut Option<LeaseKeeper>) -> bool {
    let client = etcd.client();
    if let Some(k) = keeper.as_mut() {
        let alive = matches!(k.renew().await, Ok(ttl) if ttl > 0);
        if alive {
            return true;
        }
        tracing::warn!(
            replica = replica.id(),
            "this replica's etcd lease ended; taking a new one"
        );
        *keeper = None;
    }
    let ttl = i64::try_from(LEASE_TTL.as_secs()).unwrap_or(3);
    let granted = match client.lease_grant(ttl).await {
        Ok(granted) if granted.error.is_empty() && granted.ttl > 0 => granted,
        _ => return false,
    };
    replica.lease.store(granted.id, Ordering::SeqCst);
    match client.lease_keep_alive(granted.id).await {
        Ok((k, ttl)) if ttl > 0 => {
            *keeper = Some(k);
            true
        }
        _ => false,
    }
}

/// Writes this replica's entry and its proxies under its lease.
async fn report(
    state: &State,
    etcd: &EtcdStore,
    replica: &Replica,
) -> Result<(), crate::ControlError> {
    let lease = replica.lease.load(Ordering::SeqCst);
    let mut entry = replica.entry.clone();
    entry.seen_unix = crate::proxies::unix_now();
    // Strings and numbers: serialising cannot fail.
    let json = serde_json::to_vec(&entry).unwrap_or_default();
    let bundle = state.cas.borrow().bundle().fingerprints();
    let proxies = bulkhead_api::proxies_to_bytes(&state.proxies.list(&bundle));
    etcd.put_leased(
        &[
            (entry_key(replica.id()), json),
            (proxies_key(replica.id()), proxies),
        ],
        lease,
    )
    .await
}

/// The edges reported to the other replicas, seen at or after `since`, and the replicas
/// that did not give theirs (id, address and why).
#[derive(Default)]
pub(crate) struct OthersEdges {
    pub edges: Vec<bulkhead_insight::Edge>,
    pub missing: Vec<String>,
}

/// Writes the anomaly events this replica found within their window, under its lease: at
/// most [`MAX_SHARED_EVENTS`], the newest, within [`MAX_SHARED_EVENT_BYTES`].
async fn share_events(
    state: &State,
    etcd: &EtcdStore,
    replica: &Replica,
) -> Result<(), crate::ControlError> {
    let now = crate::proxies::unix_now();
    let since = now.saturating_sub(crate::anomaly::EVENT_RETENTION.window_secs);
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let page = state.store.events(after, since, MAX_SHARED_EVENTS)?;
        let done = page.events.len() < MAX_SHARED_EVENTS || page.last <= after;
        after = page.last;
        events.extend(page.events);
        let excess = events.len().saturating_sub(MAX_SHARED_EVENTS);
        events.drain(..excess);
        if done {
            break;
        }
    }
    let mut json = serde_json::to_vec(&events).unwrap_or_default();
    while json.len() > MAX_SHARED_EVENT_BYTES && !events.is_empty() {
        let half = events.len() / 2;
        events.drain(..half.max(1));
        json = serde_json::to_vec(&events).unwrap_or_default();
    }
    let lease = replica.lease.load(Ordering::SeqCst);
    etcd.put_leased(&[(events_key(replica.id()), json)], lease)
        .await
}

/// The anomaly events the other replicas share, found at or after `since`, each naming
/// its replica.
pub(crate) async fn others_events(
    etcd: &EtcdStore,
    this: &Replica,
    since: u64,
) -> Result<Vec<bulkhead_insight::events::Event>, crate::ControlError> {
    let prefix = format!("{PREFIX}events/");
    let mine = events_key(this.id());
    let mut out = Vec::new();
    for (key, json) in etcd.values_under(prefix.clone()).await? {
        if key == mine {
            continue;
        }
        let replica = key.strip_prefix(&prefix).unwrap_or_default().to_string();
        if let Ok(events) = serde_json::from_slice::<Vec<bulkhead_insight::events::Event>>(&json) {
            out.extend(events.into_iter().filter(|e| e.at >= since).map(|e| {
                bulkhead_insight::events::Event {
                    replica: Some(replica.clone()),
                    ..e
                }
            }));
        }
    }
    Ok(out)
}

fn events_key(replica: &str) -> String {
    format!("{PREFIX}events/{replica}")
}

/// Copies the credential audit entries this replica made since the last copy (at start,
/// its newest [`AUDIT_AT_START`]) to etcd; `shared` is the last entry number copied.
async fn share_audit(
    state: &State,
    etcd: &EtcdStore,
    shared: &mut Option<u64>,
) -> Result<(), crate::ControlError> {
    let after = match *shared {
        Some(after) => after,
        None => state
            .store
            .audit_log(1)?
            .first()
            .map_or(0, |e| e.seq)
            .saturating_sub(AUDIT_AT_START),
    };
    let entries = state.store.audit_after(after, AUDIT_PER_TICK)?;
    let Some(last) = entries.last().map(|e| e.seq) else {
        *shared = Some(after);
        return Ok(());
    };
    let made: Vec<_> = entries
        .into_iter()
        .filter(crate::store::etcd_audit::made_here)
        .collect();
    etcd.put_audit(&made).await?;
    *shared = Some(last);
    Ok(())
}

/// Asks every other replica etcd lists for the edges reported to it, all at once, each
/// within [`PEER_EDGES_TIMEOUT`]. The call is mutual TLS with a certificate this replica
/// makes itself for the control plane's reserved identity (its key never leaves this
/// process), and each replica answered must prove the same identity under our bundle.
pub(crate) async fn others_edges(
    state: &State,
    etcd: &EtcdStore,
    this: &Replica,
    since: u64,
) -> Result<OthersEdges, crate::ControlError> {
    let others: Vec<Entry> = etcd
        .values_under(format!("{PREFIX}replicas/"))
        .await?
        .into_iter()
        .filter_map(|(_, json)| serde_json::from_slice::<Entry>(&json).ok())
        .filter(|e| e.id != this.id())
        .collect();
    if others.is_empty() {
        return Ok(OthersEdges {
            edges: Vec::new(),
            missing: Vec::new(),
        });
    }
    let id = bulkhead_identity::SpiffeId::parse(&format!(
        "spiffe://{}{}",
        state.trust_domain(),
        bulkhead_api::channel::CONTROL_ID_PATH
    ))?;
    let tls = {
        let cas = state.cas.borrow();
        let svid =
            cas.active()
                .issue_local(&id, PEER_CLIENT_LIFETIME, std::time::SystemTime::now())?;
        bulkhead_identity::tls::client_config(
            Some(&svid),
            cas.bundle(),
            bulkhead_identity::tls::ExpectedServer::Exact(id),
            &[b"h2"],
        )?
    };
    let asked = others.into_iter().map(|e| {
        let tls = tls.clone();
        async move {
            let got = match peer_address(&e.address) {
                Ok(addr) => tokio::time::timeout(PEER_EDGES_TIMEOUT, edges_of(addr, tls, since))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "no answer within {} s",
                            PEER_EDGES_TIMEOUT.as_secs()
                        ))
                    }),
                Err(why) => Err(why),
            };
            (e, got)
        }
    });
    let mut out = OthersEdges {
        edges: Vec::new(),
        missing: Vec::new(),
    };
    for (e, got) in futures_util::future::join_all(asked).await {
        match got {
            Ok(edges) => out.edges.extend(edges),
            Err(why) => {
                tracing::warn!(
                    replica = e.id,
                    address = e.address,
                    error = why,
                    "another replica did not give its edges; the answer lacks them"
                );
                out.missing.push(format!("{} ({}): {why}", e.id, e.address));
            }
        }
    }
    Ok(out)
}

/// Where another replica can be dialled, from the address it registered.
fn peer_address(registered: &str) -> Result<std::net::SocketAddr, String> {
    let addr = registered
        .parse::<std::net::SocketAddr>()
        .map_err(|_| format!("its registered address {registered:?} is not an address"))?;
    // Dialled here, 0.0.0.0 would be this machine: perhaps this very replica, whose edges
    // would then be counted twice.
    if addr.ip().is_unspecified() {
        return Err(format!(
            "it listens on {addr}, which no other replica can dial; start it with --listen on an address of its own"
        ));
    }
    Ok(addr)
}

/// The edges reported to the replica at `addr` (its own only: it sees a replica calling).
async fn edges_of(
    addr: std::net::SocketAddr,
    tls: rustls::ClientConfig,
    since: u64,
) -> Result<Vec<bulkhead_insight::Edge>, String> {
    let mut admin = pb::admin_client::AdminClient::new(bulkhead_api::channel::connect(addr, tls));
    let mut chunks = admin
        .list_edges(pb::ListEdgesRequest { since })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let mut edges = Vec::new();
    while let Some(chunk) = chunks
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        let part: Vec<bulkhead_insight::Edge> = serde_json::from_str(&chunk.edges_json)
            .map_err(|e| format!("its edges do not decode (versions differ?): {e}"))?;
        edges.extend(part.into_iter().filter(|e| e.stats.last_seen >= since));
    }
    Ok(edges)
}

/// Takes the leadership if nobody holds it; whether this replica holds it.
async fn elect(etcd: &EtcdStore, replica: &Replica) -> Result<bool, crate::ControlError> {
    let lease = replica.lease.load(Ordering::SeqCst);
    let holder = etcd
        .put_if_absent(leader_key(), replica.id().as_bytes().to_vec(), lease)
        .await?;
    Ok(holder.as_deref() == Some(replica.id().as_bytes()))
}

/// The replicas etcd lists, with the proxies each serves, as the admin API shows them.
pub(crate) async fn list(
    etcd: &EtcdStore,
    this: &Replica,
) -> Result<(Vec<pb::ReplicaInfo>, Vec<pb::ProxyStatus>), crate::ControlError> {
    let leader = etcd.value(leader_key()).await?;
    let now = crate::proxies::unix_now();
    let mut replicas = Vec::new();
    let mut proxies = Vec::new();
    let proxy_lists = etcd.values_under(format!("{PREFIX}proxies/")).await?;
    for (_, json) in etcd.values_under(format!("{PREFIX}replicas/")).await? {
        let Ok(e) = serde_json::from_slice::<Entry>(&json) else {
            continue;
        };
        let theirs: Vec<pb::ProxyStatus> = proxy_lists
            .iter()
            .find(|(k, _)| k == &proxies_key(&e.id))
            .and_then(|(_, bytes)| bulkhead_api::proxies_from_bytes(bytes))
            .unwrap_or_default();
        let connected = theirs.iter().filter(|p| p.connected).count();
        proxies.extend(theirs.into_iter().map(|mut p| {
            p.replica = e.id.clone();
            p
        }));
        replicas.push(pb::ReplicaInfo {
            leader: leader.as_deref() == Some(e.id.as_bytes()),
            healthy: now.saturating_sub(e.seen_unix) <= HEALTHY_WITHIN,
            answering: e.id == this.id(),
            proxies: u32::try_from(connected).unwrap_or(u32::MAX),
            id: e.id,
            address: e.address,
            version: e.version,
            started_unix: e.started_unix,
            seen_unix: e.seen_unix,
        });
    }
    Ok((replicas, proxies))
}

/// The proxies the other live replicas report in etcd, each with its replica's id, kept up
/// to date for as long as the receiver is held: a watch on `proxies/` (every replica
/// rewrites its entry every [`TICK`], and a lost one's entry goes with its lease) wakes a
/// new read of the prefix. The first read is done before this returns, so that a wait never
/// starts from an empty picture; an error then says etcd cannot be read. A later failed
/// read keeps the last picture (and is logged); etcd's watch is taken up again on its own.
pub(crate) async fn follow_others_proxies(
    etcd: &EtcdStore,
    this: &Replica,
) -> Result<tokio::sync::watch::Receiver<Vec<pb::ProxyStatus>>, crate::ControlError> {
    let mine = this.id().to_string();
    let first = others_proxies(etcd, &mine).await?;
    let (tx, rx) = tokio::sync::watch::channel(first);
    let etcd = etcd.clone();
    tokio::spawn(async move {
        let (seen, mut changes) = tokio::sync::watch::channel(Vec::new());
        let follower = {
            let etcd = etcd.clone();
            tokio::spawn(async move { etcd.follow_prefix(format!("{PREFIX}proxies/"), seen).await })
        };
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = tx.closed() => break,
            }
            match others_proxies(&etcd, &mine).await {
                Ok(now) => {
                    if tx.send(now).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the other replicas' proxies from etcd; a wait keeps their last known state");
                }
            }
        }
        follower.abort();
    });
    Ok(rx)
}

/// The proxies every live replica but `mine` lists in etcd, each with its replica's id.
async fn others_proxies(
    etcd: &EtcdStore,
    mine: &str,
) -> Result<Vec<pb::ProxyStatus>, crate::ControlError> {
    let prefix = format!("{PREFIX}proxies/");
    let mut out = Vec::new();
    for (key, bytes) in etcd.values_under(prefix.clone()).await? {
        let Some(id) = key.strip_prefix(&prefix) else {
            continue;
        };
        if id == mine {
            continue;
        }
        let Some(theirs) = bulkhead_api::proxies_from_bytes(&bytes) else {
            continue;
        };
        out.extend(theirs.into_iter().map(|mut p| {
            p.replica = id.to_string();
            p
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_replica_is_dialled_only_at_an_address_of_its_own() {
        assert_eq!(
            peer_address("10.0.0.2:7443").unwrap(),
            "10.0.0.2:7443".parse().unwrap()
        );
        assert!(peer_address("[::1]:7443").is_ok());
        for unusable in ["0.0.0.0:7443", "[::]:7443"] {
            let why = peer_address(unusable).unwrap_err();
            assert!(why.contains("start it with --listen"), "{why}");
        }
        assert!(
            peer_address("replica-b:7443")
                .unwrap_err()
                .contains("not an address")
        );
    }
}
