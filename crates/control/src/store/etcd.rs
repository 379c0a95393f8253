//! The replicated backend of the resource set (`bulkhead control --etcd`): the current set,
//! the revision log (who changed what, when) and the snapshots rollback restores, kept in
//! etcd so that several control-plane replicas share them.
//!
//! Key layout, under [`PREFIX`]:
//!
//! | key | value |
//! |---|---|
//! | `revision` | the current revision number, in decimal |
//! | `sets/<revision, 20 digits>` | the whole set at that revision: a JSON array of resources |
//! | `log/<revision, 20 digits>` | the [`RevisionRecord`] of that revision (no set) |
//! | `tokens/<id>` | a join token's record: the SHA-256 of its secret, never the secret |
//! | `bindings/<spiffe id>\|<namespace>/<name>` | that identity may fetch that workload's configuration |
//! | `revocations/<spiffe id>` | an identity's revocation, or its lifting |
//! | `revocations/proxy/<instance id>` | a proxy instance's revocation, with the instance |
//! | `instances/<id>`, `serials/<serial>` | proxy instances and their certificates (`etcd_instances.rs`) |
//! | `audit/<time>-<digest>` | the credential audit log, every replica's (`etcd_audit.rs`) |
//! | `ca/files` | the CA set's files, private keys sealed (`etcd_ca.rs`) |
//!
//! A revision is committed in one etcd transaction that compares `revision` with the
//! revision the change was built on (its value, or its absence before the first revision)
//! and only then writes the new number, the set and the log entry, and deletes the snapshot
//! that falls out of the kept window. Two replicas committing at once: one transaction wins,
//! the other finds the comparison false and writes nothing ([`Commit::Conflict`]); its
//! caller reads the new set and builds its change again. Nothing is ever overwritten
//! unseen.
//!
//! It must never write the set without that comparison, and never hold anything secret in
//! clear: the set and the log are what `bulkhead get` and `bulkhead history` show anyway,
//! and a token is kept as its hash.

use super::etcd_ca::{Files, SecretKey, collect, files_key};
use super::etcd_client::{
    self as etcd, Client, KeyValue, delete, get, get_newest, get_prefix, mod_revision_is, put, txn,
    value_is, version_is,
};
use super::{Change, Committed, HistoryRetention, RevisionRecord, SetAt, by_key, changes};
use crate::error::ControlError;
use crate::store::trust::Revocation;
use crate::tokens::{TokenError, TokenRecord};
use bulkhead_api::etcd::etcdserverpb as pb;
use bulkhead_policy::model::{Resource, ResourceName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every key Bulkhead writes in etcd starts with this.
pub const PREFIX: &str = "/bulkhead/";

/// How `bulkhead control` reaches etcd.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port` of one or more etcd members.
    pub endpoints: Vec<String>,
    /// PEM CA that signed the members' serving certificates (`--etcd-ca`).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key to present to etcd (`--etcd-cert`, `--etcd-key`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The 32-byte file the CA keys are sealed under in etcd (`--etcd-secret-key-file`):
    /// the same on every replica.
    pub secret_key_file: PathBuf,
}

/// The outcome of one attempt to commit.
#[derive(Debug)]
pub(crate) enum Commit {
    Done(Committed),
    /// Another replica committed first: the set is no longer at the revision the change
    /// was built on. Nothing was written.
    Conflict,
}

