//! The control plane's shared state, and the services proxies call: Identity (join) and
//! Config (watch, ack, flow reports). The admin API is in `admin.rs`.

use crate::anomaly::{Anomalies, Monitor};
use crate::cas::CaSet;
use crate::datadir::DataDir;
use crate::error::ControlError;
use crate::flows::{self, Counters, FlowRetention, Reporter};
use crate::listener::PeerInfo;
use crate::metrics::Metrics;
use crate::proxies::{Registry, unix_now};
use crate::store::Store;
use crate::tokens::{self, TokenError, TokenRecord};
use arc_swap::ArcSwap;
use bulkhead_api::channel::ADMIN_ID_PATH;
use bulkhead_api::resource_to_wire;
use bulkhead_api::v1::{self as pb, config_server::Config, identity_server::Identity};
use bulkhead_identity::{Ca, IdentityError, SpiffeId};
use bulkhead_policy::model::{Resource, ResourceName};
use bulkhead_policy::{Origin, PolicySet};
use futures_util::Stream;
use rustls::ServerConfig;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

mod attested;

/// The resource set every proxy's view is cut from, with what the cut needs precomputed once
/// per revision: the distribution index and each resource's wire encoding.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub revision: u64,
    pub resources: Vec<Resource>,
    pub(crate) wire: Vec<pb::Resource>,
    /// The mesh's address table, the same for every proxy.
    pub(crate) endpoints: Vec<pb::Endpoint>,
    pub(crate) distribution: bulkhead_policy::Distribution,
    /// The span of the commit that made this revision, when it was traced: each proxy's
    /// push span is its child.
    pub(crate) commit_span: Option<bulkhead_api::otlp::SpanContext>,
    /// When this revision was committed (or loaded), for the push latency metric.
    pub(crate) committed: Option<std::time::Instant>,
}

impl Snapshot {
    pub(crate) fn new(revision: u64, resources: Vec<Resource>) -> Snapshot {
        let wire = resources.iter().map(resource_to_wire).collect();
        let distribution = bulkhead_policy::Distribution::new(&resources);
        let endpoints = bulkhead_api::endpoints_to_wire(
            &bulkhead_policy::Endpoints::from_resources(&resources),
        );
        Snapshot {
            revision,
            resources,
            wire,
            endpoints,
            distribution,
            commit_span: None,
            committed: Some(std::time::Instant::now()),
        }
    }

    /// The part that concerns `workload`, with the trust bundle and the revocations, as one
    /// message.
    fn config_for(
        &self,
        workload: &ResourceName,
        trust: &pb::TrustBundle,
        revoked: &bulkhead_identity::RevokedSet,
    ) -> pb::ProxyConfig {
        let resources: Vec<pb::Resource> = self
            .distribution
            .indices_for(workload)
            .into_iter()
            .filter_map(|i| self.wire.get(i).cloned())
            .collect();
        pb::ProxyConfig {
            revision: self.revision,
            digest: bulkhead_api::pieces::digest(&resources, &self.endpoints),
            resources,
            endpoints: self.endpoints.clone(),
            trust_bundle: Some(trust.clone()),
            piece: 0,
            pieces: 1,
            unchanged: false,
            revocations: Some(crate::credentials::to_wire(revoked)),
        }
    }
}

/// Follows `key` in etcd on a task of its own: the receiver sees every value it takes, until
/// it is dropped.
pub(crate) fn followed(
    etcd: &crate::store::etcd::EtcdStore,
    key: String,
) -> watch::Receiver<Vec<u8>> {
    let (seen, values) = watch::channel(Vec::new());
    let follower = etcd.clone();
    tokio::spawn(async move { follower.follow(key, seen).await });
    values
}

/// With replicas on etcd, follows the identity revocations there: one made or lifted on
/// another replica is taken up here and pushed to this replica's proxies.
pub(crate) fn spawn_follow_revocations(state: Arc<State>) {
    let Some(etcd) = state.shared.clone() else {
        return;
    };
    let (seen, mut values) = watch::channel(Vec::new());
    tokio::spawn(async move {
        etcd.follow_prefix(format!("{}revocations/", crate::store::etcd::PREFIX), seen)
            .await
    });
    let weak = Arc::downgrade(&state);
    drop(state);
    tokio::spawn(async move {
        while values.changed().await.is_ok() {
            values.borrow_and_update();
            let Some(state) = weak.upgrade() else {
                return;
            };
            if let Err(e) = state.sync_revocations().await {
                tracing::error!(error = %e, "cannot take up the revocations made on other replicas; trying at the next change");
            }
        }
    });
}

/// With replicas on etcd, follows the CA files there: another replica's CA change (add,
/// switch, retire) is written into this replica's data directory and made current, as if
/// it had been made here.
pub(crate) fn spawn_follow_cas(state: Arc<State>) {
    let Some(etcd) = state.shared.clone() else {
        return;
    };
    let mut values = followed(&etcd, crate::store::etcd_ca::files_key());
    let weak = Arc::downgrade(&state);
    drop(state);
    tokio::spawn(async move {
        while values.changed().await.is_ok() {
            let json = values.borrow_and_update().clone();
            let Some(state) = weak.upgrade() else {
                return;
            };
            if json.is_empty() || !etcd.is_new_ca(&json) {
                continue;
            }
            let _one_ca_change_at_a_time = state.ca_changes.lock().await;
            let taken = etcd
                .write_cas(state.dir.path(), &json)
                .and_then(|()| state.dir.reload(state.trust_domain(), state.svid_lifetime))
                .and_then(|set| {
                    state.dir.save(&set)?;
                    // The JWT key the other replica rotated with its CA switch, if it did
                    // (before the push, so the push carries it).
                    if let Some(next) = state.jwt.load().take_up(state.dir.path(), unix_now())? {
                        state.jwt.store(Arc::new(next));
                    }
                    state.cas.send_replace(Arc::new(set));
                    state.refresh_serving()
                });
            match taken {
                Ok(()) => tracing::info!("took up the CA set another replica changed"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot take up the CA set another replica changed; this replica keeps signing with the set it has")
                }
            }
        }
    });
}

