//! The admin API: tokens, apply / delete / get, history and rollback, proxy status, the
//! CAs (status, add, switch, retire), the stored traffic edges and anomalies. Every call
//! needs the admin credential; every policy change is a revision recorded with its author,
//! every CA change is logged with its author.

use crate::anomaly::{EVENT_RETENTION, MAX_EVENTS_PER_LIST};
use crate::cas::{CaChangeError, CaOrigin, CaState, short};
use crate::change::Proposal;
use crate::flows::{JsonChunks, LIST_CHUNK_BYTES};
use crate::proxies::unix_now;
use crate::service::{State, caller, internal};
use crate::store::SetAt;
use crate::tokens::{self, TokenRecord};
use bulkhead_api::channel::CONTROL_ID_PATH;
use bulkhead_api::resource_to_wire;
use bulkhead_api::v1::{self as pb, admin_server::Admin};
use bulkhead_identity::{Ca, SpiffeId, fingerprint};
use bulkhead_insight::tap::TapFilter;
use bulkhead_policy::Origin;
use bulkhead_policy::model::{Resource, ResourceName};
use std::collections::HashSet;
use std::time::{Duration, SystemTime};
use tonic::{Request, Response, Status};

type ListEdgesStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<pb::ListEdgesResponse, Status>> + Send>,
>;

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
const DEFAULT_HISTORY: usize = 20;

/// The largest policy file one apply may carry. Larger files are refused in these words
/// before anything is parsed (the admin service reads messages up to a little more, so the
/// refusal is ours, not the transport's).
pub const MAX_APPLY_BYTES: usize = 16 * 1024 * 1024;

/// Why a file is too large to apply.
fn too_large(file: &str, bytes: usize) -> String {
    format!(
        "{file} is {}; one apply may carry at most {}: split it into several files and apply each",
        crate::change::mib(bytes),
        crate::change::mib(MAX_APPLY_BYTES)
    )
}

