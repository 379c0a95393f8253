//! Sidecar injection: the decision and the JSONPatch a mutating admission webhook answers an
//! AdmissionReview (v1) for a pod with.
//!
//! An injected pod gets, ahead of its own init containers: `bulkhead-init`, which runs
//! `bulkhead-proxy init` with NET_ADMIN and NET_RAW only, and `bulkhead-proxy`, the sidecar as
//! a native sidecar (an init container with `restartPolicy: Always`, started before the app
//! and ready only once it holds an SVID and a policy revision); a projected volume with a
//! service-account token for audience `bulkhead` (600 s) and the trust bundle; resource
//! requests. Kubelet HTTP and TCP probes of the app are rewritten to the sidecar's admin
//! port, which runs exactly the probe that was declared and nothing else, so probes pass
//! default deny without opening a port to other pods.
//!
//! Pure: a pod and the mesh's settings in, a verdict and a patch out. It must never inject a
//! host-network pod (its init would rewrite the node's firewall), never inject twice, and
//! never let a pod that asked to be meshed through without its sidecar: what it cannot mesh
//! it refuses, with the reason and what to do.

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// The sidecar's container name (an init container with `restartPolicy: Always`).
pub const PROXY_CONTAINER: &str = "bulkhead-proxy";
/// The init container that installs the capture rules.
pub const INIT_CONTAINER: &str = "bulkhead-init";
/// The projected volume with the service-account token and the trust bundle.
pub const IDENTITY_VOLUME: &str = "bulkhead-identity";
/// Where that volume is mounted in the sidecar.
pub const IDENTITY_DIR: &str = "/var/run/bulkhead";
/// Opt in (namespace label or pod label `enabled`), opt out (pod label or annotation
/// `disabled`).
pub const INJECT_KEY: &str = "bulkhead.dev/inject";
/// Pod annotation holding the trust bundle (PEM) that the sidecar reads through the
/// downward API on its first join.
pub const TRUST_BUNDLE_ANNOTATION: &str = "bulkhead.dev/trust-bundle";
/// Pod annotations: comma lists of ports or CIDRs left out of capture.
pub const EXCLUDE_INBOUND_PORTS: &str = "bulkhead.dev/exclude-inbound-ports";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "bulkhead.dev/exclude-outbound-ports";
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "bulkhead.dev/exclude-outbound-cidrs";
/// The audience of the projected token; TokenReview checks it.
pub const TOKEN_AUDIENCE: &str = "bulkhead";
/// Lifetime the kubelet gives the projected token (it refreshes it at 80 %).
pub const TOKEN_EXPIRATION_SECONDS: i64 = 600;
/// The sidecar's environment variable listing the app probes it runs for the kubelet.
pub const APP_PROBES_ENV: &str = "BULKHEAD_APP_PROBES";

/// What injection needs to know about the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectConfig {
    /// The image holding both binaries.
    pub image: String,
    pub image_pull_policy: String,
    /// The control plane as the sidecar dials it (its Service's cluster IP and port).
    pub control: SocketAddr,
    /// The trust bundle (PEM) the sidecar checks the control plane's certificate against.
    pub trust_bundle_pem: String,
    /// The uid the sidecar runs as; `init` never captures its traffic.
    pub proxy_uid: i64,
    pub admin_port: u16,
    pub inbound_port: u16,
    pub outbound_port: u16,
}

impl InjectConfig {
    /// The defaults of `bulkhead-proxy` and `bulkhead-proxy init`.
    pub fn new(image: &str, control: SocketAddr, trust_bundle_pem: &str) -> InjectConfig {
        InjectConfig {
            image: image.to_string(),
            image_pull_policy: "IfNotPresent".into(),
            control,
            trust_bundle_pem: trust_bundle_pem.to_string(),
            proxy_uid: 1337,
            admin_port: 15000,
            inbound_port: 15006,
            outbound_port: 15001,
        }
    }
}