impl State {
    /// The work that must happen once, done by the leading replica: etcd's revision log
    /// trimmed to its bound, expired join tokens deleted.
    pub(crate) async fn lead(&self, etcd: &crate::store::etcd::EtcdStore) {
        let expired = unix_now().saturating_sub(crate::store::trust::EXPIRY_SLACK_SECS);
        match etcd.prune_instances(expired).await {
            Ok(0) => {}
            Ok(instances) => tracing::info!(
                instances,
                "leader upkeep: forgot the proxy instances in etcd whose certificates all expired"
            ),
            Err(e) => tracing::warn!(error = %e, "leader upkeep failed; trying again in a minute"),
        }
        match etcd.trim_audit().await {
            Ok(0) => {}
            Ok(entries) => tracing::info!(
                entries,
                "leader upkeep: trimmed the shared credential audit log in etcd"
            ),
            Err(e) => tracing::warn!(error = %e, "leader upkeep failed; trying again in a minute"),
        }
        match etcd.trim(unix_now()).await {
            Ok((0, 0)) => {}
            Ok((log, tokens)) => {
                tracing::info!(
                    log,
                    tokens,
                    "leader upkeep: trimmed the revision log and deleted expired join tokens in etcd"
                )
            }
            Err(e) => tracing::warn!(error = %e, "leader upkeep failed; trying again in a minute"),
        }
    }
}

pub(crate) struct State {
    pub(crate) dir: DataDir,
    pub(crate) store: Store,
    /// Where the resource set and its revision log are kept when replicas share them
    /// (`--etcd`); `None`: in `store`.
    pub(crate) shared: Option<crate::store::etcd::EtcdStore>,
    /// This replica: its id in the registry and whether it leads (`replicas.rs`).
    pub(crate) replica: Option<Arc<crate::replicas::Replica>>,
    svid_lifetime: Duration,
    trust_domain: String,
    pub(crate) snapshot: watch::Sender<Arc<Snapshot>>,
    /// The CAs and the bundle they make; every configuration stream follows it.
    pub(crate) cas: watch::Sender<Arc<CaSet>>,
    /// Held by every CA change (add, switch, retire) from reading the set until the new one
    /// is saved and published.
    pub(crate) ca_changes: tokio::sync::Mutex<()>,
    /// The listener's TLS configuration: re-issued at half-life and at every CA change.
    pub(crate) serving: Arc<ArcSwap<ServerConfig>>,
    pub(crate) admin_id: SpiffeId,
    pub(crate) proxies: Arc<Registry>,
    /// Held by every change ([`State::change`]) from reading the current set until the new
    /// revision is published: changes apply one at a time, none is lost, and proxies see
    /// revisions in order.
    pub(crate) writes: tokio::sync::Mutex<()>,
    /// What one proxy's configuration may hold, checked before every change is committed.
    pub(crate) proxy_bounds: crate::change::ProxyBounds,
    /// How long reported traffic edges are kept, and how many.
    pub(crate) flow_retention: FlowRetention,
    /// Edges proxies dropped and edges this control plane refused, since it started.
    pub(crate) flow_counters: Counters,
    /// Open `bulkhead tap` sessions, per tapped workload.
    pub(crate) taps: Arc<crate::tap::TapHub>,
    /// Finds anomalies in flow reports (`bulkhead events`).
    pub(crate) anomalies: Monitor,
    pub(crate) metrics: Arc<Metrics>,
    /// The web console's sessions and live signals (issue 21).
    pub(crate) console: crate::console::Console,
    /// Who is refused although their certificates chain to the bundle: pushed to every
    /// proxy, and checked by every call made with a certificate.
    pub(crate) revoked: Arc<crate::credentials::Revoked>,
    /// Spans to an OTLP collector (`--otlp-endpoint`), and the pushes awaiting an answer.
    pub(crate) tracer: Option<Arc<bulkhead_api::otlp::Tracer>>,
    pub(crate) pushes: crate::spans::Pushes,
    /// The Prometheus file_sd file (`--prometheus-sd-file`), when one is written.
    pub(crate) discovery: Option<crate::discovery::Discovery>,
    /// Checks the credentials of joins without a join token (`--kubernetes-attest`).
    pub(crate) attestor: Option<Arc<dyn crate::Attestor>>,
    /// The roots of every federated trust domain (`--federation`); every configuration
    /// stream follows it.
    pub(crate) federated: watch::Sender<Arc<crate::federation::FederatedRoots>>,
    /// The `spiffe_refresh_hint` our own SPIFFE bundle gives (seconds).
    pub(crate) bundle_refresh_hint: u64,
    /// Signs JWT-SVIDs (`Identity.SignJwtSvid`); its public half goes to every proxy.
    pub(crate) jwt: Arc<ArcSwap<crate::jwt_svid::Keys>>,
}

