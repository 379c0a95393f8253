//! Bulkhead's own etcd v3 client: the calls [`super::etcd`] and `replicas.rs` make (range,
//! delete, transaction, watch, lease grant and keep-alive) over etcd's gRPC API, with the
//! messages of `bulkhead_api::etcd` (compiled by protox: building needs no protoc).
//!
//! One lazily dialled channel per member. Every call goes to the member in use; a call that
//! fails in a way another member may not (the member is down, has no leader, or did not
//! answer in time) moves the client on to the next member, so the caller's retry reaches
//! another one. TLS to etcd (rustls, aws-lc-rs) verifies the members against the CA given,
//! and presents the client certificate given; without either, plain HTTP/2.
//!
//! It must never send anything but what its caller built (no retry of its own: the store
//! decides what may be sent again), and never take a member's certificate without the CA.

use bulkhead_api::etcd::etcdserverpb as pb;
use bulkhead_api::etcd::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

pub(crate) use bulkhead_api::etcd::mvccpb::KeyValue;

/// How long dialling one member may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one call may wait for its answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer taken from a member (tonic's default is 4 MiB; a read of every
/// replica's shared flows, at most 1 MiB each, can pass that with a few replicas).
const MAX_ANSWER: usize = 64 * 1024 * 1024;
/// HTTP/2 pings on an open connection, and how long one may go unanswered.
const KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(3));

/// A failed call: which member, and what it (or the connection to it) said.
#[derive(Debug)]
pub(crate) struct Error {
    member: String,
    status: tonic::Status,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = format!(
            "member {}: {:?}: {}",
            self.member,
            self.status.code(),
            self.status.message()
        );
        // A connection's failure (a TLS alert, a refused dial) is in the status's sources,
        // which often repeat one another.
        let mut source = std::error::Error::source(&self.status);
        while let Some(s) = source {
            let text = s.to_string();
            if !shown.contains(&text) {
                shown = format!("{shown}: {text}");
            }
            source = s.source();
        }
        f.write_str(&shown)
    }
}

impl Error {
    /// Whether the call may pass once etcd has a leader again or on another member.
    pub(crate) fn is_transient(&self) -> bool {
        let message = self.status.message();
        matches!(
            self.status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ) || message.contains("leader changed")
            || message.contains("no leader")
    }
}

struct Member {
    url: String,
    channel: Channel,
}

/// The client: cheap to clone, every clone shares the members and which one is in use.
#[derive(Clone)]
pub(crate) struct Client {
    members: Arc<Vec<Member>>,
    current: Arc<AtomicUsize>,
}

/// A member URL taken apart: whether it asks for TLS, and where to dial.
#[derive(Debug, PartialEq, Eq)]
struct Url {
    tls: bool,
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> Result<Url, String> {
    let bad = || {
        format!(
            "etcd member {url:?} is not http://HOST:PORT or https://HOST:PORT (like http://10.0.0.1:2379)"
        )
    };
    let (tls, rest) = match url.split_once("://") {
        Some(("http", rest)) => (false, rest),
        Some(("https", rest)) => (true, rest),
        Some(_) => return Err(bad()),
        None => (false, url),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['/', '@', '?', '#']) || port == 0 {
        return Err(bad());
    }
    Ok(Url {
        tls,
        host: host.to_string(),
        port,
    })
}

/// The TLS configuration to reach etcd with: the members verified against the PEM CA
/// `ca`, and the PEM client certificate chain and key `client` presented when given.
pub(crate) fn tls_config(
    ca: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        let cert = cert.map_err(|e| format!("the etcd CA is not PEM certificates: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the etcd CA holds a certificate rustls refuses: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the etcd CA file holds no PEM certificate".to_string());
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the etcd client certificate is not PEM: {e}"))?;
            if chain.is_empty() {
                return Err("the etcd client certificate file holds no PEM certificate".into());
            }
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| format!("the etcd client key is not a PEM private key: {e}"))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                format!("the etcd client certificate and key do not go together: {e}")
            })?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

