//! A small Kubernetes API server for tests: HTTPS (its own CA, a certificate for
//! 127.0.0.1), a bearer token checked, and a kubeconfig file pointing at it. It holds
//! objects the test puts in, and serves them as the real API server does for the calls a
//! controller makes:
//!
//! - list (`GET /api/v1/pods`, `/apis/G/V/namespaces/NS/PLURAL`, …): a `…List` with
//!   `metadata.resourceVersion`; items of built-in kinds without `kind`/`apiVersion`, CR items
//!   with them, as the real one sends them;
//! - watch (`?watch=1&resourceVersion=N`): newline-delimited WatchEvents (`ADDED`, `MODIFIED`,
//!   `DELETED`) of everything after N, then live ones, in a chunked response that lasts
//!   `timeoutSeconds` or until the test drops it; `BOOKMARK`s when `allowWatchBookmarks` is
//!   set; no or `0` resourceVersion: every object as `ADDED` first; a resourceVersion older
//!   than the last compaction: one `ERROR` event with a `410 Expired` Status, then the end;
//! - get and replace (`PUT`, refused `409 Conflict` for a stale `metadata.resourceVersion`)
//!   of one object;
//! - `PATCH …/status` (the status subresource) with a merge patch
//!   (`application/merge-patch+json`) or `application/apply-patch+yaml` (JSON bodies, applied
//!   as a merge of `status`: not the real server-side apply's field ownership), changing only
//!   `status`.
//!
//! Every write bumps one global resourceVersion, as etcd's revision does. Written to the
//! API's documented behaviour; it is not a real API server (no field or label selectors, no
//! paging, no admission, no strategic merge patch, no validation against the CRDs).
//!
//! Blocking, one thread per connection, one request per connection. Stopped when dropped.

use crate::TempDir;
use crate::tokenreview::{accept, api_server_tls};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The bearer token callers must send (in the kubeconfig).
pub const CALLER_TOKEN: &str = "controller-service-account-token";

/// Where a kind's objects live: the API path prefix, the plural, and whether namespaced.
fn resource_of(api_version: &str, kind: &str) -> Option<(String, &'static str, bool)> {
    let (plural, namespaced) = match (api_version, kind) {
        ("v1", "Namespace") => ("namespaces", false),
        ("v1", "Pod") => ("pods", true),
        ("v1", "Service") => ("services", true),
        ("v1", "ServiceAccount") => ("serviceaccounts", true),
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
            ("mutatingwebhookconfigurations", false)
        }
        ("bulkhead.dev/v1alpha1", "AuthorizationPolicy") => ("authorizationpolicies", true),
        ("bulkhead.dev/v1alpha1", "Workload") => ("workloads", true),
        ("bulkhead.dev/v1alpha1", "Service") => ("services", true),
        ("bulkhead.dev/v1alpha1", "DefaultPosture") => ("defaultpostures", true),
        _ => return None,
    };
    let prefix = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    Some((prefix, plural, namespaced))
}

/// `(collection, namespace, name)`; the collection is `PREFIX/PLURAL`.
type Key = (String, String, String);