impl State {
    /// [`State::with_options`] with the default anomaly options.
    #[cfg(test)]
    pub(crate) fn new(
        dir: DataDir,
        cas: CaSet,
        store: Store,
        svid_lifetime: Duration,
        flow_retention: FlowRetention,
    ) -> Result<State, ControlError> {
        let anomalies = Anomalies::default();
        let bounds = crate::change::ProxyBounds::default();
        let (revision, resources) = store.resources()?;
        State::build(
            dir,
            cas,
            store,
            svid_lifetime,
            flow_retention,
            &anomalies,
            bounds,
            (revision, resources),
            None,
        )
    }

    /// [`State::build`] with the set read from etcd when `shared` is given, else from
    /// `store`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn with_options(
        dir: DataDir,
        cas: CaSet,
        store: Store,
        svid_lifetime: Duration,
        flow_retention: FlowRetention,
        anomalies: &Anomalies,
        proxy_bounds: crate::change::ProxyBounds,
        shared: Option<crate::store::etcd::EtcdStore>,
    ) -> Result<State, ControlError> {
        let current = match &shared {
            Some(etcd) => etcd.resources().await?,
            None => store.resources()?,
        };
        State::build(
            dir,
            cas,
            store,
            svid_lifetime,
            flow_retention,
            anomalies,
            proxy_bounds,
            current,
            shared,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn build(
        dir: DataDir,
        cas: CaSet,
        store: Store,
        svid_lifetime: Duration,
        flow_retention: FlowRetention,
        anomalies: &Anomalies,
        proxy_bounds: crate::change::ProxyBounds,
        (revision, resources): (u64, Vec<Resource>),
        shared: Option<crate::store::etcd::EtcdStore>,
    ) -> Result<State, ControlError> {
        let anomalies = Monitor::load(&store, anomalies, unix_now())?;
        tracing::info!(revision, resources = resources.len(), dir = %dir.path().display(), "loaded resources");
        let trust_domain = cas.trust_domain().to_string();
        let admin_id = SpiffeId::parse(&format!("spiffe://{trust_domain}{ADMIN_ID_PATH}"))?;
        let revoked = Arc::new(crate::credentials::Revoked::load(&store, unix_now())?);
        let serving = crate::listener::serving_config(&cas, svid_lifetime)?;
        let jwt = Arc::new(ArcSwap::from_pointee(crate::jwt_svid::Keys::new(
            crate::jwt_svid::load_or_create(dir.path())?,
        )));
        Ok(State {
            dir,
            store,
            shared,
            replica: None,
            svid_lifetime,
            trust_domain,
            snapshot: watch::Sender::new(Arc::new(Snapshot::new(revision, resources))),
            cas: watch::Sender::new(Arc::new(cas)),
            ca_changes: tokio::sync::Mutex::new(()),
            serving: Arc::new(ArcSwap::from_pointee(serving)),
            admin_id,
            proxies: Arc::new(Registry::default()),
            writes: tokio::sync::Mutex::new(()),
            proxy_bounds,
            flow_retention,
            flow_counters: Counters::default(),
            taps: Arc::default(),
            anomalies,
            metrics: Arc::default(),
            console: Default::default(),
            revoked,
            tracer: None,
            pushes: Default::default(),
            discovery: None,
            attestor: None,
            federated: watch::Sender::new(Arc::default()),
            bundle_refresh_hint: crate::spiffe_bundle::REFRESH_HINT_SECS,
            jwt,
        })
    }

    pub(crate) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA that signs now.
    pub(crate) fn signer(&self) -> Arc<Ca> {
        self.cas.borrow().active().clone()
    }

    /// Saves `set` in the data directory, then makes it current: every proxy's stream
    /// pushes the new bundle, and the listener re-issues its certificate from the signing
    /// CA, trusting the new bundle for new connections.
    /// When another CA signs, the JWT-SVID key rotates too (before the push, so the push
    /// carries it).
    ///
    /// With replicas on etcd, the set's files go to etcd too (keys sealed), and every
    /// other replica takes them up.
    pub(crate) async fn publish_cas(&self, set: CaSet) -> Result<(), ControlError> {
        self.dir.save(&set)?;
        let next_jwt = match set.active().fingerprint() != self.cas.borrow().active().fingerprint()
        {
            true => Some(self.jwt.load().rotate(self.dir.path(), unix_now())?),
            false => None,
        };
        if let Some(etcd) = &self.shared {
            // With the JWT key as rotated: the other replicas sign with it too.
            etcd.store_cas(self.dir.path(), &set.file(), false).await?;
        }
        if let Some(next) = next_jwt {
            self.jwt.store(Arc::new(next));
        }
        self.cas.send_replace(Arc::new(set));
        self.refresh_serving()
    }

    /// Rebuilds the listener's TLS configuration from the current CA set.
    pub(crate) fn refresh_serving(&self) -> Result<(), ControlError> {
        let config = crate::listener::serving_config(&self.cas.borrow(), self.svid_lifetime)?;
        self.serving.store(Arc::new(config));
        Ok(())
    }

    pub(crate) fn svid_lifetime(&self) -> Duration {
        self.svid_lifetime
    }

    pub(crate) fn bundle_der(&self) -> Vec<Vec<u8>> {
        let cas = self.cas.borrow();
        cas.bundle().roots().iter().map(|r| r.to_vec()).collect()
    }

    /// Refuses the call unless it comes from the admin credential; returns who it is for the
    /// audit log: the verified identity and the user name the CLI claims.
    pub(crate) fn require_admin<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let id = caller(req)?;
        if id != self.admin_id {
            return Err(Status::permission_denied(format!(
                "this call needs the admin credential; {id} is not an admin"
            )));
        }
        let user = req
            .metadata()
            .get("x-bulkhead-user")
            .and_then(|v| v.to_str().ok())
            .filter(|u| !u.is_empty() && u.len() <= 64 && u.bytes().all(|b| b.is_ascii_graphic()));
        Ok(match user {
            Some(u) => format!("{id} (user {u})"),
            None => id.to_string(),
        })
    }

    /// Checks that `set` compiles as a whole; the errors of resources with an origin point
    /// into the operator's file.
    pub(crate) fn check(&self, set: &[Resource], origins: &[Option<Origin>]) -> Result<(), Status> {
        PolicySet::compile_with_origins(set, origins, 0)
            .map(|_| ())
            .map_err(|errors| {
                let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                Status::invalid_argument(text.join("\n"))
            })
    }
}