impl Client {
    /// A client of the members `urls` (`http://HOST:PORT` or `https://HOST:PORT`), over
    /// TLS with `tls` when given. Dials nothing yet: the first call does.
    pub(crate) fn new(
        urls: &[String],
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Client, String> {
        if urls.is_empty() {
            return Err("no etcd member given".to_string());
        }
        let mut members = Vec::new();
        for url in urls {
            let parsed = parse_url(url)?;
            if parsed.tls && tls.is_none() {
                return Err(format!(
                    "etcd member {url} is https: give --etcd-ca, the CA of the members' serving certificates"
                ));
            }
            let server_name = ServerName::try_from(parsed.host.clone())
                .map_err(|e| format!("etcd member {url}: {e}"))?;
            let tls = tls.clone().map(tokio_rustls::TlsConnector::from);
            let address = (parsed.host, parsed.port);
            // The URI is only a placeholder for tonic; the connector decides where to dial.
            let channel = Endpoint::from_static("http://etcd.member")
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .http2_keep_alive_interval(KEEP_ALIVE.0)
                .keep_alive_timeout(KEEP_ALIVE.1)
                .connect_with_connector_lazy(tower::service_fn(move |_uri| {
                    let (tls, address, server_name) =
                        (tls.clone(), address.clone(), server_name.clone());
                    async move {
                        let tcp =
                            tokio::net::TcpStream::connect((address.0.as_str(), address.1)).await?;
                        tcp.set_nodelay(true)?;
                        Ok::<_, std::io::Error>(match tls {
                            None => TokioIo::new(Stream::Plain(tcp)),
                            Some(tls) => TokioIo::new(Stream::Tls(Box::new(
                                tls.connect(server_name, tcp).await?,
                            ))),
                        })
                    }
                }));
            members.push(Member {
                url: url.clone(),
                channel,
            });
        }
        // Replicas spread over the members rather than all starting on the first.
        let first = rand::random_range(0..members.len());
        Ok(Client {
            members: Arc::new(members),
            current: Arc::new(AtomicUsize::new(first)),
        })
    }

    /// The member in use.
    fn member(&self) -> Call<'_> {
        let index = self.current.load(Ordering::SeqCst) % self.members.len();
        Call {
            client: self,
            index,
            done: false,
        }
    }

    /// Moves on from member `index` (unless another call did already).
    fn next_after(&self, index: usize) {
        let next = (index + 1) % self.members.len();
        if self
            .current
            .compare_exchange(index, next, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            && self.members.len() > 1
        {
            tracing::debug!(from = %self.members[index].url, to = %self.members[next].url, "trying another etcd member");
        }
    }

    pub(crate) async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, Error> {
        let call = self.member();
        let out = KvClient::new(call.channel())
            .max_decoding_message_size(MAX_ANSWER)
            .range(req)
            .await;
        call.finish(out)
    }

    pub(crate) async fn delete_range(
        &self,
        req: pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse, Error> {
        let call = self.member();
        let out = KvClient::new(call.channel())
            .max_decoding_message_size(MAX_ANSWER)
            .delete_range(req)
            .await;
        call.finish(out)
    }

    pub(crate) async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, Error> {
        let call = self.member();
        let out = KvClient::new(call.channel())
            .max_decoding_message_size(MAX_ANSWER)
            .txn(req)
            .await;
        call.finish(out)
    }

    pub(crate) async fn lease_grant(&self, ttl_secs: i64) -> Result<pb::LeaseGrantResponse, Error> {
        let call = self.member();
        let out = LeaseClient::new(call.channel())
            .max_decoding_message_size(MAX_ANSWER)
            .lease_grant(pb::LeaseGrantRequest {
                ttl: ttl_secs,
                id: 0,
            })
            .await;
        call.finish(out)
    }

    /// Opens a keep-alive stream for lease `id` and renews it once.
    pub(crate) async fn lease_keep_alive(&self, id: i64) -> Result<(LeaseKeeper, i64), Error> {
        let call = self.member();
        let (requests, rx) = mpsc::channel(1);
        // etcd answers (and so sends the stream's headers) only once it has a request.
        let _ = requests.try_send(pb::LeaseKeepAliveRequest { id });
        let out = LeaseClient::new(call.channel())
            .max_decoding_message_size(MAX_ANSWER)
            .lease_keep_alive(ReceiverStream::new(rx))
            .await;
        let index = call.index;
        let stream = call.finish(out)?;
        let mut keeper = LeaseKeeper {
            client: self.clone(),
            index,
            id,
            requests,
            stream,
        };
        let ttl = keeper.answer().await?;
        Ok((keeper, ttl))
    }

    /// Watches `key` (with `range_end`, the keys in [key, range_end)) from now on; returns
    /// once etcd has created the watch, so that nothing written after is missed.
    pub(crate) async fn watch(&self, key: Vec<u8>, range_end: Vec<u8>) -> Result<Watch, Error> {
        let call = self.member();
        let (requests, rx) = mpsc::channel(1);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key,
                    range_end,
                    start_revision: 0,
                },
            )),
        };
        let _ = requests.try_send(create);
        let out = WatchClient::new(call.channel())
            .max_decoding_message_size(MAX_ANSWER)
            .watch(ReceiverStream::new(rx))
            .await;
        let index = call.index;
        let stream = call.finish(out)?;
        let mut watch = Watch {
            client: self.clone(),
            index,
            _requests: requests,
            stream,
        };
        match watch.message().await? {
            Some(first) if first.created && !first.canceled => Ok(watch),
            other => Err(self.error(
                index,
                tonic::Status::unavailable(format!(
                    "etcd did not create the watch: {}",
                    other
                        .map(|r| r.cancel_reason)
                        .unwrap_or_else(|| "the stream ended".to_string())
                )),
            )),
        }
    }

    fn error(&self, index: usize, status: tonic::Status) -> Error {
        let error = Error {
            member: self.members[index].url.clone(),
            status,
        };
        if error.is_transient() {
            self.next_after(index);
        }
        error
    }
}

