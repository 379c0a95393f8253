//! What users declare by hand outside Kubernetes, derived from the cluster: a Workload per
//! pod owner (a Deployment, StatefulSet, DaemonSet, Job, or a bare pod) whose pods carry the
//! sidecar, and a Service per Kubernetes Service with a selector.
//!
//! A Workload's identity is `spiffe://<td>/ns/<ns>/sa/<sa>` of its pods' service account,
//! its labels those all its pods share (less the per-revision hashes), its addresses the
//! pods' IPs (and a Service's cluster IPs when that Service fronts exactly this workload on
//! unchanged ports), its ports the containers' TCP ports with a protocol from the Services'
//! `appProtocol` or the port's name.
//!
//! Pure: objects in, resources out. It must never declare a pod that does not carry the
//! sidecar (callers would then demand mTLS of it), never give a workload an identity other
//! than its own service account's, and never panic on an object it does not understand: such
//! an object is skipped with a reason.

use crate::inject::{PROXY_CONTAINER, is_injected};
use crate::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use bulkhead_policy::model::Resource;
use bulkhead_policy::{API_VERSION, is_valid_name};
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

/// Labels that differ between revisions or between pods of one owner; never part of a
/// Workload's labels.
const PER_POD_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/job-completion-index",
    "batch.kubernetes.io/controller-uid",
    "controller-uid",
];

/// The cluster objects derivation reads.
#[derive(Clone, Copy, Debug)]
pub struct ClusterObjects<'a> {
    pub pods: &'a [Arc<Pod>],
    pub services: &'a [Arc<Service>],
    pub service_accounts: &'a [Arc<ServiceAccount>],
}

/// What derivation produced: resources in key order, and what it left out, and why.
#[derive(Clone, Debug, Default)]
pub struct Derived {
    pub resources: Vec<Resource>,
    pub skipped: Vec<Skipped>,
}

/// An object derivation could not turn into a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// `Pod/shop/orders-6d4b9-x2x7z`, `Service/shop/orders`.
    pub object: String,
    pub reason: String,
}

/// The controller of a pod, as a Workload is named after it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `ReplicaSet`, … or `Pod`.
    pub kind: String,
    pub name: String,
}

/// The pod's controller. A ReplicaSet a Deployment made (its name is the Deployment's plus
/// `-<pod-template-hash>`) counts as that Deployment, so a rollout keeps one Workload; a pod
/// without a controller is its own owner.
pub fn owner_of(pod: &Pod) -> Owner {
    let meta = &pod.metadata;
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    let Some(o) = controller else {
        return Owner {
            kind: "Pod".into(),
            name: meta.name.clone().unwrap_or_default(),
        };
    };
    if o.kind == "ReplicaSet"
        && let Some(hash) = meta
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash"))
        && let Some(deployment) = o.name.strip_suffix(&format!("-{hash}"))
        && !deployment.is_empty()
    {
        return Owner {
            kind: "Deployment".into(),
            name: deployment.to_string(),
        };
    }
    Owner {
        kind: o.kind.clone(),
        name: o.name.clone(),
    }
}