/// What the webhook answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Admit unchanged: not opted in, opted out, or already injected.
    Unchanged(&'static str),
    /// Admit with this JSONPatch (RFC 6902).
    Patch(json_patch::Patch),
    /// Refuse the pod, with a message for whoever created it.
    Refuse(String),
}

/// A probe the sidecar runs for the kubelet at `path` on its admin port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    /// `/app-health/<container>/<livez|readyz|startupz>`.
    pub path: String,
    /// The app's port on 127.0.0.1.
    pub port: u16,
    /// HTTP probe: this path is GET; absent: a TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
}

/// Whether the pod already carries the sidecar.
pub fn is_injected(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == PROXY_CONTAINER))
}

fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The decision and patch for `pod`, in a namespace whose `bulkhead.dev/inject` label is
/// `namespace_label` (`None`: the namespace is not known yet).
pub fn inject(pod: &Pod, namespace_label: Option<Option<&str>>, config: &InjectConfig) -> Verdict {
    let opted_out = label(pod, INJECT_KEY) == Some("disabled")
        || annotation(pod, INJECT_KEY) == Some("disabled");
    if opted_out {
        return Verdict::Unchanged("the pod opted out (bulkhead.dev/inject: disabled)");
    }
    if is_injected(pod) {
        return Verdict::Unchanged("the pod already has the sidecar");
    }
    let pod_in = label(pod, INJECT_KEY) == Some("enabled");
    match namespace_label {
        _ if pod_in => {}
        Some(Some("enabled")) => {}
        Some(_) => {
            return Verdict::Unchanged(
                "neither the pod nor its namespace opted in (label bulkhead.dev/inject=enabled)",
            );
        }
        None => {
            return Verdict::Refuse(
                "the Bulkhead controller does not know this pod's namespace yet, so it cannot tell whether the pod must be meshed; the pod's controller will retry".into(),
            );
        }
    }
    let Some(spec) = &pod.spec else {
        return Verdict::Refuse("the pod has no spec".into());
    };
    if spec.host_network == Some(true) {
        return Verdict::Refuse(
            "a hostNetwork pod cannot be meshed: its capture rules would apply to the node. Set the annotation bulkhead.dev/inject: disabled to run it outside the mesh".into(),
        );
    }
    match build(pod, config) {
        Ok(patch) => Verdict::Patch(patch),
        Err(message) => Verdict::Refuse(message),
    }
}

/// A comma list from an annotation, each item parsed.
fn list<T>(pod: &Pod, key: &str, parse: impl Fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    let Some(text) = annotation(pod, key) else {
        return Ok(Vec::new());
    };
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| parse(item).ok_or_else(|| format!("annotation {key}: {item:?} is not valid")))
        .collect()
}

fn port(s: &str) -> Option<u16> {
    s.parse().ok().filter(|p| *p > 0)
}