/// One call on one member: if it fails in a way another member may not, or is dropped
/// before it ends (its caller gave up waiting), the client moves on to the next member.
struct Call<'a> {
    client: &'a Client,
    index: usize,
    done: bool,
}

impl Call<'_> {
    fn channel(&self) -> Channel {
        self.client.members[self.index].channel.clone()
    }

    fn finish<T>(mut self, out: Result<tonic::Response<T>, tonic::Status>) -> Result<T, Error> {
        self.done = true;
        out.map(tonic::Response::into_inner)
            .map_err(|status| self.client.error(self.index, status))
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.client.next_after(self.index);
        }
    }
}

/// A lease's keep-alive stream.
pub(crate) struct LeaseKeeper {
    client: Client,
    index: usize,
    id: i64,
    requests: mpsc::Sender<pb::LeaseKeepAliveRequest>,
    stream: tonic::Streaming<pb::LeaseKeepAliveResponse>,
}

impl LeaseKeeper {
    /// Renews the lease; the seconds it has left (0 or less: it ended).
    pub(crate) async fn renew(&mut self) -> Result<i64, Error> {
        if self
            .requests
            .send(pb::LeaseKeepAliveRequest { id: self.id })
            .await
            .is_err()
        {
            return Err(self.client.error(
                self.index,
                tonic::Status::unavailable("the keep-alive stream is closed"),
            ));
        }
        self.answer().await
    }

    async fn answer(&mut self) -> Result<i64, Error> {
        match self.stream.message().await {
            Ok(Some(r)) => Ok(r.ttl),
            Ok(None) => Err(self.client.error(
                self.index,
                tonic::Status::unavailable("etcd ended the keep-alive stream"),
            )),
            Err(status) => Err(self.client.error(self.index, status)),
        }
    }
}

/// A watch's stream of changes.
pub(crate) struct Watch {
    client: Client,
    index: usize,
    /// Kept open: etcd ends the watch when the client closes its side.
    _requests: mpsc::Sender<pb::WatchRequest>,
    stream: tonic::Streaming<pb::WatchResponse>,
}

impl Watch {
    /// The next batch of changes; `None` once etcd ended the stream.
    pub(crate) async fn message(&mut self) -> Result<Option<pb::WatchResponse>, Error> {
        self.stream
            .message()
            .await
            .map_err(|status| self.client.error(self.index, status))
    }
}

/// A connection to a member, plain or TLS.
enum Stream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The end of the range of every key starting with `prefix`: the prefix with its last byte
/// below 0xff incremented (and what follows dropped); `\0` (every key) if there is none.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A read of `key` alone.
pub(crate) fn get(key: impl Into<Vec<u8>>) -> pb::RangeRequest {
    pb::RangeRequest {
        key: key.into(),
        ..Default::default()
    }
}

/// A read of every key starting with `prefix`, in key order.
pub(crate) fn get_prefix(prefix: impl Into<Vec<u8>>) -> pb::RangeRequest {
    let key = prefix.into();
    pb::RangeRequest {
        range_end: prefix_end(&key),
        key,
        ..Default::default()
    }
}

/// A read of the newest `limit` keys starting with `prefix` (keys that sort by age), newest
/// first.
pub(crate) fn get_newest(prefix: impl Into<Vec<u8>>, limit: usize) -> pb::RangeRequest {
    pb::RangeRequest {
        sort_target: pb::range_request::SortTarget::Key as i32,
        sort_order: pb::range_request::SortOrder::Descend as i32,
        limit: i64::try_from(limit).unwrap_or(i64::MAX),
        ..get_prefix(prefix)
    }
}