#[tonic::async_trait]
impl Admin for State {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let actor = self.require_admin(&req)?;
        let r = req.into_inner();
        let id =
            SpiffeId::parse(&r.spiffe_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if id.trust_domain() != self.trust_domain() {
            return Err(Status::invalid_argument(format!(
                "{id} is outside this control plane's trust domain {}",
                self.trust_domain()
            )));
        }
        id.refuse_reserved()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let pick = |given: String, derived: Option<&str>, what: &str| {
            let v = if given.is_empty() {
                derived.unwrap_or_default().to_string()
            } else {
                given
            };
            if v.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "{id} is not of the form spiffe://<td>/ns/<namespace>/sa/<account>; pass --{what}"
                )));
            }
            if !bulkhead_policy::is_valid_name(&v) {
                return Err(Status::invalid_argument(format!(
                    "{what} {v:?} is not a valid name (lowercase letters, digits, '-')"
                )));
            }
            Ok(v)
        };
        let namespace = pick(r.namespace, id.namespace(), "namespace")?;
        let workload = pick(r.workload, id.service_account(), "workload")?;
        let ttl = match r.ttl_seconds {
            0 => DEFAULT_TOKEN_TTL,
            s => Duration::from_secs(s),
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument(
                "token lifetime may be at most 30 days",
            ));
        }
        let uses = if r.max_uses == 0 { 1 } else { r.max_uses };
        let (token_id, secret_sha256, token) = tokens::mint();
        let expires_unix = unix_now() + ttl.as_secs();
        let record = TokenRecord {
            secret_sha256,
            spiffe_id: id.clone(),
            namespace,
            workload,
            expires_unix,
            uses_left: uses,
        };
        self.store
            .create_token(&token_id, &record, &actor, unix_now())
            .map_err(internal)?
            .map_err(|revoked| Status::failed_precondition(format!(
                "{}; a revoked identity gets no join token (`bulkhead unrevoke identity` lifts it once its certificates expired)",
                revoked.describe()
            )))?;
        if let Some(etcd) = &self.shared {
            etcd.put_token(&token_id, &record).await.map_err(internal)?;
        }
        tracing::info!(actor, token_id, spiffe_id = %id, namespace = record.namespace, workload = record.workload, uses, "join token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token,
            expires_unix,
        }))
    }

    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let actor = self.require_admin(&req)?;
        let r = req.into_inner();
        let files: Vec<pb::ApplyFile> = if r.files.is_empty() {
            vec![pb::ApplyFile {
                file: r.file,
                yaml: r.yaml,
            }]
        } else {
            r.files
        };
        let total: usize = files.iter().map(|f| f.yaml.len()).sum();
        if total > MAX_APPLY_BYTES {
            let name = match files.as_slice() {
                [one] => one.file.clone(),
                many => format!("{} files", many.len()),
            };
            return Err(Status::invalid_argument(too_large(&name, total)));
        }
        let mut parsed: Vec<(Resource, Origin)> = Vec::new();
        let mut errors = Vec::new();
        for f in &files {
            match bulkhead_policy::parse_file(&f.file, &f.yaml) {
                Ok(resources) => parsed.extend(resources),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if !errors.is_empty() {
            return Err(Status::invalid_argument(errors.join("\n")));
        }
        // One resource twice (in two files, or twice in one) would leave which one wins to
        // the order of the files: refused, naming both places.
        let mut seen: std::collections::HashMap<String, &Origin> = std::collections::HashMap::new();
        for (res, origin) in &parsed {
            if let Some(first) = seen.insert(res.key(), origin) {
                errors.push(format!(
                    "{}:{}: {} is also at {}:{}; apply each resource once",
                    origin.file,
                    origin.line_offset + 1,
                    res.key(),
                    first.file,
                    first.line_offset + 1
                ));
            }
        }
        if !errors.is_empty() {
            return Err(Status::invalid_argument(errors.join("\n")));
        }
        let new_keys: HashSet<String> = parsed.iter().map(|(r, _)| r.key()).collect();
        let names: Vec<&str> = files.iter().map(|f| f.file.as_str()).collect();
        let action = format!("apply {}", names.join(", "));
        let (changed, ()) = self
            .change_with(&actor, &action, r.expect_revision, r.dry_run, |current| {
                // The applied resources replace those of the same key; the rest stay.
                let (mut set, mut origins): (Vec<Resource>, Vec<Option<Origin>>) = current
                    .resources
                    .iter()
                    .filter(|r| !new_keys.contains(&r.key()))
                    .map(|r| (r.clone(), None))
                    .unzip();
                for (res, origin) in &parsed {
                    set.push(res.clone());
                    origins.push(Some(origin.clone()));
                }
                Ok((Proposal { set, origins }, ()))
            })
            .await?;
        Ok(Response::new(pb::ApplyResponse {
            revision: changed.revision,
            applied: changed.lines(|k| new_keys.contains(k)),
            affected_workloads: changed.affected_names(),
            dry_run: r.dry_run,
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let actor = self.require_admin(&req)?;
        let r = req.into_inner();
        let keys: HashSet<String> = r.keys.into_iter().collect();
        let (changed, ()) = self
            .change(&actor, "delete", r.expect_revision, |current| {
                let existing: HashSet<String> = current.resources.iter().map(Resource::key).collect();
                if let Some(missing) = keys.iter().find(|k| !existing.contains(*k)) {
                    return Err(Status::not_found(format!(
                        "{missing} does not exist; `bulkhead get` lists resources as Kind/namespace/name"
                    )));
                }
                let set = current
                    .resources
                    .iter()
                    .filter(|r| !keys.contains(&r.key()))
                    .cloned()
                    .collect();
                Ok((Proposal::unlocated(set), ()))
            })
            .await?;
        Ok(Response::new(pb::ApplyResponse {
            revision: changed.revision,
            applied: changed.lines(|k| keys.contains(k)),
            affected_workloads: changed.affected_names(),
            dry_run: false,
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        self.require_admin(&req)?;
        let kind = req.into_inner().kind;
        let snap = self.snapshot.borrow().clone();
        Ok(Response::new(pb::GetResponse {
            revision: snap.revision,
            resources: snap
                .resources
                .iter()
                .filter(|r| kind.is_empty() || r.kind() == kind)
                .map(resource_to_wire)
                .collect(),
        }))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        self.require_admin(&req)?;
        let limit = match req.into_inner().limit {
            0 => DEFAULT_HISTORY,
            n => n as usize,
        };
        let revisions = self
            .revision_log(limit)
            .await?
            .into_iter()
            .map(|r| pb::RevisionInfo {
                revision: r.revision,
                time_unix: r.time_unix,
                actor: r.actor,
                action: r.action,
                changes: r.changes,
            })
            .collect();
        let mut audit = self.store.audit_log(limit).map_err(internal)?;
        if let Some(etcd) = &self.shared {
            // Every replica's entries, and this one's not copied yet.
            let shared = etcd.audit_log(limit).await.map_err(internal)?;
            audit = crate::store::etcd_audit::merged(audit, shared, limit);
        }
        let audit = audit
            .into_iter()
            .map(|e| pb::AuditEntry {
                seq: e.seq,
                time_unix: e.time_unix,
                actor: e.actor,
                action: e.action,
                detail: e.detail,
                revision: e.revision.unwrap_or(0),
            })
            .collect();
        Ok(Response::new(pb::HistoryResponse { revisions, audit }))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let actor = self.require_admin(&req)?;
        let r = req.into_inner();
        let target = r.revision;
        let action = format!("rollback to {target}");
        let restored = self.set_at(target).await?;
        let (changed, ()) = self
            .change(&actor, &action, r.expect_revision, |_| {
                let set = match &restored {
                    SetAt::Kept(set) => set.clone(),
                    SetAt::Missing => {
                        return Err(Status::not_found(format!(
                            "there is no revision {target}; `bulkhead history` lists them"
                        )));
                    }
                    &SetAt::Pruned { oldest_kept } => {
                        let h = self.store.history_retention();
                        return Err(Status::not_found(format!(
                            "revision {target} was pruned: the control plane keeps the whole set of the newest {} revisions for at most {} days (bulkhead control --history-revisions, --history-max-age). The oldest revision it can restore is {oldest_kept}; `bulkhead history` still lists who changed what",
                            h.max_revisions,
                            h.max_age.as_secs() / 86_400,
                        )));
                    }
                };
                // Declarations can have changed since; the restored set must still compile.
                Ok((Proposal::unlocated(set), ()))
            })
            .await?;
        Ok(Response::new(pb::ApplyResponse {
            revision: changed.revision,
            applied: changed
                .lines(|_| true)
                .into_iter()
                .filter(|l| !l.ends_with(" unchanged"))
                .collect(),
            affected_workloads: changed.affected_names(),
            dry_run: false,
        }))
    }

    async fn list_replicas(
        &self,
        req: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        self.require_admin(&req)?;
        let Some(replica) = &self.replica else {
            return Err(Status::internal("this control plane has no replica entry"));
        };
        let Some(etcd) = &self.shared else {
            let e = &replica.entry;
            let bundle = self.cas.borrow().bundle().fingerprints();
            let connected = self
                .proxies
                .list(&bundle)
                .iter()
                .filter(|p| p.connected)
                .count();
            return Ok(Response::new(pb::ListReplicasResponse {
                replicas: vec![pb::ReplicaInfo {
                    id: e.id.clone(),
                    address: e.address.clone(),
                    version: e.version.clone(),
                    started_unix: e.started_unix,
                    leader: true,
                    seen_unix: crate::proxies::unix_now(),
                    healthy: true,
                    proxies: u32::try_from(connected).unwrap_or(u32::MAX),
                    answering: true,
                }],
                store: "embedded".into(),
            }));
        };
        let (replicas, _) = crate::replicas::list(etcd, replica)
            .await
            .map_err(internal)?;
        Ok(Response::new(pb::ListReplicasResponse {
            replicas,
            store: "etcd".into(),
        }))
    }

    async fn version(
        &self,
        req: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        self.require_admin(&req)?;
        let bundle = self.cas.borrow().bundle().fingerprints();
        Ok(Response::new(pb::VersionResponse {
            control_version: env!("CARGO_PKG_VERSION").to_string(),
            proxies: self.proxies.list(&bundle),
        }))
    }

    async fn list_proxies(
        &self,
        req: Request<pb::ListProxiesRequest>,
    ) -> Result<Response<pb::ListProxiesResponse>, Status> {
        self.require_admin(&req)?;
        let bundle = self.cas.borrow().bundle().fingerprints();
        let revocations = self.store.revocations().map_err(internal)?;
        let mut proxies = self.all_proxies(&bundle).await?;
        for p in &mut proxies {
            if let Some(r) = revocations.iter().find(|r| {
                r.subject == p.spiffe_id || (!p.instance.is_empty() && r.subject == p.instance)
            }) {
                p.revoked = r.describe();
            }
        }
        Ok(Response::new(pb::ListProxiesResponse { proxies }))
    }

    async fn ca_status(
        &self,
        req: Request<pb::CaStatusRequest>,
    ) -> Result<Response<pb::CaStatusResponse>, Status> {
        self.require_admin(&req)?;
        Ok(Response::new(self.ca_status_now().await?))
    }

    async fn ca_bundle(
        &self,
        req: Request<pb::CaBundleRequest>,
    ) -> Result<Response<pb::CaBundleResponse>, Status> {
        self.require_admin(&req)?;
        let cas = self.cas.borrow().clone();
        Ok(Response::new(pb::CaBundleResponse {
            trust_domain: cas.trust_domain().to_string(),
            pem: cas.bundle().to_pem(),
            spiffe_json: crate::spiffe_bundle::document_text(
                &cas,
                self.bundle_refresh_hint,
                &self.jwt.load().public(crate::proxies::unix_now()),
            ),
            spiffe_sequence: crate::spiffe_bundle::sequence(&cas),
        }))
    }

    async fn add_ca(
        &self,
        req: Request<pb::AddCaRequest>,
    ) -> Result<Response<pb::CaChangeResponse>, Status> {
        let actor = self.require_admin(&req)?;
        let r = req.into_inner();
        let importing = [&r.cert_pem, &r.key_pem, &r.chain_pem]
            .iter()
            .any(|p| !p.trim().is_empty());
        let now = SystemTime::now();
        let (ca, origin) = if importing {
            if r.cert_pem.trim().is_empty() || r.key_pem.trim().is_empty() {
                return Err(Status::invalid_argument(
                    "importing a CA needs its certificate and its private key (--import-cert and --import-key), and the chain up to its root (--chain) unless it is a root",
                ));
            }
            let ca = Ca::import(
                self.trust_domain(),
                &r.cert_pem,
                &r.key_pem,
                &r.chain_pem,
                now,
            )
            .map_err(|e| Status::invalid_argument(format!("CA refused: {e}")))?;
            (ca, CaOrigin::Imported)
        } else {
            let ca = Ca::generate(self.trust_domain(), now)
                .map_err(|e| internal(crate::ControlError::Identity(e)))?;
            (ca, CaOrigin::Generated)
        };
        let id = ca.fingerprint();
        let _one_change_at_a_time = self.ca_changes.lock().await;
        let current = self.cas.borrow().clone();
        // Before anything is written: a known CA's files stay as they are.
        if let Some(known) = current.members().iter().find(|m| m.record.sha256 == id) {
            return Err(refused(CaChangeError::Duplicate {
                id: short(&id),
                state: known.record.state.word(),
            }));
        }
        let member = self.dir.store_new_ca(ca, origin).map_err(internal)?;
        let set = current.with_added(member).map_err(refused)?;
        self.publish_cas(set).await.map_err(internal)?;
        self.audit_ca(
            &actor,
            format!("ca add {id}"),
            vec![format!(
                "{} CA; its root is in the bundle, it does not sign yet",
                if origin == CaOrigin::Imported {
                    "an imported"
                } else {
                    "a generated"
                }
            )],
        );
        tracing::info!(
            actor,
            ca = short(&id),
            ?origin,
            "added a CA: its root is in the bundle now, pushed to every proxy; it does not sign yet"
        );
        Ok(Response::new(self.ca_changed(&id).await?))
    }

    async fn switch_ca(
        &self,
        req: Request<pb::SwitchCaRequest>,
    ) -> Result<Response<pb::CaChangeResponse>, Status> {
        let actor = self.require_admin(&req)?;
        let r = req.into_inner();
        let _one_change_at_a_time = self.ca_changes.lock().await;
        let current = self.cas.borrow().clone();
        let target = current.find(&r.id).map_err(refused)?;
        let id = target.record.sha256.clone();
        if target.record.state == CaState::Trusted && !r.force {
            // A proxy that does not hold the root yet would refuse every certificate the
            // CA signs from now on.
            let root = fingerprint(&target.root);
            // With replicas on etcd, every replica's proxies: the CA signs for all of them.
            let lacking: Vec<String> = self
                .all_proxies(&[])
                .await?
                .into_iter()
                .filter(|p| p.connected && !p.bundle_sha256.contains(&root))
                .map(|p| match p.replica.as_str() {
                    "" => format!("{} ({}/{})", p.spiffe_id, p.namespace, p.workload),
                    replica => format!(
                        "{} ({}/{}) on replica {replica}",
                        p.spiffe_id, p.namespace, p.workload
                    ),
                })
                .collect();
            if !lacking.is_empty() {
                let shown: Vec<&str> = lacking.iter().take(5).map(String::as_str).collect();
                return Err(Status::failed_precondition(format!(
                    "{} connected proxies have not confirmed holding the root of CA {} and would refuse the certificates it signs: {}{}. Wait until `bulkhead ca status` shows every proxy on the current bundle, or pass --force",
                    lacking.len(),
                    short(&id),
                    shown.join(", "),
                    if lacking.len() > shown.len() {
                        ", …"
                    } else {
                        ""
                    }
                )));
            }
        }
        let set = current
            .with_switched(&id, unix_now(), self.svid_lifetime())
            .map_err(refused)?;
        let signer = set.active().clone();
        self.publish_cas(set).await.map_err(internal)?;
        self.audit_ca(
            &actor,
            format!("ca switch {id}"),
            vec![format!(
                "it signs every new certificate from now on{}",
                if r.force {
                    " (forced: not every proxy had confirmed its root)"
                } else {
                    ""
                }
            )],
        );
        if let Err(e) = self.dir.write_admin_credential(&signer) {
            // The switch stands; the old credential stays valid until its CA is retired.
            tracing::error!(error = %e, "switched CA, but could not re-issue the admin credential from it; it will be at the next start");
        }
        tracing::info!(
            actor,
            ca = short(&id),
            force = r.force,
            "switched signing CA: new certificates (proxies', the control plane's, the admin credential) come from it; proxies renew soon"
        );
        Ok(Response::new(self.ca_changed(&id).await?))
    }

    async fn retire_ca(
        &self,
        req: Request<pb::RetireCaRequest>,
    ) -> Result<Response<pb::CaChangeResponse>, Status> {
        let actor = self.require_admin(&req)?;
        let r = req.into_inner();
        let _one_change_at_a_time = self.ca_changes.lock().await;
        let current = self.cas.borrow().clone();
        let (set, record) = current
            .with_retired(&r.id, unix_now(), r.force)
            .map_err(refused)?;
        self.publish_cas(set).await.map_err(internal)?;
        self.dir.delete_key(&record);
        self.audit_ca(
            &actor,
            format!("ca retire {}", record.sha256),
            vec![format!(
                "its root left the bundle and its key was deleted{}",
                if r.force {
                    " (forced: certificates it signed may still be valid)"
                } else {
                    ""
                }
            )],
        );
        tracing::info!(
            actor,
            ca = short(&record.sha256),
            force = r.force,
            "retired a CA: its root left the bundle, pushed to every proxy"
        );
        Ok(Response::new(self.ca_changed(&record.sha256).await?))
    }

    type ListEdgesStream = ListEdgesStream;

    async fn list_edges(
        &self,
        req: Request<pb::ListEdgesRequest>,
    ) -> Result<Response<ListEdgesStream>, Status> {
        // Another replica asks for this one's own edges, with the control plane's identity
        // (which no workload can hold); anyone else needs the admin credential.
        let control_id = format!("spiffe://{}{CONTROL_ID_PATH}", self.trust_domain());
        let from_replica =
            self.shared.is_some() && caller(&req).is_ok_and(|id| id.as_str() == control_id);
        if !from_replica {
            self.require_admin(&req)?;
        }
        let since = req.into_inner().since;
        // Hours past the window may not be deleted yet (that happens on a report).
        let from = since.max(self.flow_retention.oldest_bucket(unix_now()));
        let mut edges = self.store.edges_since(from).map_err(internal)?;
        let mut missing_replicas = Vec::new();
        if let (false, Some(etcd), Some(replica)) = (from_replica, &self.shared, &self.replica) {
            // The union of every replica's: each proxy reports to the replica it is on.
            let others = crate::replicas::others_edges(self, etcd, replica, from)
                .await
                .map_err(internal)?;
            missing_replicas = others.missing;
            edges = bulkhead_insight::merge_edges(edges.into_iter().chain(others.edges));
        }
        let (dropped, refused) = self.flow_counters.get();
        // Chunks are encoded as the caller reads them, so at most one is held at a time.
        let chunks = JsonChunks::new(edges, LIST_CHUNK_BYTES).map(move |chunk| {
            chunk
                .map(|edges_json| pb::ListEdgesResponse {
                    edges_json,
                    dropped,
                    refused,
                    missing_replicas: missing_replicas.clone(),
                })
                .map_err(|e| Status::internal(format!("cannot encode the edges: {e}")))
        });
        Ok(Response::new(Box::pin(futures_util::stream::iter(chunks))))
    }

    type TapStream = crate::tap::TapStream;

    async fn tap(&self, req: Request<pb::TapRequest>) -> Result<Response<Self::TapStream>, Status> {
        self.require_admin(&req)?;
        let r = req.into_inner();
        let workload = ResourceName {
            namespace: r.namespace,
            name: r.workload,
        };
        let filter: TapFilter = if r.filter_json.is_empty() {
            TapFilter::default()
        } else {
            serde_json::from_str(&r.filter_json).map_err(|e| {
                Status::invalid_argument(format!("the tap filter does not decode: {e}"))
            })?
        };
        let (subscription, rx) = self.taps.subscribe(&workload, filter)?;
        let connected = self.proxies.connected(&workload);
        tracing::info!(%workload, proxies = connected, "tap opened");
        Ok(Response::new(crate::tap::session_stream(
            subscription,
            rx,
            connected,
        )))
    }

    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        let actor = self.require_admin(&req)?;
        let key = req.get_ref().key.clone();
        let (changed, forced_over) = self.promote_audit(&actor, req.into_inner()).await?;
        Ok(Response::new(pb::PromoteResponse {
            result: Some(pb::ApplyResponse {
                revision: changed.revision,
                applied: changed.lines(|k| k == key),
                affected_workloads: changed.affected_names(),
                dry_run: false,
            }),
            forced_over,
        }))
    }

    type AwaitRevisionStream = crate::delivery::AwaitStream;

    async fn await_revision(
        &self,
        req: Request<pb::AwaitRevisionRequest>,
    ) -> Result<Response<Self::AwaitRevisionStream>, Status> {
        self.require_admin(&req)?;
        let r = req.into_inner();
        let timeout = match r.timeout_ms {
            0 => crate::delivery::DEFAULT_WAIT,
            ms => Duration::from_millis(ms),
        };
        // With replicas on etcd, the other live replicas' proxies too.
        let others = match (&self.shared, &self.replica) {
            (Some(etcd), Some(replica)) => {
                let others = crate::replicas::follow_others_proxies(etcd, replica)
                    .await
                    .map_err(|e| {
                        Status::aborted(format!(
                            "cannot read the other replicas' proxies from etcd ({e}); revision {} is committed: see `bulkhead get proxies`",
                            r.revision
                        ))
                    })?;
                Some((replica.id().to_string(), others))
            }
            _ => None,
        };
        let sources = crate::delivery::Sources {
            registry: self.proxies.clone(),
            others,
        };
        Ok(Response::new(crate::delivery::await_revision(
            sources,
            r.revision,
            r.workloads,
            timeout,
        )))
    }

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        self.require_admin(&req)?;
        let r = req.into_inner();
        let limit = match r.limit as usize {
            0 => MAX_EVENTS_PER_LIST,
            n => n.min(MAX_EVENTS_PER_LIST),
        };
        let now = unix_now();
        // Events past the window may not be deleted yet (that happens on the next one).
        let since = r.since.max(now.saturating_sub(EVENT_RETENTION.window_secs));
        let mut page = self.store.events(r.after, since, limit).map_err(internal)?;
        if let (Some(etcd), Some(replica), 0) = (&self.shared, &self.replica, r.after) {
            // The first page holds every other replica's events too (those each shares
            // under its lease); the pages after it, and `--follow`, this replica's.
            let others = crate::replicas::others_events(etcd, replica, since)
                .await
                .map_err(internal)?;
            page.events.extend(others);
            page.events.sort_by_key(|e| e.at);
        }
        let events_json = serde_json::to_string(&page.events)
            .map_err(|e| Status::internal(format!("cannot encode the events: {e}")))?;
        Ok(Response::new(pb::ListEventsResponse {
            events_json,
            last: page.last,
            learning_until: self.anomalies.learning_until(now),
        }))
    }

    // Issue 21: console
    async fn create_console_token(
        &self,
        req: Request<pb::CreateConsoleTokenRequest>,
    ) -> Result<Response<pb::CreateConsoleTokenResponse>, Status> {
        crate::console::create_token(self, req)
    }
}

fn refused(e: CaChangeError) -> Status {
    match e {
        CaChangeError::Unknown(_) => Status::not_found(e.to_string()),
        CaChangeError::TooShort { .. } | CaChangeError::Ambiguous { .. } => {
            Status::invalid_argument(e.to_string())
        }
        CaChangeError::Duplicate { .. } => Status::already_exists(e.to_string()),
        CaChangeError::Invalid(_) => {
            tracing::error!(error = %e, "CA change refused");
            Status::internal(e.to_string())
        }
        _ => Status::failed_precondition(e.to_string()),
    }
}

impl State {
    /// Records a CA change in the audit log (`bulkhead history`). The change is made and
    /// published already: a failure to record it is logged, not undone.
    fn audit_ca(&self, actor: &str, action: String, detail: Vec<String>) {
        let entry = crate::store::audit::NewEntry {
            actor: actor.to_string(),
            action,
            detail,
            revision: None,
        };
        if let Err(e) = self.store.audit(entry, unix_now()) {
            tracing::error!(error = %e, "could not record a CA change in the audit log");
        }
    }

    /// The CA set and how far the connected proxies (with replicas on etcd, every
    /// replica's) are on it.
    async fn ca_status_now(&self) -> Result<pb::CaStatusResponse, Status> {
        let cas = self.cas.borrow().clone();
        let bundle = cas.bundle().fingerprints();
        let signing = cas.active().fingerprint();
        let connected: Vec<pb::ProxyStatus> = self
            .all_proxies(&bundle)
            .await?
            .into_iter()
            .filter(|p| p.connected)
            .collect();
        let count = |f: &dyn Fn(&pb::ProxyStatus) -> bool| {
            u32::try_from(connected.iter().filter(|p| f(p)).count()).unwrap_or(u32::MAX)
        };
        Ok(pb::CaStatusResponse {
            trust_domain: self.trust_domain().to_string(),
            cas: cas.infos(),
            bundle_sha256: bundle,
            svid_lifetime_seconds: self.svid_lifetime().as_secs(),
            proxies_connected: count(&|_| true),
            proxies_with_current_bundle: count(&|p| p.bundle_current),
            proxies_on_signing_ca: count(&|p| p.cert_ca_sha256 == signing),
        })
    }

    async fn ca_changed(&self, id: &str) -> Result<pb::CaChangeResponse, Status> {
        Ok(pb::CaChangeResponse {
            sha256: id.to_string(),
            status: Some(self.ca_status_now().await?),
        })
    }

    /// The proxies connected to this control plane, with `bundle`'s roots marked; with
    /// replicas on etcd, every replica's: this one's live, the others' as they last reported
    /// them to etcd (within half a second), each naming its replica.
    async fn all_proxies(&self, bundle: &[String]) -> Result<Vec<pb::ProxyStatus>, Status> {
        let mut proxies = self.proxies.list(bundle);
        if let (Some(etcd), Some(replica)) = (&self.shared, &self.replica) {
            for p in &mut proxies {
                p.replica = replica.id().to_string();
            }
            let (_, others) = crate::replicas::list(etcd, replica)
                .await
                .map_err(internal)?;
            // Current against this replica's bundle, which the other may not have taken up.
            proxies.extend(
                others
                    .into_iter()
                    .filter(|p| p.replica != replica.id())
                    .map(|mut p| {
                        p.bundle_current = crate::proxies::same_roots(&p.bundle_sha256, bundle);
                        p
                    }),
            );
        }
        Ok(proxies)
    }
}
