//! Control-plane replicas on etcd (issue #18): each replica's entry in the registry, the
//! leader, and the proxies each replica serves, all under the replica's etcd lease, so that
//! a replica that stops (killed, partitioned from etcd) drops out within [`LEASE_TTL`].
//!
//! | key (under `/bulkhead/`) | value |
//! |---|---|
//! | `replicas/<id>` | [`Entry`]: address, version, started, last seen (rewritten every 2 s) |
//! | `proxies/<id>` | the proxies connected to that replica (`ListProxiesResponse` bytes) |
//! | `flows/<id>` | the edges reported to that replica (JSON, at most 1 MiB), every 5 s |
//! | `leader` | the id of the leading replica |
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
/// How often a replica shares the edges reported to it.
const FLOWS_EVERY: Duration = Duration::from_secs(5);
/// The most one replica's shared edges take in etcd (under its default request limit).
const MAX_SHARED_FLOW_BYTES: usize = 1024 * 1024;
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

fn flows_key(id: &str) -> String {
    format!("{PREFIX}flows/{id}")
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
        let mut last_flows: Option<std::time::Instant> = None;
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
            if last_flows.is_none_or(|t| t.elapsed() >= FLOWS_EVERY) {
                last_flows = Some(std::time::Instant::now());
                if let Err(e) = share_flows(&state, &etcd, &replica).await {
                    tracing::warn!(error = %e, "cannot share this replica's flows in etcd");
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

/// Writes the edges reported to this replica within the retention window, merged over the
/// hours, under its lease: at most [`MAX_SHARED_FLOW_BYTES`], the most recently seen first.
async fn share_flows(
    state: &State,
    etcd: &EtcdStore,
    replica: &Replica,
) -> Result<(), crate::ControlError> {
    let now = crate::proxies::unix_now();
    let mut edges = state
        .store
        .edges_since(state.flow_retention.oldest_bucket(now))?;
    edges.sort_by_key(|e| std::cmp::Reverse(e.stats.last_seen));
    let mut json = serde_json::to_vec(&edges).unwrap_or_default();
    let all = edges.len();
    while json.len() > MAX_SHARED_FLOW_BYTES && !edges.is_empty() {
        edges.truncate(edges.len() / 2);
        json = serde_json::to_vec(&edges).unwrap_or_default();
    }
    if edges.len() < all {
        tracing::warn!(
            shared = edges.len(),
            all,
            "this replica's edges are over what one etcd value holds; the others see the most recently seen"
        );
    }
    let lease = replica.lease.load(Ordering::SeqCst);
    etcd.put_leased(&[(flows_key(replica.id()), json)], lease)
        .await
}

/// The edges the other replicas share, seen at or after `since`.
pub(crate) async fn others_edges(
    etcd: &EtcdStore,
    this: &Replica,
    since: u64,
) -> Result<Vec<bulkhead_insight::Edge>, crate::ControlError> {
    let mine = flows_key(this.id());
    let mut out = Vec::new();
    for (key, json) in etcd.values_under(format!("{PREFIX}flows/")).await? {
        if key == mine {
            continue;
        }
        if let Ok(edges) = serde_json::from_slice::<Vec<bulkhead_insight::Edge>>(&json) {
            out.extend(edges.into_iter().filter(|e| e.stats.last_seen >= since));
        }
    }
    Ok(out)
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