/// A transaction: `success` if every comparison in `compare` holds, else nothing.
pub(crate) fn txn(compare: Vec<pb::Compare>, success: Vec<pb::RequestOp>) -> pb::TxnRequest {
    pb::TxnRequest {
        compare,
        success,
        failure: Vec::new(),
    }
}

/// Put `value` at `key`, under `lease` unless 0.
pub(crate) fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
        })),
    }
}

/// Delete `key`.
pub(crate) fn delete(key: impl Into<Vec<u8>>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key: key.into(),
                ..Default::default()
            },
        )),
    }
}

fn compare_equal(key: impl Into<Vec<u8>>, target: pb::compare::TargetUnion) -> pb::Compare {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let target_kind = match &target {
        TargetUnion::Version(_) => CompareTarget::Version,
        TargetUnion::CreateRevision(_) => CompareTarget::Create,
        TargetUnion::ModRevision(_) => CompareTarget::Mod,
        TargetUnion::Value(_) => CompareTarget::Value,
        TargetUnion::Lease(_) => CompareTarget::Lease,
    };
    pb::Compare {
        result: CompareResult::Equal as i32,
        target: target_kind as i32,
        key: key.into(),
        target_union: Some(target),
    }
}

/// `key` has been changed `version` times since it was created (0: it does not exist).
pub(crate) fn version_is(key: impl Into<Vec<u8>>, version: i64) -> pb::Compare {
    compare_equal(key, pb::compare::TargetUnion::Version(version))
}

/// `key` holds `value`.
pub(crate) fn value_is(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> pb::Compare {
    compare_equal(key, pb::compare::TargetUnion::Value(value.into()))
}

/// `key` was last changed at store revision `revision`.
pub(crate) fn mod_revision_is(key: impl Into<Vec<u8>>, revision: i64) -> pb::Compare {
    compare_equal(key, pb::compare::TargetUnion::ModRevision(revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_urls_are_http_or_https_host_and_port() {
        assert_eq!(
            parse_url("http://10.0.0.1:2379"),
            Ok(Url {
                tls: false,
                host: "10.0.0.1".into(),
                port: 2379
            })
        );
        assert_eq!(
            parse_url("https://[::1]:2379/"),
            Ok(Url {
                tls: true,
                host: "::1".into(),
                port: 2379
            })
        );
        assert_eq!(
            parse_url("etcd-0.etcd:2379"),
            Ok(Url {
                tls: false,
                host: "etcd-0.etcd".into(),
                port: 2379
            })
        );
        for bad in [
            "unix:///run/etcd.sock",
            "http://10.0.0.1",
            "http://:2379",
            "http://10.0.0.1:0",
            "http://user@10.0.0.1:2379",
            "http://10.0.0.1:2379/v3",
        ] {
            let e = parse_url(bad).unwrap_err();
            assert!(e.contains("http://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn https_members_need_a_ca_and_bad_pem_is_refused() {
        let e = Client::new(&["https://127.0.0.1:2379".into()], None)
            .err()
            .unwrap();
        assert!(e.contains("--etcd-ca"), "{e}");
        assert!(Client::new(&[], None).is_err());
        let e = tls_config(b"not a certificate", None).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn a_prefix_range_ends_past_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/bulkhead/"), b"/bulkhead0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn comparisons_name_the_target_they_carry() {
        let c = version_is("k", 0);
        assert_eq!(c.target, pb::compare::CompareTarget::Version as i32);
        let c = value_is("k", "7");
        assert_eq!(c.target, pb::compare::CompareTarget::Value as i32);
        let c = mod_revision_is("k", 9);
        assert_eq!(c.target, pb::compare::CompareTarget::Mod as i32);
        assert_eq!(c.result, pb::compare::CompareResult::Equal as i32);
    }

    #[test]
    fn unavailable_and_leader_changes_are_transient_and_others_are_not() {
        let e = |status| Error {
            member: "http://127.0.0.1:2379".into(),
            status,
        };
        assert!(e(tonic::Status::unavailable("connection refused")).is_transient());
        assert!(e(tonic::Status::unknown("etcdserver: leader changed")).is_transient());
        assert!(
            !e(tonic::Status::invalid_argument(
                "etcdserver: key is not provided"
            ))
            .is_transient()
        );
        assert!(
            !e(tonic::Status::permission_denied(
                "etcdserver: permission denied"
            ))
            .is_transient()
        );
    }
}