#[derive(Clone)]
struct Event {
    rv: u64,
    collection: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Db {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Kind and apiVersion per collection, for lists and bookmarks.
    kinds: BTreeMap<String, (String, String)>,
    events: Vec<Event>,
    /// Watches from a resourceVersion below this are answered 410.
    compacted: u64,
    /// Bumped to end every open watch.
    epoch: u64,
    /// Request lines received (`GET /api/v1/pods?watch=1&… HTTP/1.1`), authorized or not.
    requests: Vec<String>,
    /// Status patches received: (`Kind/namespace/name`, the patch).
    status_patches: Vec<(String, Value)>,
    uids: u64,
    /// Watches answered `410 Expired`.
    expired: u64,
}

#[derive(Default)]
struct Shared {
    db: Mutex<Db>,
    changed: Condvar,
    stop: AtomicBool,
}

pub struct KubeApiServer {
    pub addr: SocketAddr,
    dir: TempDir,
    shared: Arc<Shared>,
}

impl KubeApiServer {
    pub fn start() -> KubeApiServer {
        let dir = TempDir::new().unwrap();
        let config = api_server_tls(&dir);
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://{addr}\n    certificate-authority: {}\nusers:\n- name: controller\n  user:\n    token: {CALLER_TOKEN}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: controller\ncurrent-context: test\n",
            dir.path().join("ca.crt").display()
        );
        std::fs::write(dir.path().join("kubeconfig"), kubeconfig).unwrap();
        let shared = Arc::new(Shared::default());
        shared.db.lock().unwrap().rv = 1000;
        accept(tcp, config, shared.clone(), |s| &s.stop, serve);
        KubeApiServer { addr, dir, shared }
    }

    /// A kubeconfig whose current context reaches this server with [`CALLER_TOKEN`].
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Creates or replaces an object (a whole Kubernetes object with `apiVersion`, `kind`,
    /// `metadata.name` and, if namespaced, `metadata.namespace`), as `kubectl apply` would:
    /// a new resourceVersion, a uid and creation time kept, `metadata.generation` bumped
    /// when `spec` changes, `status` kept unless given. Watchers see ADDED or MODIFIED.
    pub fn apply(&self, object: Value) -> Value {
        let mut db = self.shared.db.lock().unwrap();
        let key = key_of(&object).expect("apply: an object of a kind this server serves");
        let old = db.objects.get(&key).cloned();
        let mut object = object;
        db.rv += 1;
        let rv = db.rv;
        let meta = object["metadata"].as_object_mut().unwrap();
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        match &old {
            Some(old) => {
                for k in ["uid", "creationTimestamp"] {
                    meta.insert(k.into(), old["metadata"][k].clone());
                }
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let bumped = if old.get("spec") == object.get("spec") {
                    generation
                } else {
                    generation + 1
                };
                object["metadata"]["generation"] = json!(bumped);
                if object.get("status").is_none()
                    && let Some(status) = old.get("status")
                {
                    object["status"] = status.clone();
                }
            }
            None => {
                db.uids += 1;
                meta.insert(
                    "uid".into(),
                    json!(format!("00000000-0000-4000-8000-{:012}", db.uids)),
                );
                meta.insert("creationTimestamp".into(), json!("2026-12-05T12:00:00Z"));
                meta.insert("generation".into(), json!(1));
            }
        }
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        db.objects.insert(key.clone(), object.clone());
        record(&mut db, &key, kind, &object);
        drop(db);
        self.shared.changed.notify_all();
        object
    }

    /// Deletes an object; watchers see DELETED with its last state. Whether it existed.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let (prefix, plural, namespaced) = resource_of(api_version, kind).unwrap();
        let ns = if namespaced { namespace } else { "" };
        let key = (
            format!("{prefix}/{plural}"),
            ns.to_string(),
            name.to_string(),
        );
        let mut db = self.shared.db.lock().unwrap();
        let Some(mut object) = db.objects.remove(&key) else {
            return false;
        };
        db.rv += 1;
        object["metadata"]["resourceVersion"] = json!(db.rv.to_string());
        record(&mut db, &key, "DELETED", &object);
        drop(db);
        self.shared.changed.notify_all();
        true
    }