fn build(pod: &Pod, config: &InjectConfig) -> Result<json_patch::Patch, String> {
    let spec = pod.spec.as_ref().ok_or("the pod has no spec")?;
    let inbound = list(pod, EXCLUDE_INBOUND_PORTS, port)?;
    let outbound = list(pod, EXCLUDE_OUTBOUND_PORTS, port)?;
    let cidrs = list(pod, EXCLUDE_OUTBOUND_CIDRS, |s| {
        s.parse::<IpNet>()
            .ok()
            .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
    })?;
    if let Some(net) = cidrs.iter().find(|n| matches!(n, IpNet::V6(_))) {
        return Err(format!(
            "annotation {EXCLUDE_OUTBOUND_CIDRS}: {net} is IPv6; only IPv4 destinations can be left out of capture"
        ));
    }
    for p in inbound.iter().chain(&outbound) {
        if [config.admin_port, config.inbound_port, config.outbound_port].contains(p) {
            return Err(format!(
                "port {p} is the sidecar's own; it cannot be left out of capture"
            ));
        }
    }

    let mut ops: Vec<Value> = Vec::new();
    // The trust bundle, for the downward API.
    match &pod.metadata.annotations {
        None => ops.push(json!({"op": "add", "path": "/metadata/annotations",
            "value": {TRUST_BUNDLE_ANNOTATION: config.trust_bundle_pem}})),
        Some(_) => ops.push(json!({"op": "add",
            "path": format!("/metadata/annotations/{}", escape(TRUST_BUNDLE_ANNOTATION)),
            "value": config.trust_bundle_pem})),
    }

    // Probes: rewritten to the sidecar, which runs what was declared.
    let mut probes: Vec<AppProbe> = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        for (field, kind, probe) in [
            ("livenessProbe", "livez", &c.liveness_probe),
            ("readinessProbe", "readyz", &c.readiness_probe),
            ("startupProbe", "startupz", &c.startup_probe),
        ] {
            let Some(probe) = probe else { continue };
            let Some(app) = app_probe(c, kind, probe)? else {
                continue;
            };
            let mut rewritten = serde_json::to_value(probe).map_err(|e| e.to_string())?;
            if let Some(obj) = rewritten.as_object_mut() {
                obj.remove("httpGet");
                obj.remove("tcpSocket");
                obj.insert(
                    "httpGet".into(),
                    json!({"path": app.path, "port": config.admin_port, "scheme": "HTTP"}),
                );
            }
            ops.push(json!({"op": "replace",
                "path": format!("/spec/containers/{i}/{field}"), "value": rewritten}));
            probes.push(app);
        }
    }

    // The volume.
    let volume = json!({
        "name": IDENTITY_VOLUME,
        "projected": {"sources": [
            {"serviceAccountToken": {"audience": TOKEN_AUDIENCE,
                "expirationSeconds": TOKEN_EXPIRATION_SECONDS, "path": "token"}},
            {"downwardAPI": {"items": [{"path": "trust-bundle.pem",
                "fieldRef": {"fieldPath": format!("metadata.annotations['{TRUST_BUNDLE_ANNOTATION}']")}}]}},
        ]},
    });
    match &spec.volumes {
        None => ops.push(json!({"op": "add", "path": "/spec/volumes", "value": [volume]})),
        Some(_) => ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume})),
    }

    // The containers, first among the init containers: capture, then the sidecar.
    let init = init_container(config, &inbound, &outbound, &cidrs);
    let proxy = proxy_container(config, &probes)?;
    match &spec.init_containers {
        None => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [init, proxy]}))
        }
        Some(_) => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": proxy}));
            ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": init}));
        }
    }
    serde_json::from_value(Value::Array(ops)).map_err(|e| format!("cannot build the patch: {e}"))
}

/// RFC 6901: `~` and `/` in a path segment.
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The probe the sidecar runs for one declared probe; `None` for an exec probe, which the
/// kubelet runs in the container and capture never sees.
fn app_probe(c: &Container, kind: &str, probe: &Probe) -> Result<Option<AppProbe>, String> {
    let path = format!("/app-health/{}/{kind}", c.name);
    let resolve = |p: &IntOrString| -> Result<u16, String> {
        match p {
            IntOrString::Int(n) => u16::try_from(*n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("container {}: probe port {n} is not a port", c.name)),
            IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| {
                    format!(
                        "container {}: probe port {name:?} names no port of the container",
                        c.name
                    )
                }),
        }
    };
    if let Some(get) = &probe.http_get {
        if get.scheme.as_deref().is_some_and(|s| s != "HTTP") {
            return Err(unsupported(c, kind, "an HTTPS probe"));
        }
        if get.host.is_some() {
            return Err(unsupported(c, kind, "a probe with a host"));
        }
        let http_path = get.path.clone().unwrap_or_else(|| "/".into());
        if !http_path.starts_with('/') || http_path.contains(['\r', '\n', ' ']) {
            return Err(format!(
                "container {}: probe path {http_path:?} is not a path",
                c.name
            ));
        }
        return Ok(Some(AppProbe {
            path,
            port: resolve(&get.port)?,
            http_path: Some(http_path),
        }));
    }
    if let Some(tcp) = &probe.tcp_socket {
        if tcp.host.is_some() {
            return Err(unsupported(c, kind, "a probe with a host"));
        }
        return Ok(Some(AppProbe {
            path,
            port: resolve(&tcp.port)?,
            http_path: None,
        }));
    }
    if probe.grpc.is_some() {
        return Err(unsupported(c, kind, "a gRPC probe"));
    }
    Ok(None)
}

