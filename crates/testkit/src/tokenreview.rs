//! A Kubernetes API server for TokenReviews only, for tests: HTTPS (TLS 1.3, its own CA,
//! a certificate for 127.0.0.1), `POST /apis/authentication.k8s.io/v1/tokenreviews` with the
//! caller's bearer token checked, each reviewed token answered with the TokenReview the test
//! gave for it (the request's `spec` echoed, as the API server does), and an unknown token
//! answered unauthenticated with the API server's words. Written to the API's documented
//! shape; it is not a real API server.
//!
//! Blocking, one thread per connection, one request per connection (what
//! `bulkhead_kubernetes::attest` sends). Stopped when dropped.

use crate::TempDir;
use bulkhead_identity::{Ca, SpiffeId};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The path TokenReviews are posted to.
pub const PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
/// The bearer token callers must send (in [`TokenReviewServer::token_file`]).
pub const CALLER_TOKEN: &str = "control-plane-service-account-token";
/// What the API server says of a token it cannot authenticate at all.
pub const UNKNOWN_TOKEN_ERROR: &str = "[invalid bearer token, token lookup failed]";

#[derive(Default)]
struct Shared {
    answers: Mutex<BTreeMap<String, Value>>,
    forbidden: AtomicBool,
    stop: AtomicBool,
    /// The reviews asked for, as received (authorized and well-formed ones).
    reviews: Mutex<Vec<Value>>,
}

pub struct TokenReviewServer {
    pub addr: SocketAddr,
    dir: TempDir,
    shared: Arc<Shared>,
}

impl TokenReviewServer {
    pub fn start() -> TokenReviewServer {
        let dir = TempDir::new().unwrap();
        let config = api_server_tls(&dir);
        std::fs::write(dir.path().join("token"), format!("{CALLER_TOKEN}\n")).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        accept(tcp, config, shared.clone(), |s| &s.stop, serve);
        TokenReviewServer { addr, dir, shared }
    }

    /// `https://127.0.0.1:PORT`, for `--kubernetes-api`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA certificate the server's certificate chains to.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The bearer token callers must present ([`CALLER_TOKEN`]).
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// Answers reviews of `token` with `review` (a whole TokenReview; its `spec` is replaced
    /// by the request's).
    pub fn answer(&self, token: &str, review: Value) {
        self.shared
            .answers
            .lock()
            .unwrap()
            .insert(token.to_string(), review);
    }

    /// Answers every review 403, as without the RBAC grant.
    pub fn forbid(&self, forbidden: bool) {
        self.shared.forbidden.store(forbidden, Ordering::SeqCst);
    }

    /// The TokenReviews received so far, authorized and well-formed.
    pub fn reviews(&self) -> Vec<Value> {
        self.shared.reviews.lock().unwrap().clone()
    }
}

impl Drop for TokenReviewServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// What the API server answers for a pod-bound token of `namespace`/`account` for
/// `audiences`.
pub fn bound_token(namespace: &str, account: &str, pod: &str, audiences: &[&str]) -> Value {
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "status": {
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{namespace}:{account}"),
                "uid": "9a7c1e55-2b3d-4f6a-8e9b-0c1d2e3f4a5b",
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/pod-name": [pod],
                    "authentication.kubernetes.io/pod-uid": ["3d9b6f21-8c4e-4a7b-b5d2-1e0f9a8c7b6d"],
                },
            },
            "audiences": audiences,
        },
    })
}

/// What the API server answers for a token it does not authenticate, with its `error`.
pub fn unauthenticated(error: &str) -> Value {
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "status": {"user": {}, "error": error},
    })
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// The TLS an API server of the tests serves with: a certificate for 127.0.0.1 from a CA of
/// its own, whose certificate it writes to `dir/ca.crt` (what a kubeconfig or
/// `--kubernetes-ca` names).
pub(crate) fn api_server_tls(dir: &TempDir) -> Arc<rustls::ServerConfig> {
    let now = SystemTime::now();
    let ca = Ca::generate("kubernetes.test", now).unwrap();
    let id = SpiffeId::parse("spiffe://kubernetes.test/kube-apiserver").unwrap();
    let svid = ca
        .issue_local_for_hosts(&id, &["127.0.0.1".into()], Duration::from_secs(3600), now)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(bulkhead_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(svid.chain().to_vec(), svid.private_key())
        .unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
    Arc::new(config)
}

/// Accepts connections on `tcp` until `stop` of the state is set, serving each on a thread
/// of its own.
pub(crate) fn accept<S: Send + Sync + 'static>(
    tcp: TcpListener,
    config: Arc<rustls::ServerConfig>,
    state: Arc<S>,
    stop: fn(&S) -> &AtomicBool,
    serve: fn(TcpStream, Arc<rustls::ServerConfig>, &S),
) {
    std::thread::spawn(move || {
        for stream in tcp.incoming() {
            if stop(&state).load(Ordering::SeqCst) {
                return;
            }
            let Ok(stream) = stream else { continue };
            let (config, state) = (config.clone(), state.clone());
            std::thread::spawn(move || serve(stream, config, &state));
        }
    });
}

fn serve(stream: TcpStream, config: Arc<rustls::ServerConfig>, state: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let Some((head, body)) = read_request(&mut tls) else {
        return;
    };
    let (code, answer) = respond(&head, &body, state);
    let text = answer.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        _ => "Not Found",
    };
    let reply = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = tls.write_all(reply.as_bytes());
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

/// The request head (lines) and body; `None` if the peer went away or sent nonsense.
pub(crate) fn read_request(tls: &mut impl Read) -> Option<(Vec<String>, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if raw.len() > 64 * 1024 {
            return None;
        }
        let n = tls.read(&mut buf).ok().filter(|n| *n > 0)?;
        raw.extend_from_slice(&buf[..n]);
    };
    let head: Vec<String> = String::from_utf8_lossy(&raw[..end])
        .split("\r\n")
        .map(str::to_string)
        .collect();
    let length: usize = head
        .iter()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = raw[end + 4..].to_vec();
    while body.len() < length {
        let n = tls.read(&mut buf).ok().filter(|n| *n > 0)?;
        body.extend_from_slice(&buf[..n]);
    }
    Some((head, body))
}

fn respond(head: &[String], body: &[u8], state: &Shared) -> (u16, Value) {
    let header = |name: &str| {
        head.iter().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    if header("authorization").as_deref() != Some(&format!("Bearer {CALLER_TOKEN}")) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    if state.forbidden.load(Ordering::SeqCst) {
        return status(
            403,
            "Forbidden",
            "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:bulkhead-system:bulkhead-control\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
        );
    }
    let line = head.first().cloned().unwrap_or_default();
    if line != format!("POST {PATH} HTTP/1.1") {
        return status(
            404,
            "NotFound",
            &format!("the server could not find {line:?}"),
        );
    }
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "the body is not JSON");
    };
    if review["apiVersion"] != "authentication.k8s.io/v1" || review["kind"] != "TokenReview" {
        return status(
            400,
            "BadRequest",
            "not an authentication.k8s.io/v1 TokenReview",
        );
    }
    let Some(token) = review["spec"]["token"].as_str() else {
        return status(400, "BadRequest", "spec.token: Required value");
    };
    state.reviews.lock().unwrap().push(review.clone());
    let mut answer = state
        .answers
        .lock()
        .unwrap()
        .get(token)
        .cloned()
        .unwrap_or_else(|| unauthenticated(UNKNOWN_TOKEN_ERROR));
    answer["spec"] = review["spec"].clone();
    (201, answer)
}