pub(crate) fn caller<T>(req: &Request<T>) -> Result<SpiffeId, Status> {
    req.extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.identity.clone())
        .ok_or_else(|| Status::unauthenticated("this call needs a client certificate (mTLS)"))
}

pub(crate) fn internal(e: ControlError) -> Status {
    tracing::error!(error = %e, "internal error");
    match e {
        ControlError::DiskFull { .. } => Status::resource_exhausted(e.to_string()),
        e => Status::internal(e.to_string()),
    }
}

/// Why a join was refused.
#[derive(Debug, thiserror::Error)]
enum JoinRefusal {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

#[tonic::async_trait]
impl Identity for State {
    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        self.renew_svid(req).await
    }

    async fn sign_jwt_svid(
        &self,
        req: Request<pb::JwtSvidRequest>,
    ) -> Result<Response<pb::JwtSvidResponse>, Status> {
        let id = caller(&req)?;
        id.refuse_reserved()
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        if !self.store.has_identity(id.as_str()).map_err(internal)? {
            return Err(Status::permission_denied(format!(
                "{id} was never issued by a join token; only workload identities get JWT-SVIDs"
            )));
        }
        self.refuse_revoked(&req)?;
        let audience = req.into_inner().audience;
        crate::jwt_svid::check_audience(&audience).map_err(Status::invalid_argument)?;
        let now = SystemTime::now();
        let lifetime = crate::jwt_svid::LIFETIME.min(self.svid_lifetime);
        let signer = self.jwt.load().current.clone();
        let token = signer
            .sign_svid(&id, &audience, now, lifetime)
            .map_err(|e| internal(e.into()))?;
        let expires = now + lifetime;
        tracing::info!(spiffe_id = %id, ?audience, kid = signer.kid(), "issued a JWT-SVID");
        Ok(Response::new(pb::JwtSvidResponse {
            spiffe_id: id.to_string(),
            token,
            expires_at_unix: expires
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        }))
    }

    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let remote = req.extensions().get::<PeerInfo>().map(|p| p.remote);
        let r = req.into_inner();
        if !r.service_account_token.is_empty() {
            if !r.token.is_empty() {
                return Err(Status::invalid_argument(
                    "a join presents a join token or a service-account token, not both",
                ));
            }
            return self.join_attested(remote, r).await;
        }
        let (token_id, secret) =
            tokens::parse(&r.token).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let now = SystemTime::now();
        let issue = |record: &TokenRecord| {
            let id = record.spiffe_id.clone();
            let chain = self
                .signer()
                .sign_csr(&r.csr_der, &id, self.svid_lifetime, now)?;
            Ok::<_, JoinRefusal>((id, chain))
        };
        let hash = tokens::hash(secret);
        let outcome = match &self.shared {
            Some(etcd) => etcd.redeem_token(token_id, &hash, unix_now(), issue).await,
            None => self.store.redeem_token(token_id, &hash, unix_now(), issue),
        }
        .map_err(internal)?;
        let (record, (id, chain)) = match outcome {
            Ok(ok) => ok,
            Err(refusal) => {
                tracing::warn!(?remote, token_id, reason = %refusal, "join refused");
                return Err(match refusal {
                    JoinRefusal::Token(e) => Status::unauthenticated(e.to_string()),
                    JoinRefusal::Identity(
                        e @ (IdentityError::IdentityMismatch { .. }
                        | IdentityError::Reserved { .. }),
                    ) => Status::permission_denied(e.to_string()),
                    JoinRefusal::Identity(e) => Status::invalid_argument(e.to_string()),
                });
            }
        };
        let workload = ResourceName {
            namespace: record.namespace.clone(),
            name: record.workload.clone(),
        };
        // Recorded in the transaction that checks the revocations: a certificate of an
        // identity revoked meanwhile never leaves.
        let instance = self
            .store
            .new_instance(id.as_str(), &workload, token_id, issued(&chain), unix_now())
            .map_err(internal)?
            .map_err(|revoked| {
                tracing::warn!(?remote, token_id, spiffe_id = %id, "join refused: the identity is revoked");
                Status::permission_denied(revoked.describe())
            })?;
        self.share_instance(&instance).await?;
        self.bind(id.as_str(), &workload).await?;
        tracing::info!(?remote, spiffe_id = %id, %workload, instance = instance.id, lifetime_s = self.svid_lifetime.as_secs(), "issued SVID");
        Ok(self.joined(&id, &chain, workload, instance.id))
    }
}