    /// The object as stored now.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let (prefix, plural, namespaced) = resource_of(api_version, kind).unwrap();
        let ns = if namespaced { namespace } else { "" };
        let key = (
            format!("{prefix}/{plural}"),
            ns.to_string(),
            name.to_string(),
        );
        self.shared.db.lock().unwrap().objects.get(&key).cloned()
    }

    /// Compacts the history as etcd does and ends every open watch: a watcher that comes
    /// back with a resourceVersion it had is answered `410 Expired` and must list again.
    pub fn expire_watches(&self) {
        let mut db = self.shared.db.lock().unwrap();
        db.rv += 1;
        db.compacted = db.rv;
        db.events.clear();
        db.epoch += 1;
        drop(db);
        self.shared.changed.notify_all();
    }

    /// The request lines received so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.db.lock().unwrap().requests.clone()
    }

    /// How many watches were answered `410 Expired` (an ERROR event) so far.
    pub fn expired_watches(&self) -> u64 {
        self.shared.db.lock().unwrap().expired
    }

    /// The status patches received so far: (`Kind/namespace/name`, the patch).
    pub fn status_patches(&self) -> Vec<(String, Value)> {
        self.shared.db.lock().unwrap().status_patches.clone()
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        let _ = TcpStream::connect(self.addr);
    }
}

fn key_of(object: &Value) -> Option<Key> {
    let api_version = object["apiVersion"].as_str()?;
    let kind = object["kind"].as_str()?;
    let (prefix, plural, namespaced) = resource_of(api_version, kind)?;
    let name = object["metadata"]["name"].as_str()?.to_string();
    let ns = if namespaced {
        object["metadata"]["namespace"].as_str()?.to_string()
    } else {
        String::new()
    };
    Some((format!("{prefix}/{plural}"), ns, name))
}