/// The resource set in etcd. Cheap to clone: one connection, shared.
#[derive(Clone)]
pub(crate) struct EtcdStore {
    client: Client,
    endpoints: String,
    history: HistoryRetention,
    secret: std::sync::Arc<SecretKey>,
    /// The CA files as this replica last wrote or read them in etcd, to tell another
    /// replica's CA change from its own.
    ca_seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

fn set_key(revision: u64) -> String {
    format!("{PREFIX}sets/{revision:020}")
}

fn log_key(revision: u64) -> String {
    format!("{PREFIX}log/{revision:020}")
}

impl EtcdStore {
    /// Connects to the members in `options` (TLS when a CA or client certificate is given)
    /// and checks that they answer.
    pub(crate) async fn connect(
        options: &EtcdOptions,
        history: HistoryRetention,
    ) -> Result<EtcdStore, ControlError> {
        let endpoints = options.endpoints.join(",");
        let secret = std::sync::Arc::new(SecretKey::from_file(&options.secret_key_file)?);
        let tls = match (&options.ca, &options.client_cert) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(ControlError::EtcdOptions {
                    endpoints,
                    message: "--etcd-cert needs --etcd-ca, the CA of the members' serving certificates, to check whom it is shown to".to_string(),
                });
            }
            (Some(ca), client) => {
                let client = match client {
                    Some((cert, key)) => Some((read_pem(cert)?, read_pem(key)?)),
                    None => None,
                };
                let config = etcd::tls_config(
                    &read_pem(ca)?,
                    client.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
                )
                .map_err(|message| ControlError::EtcdOptions {
                    endpoints: endpoints.clone(),
                    message,
                })?;
                Some(std::sync::Arc::new(config))
            }
        };
        let client =
            Client::new(&options.endpoints, tls).map_err(|message| ControlError::EtcdOptions {
                endpoints: endpoints.clone(),
                message,
            })?;
        let store = EtcdStore {
            client,
            endpoints,
            history,
            secret,
            ca_seen: Default::default(),
        };
        store.current_revision().await?;
        Ok(store)
    }

    /// The members this store talks to, comma-separated, for messages.
    pub(crate) fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// The CA files etcd holds, written into `dir` (keys opened with the secret key);
    /// false if etcd holds none yet.
    pub(crate) async fn fetch_cas(&self, dir: &Path) -> Result<bool, ControlError> {
        let got = self.get(get(files_key())).await?;
        let Some(found) = got.kvs.first() else {
            return Ok(false);
        };
        let theirs = Files::from_json(&found.value)?;
        if let Some(ours) = super::etcd_ca::foreign_cas(dir, &theirs) {
            return Err(ControlError::CaSet {
                path: dir.join("cas.json"),
                message: format!(
                    "this data directory holds CA {ours}, which is not in the CA set the replicas share in etcd; nothing was overwritten. Start this replica with an empty --data-dir to join them (this directory stays as it is), or run it on its own without --etcd"
                ),
            });
        }
        self.write_cas(dir, &found.value)?;
        Ok(true)
    }

    /// If the CA files in etcd hold no JWT-SVID signing key (stored by a replica from
    /// before it was shared), puts this replica's (made if need be) in with them, for all.
    pub(crate) async fn share_jwt_key(
        &self,
        dir: &Path,
        set: &crate::cas::CaFile,
    ) -> Result<(), ControlError> {
        let got = self.get(get(files_key())).await?;
        let Some(found) = got.kvs.first() else {
            return Ok(());
        };
        if Files::from_json(&found.value)?.has(crate::jwt_svid::FILE) {
            return Ok(());
        }
        crate::jwt_svid::load_or_create(dir)?;
        let json = collect(dir, set, &self.secret)?.to_json();
        // Only over the set read: a CA change meanwhile is not written over.
        let done = self
            .txn(txn(
                vec![mod_revision_is(files_key(), found.mod_revision)],
                vec![put(files_key(), json.clone(), 0)],
            ))
            .await?;
        if done.succeeded {
            *self.ca_seen.lock().unwrap_or_else(|p| p.into_inner()) = json.into_bytes();
            tracing::info!("shared this replica's JWT-SVID signing key in etcd, sealed");
        } else {
            // Another replica changed the set first (maybe with its key): take that.
            self.fetch_cas(dir).await?;
        }
        Ok(())
    }

    /// Writes the CA files `json` (as etcd holds them) into `dir`.
    pub(crate) fn write_cas(&self, dir: &Path, json: &[u8]) -> Result<(), ControlError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| ControlError::DataDir {
                path: dir.to_path_buf(),
                source,
            })?;
        Files::from_json(json)?.write_into(dir, &self.secret)?;
        *self.ca_seen.lock().unwrap_or_else(|p| p.into_inner()) = json.to_vec();
        Ok(())
    }

    /// Whether `json` is not what this replica last wrote or read: another replica's change.
    pub(crate) fn is_new_ca(&self, json: &[u8]) -> bool {
        *self.ca_seen.lock().unwrap_or_else(|p| p.into_inner()) != json
    }

    /// Puts the CA set `set` of `dir` in etcd, keys sealed. With `first`, only if etcd holds
    /// none yet: false when another replica stored its set first.
    pub(crate) async fn store_cas(
        &self,
        dir: &Path,
        set: &crate::cas::CaFile,
        first: bool,
    ) -> Result<bool, ControlError> {
        let json = collect(dir, set, &self.secret)?.to_json();
        let put = put(files_key(), json.clone(), 0);
        let txn = match first {
            true => txn(vec![version_is(files_key(), 0)], vec![put]),
            false => txn(Vec::new(), vec![put]),
        };
        let done = self.txn(txn).await?;
        if done.succeeded {
            *self.ca_seen.lock().unwrap_or_else(|p| p.into_inner()) = json.into_bytes();
        }
        Ok(done.succeeded)
    }

    /// The JSON value at `key` and its etcd revision, if etcd holds one that parses.
    pub(super) async fn json_at<T: serde::de::DeserializeOwned>(
        &self,
        key: String,
    ) -> Result<Option<(T, i64)>, ControlError> {
        let got = self.get(get(key)).await?;
        Ok(got.kvs.first().and_then(|kv| {
            serde_json::from_slice::<T>(&kv.value)
                .ok()
                .map(|v| (v, kv.mod_revision))
        }))
    }

    /// The JSON values of the newest `limit` keys under `prefix`, newest first; values that
    /// do not parse are left out.
    pub(super) async fn newest_json<T: serde::de::DeserializeOwned>(
        &self,
        prefix: String,
        limit: usize,
    ) -> Result<Vec<T>, ControlError> {
        let got = self.get(get_newest(prefix, limit)).await?;
        Ok(got
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<T>(&kv.value).ok())
            .collect())
    }

    /// A get, waiting out a lost leader or member for up to [`TRANSIENT_FOR`].
    pub(super) async fn get(
        &self,
        range: pb::RangeRequest,
    ) -> Result<pb::RangeResponse, ControlError> {
        self.retrying(|client| {
            let range = range.clone();
            async move { client.range(range).await }
        })
        .await
    }

    /// A transaction, likewise. Sending one again after a lost answer never writes twice:
    /// each transaction here compares first (one that was applied compares false the
    /// second time and writes nothing) or puts the same value again.
    pub(super) async fn txn(&self, txn: pb::TxnRequest) -> Result<pb::TxnResponse, ControlError> {
        self.retrying(|client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await
    }

    async fn delete(
        &self,
        delete: pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse, ControlError> {
        self.retrying(|client| {
            let delete = delete.clone();
            async move { client.delete_range(delete).await }
        })
        .await
    }

    /// Deletes the keys in `[key, range_end)`; how many.
    pub(super) async fn delete_range(
        &self,
        key: Vec<u8>,
        range_end: Vec<u8>,
    ) -> Result<u64, ControlError> {
        let gone = self
            .delete(pb::DeleteRangeRequest {
                key,
                range_end,
                prev_kv: false,
            })
            .await?;
        Ok(u64::try_from(gone.deleted).unwrap_or(0))
    }

    async fn retrying<T, F>(&self, mut op: impl FnMut(Client) -> F) -> Result<T, ControlError>
    where
        F: std::future::Future<Output = Result<T, etcd::Error>>,
    {
        let deadline = std::time::Instant::now() + TRANSIENT_FOR;
        let mut wait = Duration::from_millis(50);
        loop {
            match op(self.client.clone()).await {
                Ok(out) => return Ok(out),
                Err(e) if e.is_transient() && std::time::Instant::now() < deadline => {
                    tracing::warn!(etcd = %self.endpoints, error = %e, "etcd is electing a leader or lost a member; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(self.err(e)),
            }
        }
    }

    fn err(&self, e: etcd::Error) -> ControlError {
        unreachable_etcd(&self.endpoints, &e)
    }

    fn corrupt(&self, message: String) -> ControlError {
        ControlError::Store {
            path: PathBuf::from(format!("etcd {}", self.endpoints)),
            message,
        }
    }

    /// The revision etcd holds now (0 before the first).
    pub(crate) async fn current_revision(&self) -> Result<u64, ControlError> {
        let got = self.get(get(revision_key())).await?;
        match got.kvs.first() {
            None => Ok(0),
            Some(kv) => self.parse_revision(&kv.value),
        }
    }

    fn parse_revision(&self, value: &[u8]) -> Result<u64, ControlError> {
        std::str::from_utf8(value)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                self.corrupt(format!(
                    "{} does not hold a revision number; it was written by something else than Bulkhead",
                    revision_key()
                ))
            })
    }

    /// The current revision and its set, read consistently (the set is looked up at the
    /// revision read, retried if a commit slipped in between).
    pub(crate) async fn resources(&self) -> Result<(u64, Vec<Resource>), ControlError> {
        for _ in 0..50 {
            let revision = self.current_revision().await?;
            match self.set_at(revision).await? {
                SetAt::Kept(set) => return Ok((revision, set)),
                SetAt::Missing if revision == 0 => return Ok((0, Vec::new())),
                // Pruned or not there: a newer commit moved past it; read again.
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        Err(self.corrupt(format!(
            "{} names a revision whose set ({}…) is not in etcd; was the {PREFIX} prefix edited by hand? Restore it from an etcd snapshot",
            revision_key(),
            set_key(0).trim_end_matches('0')
        )))
    }

    /// The set at `revision`, if its snapshot is still kept.
    pub(crate) async fn set_at(&self, revision: u64) -> Result<SetAt, ControlError> {
        if revision == 0 {
            return Ok(SetAt::Kept(Vec::new()));
        }
        let got = self.get(get(set_key(revision))).await?;
        if let Some(found) = got.kvs.first() {
            let jsons: Vec<String> = serde_json::from_slice(&found.value).map_err(|e| {
                self.corrupt(format!("the set at revision {revision} is unreadable: {e}"))
            })?;
            let set = jsons
                .iter()
                .map(|j| Resource::from_json(j))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    self.corrupt(format!(
                        "a resource at revision {revision} is unreadable: {e}"
                    ))
                })?;
            return Ok(SetAt::Kept(set));
        }
        let current = self.current_revision().await?;
        if revision > current {
            return Ok(SetAt::Missing);
        }
        let oldest = self
            .get(pb::RangeRequest {
                limit: 1,
                keys_only: true,
                ..get_prefix(format!("{PREFIX}sets/"))
            })
            .await?;
        let oldest_kept = oldest
            .kvs
            .first()
            .and_then(|kv| std::str::from_utf8(&kv.key).ok())
            .and_then(|k| k.rsplit('/').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(current);
        Ok(SetAt::Pruned { oldest_kept })
    }

    /// Commits `set` as the revision after `base` if etcd is still at `base`: the set, the
    /// log entry and the new number in one transaction, and the snapshot past the kept
    /// count deleted in it. Nothing is written if nothing changed or another replica
    /// committed first.
    pub(crate) async fn commit(
        &self,
        base: u64,
        base_set: &[Resource],
        set: &[Resource],
        actor: &str,
        action: &str,
        now_unix: u64,
    ) -> Result<Commit, ControlError> {
        let old = by_key(base_set).map_err(|m| self.corrupt(m))?;
        let new: BTreeMap<String, String> = by_key(set).map_err(|m| self.corrupt(m))?;
        let changes = changes(&old, &new);
        if changes.iter().all(|(_, c)| *c == Change::Unchanged) {
            return Ok(Commit::Done(Committed {
                revision: base,
                changes,
                pruned: 0,
            }));
        }
        let revision = base + 1;
        let record = RevisionRecord {
            revision,
            time_unix: now_unix,
            actor: actor.to_string(),
            action: action.to_string(),
            changes: super::log_lines(&changes),
            resources: Vec::new(),
        };
        // Strings and numbers: serialising them cannot fail.
        let record = serde_json::to_string(&record).unwrap_or_default();
        let snapshot = serde_json::to_string(&new.values().collect::<Vec<_>>()).unwrap_or_default();
        let guard = match base {
            0 => version_is(revision_key(), 0),
            n => value_is(revision_key(), n.to_string()),
        };
        let mut ops = vec![
            put(revision_key(), revision.to_string(), 0),
            put(set_key(revision), snapshot, 0),
            put(log_key(revision), record, 0),
        ];
        let keep = self.history.max_revisions.max(1);
        let mut pruned = 0;
        if revision > keep {
            ops.push(delete(set_key(revision - keep)));
            pruned = 1;
        }
        let done = self.txn(txn(vec![guard], ops)).await?;
        if !done.succeeded {
            return Ok(Commit::Conflict);
        }
        Ok(Commit::Done(Committed {
            revision,
            changes,
            pruned,
        }))
    }

    /// The newest `limit` revisions, newest first, without their sets.
    pub(crate) async fn history(&self, limit: usize) -> Result<Vec<RevisionRecord>, ControlError> {
        self.newest_json(format!("{PREFIX}log/"), limit).await
    }

    /// Sends every value `key` takes from now on, re-watching after a lost stream (and
    /// then sending its current value, so that a change made meanwhile is not missed).
    /// Runs until nobody receives.
    pub(crate) async fn follow(&self, key: String, seen: tokio::sync::watch::Sender<Vec<u8>>) {
        self.follow_with(key, false, seen).await
    }

    /// [`EtcdStore::follow`] of every key under `prefix` (the values of each change sent).
    pub(crate) async fn follow_prefix(
        &self,
        prefix: String,
        seen: tokio::sync::watch::Sender<Vec<u8>>,
    ) {
        self.follow_with(prefix, true, seen).await
    }

    async fn follow_with(
        &self,
        key: String,
        prefix: bool,
        seen: tokio::sync::watch::Sender<Vec<u8>>,
    ) {
        let mut wait = Duration::from_millis(100);
        loop {
            let range = match prefix {
                true => get_prefix(key.clone()),
                false => get(key.clone()),
            };
            match self
                .client
                .watch(range.key.clone(), range.range_end.clone())
                .await
            {
                Ok(mut stream) => {
                    wait = Duration::from_millis(100);
                    // What changed while no stream was open.
                    if let Ok(now) = self.get(range).await
                        && let Some(found) = now.kvs.last()
                        && seen.send(found.value.clone()).is_err()
                    {
                        return;
                    }
                    loop {
                        match stream.message().await {
                            Ok(Some(msg)) if msg.canceled => {
                                tracing::warn!(etcd = %self.endpoints, key, reason = msg.cancel_reason, "etcd ended the watch; watching again");
                                break;
                            }
                            Ok(Some(msg)) => {
                                for event in msg.events {
                                    let Some(KeyValue { value, .. }) = event.kv else {
                                        continue;
                                    };
                                    if value.is_empty() {
                                        continue;
                                    }
                                    if seen.send(value).is_err() {
                                        return;
                                    }
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(etcd = %self.endpoints, key, error = %e, "the watch on etcd broke; watching again");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(etcd = %self.endpoints, key, error = %e, "cannot watch etcd; trying again");
                }
            }
            if seen.is_closed() {
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    /// Parses the value of the `revision` key.
    pub(crate) fn revision_in(&self, value: &[u8]) -> Result<u64, ControlError> {
        self.parse_revision(value)
    }
}

pub(crate) fn revision_key() -> String {
    format!("{PREFIX}revision")
}

/// How long one etcd operation waits out a leader election or a lost member before the
/// caller is told etcd did not answer.
const TRANSIENT_FOR: Duration = Duration::from_secs(10);

/// Keys under a lease, for the replica registry and the leadership (`replicas.rs`).
impl EtcdStore {
    /// The client, for leases.
    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    /// Puts every `(key, value)` under `lease`, in one transaction.
    pub(crate) async fn put_leased(
        &self,
        pairs: &[(String, Vec<u8>)],
        lease: i64,
    ) -> Result<(), ControlError> {
        let ops = pairs
            .iter()
            .map(|(k, v)| put(k.clone(), v.clone(), lease))
            .collect();
        self.txn(txn(Vec::new(), ops)).await.map(|_| ())
    }

    /// Puts `key` under `lease` only if it does not exist; returns what it holds after.
    pub(crate) async fn put_if_absent(
        &self,
        key: String,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<Option<Vec<u8>>, ControlError> {
        let txn = txn(
            vec![version_is(key.clone(), 0)],
            vec![put(key.clone(), value.clone(), lease)],
        );
        if self.txn(txn).await?.succeeded {
            return Ok(Some(value));
        }
        self.value(key).await
    }

    /// The value of `key`, if it exists.
    pub(crate) async fn value(&self, key: String) -> Result<Option<Vec<u8>>, ControlError> {
        Ok(self
            .get(get(key))
            .await?
            .kvs
            .into_iter()
            .next()
            .map(|kv| kv.value))
    }

    /// Every key under `prefix` with its value, in key order.
    pub(crate) async fn values_under(
        &self,
        prefix: String,
    ) -> Result<Vec<(String, Vec<u8>)>, ControlError> {
        let got = self.get(get_prefix(prefix)).await?;
        Ok(got
            .kvs
            .into_iter()
            .filter_map(|kv| Some((String::from_utf8(kv.key).ok()?, kv.value)))
            .collect())
    }

    /// The leader's upkeep: deletes the revision log's entries past [`LOG_MAX_ENTRIES`]
    /// (the snapshots are trimmed at each commit) and the join tokens expired before
    /// `now_unix`. Returns how many of each.
    pub(crate) async fn trim(&self, now_unix: u64) -> Result<(u64, u64), ControlError> {
        let current = self.current_revision().await?;
        let mut log = 0;
        let keep = super::LOG_MAX_ENTRIES;
        if current > keep {
            let gone = self
                .delete(pb::DeleteRangeRequest {
                    key: log_key(0).into_bytes(),
                    range_end: log_key(current - keep + 1).into_bytes(),
                    prev_kv: false,
                })
                .await?;
            log = u64::try_from(gone.deleted).unwrap_or(0);
        }
        let mut tokens = 0;
        for (id, record) in self.tokens().await? {
            if record.expires_unix <= now_unix {
                self.delete_token(&id).await?;
                tokens += 1;
            }
        }
        Ok((log, tokens))
    }
}

/// Which identity may fetch which workload's configuration: written at every join, read by
/// a replica that meets an identity joined elsewhere (a proxy that failed over).
impl EtcdStore {
    pub(crate) async fn put_binding(
        &self,
        spiffe_id: &str,
        workload: &ResourceName,
        now_unix: u64,
    ) -> Result<(), ControlError> {
        let key = format!("{PREFIX}bindings/{spiffe_id}|{workload}");
        self.txn(txn(Vec::new(), vec![put(key, now_unix.to_string(), 0)]))
            .await
            .map(|_| ())
    }

    /// The workloads `spiffe_id` was bound to on any replica.
    pub(crate) async fn bindings_of(
        &self,
        spiffe_id: &str,
    ) -> Result<Vec<ResourceName>, ControlError> {
        let prefix = format!("{PREFIX}bindings/{spiffe_id}|");
        Ok(self
            .values_under(prefix.clone())
            .await?
            .into_iter()
            .filter_map(|(k, _)| {
                let (namespace, name) = k.strip_prefix(&prefix)?.split_once('/')?;
                Some(ResourceName {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })
            })
            .collect())
    }
}

/// A revocation as etcd keeps it: an identity's, made or lifted (a lift is a put too, never a
/// delete, so that a replica never reads a missing key as "not revoked"), or a proxy
/// instance's, with the instance as it was when revoked (the certificates it may still
/// present: none is added after, see `etcd_instances.rs`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum SharedRevocation {
    Revoked(Revocation),
    Instance {
        revocation: Revocation,
        instance: crate::store::trust::Instance,
    },
    Lifted {
        subject: String,
        actor: String,
        time_unix: u64,
    },
}

/// Identity revocations, shared: made on one replica, enforced by all.
impl EtcdStore {
    pub(crate) async fn put_revocation(
        &self,
        subject: &str,
        value: &SharedRevocation,
    ) -> Result<(), ControlError> {
        let key = format!("{PREFIX}revocations/{subject}");
        let json = serde_json::to_string(value).unwrap_or_default();
        self.txn(txn(Vec::new(), vec![put(key, json, 0)]))
            .await
            .map(|_| ())
    }

    pub(crate) async fn revocations(&self) -> Result<Vec<SharedRevocation>, ControlError> {
        Ok(self
            .values_under(format!("{PREFIX}revocations/"))
            .await?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// Deletes every join token bound to `spiffe_id` (it was revoked); their ids.
    pub(crate) async fn delete_tokens_of(
        &self,
        spiffe_id: &str,
    ) -> Result<Vec<String>, ControlError> {
        let mut gone = Vec::new();
        for (id, record) in self.tokens().await? {
            if record.spiffe_id.as_str() == spiffe_id {
                self.delete_token(&id).await?;
                gone.push(id);
            }
        }
        Ok(gone)
    }
}

fn token_key(id: &str) -> String {
    format!("{PREFIX}tokens/{id}")
}

/// Join tokens, shared by every replica: a token created on one is redeemed on any, and
/// each use is spent by a transaction that compares the token's etcd revision, so two
/// replicas never both spend its last use.
impl EtcdStore {
    /// Stores a new token (its secret's hash only); its id is new, so it never replaces one.
    pub(crate) async fn put_token(
        &self,
        id: &str,
        record: &TokenRecord,
    ) -> Result<(), ControlError> {
        let json = serde_json::to_string(record).unwrap_or_default();
        let txn = txn(
            vec![version_is(token_key(id), 0)],
            vec![put(token_key(id), json, 0)],
        );
        let done = self.txn(txn).await?;
        if !done.succeeded {
            return Err(self.corrupt(format!("join token id {id} exists already")));
        }
        Ok(())
    }

    async fn token(&self, id: &str) -> Result<Option<(TokenRecord, i64)>, ControlError> {
        self.json_at(token_key(id)).await
    }

    /// Checks a token, runs `issue` with its record, and spends one use only if `issue`
    /// succeeded and nobody spent one meanwhile (else it runs again on the token as it is
    /// now: a used-up token is then refused).
    pub(crate) async fn redeem_token<T, E: From<TokenError>>(
        &self,
        id: &str,
        secret_hash: &str,
        now_unix: u64,
        mut issue: impl FnMut(&TokenRecord) -> Result<T, E>,
    ) -> Result<Result<(TokenRecord, T), E>, ControlError> {
        for _ in 0..crate::change::COMMIT_ATTEMPTS {
            let Some((record, at)) = self.token(id).await? else {
                return Ok(Err(TokenError::Unknown.into()));
            };
            let (record, issued) =
                match crate::tokens::spend(Some(record), secret_hash, now_unix, &mut issue) {
                    Ok(spent) => spent,
                    Err(e) => return Ok(Err(e)),
                };
            let json = serde_json::to_string(&record).unwrap_or_default();
            let txn = txn(
                vec![mod_revision_is(token_key(id), at)],
                vec![put(token_key(id), json, 0)],
            );
            if self.txn(txn).await?.succeeded {
                return Ok(Ok((record, issued)));
            }
        }
        Err(self.corrupt(format!(
            "join token {id} kept changing while it was being redeemed; try again"
        )))
    }

    /// Every stored token by id, in id order.
    pub(crate) async fn tokens(&self) -> Result<Vec<(String, TokenRecord)>, ControlError> {
        let prefix = token_key("");
        let got = self.get(get_prefix(prefix.clone())).await?;
        Ok(got
            .kvs
            .iter()
            .filter_map(|kv| {
                let id = std::str::from_utf8(&kv.key)
                    .ok()?
                    .strip_prefix(&prefix)?
                    .to_string();
                serde_json::from_slice(&kv.value).ok().map(|r| (id, r))
            })
            .collect())
    }

    /// Deletes a token; its record, if there was one.
    pub(crate) async fn delete_token(&self, id: &str) -> Result<Option<TokenRecord>, ControlError> {
        let gone = self
            .delete(pb::DeleteRangeRequest {
                key: token_key(id).into_bytes(),
                range_end: Vec::new(),
                prev_kv: true,
            })
            .await?;
        Ok(gone
            .prev_kvs
            .first()
            .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
    }
}

fn read_pem(path: &PathBuf) -> Result<Vec<u8>, ControlError> {
    std::fs::read(path).map_err(|source| ControlError::DataDir {
        path: path.clone(),
        source,
    })
}

fn unreachable_etcd(endpoints: &str, e: &etcd::Error) -> ControlError {
    ControlError::Etcd {
        endpoints: endpoints.to_string(),
        message: e.to_string(),
    }
}