impl State {
    /// Renews the caller's own identity: the TLS layer verified its current SVID.
    async fn renew_svid(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let id = caller(&req)?;
        let remote = req.extensions().get::<PeerInfo>().map(|p| p.remote);
        // The mesh's own identities are issued by the control plane to itself, never renewed
        // on request, whatever the store says (a token from before they were reserved).
        id.refuse_reserved()
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        if !self.store.has_identity(id.as_str()).map_err(internal)?
            && !self.learn_bindings(id.as_str()).await?
        {
            return Err(Status::permission_denied(format!(
                "{id} was never issued by a join token; only workload identities renew"
            )));
        }
        self.refuse_revoked(&req)?;
        let serial = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.cert_serial.clone())
            .unwrap_or_default();
        let csr = req.into_inner().csr_der;
        let signer = self.signer();
        let chain = signer
            .sign_csr(&csr, &id, self.svid_lifetime, SystemTime::now())
            .map_err(|e| match e {
                e @ (IdentityError::IdentityMismatch { .. } | IdentityError::Reserved { .. }) => {
                    Status::permission_denied(e.to_string())
                }
                e => Status::invalid_argument(e.to_string()),
            })?;
        let instance = self.record_renewal(&id, &serial, issued(&chain)).await?;
        self.proxies
            .issued(id.as_str(), &signer.fingerprint(), svid_not_after(&chain));
        tracing::info!(?remote, spiffe_id = %id, instance = instance.id, lifetime_s = self.svid_lifetime.as_secs(), "renewed SVID");
        self.metrics.svid_issued("renew");
        Ok(Response::new(pb::JoinResponse {
            cert_chain_der: chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle_der: self.bundle_der(),
            spiffe_id: id.to_string(),
            namespace: instance.namespace,
            workload: instance.workload,
            instance: instance.id,
        }))
    }

    /// Records a renewal's certificate for the instance that holds the certificate with
    /// `serial`, in the transaction that checks the revocations. A certificate from before
    /// instances were recorded (or of an instance forgotten) makes a new instance, bound to
    /// the workload the identity's join bound it to.
    ///
    /// With replicas on etcd the instance is etcd's (it may have joined on another replica):
    /// the certificate is added there in the transaction that checks the instance's
    /// revocation, then here in the one that checks this replica's.
    async fn record_renewal(
        &self,
        id: &SpiffeId,
        serial: &str,
        cert: crate::store::trust::IssuedCert,
    ) -> Result<crate::store::trust::Instance, Status> {
        use crate::store::trust::IssueRefusal;
        let now = unix_now();
        let known = self.instance_of(serial).await?;
        let outcome = match (known, &self.shared) {
            (Some(instance), Some(etcd)) => {
                let mut added = etcd
                    .add_cert(&instance.id, cert.clone(), now)
                    .await
                    .map_err(internal)?;
                if let Err(IssueRefusal::UnknownInstance(_)) = added {
                    // Made here before it was shared (a replica that ran without etcd's
                    // instances): shared now, then renewed.
                    etcd.put_instance(&instance).await.map_err(internal)?;
                    added = etcd
                        .add_cert(&instance.id, cert, now)
                        .await
                        .map_err(internal)?;
                }
                match added {
                    Ok(recorded) => self
                        .store
                        .import_issuing(&recorded)
                        .map_err(internal)?
                        .map(|()| recorded)
                        .map_err(IssueRefusal::Revoked),
                    Err(refusal) => Err(refusal),
                }
            }
            (Some(instance), None) => self
                .store
                .add_cert(&instance.id, cert, now)
                .map_err(internal)?,
            (None, _) => {
                let workload = self
                    .store
                    .bound_workloads(id.as_str())
                    .map_err(internal)?
                    .into_iter()
                    .next()
                    .ok_or_else(|| {
                        Status::permission_denied(format!(
                            "{id} is bound to no workload; join with a new token"
                        ))
                    })?;
                let made = self
                    .store
                    .new_instance(id.as_str(), &workload, "", cert, now)
                    .map_err(internal)?
                    .map_err(IssueRefusal::Revoked);
                if let Ok(instance) = &made {
                    self.share_instance(instance).await?;
                }
                made
            }
        };
        outcome.map_err(|refusal| match refusal {
            IssueRefusal::Revoked(r) => {
                tracing::warn!(spiffe_id = %id, serial, "renewal refused: revoked");
                Status::permission_denied(r.describe())
            }
            IssueRefusal::UnknownInstance(i) => Status::permission_denied(format!(
                "proxy instance {i} is no longer known (its certificates expired); join again with a new token"
            )),
        })
    }
}

