//! The controller: watches Namespaces, Pods, Services, ServiceAccounts and our CRs with
//! kube-rs's watcher and reflector, and on each change (after a short quiet period) commits
//! the set the cluster asks for ([`crate::desired::plan`]) as one revision by author
//! `kubernetes`, through the control plane's [`Resources::change`], exactly as an apply. Each
//! CR gets an `Accepted` condition (status subresource, merge patch) with the reason and the
//! field path when refused. It also keeps the injection webhook's `caBundle` the mesh's
//! trust bundle.
//!
//! It must never commit before every watch has listed once (a set derived from half the
//! cluster would delete the other half's Workloads), never commit a set the compiler refuses,
//! and never let an unreachable or misbehaving API server loosen what the mesh enforces: on
//! any error it keeps the revision in force and tries again.

use crate::access::WEBHOOK_CONFIGURATION_NAME;
use crate::cr::{self, CrRefusal};
use crate::crd::{self, Condition, CrStatus};
use crate::derive::{self, ClusterObjects};
use crate::desired::{self, CrInput, CrOutcome};
use bulkhead_control::{Issuer, Resources};
use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
/// The kube client [`client`] builds and [`spawn`] takes.
pub use kube::Client;
use kube::Config;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The author of the revisions the controller commits.
pub const AUTHOR: &str = "kubernetes";
/// The condition type every CR gets.
pub const ACCEPTED: &str = "Accepted";

/// How the controller behaves (the API server is the [`client`]'s).
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// How long the cluster must be quiet after a change before the set is recomputed, so
    /// that a rollout's burst of pod events makes one revision, not fifty.
    pub debounce: Duration,
    /// Recompute this often even without events (a commit that failed for a reason the
    /// cluster did not change is retried).
    pub resync: Duration,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept current.
    pub webhook_configuration: String,
}

impl Default for ControllerOptions {
    fn default() -> ControllerOptions {
        ControllerOptions {
            debounce: Duration::from_millis(500),
            resync: Duration::from_secs(300),
            webhook_configuration: WEBHOOK_CONFIGURATION_NAME.to_string(),
        }
    }
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(
        "could not read the kubeconfig {path}: {message}. Pass --kubeconfig with a readable kubeconfig file, or leave it out to use the in-cluster service account"
    )]
    Kubeconfig { path: PathBuf, message: String },
    #[error(
        "could not load the in-cluster Kubernetes configuration: {0}. Outside a pod, pass --kubeconfig PATH"
    )]
    InCluster(String),
    #[error("could not build a Kubernetes client: {0}")]
    Client(String),
}

/// Builds a client from a kubeconfig file (its current context) or, without one, the
/// in-cluster configuration (the pod's service-account token and CA,
/// `KUBERNETES_SERVICE_HOST`/`_PORT`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ControllerError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| ControllerError::Kubeconfig {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| ControllerError::Kubeconfig {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?
        }
        None => Config::incluster().map_err(|e| ControllerError::InCluster(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| ControllerError::Client(e.to_string()))
}

/// The reflectors' stores: what the cluster holds, as last listed and watched.
struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    service_accounts: Store<ServiceAccount>,
    /// (kind, store) per CR kind.
    crs: Vec<(&'static str, Store<DynamicObject>)>,
}

/// The API resource of one of our kinds.
fn api_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: crd::GROUP.into(),
        version: crd::VERSION.into(),
        api_version: format!("{}/{}", crd::GROUP, crd::VERSION),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Runs a watcher into a reflector's store until the process ends, waking `notify` at
/// every event; returns the store to read. Errors (the API server away, a watch dropped, a resourceVersion too old)
/// are logged and retried with backoff by kube-rs; the store keeps its last state meanwhile.
fn reflect<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    what: &'static str,
    notify: Arc<Notify>,
) -> reflector::Store<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let store = writer.as_reader();
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => notify.notify_one(),
                Err(e) => watch_failed(what, &e),
            }
        }
    });
    store
}

/// Logs a watch's error. A resourceVersion too old (410) is routine: the API server
/// compacted its history, and kube-rs lists again.
fn watch_failed(what: &str, e: &watcher::Error) {
    match e {
        watcher::Error::WatchError(s) if s.code == 410 => {
            tracing::info!(resource = what, reason = %s.message, "watch expired (410); listing again");
        }
        e => tracing::warn!(resource = what, error = %e, "watch failed; retrying with backoff"),
    }
}

