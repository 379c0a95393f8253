//! The admin API: tokens, apply / delete / get, history and rollback, proxy status. Every
//! call needs the admin credential; every change is a revision recorded with its author.

use crate::proxies::unix_now;
use crate::service::{State, internal};
use crate::store::Change;
use crate::tokens::{self, TokenRecord};
use bulkhead_api::resource_to_wire;
use bulkhead_api::v1::{self as pb, admin_server::Admin};
use bulkhead_identity::SpiffeId;
use bulkhead_policy::Origin;
use bulkhead_policy::model::Resource;
use std::collections::HashSet;
use std::time::Duration;
use tonic::{Request, Response, Status};

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
const DEFAULT_HISTORY: usize = 20;

fn lines(changes: &[(String, Change)], keep: impl Fn(&str) -> bool) -> Vec<String> {
    changes
        .iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, c)| format!("{k} {}", c.word()))
        .collect()
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
            spiffe_id: id.to_string(),
            namespace,
            workload,
            expires_unix,
            uses_left: uses,
        };
        self.store
            .insert_token(&token_id, &record)
            .map_err(internal)?;
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
        let parsed = bulkhead_policy::parse_file(&r.file, &r.yaml)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let _one_change_at_a_time = self.writes.lock().await;
        // The whole set after this apply must compile: a change that would leave any policy
        // unenforceable (say, a port re-declared as tcp under an HTTP rule) is refused.
        let new_keys: HashSet<String> = parsed.iter().map(|(r, _)| r.key()).collect();
        let current = self.snapshot.borrow().resources.clone();
        let (mut set, mut origins): (Vec<Resource>, Vec<Option<Origin>>) = current
            .into_iter()
            .filter(|r| !new_keys.contains(&r.key()))
            .map(|r| (r, None))
            .unzip();
        for (res, origin) in parsed {
            set.push(res);
            origins.push(Some(origin));
        }
        self.check(&set, &origins)?;
        let (revision, changes) = self.commit(&set, &actor, &format!("apply {}", r.file))?;
        let applied = lines(&changes, |k| new_keys.contains(k));
        Ok(Response::new(pb::ApplyResponse { revision, applied }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let actor = self.require_admin(&req)?;
        let keys: HashSet<String> = req.into_inner().keys.into_iter().collect();
        let _one_change_at_a_time = self.writes.lock().await;
        let current = self.snapshot.borrow().resources.clone();
        let existing: HashSet<String> = current.iter().map(Resource::key).collect();
        if let Some(missing) = keys.iter().find(|k| !existing.contains(*k)) {
            return Err(Status::not_found(format!(
                "{missing} does not exist; `bulkhead get` lists resources as Kind/namespace/name"
            )));
        }
        let set: Vec<Resource> = current
            .into_iter()
            .filter(|r| !keys.contains(&r.key()))
            .collect();
        self.check(&set, &vec![None; set.len()])?;
        let (revision, changes) = self.commit(&set, &actor, "delete")?;
        Ok(Response::new(pb::ApplyResponse {
            revision,
            applied: lines(&changes, |k| keys.contains(k)),
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
            .store
            .history(limit)
            .map_err(internal)?
            .into_iter()
            .map(|r| pb::RevisionInfo {
                revision: r.revision,
                time_unix: r.time_unix,
                actor: r.actor,
                action: r.action,
                changes: r.changes,
            })
            .collect();
        Ok(Response::new(pb::HistoryResponse { revisions }))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let actor = self.require_admin(&req)?;
        let target = req.into_inner().revision;
        let _one_change_at_a_time = self.writes.lock().await;
        let Some(set) = self.store.set_at(target).map_err(internal)? else {
            return Err(Status::not_found(format!(
                "there is no revision {target}; `bulkhead history` lists them"
            )));
        };
        // Declarations can have changed since; the restored set must still compile.
        self.check(&set, &vec![None; set.len()])?;
        let (revision, changes) = self.commit(&set, &actor, &format!("rollback to {target}"))?;
        Ok(Response::new(pb::ApplyResponse {
            revision,
            applied: lines(&changes, |_| true)
                .into_iter()
                .filter(|l| !l.ends_with(" unchanged"))
                .collect(),
        }))
    }

    async fn list_proxies(
        &self,
        req: Request<pb::ListProxiesRequest>,
    ) -> Result<Response<pb::ListProxiesResponse>, Status> {
        self.require_admin(&req)?;
        Ok(Response::new(pb::ListProxiesResponse {
            proxies: self.proxies.list(),
        }))
    }
}