/// The serial and expiry of the leaf of `chain`, as the store records an issued certificate.
impl State {
    /// The answer to a join (by join token or by attestation) that issued `chain` to `id`
    /// for `workload`, as proxy instance `instance`.
    pub(crate) fn joined(
        &self,
        id: &SpiffeId,
        chain: &[rustls::pki_types::CertificateDer<'_>],
        workload: ResourceName,
        instance: String,
    ) -> Response<pb::JoinResponse> {
        self.metrics.svid_issued("join");
        Response::new(pb::JoinResponse {
            cert_chain_der: chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle_der: self.bundle_der(),
            spiffe_id: id.to_string(),
            namespace: workload.namespace,
            workload: workload.name,
            instance,
        })
    }
}

fn issued(chain: &[rustls::pki_types::CertificateDer<'_>]) -> crate::store::trust::IssuedCert {
    crate::store::trust::IssuedCert {
        serial: chain
            .first()
            .and_then(|c| bulkhead_identity::serial_of(c))
            .unwrap_or_default(),
        not_after_unix: svid_not_after(chain),
    }
}

/// When the leaf of `chain` expires, in Unix seconds (0 if unknown).
fn svid_not_after(chain: &[rustls::pki_types::CertificateDer<'_>]) -> u64 {
    chain
        .first()
        .and_then(|c| bulkhead_identity::not_after_of(c))
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

type ConfigStream = Pin<Box<dyn Stream<Item = Result<pb::ProxyConfig, Status>> + Send>>;

/// One proxy's configuration stream: what it follows, what it said it holds, and the
/// messages of a revision not sent yet.
struct Follow {
    revisions: watch::Receiver<Arc<Snapshot>>,
    cas: watch::Receiver<Arc<CaSet>>,
    federated: watch::Receiver<Arc<crate::federation::FederatedRoots>>,
    revoked: watch::Receiver<Arc<bulkhead_identity::RevokedSet>>,
    /// The serial of the certificate the stream was opened with: if it or its identity is
    /// revoked, the stream ends.
    serial: String,
    ended: bool,
    first: bool,
    /// The revision and digest the proxy said it holds, until the first message.
    held: Option<(u64, String)>,
    queue: std::collections::VecDeque<pb::ProxyConfig>,
    /// Marks the proxy connected while the stream lives.
    _connection: crate::proxies::Connection,
    /// Lists the proxy in the Prometheus file_sd file while the stream lives.
    _listed: Option<crate::discovery::Listed>,
    /// Counts the stream in `bulkhead_proxies_connected` while it lives.
    _open: crate::metrics::OpenStream,
    /// The revision last sent on this stream (0: none yet).
    sent: u64,
}

impl State {
    /// Records that `spiffe_id` may fetch `workload`'s configuration: here, and with
    /// replicas in etcd too, for the replicas its proxy may fail over to.
    pub(crate) async fn bind(
        &self,
        spiffe_id: &str,
        workload: &ResourceName,
    ) -> Result<(), Status> {
        self.store
            .bind(spiffe_id, workload, unix_now())
            .map_err(internal)?;
        if let Some(etcd) = &self.shared {
            etcd.put_binding(spiffe_id, workload, unix_now())
                .await
                .map_err(internal)?;
        }
        Ok(())
    }

    /// With replicas on etcd, shares an instance this replica made (a join) with the
    /// others, so that its proxy renews as the same instance wherever it moves.
    pub(crate) async fn share_instance(
        &self,
        instance: &crate::store::trust::Instance,
    ) -> Result<(), Status> {
        match &self.shared {
            Some(etcd) => etcd.put_instance(instance).await.map_err(internal),
            None => Ok(()),
        }
    }

    /// The instance a certificate was issued to: this replica's record, else (replicas on
    /// etcd) the one another replica shared, copied here.
    pub(crate) async fn instance_of(
        &self,
        serial: &str,
    ) -> Result<Option<crate::store::trust::Instance>, Status> {
        if let Some(known) = self.store.instance_by_serial(serial).map_err(internal)? {
            return Ok(Some(known));
        }
        let Some(etcd) = &self.shared else {
            return Ok(None);
        };
        let Some(shared) = etcd.instance_by_serial(serial).await.map_err(internal)? else {
            return Ok(None);
        };
        self.store.import_instance(&shared).map_err(internal)?;
        Ok(Some(shared))
    }

    /// With replicas on etcd, copies the bindings another replica made for `spiffe_id`
    /// (its proxy joined there) into this replica's store; whether there were any.
    pub(crate) async fn learn_bindings(&self, spiffe_id: &str) -> Result<bool, Status> {
        let Some(etcd) = &self.shared else {
            return Ok(false);
        };
        let found = etcd.bindings_of(spiffe_id).await.map_err(internal)?;
        for workload in &found {
            self.store
                .bind(spiffe_id, workload, unix_now())
                .map_err(internal)?;
        }
        Ok(!found.is_empty())
    }

    /// The caller's identity, if it is bound to `workload` (by the join token it used, on
    /// this replica or, with replicas on etcd, any).
    async fn bound_caller<T>(
        &self,
        req: &Request<T>,
        workload: &ResourceName,
    ) -> Result<SpiffeId, Status> {
        let id = caller(req)?;
        self.refuse_revoked(req)?;
        let bound = |s: &Self| s.store.is_bound(id.as_str(), workload).map_err(internal);
        let known = bound(self)? || (self.learn_bindings(id.as_str()).await? && bound(self)?);
        if !known {
            return Err(Status::permission_denied(format!(
                "{id} may not read or report the configuration of workload {workload}: no join token bound it to that workload"
            )));
        }
        Ok(id)
    }
}

#[tonic::async_trait]
impl Config for State {
    type WatchStream = ConfigStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<ConfigStream>, Status> {
        let workload = ResourceName {
            namespace: req.get_ref().namespace.clone(),
            name: req.get_ref().workload.clone(),
        };
        let id = self.bound_caller(&req, &workload).await?;
        let peer = req.extensions().get::<PeerInfo>().cloned();
        let remote = peer
            .as_ref()
            .map(|p| p.remote.to_string())
            .unwrap_or_default();
        let cert_ca = peer
            .as_ref()
            .and_then(|p| p.cert_ca_sha256.clone())
            .unwrap_or_default();
        let not_after = peer.as_ref().and_then(|p| p.cert_not_after).unwrap_or(0);
        let serial = peer
            .as_ref()
            .and_then(|p| p.cert_serial.clone())
            .unwrap_or_default();
        let instance = match self.instance_of(&serial).await? {
            Some(i) => i.id,
            None => String::new(),
        };
        let held = (req.get_ref().held_revision != 0).then(|| {
            (
                req.get_ref().held_revision,
                req.get_ref().held_digest.clone(),
            )
        });
        let pieces = req.get_ref().accepts_pieces;
        tracing::info!(spiffe_id = %id, %workload, held_revision = held.as_ref().map_or(0, |h| h.0), pieces, "proxy watching configuration");
        let connection = self.proxies.connect(
            id.as_str(),
            &workload,
            crate::proxies::Connecting {
                remote,
                cert_not_after_unix: not_after,
                cert_ca_sha256: cert_ca,
                instance: instance.clone(),
                version: crate::proxies::bounded_version(&req.get_ref().proxy_version),
            },
        );
        let listed = self.discovery.as_ref().and_then(|d| {
            let target = crate::discovery::Target::reported(
                &req.get_ref().admin_address,
                peer.as_ref().map(|p| p.remote),
                &workload,
                &instance,
            )?;
            Some(d.list(target))
        });
        let registry = self.proxies.clone();
        let tracer = self.tracer.clone();
        let pushes = self.pushes.clone();
        let metrics = self.metrics.clone();
        let jwt = self.jwt.clone();
        // A new revision or a new bundle: either sends the whole current state, in pieces
        // to a proxy that takes them, and only the bundle to a proxy that just reconnected
        // holding exactly the current revision.
        let follow = Follow {
            revisions: self.snapshot.subscribe(),
            cas: self.cas.subscribe(),
            federated: self.federated.subscribe(),
            revoked: self.revoked.subscribe(),
            serial,
            ended: false,
            first: true,
            held,
            queue: std::collections::VecDeque::new(),
            _connection: connection,
            _listed: listed,
            _open: self.metrics.stream_opened(),
            sent: 0,
        };
        let stream = futures_util::stream::unfold(follow, move |mut f| {
            let workload = workload.clone();
            let id = id.clone();
            let registry = registry.clone();
            let tracer = tracer.clone();
            let pushes = pushes.clone();
            let metrics = metrics.clone();
            let jwt = jwt.clone();
            async move {
                loop {
                    if let Some(next) = f.queue.pop_front() {
                        return Some((Ok(next), f));
                    }
                    if f.ended {
                        return None;
                    }
                    if !f.first {
                        let changed = tokio::select! {
                            r = f.revisions.changed() => r,
                            r = f.cas.changed() => r,
                            r = f.federated.changed() => r,
                            r = f.revoked.changed() => r,
                        };
                        if changed.is_err() {
                            return None;
                        }
                    }
                    // A revision pushed to a proxy already connected when it was
                    // committed is timed to its answer; a (re)connection's first is not,
                    // nor the same revision sent again with a new bundle.
                    let live = !f.first;
                    f.first = false;
                    let revoked = f.revoked.borrow_and_update().clone();
                    if revoked.refuses(id.as_str(), &f.serial) {
                        tracing::warn!(spiffe_id = %id, %workload, serial = f.serial, "ending the configuration stream of a revoked proxy");
                        f.ended = true;
                        let status = Status::permission_denied(format!(
                            "the certificate of {id} (serial {}) is revoked; `bulkhead get revocations` says why",
                            f.serial
                        ));
                        return Some((Err(status), f));
                    }
                    let snap = f.revisions.borrow_and_update().clone();
                    let trust = f.cas.borrow_and_update().clone();
                    let federated = f.federated.borrow_and_update().clone();
                    let mut wire = trust.wire().clone();
                    wire.federated = federated
                        .iter()
                        .map(|(td, f)| pb::FederatedBundle {
                            trust_domain: td.clone(),
                            roots_der: f.roots.clone(),
                            jwt_keys: f
                                .jwt_keys
                                .iter()
                                .map(crate::jwt_svid::wire_public)
                                .collect(),
                        })
                        .collect();
                    wire.jwt_keys = jwt
                        .load()
                        .public(unix_now())
                        .iter()
                        .map(crate::jwt_svid::wire_public)
                        .collect();
                    registry.sent(id.as_str(), &workload, snap.revision);
                    if live
                        && snap.revision != f.sent
                        && let Some(committed) = snap.committed
                    {
                        metrics.pushed(id.as_str(), &workload, snap.revision, committed);
                    }
                    f.sent = snap.revision;
                    if let Some(tracer) = &tracer {
                        pushes.sent(
                            tracer,
                            id.as_str(),
                            &workload,
                            snap.revision,
                            snap.commit_span.as_ref(),
                        );
                    }
                    let config = snap.config_for(&workload, &wire, &revoked);
                    match f.held.take() {
                        Some((revision, digest))
                            if revision == config.revision && digest == config.digest =>
                        {
                            tracing::info!(spiffe_id = %id, %workload, revision, "the proxy holds the current revision; sending only the trust bundle");
                            f.queue.push_back(pb::ProxyConfig {
                                revision,
                                digest,
                                unchanged: true,
                                trust_bundle: config.trust_bundle,
                                revocations: config.revocations,
                                ..pb::ProxyConfig::default()
                            });
                        }
                        _ if pieces => f.queue.extend(bulkhead_api::pieces::split(
                            config,
                            bulkhead_api::pieces::PIECE_BYTES,
                        )),
                        _ => f.queue.push_back(config),
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let workload = ResourceName {
            namespace: req.get_ref().namespace.clone(),
            name: req.get_ref().workload.clone(),
        };
        let id = self.bound_caller(&req, &workload).await?;
        let r = req.into_inner();
        self.proxies
            .holds_bundle(id.as_str(), &workload, r.bundle_sha256.clone());
        self.proxies
            .reported_version(id.as_str(), &workload, &r.proxy_version);
        if r.accepted {
            tracing::debug!(spiffe_id = %id, %workload, revision = r.revision, "ACK");
            self.proxies.ack(id.as_str(), &workload, r.revision, None);
            self.metrics
                .answered(id.as_str(), &workload, r.revision, false);
            if let Some(tracer) = &self.tracer {
                self.pushes
                    .answered(tracer, id.as_str(), &workload, r.revision, None);
            }
        } else {
            let error: String = r.error.chars().take(2000).collect();
            // A proxy that could not even read what it was sent does not know its revision:
            // it refused the one sent to it.
            let revision = match r.revision {
                0 => self.proxies.sent_revision(id.as_str(), &workload),
                n => n,
            };
            tracing::warn!(spiffe_id = %id, %workload, revision, error, "NACK: the proxy refused this revision and keeps its last good one");
            if let Some(tracer) = &self.tracer {
                self.pushes
                    .answered(tracer, id.as_str(), &workload, revision, Some(&error));
            }
            self.metrics
                .answered(id.as_str(), &workload, revision, true);
            self.proxies
                .ack(id.as_str(), &workload, revision, Some(error));
        }
        Ok(Response::new(pb::AckResponse {}))
    }

    async fn report_flows(
        &self,
        req: Request<pb::ReportFlowsRequest>,
    ) -> Result<Response<pb::ReportFlowsResponse>, Status> {
        let workload = ResourceName {
            namespace: req.get_ref().namespace.clone(),
            name: req.get_ref().workload.clone(),
        };
        let id = self.bound_caller(&req, &workload).await?;
        let r = req.into_inner();
        let edges = flows::parse_report(&r.edges_json).map_err(|e| {
            tracing::warn!(spiffe_id = %id, %workload, reason = %e, "flow report refused");
            Status::invalid_argument(e.to_string())
        })?;
        let reporter = Reporter {
            workload: &workload,
            spiffe_id: id.as_str(),
        };
        let (mut kept, refused) = reporter.sort(edges);
        self.flow_counters.add(r.dropped, refused);
        if refused > 0 {
            tracing::warn!(spiffe_id = %id, %workload, refused, "refused reported edges that this workload's sidecar did not decide");
        }
        let written = self
            .store
            .merge_edges(&mut kept, unix_now(), &self.flow_retention)
            .map_err(internal)?;
        if written.outside_window > 0 {
            tracing::warn!(spiffe_id = %id, %workload, edges = written.outside_window, "reported edges outside the retention window (or ahead of this clock) were not stored");
        }
        if written.evicted > 0 {
            tracing::warn!(
                rows = written.evicted,
                max_rows = self.flow_retention.max_rows,
                "stored edges reached their bound; deleted the oldest hours"
            );
        }
        if written.evicted_in_workload > 0 {
            tracing::warn!(
                %workload,
                rows = written.evicted_in_workload,
                max_rows_per_workload = self.flow_retention.max_rows_per_workload,
                "this workload's stored edges reached their bound; deleted its oldest hours"
            );
        }
        if written.folded > 0 {
            tracing::debug!(
                %workload,
                edges = written.folded,
                max_paths_per_edge = self.flow_retention.max_paths_per_edge,
                "edges past their bound of distinct paths were counted into their /* template"
            );
        }
        self.metrics.edges_stored(written.stored);
        self.metrics.edges_bounded(&written);
        self.anomalies
            .observe(&self.store, &kept, unix_now(), &self.metrics);
        self.console.flows_reported();
        tracing::debug!(spiffe_id = %id, %workload, stored = written.stored, refused, dropped = r.dropped, expired = written.expired, "flow report");
        Ok(Response::new(pb::ReportFlowsResponse {
            stored: written.stored,
            refused,
        }))
    }

    type WatchTapsStream = crate::tap::FiltersStream;

    async fn watch_taps(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchTapsStream>, Status> {
        let workload = ResourceName {
            namespace: req.get_ref().namespace.clone(),
            name: req.get_ref().workload.clone(),
        };
        self.bound_caller(&req, &workload).await?;
        let filters = self.taps.filters(&workload);
        Ok(Response::new(crate::tap::filters_stream(filters)))
    }

    async fn report_tap(
        &self,
        req: Request<pb::ReportTapRequest>,
    ) -> Result<Response<pb::ReportTapResponse>, Status> {
        let workload = ResourceName {
            namespace: req.get_ref().namespace.clone(),
            name: req.get_ref().workload.clone(),
        };
        let id = self.bound_caller(&req, &workload).await?;
        let r = req.into_inner();
        let (events, refused) = crate::tap::parse_report(&r.events_json, &workload, id.as_str())
            .map_err(|e| {
                tracing::warn!(spiffe_id = %id, %workload, reason = %e, "tap report refused");
                Status::invalid_argument(e)
            })?;
        if refused > 0 {
            tracing::warn!(spiffe_id = %id, %workload, refused, "refused tapped requests that this workload's sidecar did not decide");
        }
        self.taps.publish(&workload, &events, r.skipped);
        Ok(Response::new(pb::ReportTapResponse {}))
    }
}

#[cfg(test)]
mod tests;