/// Starts the controller in the background: the watches, the loop that commits what they
/// see, and the task that keeps the webhook's caBundle current.
pub fn spawn(client: Client, resources: Resources, issuer: Issuer, options: ControllerOptions) {
    let notify = Arc::new(Notify::new());
    // A built-in kind's watch, by its plural.
    fn all<K>(client: &Client, plural: &'static str, notify: &Arc<Notify>) -> reflector::Store<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync,
        K: 'static,
    {
        let api = Api::<K>::all(client.clone());
        reflect(
            api,
            reflector::store::Writer::default(),
            plural,
            notify.clone(),
        )
    }
    let stores = Stores {
        namespaces: all(&client, "namespaces", &notify),
        pods: all(&client, "pods", &notify),
        services: all(&client, "services", &notify),
        service_accounts: all(&client, "serviceaccounts", &notify),
        crs: crd::KINDS
            .iter()
            .map(|(kind, plural)| {
                let ar = api_resource(kind, plural);
                let writer = reflector::store::Writer::new(ar.clone());
                let api = Api::all_with(client.clone(), &ar);
                (*kind, reflect(api, writer, plural, notify.clone()))
            })
            .collect(),
    };
    tokio::spawn(caretake_ca_bundle(
        client.clone(),
        issuer,
        options.webhook_configuration.clone(),
    ));
    tokio::spawn(run(client, resources, stores, notify, options));
}

async fn run(
    client: Client,
    resources: Resources,
    stores: Stores,
    notify: Arc<Notify>,
    options: ControllerOptions,
) {
    // Nothing is committed before every watch has listed once.
    let ready = async {
        stores.namespaces.wait_until_ready().await?;
        stores.pods.wait_until_ready().await?;
        stores.services.wait_until_ready().await?;
        stores.service_accounts.wait_until_ready().await?;
        for (_, s) in &stores.crs {
            s.wait_until_ready().await?;
        }
        Ok::<(), reflector::store::WriterDropped>(())
    };
    if ready.await.is_err() {
        tracing::error!("a watch stopped before it listed; the controller commits nothing");
        return;
    }
    tracing::info!(
        "every watch has listed; the cluster's resources are now committed as revisions by author kubernetes"
    );
    loop {
        // A quiet period: each event starts it again, up to ten periods, so that a burst
        // (a rollout) folds into one pass and a steady stream still gets one.
        let burst = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = notify.notified() => if burst.elapsed() >= options.debounce * 10 { break },
                () = tokio::time::sleep(options.debounce) => break,
            }
        }
        reconcile(&client, &resources, &stores).await;
        tokio::select! {
            () = notify.notified() => {}
            () = tokio::time::sleep(options.resync) => {}
        }
    }
}