/// The service account a pod runs under (`default` when the spec names none).
pub fn service_account_of(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn identity(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Whether a pod is gone for good (its containers will not run again).
fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn object(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

/// The protocol of a port, from a Service's `appProtocol` (Kubernetes' standard values and
/// the common bare names), else the port's name by the usual convention (`http`, `http-*`,
/// `http2`, `h2c`, `grpc`, `grpc-*`, …). Anything else is opaque TCP: rules that need HTTP on
/// it are then refused by the compiler, loudly, rather than guessed at.
pub fn protocol_for(app_protocol: Option<&str>, port_name: Option<&str>) -> &'static str {
    let by_app = app_protocol.map(str::to_ascii_lowercase);
    match by_app.as_deref() {
        Some("http" | "kubernetes.io/ws") => return "http",
        Some("http2" | "h2c" | "kubernetes.io/h2c") => return "http2",
        Some("grpc") => return "grpc",
        Some(_) => return "tcp",
        None => {}
    }
    let name = port_name.unwrap_or_default().to_ascii_lowercase();
    let prefix = name.split(['-', '_']).next().unwrap_or_default();
    match prefix {
        "http" | "ws" => "http",
        "http2" | "h2c" => "http2",
        "grpc" => "grpc",
        _ => "tcp",
    }
}

/// One pod's TCP container ports, without the sidecar's: (number, name).
fn container_ports(pod: &Pod) -> Vec<(u16, Option<String>)> {
    let mut out = Vec::new();
    let Some(spec) = &pod.spec else { return out };
    for c in spec.containers.iter().filter(|c| c.name != PROXY_CONTAINER) {
        for p in c.ports.iter().flatten() {
            let tcp = p.protocol.as_deref().unwrap_or("TCP") == "TCP";
            if let Ok(port) = u16::try_from(p.container_port)
                && tcp
                && port > 0
            {
                out.push((port, p.name.clone()));
            }
        }
    }
    out
}

fn labels(pod: &Pod) -> BTreeMap<String, String> {
    pod.metadata.labels.clone().unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A Service's port resolved against one pod: (service port, target port number, name,
/// appProtocol). A named target port the pod does not declare does not resolve.
fn resolve(svc_port: &k8s_openapi::api::core::v1::ServicePort, pod: &Pod) -> Option<u16> {
    match &svc_port.target_port {
        None => u16::try_from(svc_port.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(name)) => container_ports(pod)
            .into_iter()
            .find(|(_, n)| n.as_deref() == Some(name.as_str()))
            .map(|(p, _)| p),
    }
}

fn tcp_ports(svc: &Service) -> impl Iterator<Item = &k8s_openapi::api::core::v1::ServicePort> {
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
}

struct Group<'a> {
    owner: Owner,
    namespace: String,
    pods: Vec<&'a Pod>,
}

/// Derives the Workloads and Services of a cluster, in key order.
pub fn derive(trust_domain: &str, cluster: ClusterObjects<'_>) -> Derived {
    let mut out = Derived::default();
    let accounts: BTreeSet<(String, String)> = cluster
        .service_accounts
        .iter()
        .map(|sa| {
            (
                sa.metadata.namespace.clone().unwrap_or_default(),
                sa.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    // Meshed, live pods grouped by (namespace, owner).
    let mut groups: BTreeMap<(String, Owner), Group<'_>> = BTreeMap::new();
    for pod in cluster.pods {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        if !is_injected(pod) || finished(pod) {
            continue;
        }
        let sa = service_account_of(pod);
        if !accounts.contains(&(ns.clone(), sa.to_string())) {
            out.skipped.push(Skipped {
                object: object("Pod", &ns, &name),
                reason: format!("its service account {ns}/{sa} does not exist"),
            });
            continue;
        }
        let owner = owner_of(pod);
        groups
            .entry((ns.clone(), owner.clone()))
            .or_insert_with(|| Group {
                owner,
                namespace: ns,
                pods: Vec::new(),
            })
            .pods
            .push(pod);
    }
    // Names: the owner's; two owners of different kinds with one name in one namespace are
    // told apart by a kind suffix on all but the first (in kind order).
    let mut taken: BTreeSet<(String, String)> = BTreeSet::new();
    let mut named: Vec<(String, Group<'_>)> = Vec::new();
    for ((ns, _), group) in groups {
        let base = group.owner.name.clone();
        let name = if taken.contains(&(ns.clone(), base.clone())) {
            format!("{base}-{}", group.owner.kind.to_ascii_lowercase())
        } else {
            base
        };
        if !is_valid_name(&name) || !is_valid_name(&ns) {
            out.skipped.push(Skipped {
                object: object(&group.owner.kind, &ns, &group.owner.name),
                reason: format!(
                    "{name:?} in namespace {ns:?} is not a Bulkhead name (1-63 lowercase letters, digits or '-'); its pods get no Workload"
                ),
            });
            continue;
        }
        taken.insert((ns, name.clone()));
        named.push((name, group));
    }

    // Which workload each pod IP belongs to; the newest pod wins an address two claim (an
    // IP reused while the old pod is still terminating).
    let mut ip_owner: HashMap<IpAddr, (Option<jiff_key::Key>, usize)> = HashMap::new();
    for (i, (_, group)) in named.iter().enumerate() {
        for pod in &group.pods {
            let created = jiff_key::of(pod);
            for ip in pod_ips(pod) {
                match ip_owner.get(&ip) {
                    Some((other, _)) if *other >= created => {}
                    _ => {
                        ip_owner.insert(ip, (created.clone(), i));
                    }
                }
            }
        }
    }

    let mut workloads: Vec<WorkloadDraft> = Vec::new();
    for (i, (name, group)) in named.iter().enumerate() {
        let mut pods = group.pods.clone();
        pods.sort_by_key(|p| jiff_key::of(p));
        let newest = pods.last().copied();
        let sa = newest.map(service_account_of).unwrap_or("default");
        let mut shared: Option<BTreeMap<String, String>> = None;
        for pod in &pods {
            let l = labels(pod);
            shared = Some(match shared {
                None => l,
                Some(s) => s.into_iter().filter(|(k, v)| l.get(k) == Some(v)).collect(),
            });
        }
        let mut labels = shared.unwrap_or_default();
        labels.retain(|k, _| !PER_POD_LABELS.contains(&k.as_str()));
        let mut addresses: Vec<IpAddr> = pods
            .iter()
            .flat_map(|p| pod_ips(p))
            .filter(|ip| ip_owner.get(ip).map(|(_, o)| *o) == Some(i))
            .collect();
        addresses.sort();
        addresses.dedup();
        // Ports: every pod's (a rollout may add one), protocol from the Services that
        // select the pod and target the port, else from the port's name.
        let mut ports: BTreeMap<u16, &'static str> = BTreeMap::new();
        for pod in &pods {
            let pod_labels = self::labels(pod);
            for (port, port_name) in container_ports(pod) {
                let by_service = cluster
                    .services
                    .iter()
                    .filter(|s| s.metadata.namespace.as_deref() == Some(group.namespace.as_str()))
                    .filter(|s| selects(&selector_of(s), &pod_labels))
                    .flat_map(|s| tcp_ports(s))
                    .find(|sp| resolve(sp, pod) == Some(port) && sp.app_protocol.is_some())
                    .and_then(|sp| sp.app_protocol.as_deref());
                ports
                    .entry(port)
                    .or_insert_with(|| protocol_for(by_service, port_name.as_deref()));
            }
        }
        workloads.push(WorkloadDraft {
            namespace: group.namespace.clone(),
            name: name.clone(),
            identity: identity(trust_domain, &group.namespace, sa),
            labels,
            addresses,
            ports,
            pods: pods.iter().map(|p| labels_and_ports(p)).collect(),
        });
    }

    // Services; a cluster IP joins the addresses of the one workload its Service fronts.
    let mut services: Vec<Resource> = Vec::new();
    for svc in cluster.services {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let selector = selector_of(svc);
        if selector.is_empty() {
            continue;
        }
        if !is_valid_name(&name) || !is_valid_name(&ns) {
            out.skipped.push(Skipped {
                object: object("Service", &ns, &name),
                reason: "not a Bulkhead name".into(),
            });
            continue;
        }
        let fronted: Vec<usize> = workloads
            .iter()
            .enumerate()
            .filter(|(_, w)| w.namespace == ns && w.pods.iter().any(|(l, _)| selects(&selector, l)))
            .map(|(i, _)| i)
            .collect();
        let mut ports: BTreeMap<u16, &'static str> = BTreeMap::new();
        let mut unchanged = true;
        for sp in tcp_ports(svc) {
            let target = fronted
                .iter()
                .flat_map(|&i| workloads[i].pods.iter())
                .filter(|(l, _)| selects(&selector, l))
                .find_map(|(_, pod)| resolve(sp, pod));
            let Ok(service_port) = u16::try_from(sp.port) else {
                continue;
            };
            let port = target.unwrap_or(service_port);
            unchanged &= target == Some(service_port);
            let protocol = match &sp.app_protocol {
                Some(a) => protocol_for(Some(a), None),
                None => fronted
                    .first()
                    .and_then(|&i| workloads[i].ports.get(&port).copied())
                    .unwrap_or_else(|| protocol_for(None, sp.name.as_deref())),
            };
            ports.entry(port).or_insert(protocol);
        }
        if let [only] = fronted.as_slice()
            && unchanged
            && !ports.is_empty()
        {
            for ip in cluster_ips(svc) {
                let w = &mut workloads[*only];
                if !w.addresses.contains(&ip) {
                    w.addresses.push(ip);
                }
            }
        }
        let mut labels = svc.metadata.labels.clone().unwrap_or_default();
        labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
        let doc = json!({
            "apiVersion": API_VERSION,
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "selector": {"matchLabels": selector},
                "ports": port_list(&ports),
            },
        });
        match Resource::from_json(&doc.to_string()) {
            Ok(r) => services.push(r),
            Err(e) => out.skipped.push(Skipped {
                object: object("Service", &ns, &name),
                reason: e,
            }),
        }
    }

    for w in workloads {
        let mut labels = w.labels;
        labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
        let doc = json!({
            "apiVersion": API_VERSION,
            "kind": "Workload",
            "metadata": {"name": w.name, "namespace": w.namespace, "labels": labels},
            "spec": {
                "identity": w.identity,
                "ports": port_list(&w.ports),
                "addresses": w.addresses,
            },
        });
        match Resource::from_json(&doc.to_string()) {
            Ok(r) => out.resources.push(r),
            Err(e) => out.skipped.push(Skipped {
                object: object("Workload", &w.namespace, &w.name),
                reason: e,
            }),
        }
    }
    out.resources.extend(services);
    out.resources.sort_by_key(Resource::key);
    out
}

/// The Workload a pod belongs to, named as [`derive()`] names it (without the rare kind
/// suffix of a name clash, which attestation does not need: the pod's owner decides).
pub fn workload_name_of(pod: &Pod) -> String {
    owner_of(pod).name
}

struct WorkloadDraft<'a> {
    namespace: String,
    name: String,
    identity: String,
    labels: BTreeMap<String, String>,
    addresses: Vec<IpAddr>,
    ports: BTreeMap<u16, &'static str>,
    pods: Vec<(BTreeMap<String, String>, &'a Pod)>,
}

fn labels_and_ports(pod: &Pod) -> (BTreeMap<String, String>, &Pod) {
    (labels(pod), pod)
}

fn selector_of(svc: &Service) -> BTreeMap<String, String> {
    svc.spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default()
}

fn port_list(ports: &BTreeMap<u16, &'static str>) -> Vec<serde_json::Value> {
    ports
        .iter()
        .map(|(port, protocol)| json!({"port": port, "protocol": protocol}))
        .collect()
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse().ok())
    {
        ips.push(ip);
    }
    ips
}

fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|s| s.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Pods ordered by creation time (then name), for "the newest pod" decisions.
mod jiff_key {
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::jiff::Timestamp;

    pub(super) type Key = (Timestamp, String);

    /// A pod not yet persisted has no creation time and sorts first.
    pub(super) fn of(pod: &Pod) -> Option<Key> {
        let created = pod.metadata.creation_timestamp.as_ref()?.0;
        Some((created, pod.metadata.name.clone().unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests;