fn record(db: &mut Db, key: &Key, kind: &'static str, object: &Value) {
    let (api_version, k) = (
        object["apiVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        object["kind"].as_str().unwrap_or_default().to_string(),
    );
    db.kinds.insert(key.0.clone(), (api_version, k));
    let rv = db.rv;
    db.events.push(Event {
        rv,
        collection: key.0.clone(),
        namespace: key.1.clone(),
        kind,
        object: object.clone(),
    });
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// What a request asks for.
enum Target {
    /// A collection: (collection, namespace or empty for all).
    Collection(String, String),
    /// One object, maybe its status subresource.
    Object(Key, bool),
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (prefix, rest) = match segments.as_slice() {
        ["api", v, rest @ ..] => (format!("/api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("/apis/{g}/{v}"), rest),
        _ => return None,
    };
    let c = |plural: &str| format!("{prefix}/{plural}");
    Some(match rest {
        [plural] => Target::Collection(c(plural), String::new()),
        ["namespaces", ns, "status"] => {
            Target::Object((c("namespaces"), String::new(), ns.to_string()), true)
        }
        ["namespaces", ns, plural] => Target::Collection(c(plural), ns.to_string()),
        ["namespaces", ns, plural, name] => {
            Target::Object((c(plural), ns.to_string(), name.to_string()), false)
        }
        ["namespaces", ns, plural, name, "status"] => {
            Target::Object((c(plural), ns.to_string(), name.to_string()), true)
        }
        [plural, name] => Target::Object((c(plural), String::new(), name.to_string()), false),
        [plural, name, "status"] => {
            Target::Object((c(plural), String::new(), name.to_string()), true)
        }
        _ => return None,
    })
}

fn query(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let params = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    (path.to_string(), params)
}

type Tls = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

fn reply(tls: &mut Tls, code: u16, body: &Value) {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        415 => "Unsupported Media Type",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    );
    let _ = tls.write_all(head.as_bytes());
    let _ = tls.write_all(text.as_bytes());
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

fn serve(stream: TcpStream, config: Arc<rustls::ServerConfig>, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let Some((head, body)) = crate::tokenreview::read_request(&mut tls) else {
        return;
    };
    let line = head.first().cloned().unwrap_or_default();
    shared.db.lock().unwrap().requests.push(line.clone());
    let header = |name: &str| {
        head.iter().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    if header("authorization").as_deref() != Some(&format!("Bearer {CALLER_TOKEN}")) {
        return reply(&mut tls, 401, &status(401, "Unauthorized", "Unauthorized"));
    }
    let mut parts = line.split(' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (path, params) = query(target);
    let Some(t) = parse_path(&path) else {
        return reply(
            &mut tls,
            404,
            &status(
                404,
                "NotFound",
                &format!("the server could not find the requested resource {path}"),
            ),
        );
    };
    match (method, t) {
        ("GET", Target::Collection(c, ns)) => {
            let watching = matches!(params.get("watch").map(String::as_str), Some("1" | "true"));
            if watching {
                watch(&mut tls, shared, &c, &ns, &params);
            } else {
                let body = list(shared, &c, &ns);
                reply(&mut tls, 200, &body);
            }
        }
        ("GET", Target::Object(key, _)) => {
            let db = shared.db.lock().unwrap();
            match db.objects.get(&key) {
                Some(o) => {
                    let o = o.clone();
                    drop(db);
                    reply(&mut tls, 200, &o);
                }
                None => {
                    drop(db);
                    reply(&mut tls, 404, &not_found(&key));
                }
            }
        }
        ("PUT", Target::Object(key, false)) => {
            let (code, body) = replace(shared, &key, &body);
            reply(&mut tls, code, &body);
        }
        ("PATCH", Target::Object(key, true)) => {
            let content_type = header("content-type").unwrap_or_default();
            let (code, body) = patch_status(shared, &key, &content_type, &body);
            reply(&mut tls, code, &body);
        }
        (m, _) => reply(
            &mut tls,
            405,
            &status(
                405,
                "MethodNotAllowed",
                &format!("{m} is not supported on {path} by this test server"),
            ),
        ),
    }
}

fn not_found(key: &Key) -> Value {
    let plural = key.0.rsplit('/').next().unwrap_or_default();
    status(
        404,
        "NotFound",
        &format!("{plural} \"{}\" not found", key.2),
    )
}

fn list(shared: &Shared, collection: &str, ns: &str) -> Value {
    let db = shared.db.lock().unwrap();
    let (api_version, kind) = db
        .kinds
        .get(collection)
        .cloned()
        .unwrap_or_else(|| (String::new(), String::new()));
    let custom = collection.starts_with("/apis/bulkhead.dev/");
    let items: Vec<Value> = db
        .objects
        .iter()
        .filter(|((c, n, _), _)| c == collection && (ns.is_empty() || n == ns))
        .map(|(_, o)| {
            let mut o = o.clone();
            if !custom && let Some(m) = o.as_object_mut() {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    json!({
        "kind": format!("{kind}List"),
        "apiVersion": api_version,
        "metadata": {"resourceVersion": db.rv.to_string()},
        "items": items,
    })
}

fn chunk(tls: &mut Tls, line: &Value) -> bool {
    let text = format!("{line}\n");
    let framed = format!("{:x}\r\n{text}\r\n", text.len());
    tls.write_all(framed.as_bytes()).is_ok() && tls.flush().is_ok()
}

fn watch(
    tls: &mut Tls,
    shared: &Shared,
    collection: &str,
    ns: &str,
    params: &BTreeMap<String, String>,
) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if tls.write_all(head.as_bytes()).is_err() {
        return;
    }
    let bookmarks = matches!(
        params.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let deadline = Instant::now() + timeout;
    let from: Option<u64> = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v != 0);
    let mut db = shared.db.lock().unwrap();
    let epoch = db.epoch;
    let matches = |c: &str, n: &str| c == collection && (ns.is_empty() || n == ns);
    let mut seen = match from {
        Some(rv) if rv < db.compacted => {
            db.expired += 1;
            let too_old = json!({"type": "ERROR", "object": status(
                410, "Expired",
                &format!("too old resource version: {rv} ({})", db.compacted),
            )});
            drop(db);
            chunk(tls, &too_old);
            return end(tls);
        }
        Some(rv) => rv,
        None => {
            let now = db.rv;
            let initial: Vec<Value> = db
                .objects
                .iter()
                .filter(|((c, n, _), _)| matches(c, n))
                .map(|(_, o)| json!({"type": "ADDED", "object": o}))
                .collect();
            drop(db);
            for e in initial {
                if !chunk(tls, &e) {
                    return;
                }
            }
            db = shared.db.lock().unwrap();
            now
        }
    };
    loop {
        if shared.stop.load(Ordering::SeqCst) || db.epoch != epoch || Instant::now() >= deadline {
            drop(db);
            return end(tls);
        }
        let pending: Vec<Event> = db
            .events
            .iter()
            .filter(|e| e.rv > seen && matches(&e.collection, &e.namespace))
            .cloned()
            .collect();
        let (latest, kinds) = (db.rv, db.kinds.get(collection).cloned());
        if let Some(e) = pending.last() {
            seen = e.rv;
        }
        drop(db);
        for e in &pending {
            if !chunk(tls, &json!({"type": e.kind, "object": e.object})) {
                return;
            }
        }
        db = shared.db.lock().unwrap();
        if pending.is_empty() {
            let (guard, waited) = shared
                .changed
                .wait_timeout(db, Duration::from_secs(1))
                .unwrap();
            db = guard;
            if waited.timed_out() && bookmarks && db.epoch == epoch {
                // Nothing of ours changed up to `latest`: a watcher may resume from there.
                let (api_version, kind) = kinds.unwrap_or_default();
                seen = seen.max(latest);
                let mark = json!({"type": "BOOKMARK", "object": {"kind": kind,
                    "apiVersion": api_version, "metadata": {"resourceVersion": seen.to_string()}}});
                drop(db);
                if !chunk(tls, &mark) {
                    return;
                }
                db = shared.db.lock().unwrap();
            }
        }
    }
}

fn end(tls: &mut Tls) {
    let _ = tls.write_all(b"0\r\n\r\n");
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

fn replace(shared: &Shared, key: &Key, body: &[u8]) -> (u16, Value) {
    let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
        return (400, status(400, "BadRequest", "the body is not JSON"));
    };
    let mut db = shared.db.lock().unwrap();
    let Some(old) = db.objects.get(key).cloned() else {
        return (404, not_found(key));
    };
    let sent = object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    if !sent.is_empty()
        && sent
            != old["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
    {
        return (
            409,
            status(
                409,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                    key.0.rsplit('/').next().unwrap_or_default(),
                    key.2
                ),
            ),
        );
    }
    db.rv += 1;
    object["metadata"]["resourceVersion"] = json!(db.rv.to_string());
    for k in ["uid", "creationTimestamp", "generation"] {
        if let Some(v) = old["metadata"].get(k) {
            object["metadata"][k] = v.clone();
        }
    }
    db.objects.insert(key.clone(), object.clone());
    record(&mut db, key, "MODIFIED", &object);
    drop(db);
    shared.changed.notify_all();
    (200, object)
}

fn patch_status(shared: &Shared, key: &Key, content_type: &str, body: &[u8]) -> (u16, Value) {
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if !matches!(
        media,
        "application/merge-patch+json" | "application/apply-patch+yaml"
    ) {
        return (
            415,
            status(
                415,
                "UnsupportedMediaType",
                &format!(
                    "the body of the request was in an unknown format: {media} (this test server takes merge and apply patches of status only)"
                ),
            ),
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return (400, status(400, "BadRequest", "the body is not JSON"));
    };
    let mut db = shared.db.lock().unwrap();
    let Some(mut object) = db.objects.get(key).cloned() else {
        return (404, not_found(key));
    };
    let name = format!(
        "{}/{}/{}",
        object["kind"].as_str().unwrap_or_default(),
        key.1,
        key.2
    );
    db.status_patches.push((name, patch.clone()));
    // The status subresource changes status only, whatever else the patch says.
    if let Some(s) = patch.get("status") {
        let mut current = object.get("status").cloned().unwrap_or(json!({}));
        merge(&mut current, s);
        object["status"] = current;
    }
    db.rv += 1;
    object["metadata"]["resourceVersion"] = json!(db.rv.to_string());
    db.objects.insert(key.clone(), object.clone());
    record(&mut db, key, "MODIFIED", &object);
    drop(db);
    shared.changed.notify_all();
    (200, object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use std::io::Read;

    /// One request; the whole response (a watch that ends is read to its end).
    fn request(api: &KubeApiServer, method: &str, target: &str, token: &str, body: &str) -> String {
        let pem = std::fs::read_to_string(api.dir.path().join("ca.crt")).unwrap();
        let bundle = bulkhead_identity::TrustBundle::from_pem(&pem).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for r in bundle.roots() {
            roots.add(r.clone()).unwrap();
        }
        let config =
            rustls::ClientConfig::builder_with_provider(bulkhead_identity::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let tcp = TcpStream::connect(api.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/merge-patch+json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(head.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out);
        String::from_utf8(out).unwrap()
    }

    fn pod(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "shop"}, "spec": {"containers": []}})
    }

    #[test]
    fn list_watch_410_conflict_and_status_patch_as_the_api_documents() {
        let api = KubeApiServer::start();
        api.apply(pod("a"));
        api.apply(
            json!({"apiVersion": "bulkhead.dev/v1alpha1", "kind": "Workload",
            "metadata": {"name": "db", "namespace": "shop"}, "spec": {"identity": "x"}}),
        );

        let res = request(&api, "GET", "/api/v1/pods", "wrong", "");
        assert!(res.starts_with("HTTP/1.1 401"), "{res}");

        // A list: its resourceVersion; built-in items without kind, CRs with it.
        let res = request(
            &api,
            "GET",
            "/api/v1/namespaces/shop/pods?limit=500",
            CALLER_TOKEN,
            "",
        );
        let list: Value = serde_json::from_str(res.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(list["kind"], "PodList");
        assert_eq!(list["metadata"]["resourceVersion"], "1002");
        assert!(list["items"][0].get("kind").is_none());
        let res = request(
            &api,
            "GET",
            "/apis/bulkhead.dev/v1alpha1/workloads",
            CALLER_TOKEN,
            "",
        );
        assert!(res.contains(r#""kind":"Workload""#), "{res}");

        // A watch from a version older than the last compaction: one ERROR 410, then the end.
        api.apply(pod("b"));
        api.expire_watches();
        let res = request(
            &api,
            "GET",
            "/api/v1/pods?watch=1&resourceVersion=1002",
            CALLER_TOKEN,
            "",
        );
        assert!(
            res.contains(r#""type":"ERROR""#) && res.contains(r#""code":410"#),
            "{res}"
        );
        assert!(res.ends_with("0\r\n\r\n"), "{res}");
        assert_eq!(api.expired_watches(), 1);

        // Replace with a stale resourceVersion: 409.
        let mut stale = api.get("v1", "Pod", "shop", "a").unwrap();
        stale["metadata"]["resourceVersion"] = json!("1");
        let res = request(
            &api,
            "PUT",
            "/api/v1/namespaces/shop/pods/a",
            CALLER_TOKEN,
            &stale.to_string(),
        );
        assert!(res.starts_with("HTTP/1.1 409"), "{res}");

        // A status merge patch changes status only.
        let res = request(
            &api,
            "PATCH",
            "/apis/bulkhead.dev/v1alpha1/namespaces/shop/workloads/db/status",
            CALLER_TOKEN,
            r#"{"spec": {"identity": "y"}, "status": {"revision": 7}}"#,
        );
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");
        let db = api
            .get("bulkhead.dev/v1alpha1", "Workload", "shop", "db")
            .unwrap();
        assert_eq!(db["status"]["revision"], 7);
        assert_eq!(db["spec"]["identity"], "x");
        assert_eq!(api.status_patches().len(), 1);
    }
}