/// `Kind/namespace/name` of a CR.
fn cr_key(kind: &str, o: &DynamicObject) -> String {
    cr::key(
        kind,
        o.metadata.namespace.as_deref().unwrap_or_default(),
        o.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// What `store` holds in the namespaces of `live`.
fn in_namespaces<K>(store: &Store<K>, live: &BTreeSet<String>) -> Vec<Arc<K>>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store
        .state()
        .into_iter()
        .filter(|o| {
            o.meta()
                .namespace
                .as_ref()
                .is_some_and(|n| live.contains(n))
        })
        .collect()
}

/// One pass: derive, plan, commit, report on the CRs.
async fn reconcile(client: &Client, resources: &Resources, stores: &Stores) {
    let td = resources.trust_domain().to_string();
    // Objects of a namespace the cluster no longer has are on their way out.
    let live: BTreeSet<String> = stores
        .namespaces
        .state()
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let pods = in_namespaces(&stores.pods, &live);
    let services = in_namespaces(&stores.services, &live);
    let service_accounts = in_namespaces(&stores.service_accounts, &live);
    let derived = derive::derive(
        &td,
        ClusterObjects {
            pods: &pods,
            services: &services,
            service_accounts: &service_accounts,
        },
    );
    for s in &derived.skipped {
        tracing::debug!(object = s.object, reason = s.reason, "not derived");
    }
    let mut objects: Vec<(&'static str, Arc<DynamicObject>)> = Vec::new();
    let mut inputs = Vec::new();
    for (kind, store) in &stores.crs {
        for o in store.state() {
            if !o
                .metadata
                .namespace
                .as_ref()
                .is_some_and(|n| live.contains(n))
            {
                continue;
            }
            let key = cr_key(kind, &o);
            let parsed = match serde_json::to_value(o.as_ref()) {
                Ok(v) => cr::parse(kind, &v, &td),
                Err(e) => Err(desired::unlocated(format!(
                    "the object does not serialize: {e}"
                ))),
            };
            inputs.push(CrInput { key, parsed });
            objects.push((kind, o));
        }
    }
    let mut outcomes = None;
    let result = resources
        .change(AUTHOR, "sync", |current| {
            let plan = desired::plan(current, derived.resources.clone(), inputs.clone());
            outcomes = Some(plan.outcomes);
            if plan.blocked.is_empty() {
                Ok((plan.set, plan.origins))
            } else {
                Err(format!(
                    "the cluster's resources do not compile with the rest of the set: {}",
                    plan.blocked.join("; ")
                ))
            }
        })
        .await;
    let revision = match &result {
        Ok(c) if c.changed => {
            tracing::info!(revision = c.revision, changes = ?c.lines, "committed the cluster's resources");
            Some(c.revision)
        }
        Ok(c) => Some(c.revision),
        Err(e) => {
            tracing::error!(error = %e, "could not commit the cluster's resources; the revision in force stays, and the controller retries at the next change");
            None
        }
    };
    let outcomes = outcomes.unwrap_or_default();
    for (kind, o) in objects {
        let key = cr_key(kind, &o);
        let (status, reason, message) = match (outcomes.get(&key), &result) {
            (Some(CrOutcome::Refused(r)), _) => ("False", "Refused", refusal_text(r)),
            (Some(CrOutcome::Accepted), Ok(_)) => (
                "True",
                "Accepted",
                "the mesh enforces this generation".to_string(),
            ),
            (_, Err(e)) => ("Unknown", "NotCommitted", e.to_string()),
            (None, Ok(_)) => continue,
        };
        if let Err(e) = report(client, kind, &o, status, reason, &message, revision).await {
            tracing::warn!(cr = key, error = %e, "could not write the CR's status; retrying at the next change");
        }
    }
}

fn refusal_text(r: &CrRefusal) -> String {
    if r.path.is_empty() {
        r.message.clone()
    } else {
        format!("{}: {}", r.path, r.message)
    }
}

/// Writes the `Accepted` condition on a CR unless it already says the same of this
/// generation.
async fn report(
    client: &Client,
    kind: &str,
    o: &DynamicObject,
    status: &str,
    reason: &str,
    message: &str,
    revision: Option<u64>,
) -> Result<(), kube::Error> {
    let generation = o.metadata.generation;
    let old: CrStatus = o
        .data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .unwrap_or_default();
    let same = old.conditions.iter().any(|c| {
        c.type_ == ACCEPTED
            && c.status == status
            && c.reason == reason
            && c.message == message
            && c.observed_generation == generation
    });
    if same {
        return Ok(());
    }
    let transition = old
        .conditions
        .iter()
        .find(|c| c.type_ == ACCEPTED && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now_rfc3339);
    let new = CrStatus {
        conditions: vec![Condition {
            type_: ACCEPTED.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: transition,
        }],
        observed_generation: generation,
        revision: if status == "True" {
            revision
        } else {
            old.revision
        },
    };
    let plural = crd::KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, p)| *p)
        .unwrap_or_default();
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        o.metadata.namespace.as_deref().unwrap_or_default(),
        &api_resource(kind, plural),
    );
    api.patch_status(
        o.metadata.name.as_deref().unwrap_or_default(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": new })),
    )
    .await?;
    tracing::info!(
        cr = cr_key(kind, o),
        accepted = status,
        reason,
        message,
        "wrote the CR's Accepted condition"
    );
    Ok(())
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Keeps every webhook of the MutatingWebhookConfiguration `name` trusting the mesh's
/// current bundle: at start, at every CA change, and every minute (a configuration applied
/// later, or by hand with an old bundle, is put right).
async fn caretake_ca_bundle(client: Client, issuer: Issuer, name: String) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let mut updates = issuer.bundle_updates();
    let mut bundle = issuer.bundle_pem();
    let mut warned = false;
    loop {
        match set_ca_bundle(&api, &name, &bundle).await {
            Ok(true) => {
                tracing::info!(
                    configuration = name,
                    "set the injection webhook's caBundle to the mesh's trust bundle"
                );
                warned = false;
            }
            Ok(false) => warned = false,
            Err(e) if !warned => {
                tracing::warn!(configuration = name, error = %e, "could not update the injection webhook's caBundle; install it with `bulkhead k8s webhook-config | kubectl apply -f -`. Retrying every minute and at every CA change");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            next = updates.changed() => match next {
                Some(pem) => bundle = pem,
                None => return,
            },
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

/// Sets `caBundle` of every webhook of `name` to `bundle`; whether anything changed.
/// An update that loses a race with another writer (409) is tried again with the new
/// version.
async fn set_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    bundle: &str,
) -> Result<bool, kube::Error> {
    for _ in 0..3 {
        let mut config = api.get(name).await?;
        let want = ByteString(bundle.as_bytes().to_vec());
        let mut changed = false;
        for hook in config.webhooks.iter_mut().flatten() {
            if hook.client_config.ca_bundle.as_ref() != Some(&want) {
                hook.client_config.ca_bundle = Some(want.clone());
                changed = true;
            }
        }
        if !changed {
            return Ok(false);
        }
        match api.replace(name, &PostParams::default(), &config).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}