fn unsupported(c: &Container, kind: &str, what: &str) -> String {
    format!(
        "container {}: its {kind} probe is {what}, which Bulkhead cannot pass through the sidecar; use an httpGet (HTTP) or tcpSocket probe, or an exec probe, or leave the probe's port out of capture with the annotation {EXCLUDE_INBOUND_PORTS} (which opens that port to every caller, unauthenticated)",
        c.name
    )
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn init_container(
    config: &InjectConfig,
    inbound: &[u16],
    outbound: &[u16],
    cidrs: &[IpNet],
) -> Value {
    let mut args = vec![
        "init".to_string(),
        "--proxy-uid".into(),
        config.proxy_uid.to_string(),
        "--inbound-port".into(),
        config.inbound_port.to_string(),
        "--outbound-port".into(),
        config.outbound_port.to_string(),
    ];
    if let SocketAddr::V4(v4) = config.control {
        args.extend(["--control".into(), v4.to_string()]);
    }
    if !inbound.is_empty() {
        args.extend(["--exclude-inbound-ports".into(), join(inbound)]);
    }
    if !outbound.is_empty() {
        args.extend(["--exclude-outbound-ports".into(), join(outbound)]);
    }
    if !cidrs.is_empty() {
        args.extend(["--exclude-cidrs".into(), join(cidrs)]);
    }
    json!({
        "name": INIT_CONTAINER,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["bulkhead-proxy"],
        "args": args,
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    })
}

fn proxy_container(config: &InjectConfig, probes: &[AppProbe]) -> Result<Value, String> {
    let admin = config.admin_port;
    let mut env = vec![json!({"name": "BULKHEAD_LOG", "value": "info"})];
    if !probes.is_empty() {
        env.push(json!({"name": APP_PROBES_ENV,
            "value": serde_json::to_string(probes).map_err(|e| e.to_string())?}));
    }
    let http = |path: &str| json!({"httpGet": {"path": path, "port": admin, "scheme": "HTTP"}});
    let mut startup = http("/ready");
    let mut live = http("/live");
    if let (Some(s), Some(l)) = (startup.as_object_mut(), live.as_object_mut()) {
        s.insert("periodSeconds".into(), json!(1));
        s.insert("failureThreshold".into(), json!(300));
        l.insert("periodSeconds".into(), json!(10));
    }
    Ok(json!({
        "name": PROXY_CONTAINER,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "restartPolicy": "Always",
        "command": ["bulkhead-proxy"],
        "args": [
            "--control", config.control.to_string(),
            "--trust-bundle", format!("{IDENTITY_DIR}/trust-bundle.pem"),
            "--service-account-token-file", format!("{IDENTITY_DIR}/token"),
            "--inbound", format!("[::]:{}", config.inbound_port),
            "--transparent",
            "--outbound", format!("[::]:{}", config.outbound_port),
            "--admin", format!("[::]:{admin}"),
            "--log-format", "json",
        ],
        "env": env,
        "ports": [{"name": "bulkhead-admin", "containerPort": admin, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {
            "runAsUser": config.proxy_uid,
            "runAsGroup": config.proxy_uid,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "startupProbe": startup,
        "livenessProbe": live,
        "volumeMounts": [{"name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR, "readOnly": true}],
    }))
}

/// The `bulkhead.dev/inject` label of a namespace's labels.
pub fn namespace_opt_in(labels: Option<&BTreeMap<String, String>>) -> Option<&str> {
    labels.and_then(|l| l.get(INJECT_KEY)).map(String::as_str)
}

#[cfg(test)]
mod tests;
