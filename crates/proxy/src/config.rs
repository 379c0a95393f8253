//! The proxy's resolved configuration, and the parsing of `--upstream` values.

use bulkhead_identity::SpiffeId;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    /// The control plane's gRPC address, or its replicas' (tried in order, see [`bulkhead_api::channel::Replicas`]).
    pub control: bulkhead_api::channel::ControlAddrs,
    /// PEM root certificate(s) of the mesh; the control plane must chain to them.
    pub trust_bundle_pem: String,
    /// The join token. Its `Debug` is redacted so it cannot reach a log by accident.
    pub token: JoinToken,
    /// Join by this file's service-account token (a pod's projected token, audience
    /// `bulkhead`) instead of a join token; re-read at every join, since the kubelet
    /// rotates it.
    pub service_account_token_file: Option<PathBuf>,
    /// If set, the identity the proxy expects; the control plane refuses a token bound to
    /// another one.
    pub identity: Option<SpiffeId>,
    pub inbound: Option<InboundSpec>,
    pub upstreams: Vec<UpstreamSpec>,
    /// Transparent mode: the listener that `bulkhead-proxy init`'s rules send the app's
    /// outbound connections to. The destination is each connection's original address.
    pub outbound: Option<SocketAddr>,
    pub ready_file: Option<PathBuf>,
    /// The admin port (/metrics, /ready, /live, /config), if any.
    pub admin: Option<SocketAddr>,
    pub first_config_wait: Duration,
    /// A configuration with more compiled rules than this is refused (NACK) and the last good
    /// one stays in force: a bound on the memory a control plane can make a proxy use.
    pub max_policy_rules: usize,
    /// How often the traffic seen is reported to the control plane as edges. Zero turns
    /// flow reporting off: nothing is counted and no reporter runs.
    pub flow_interval: Duration,
    pub limits: Limits,
    /// Where request spans go (OTLP/gRPC), and which share of new traces is kept; `None`:
    /// no spans.
    pub traces: Option<Traces>,
    /// This proxy's own key and certificate, kept (0600) to rejoin after a restart without a
    /// new token; `None`: a restarted proxy needs a new join token.
    pub credential_file: Option<PathBuf>,
    /// Serve the SPIFFE Workload API to the app on this Unix socket (0600): an X.509-SVID
    /// for this proxy's identity with a key made for the app, and the trust bundle.
    pub workload_api: Option<PathBuf>,
}

/// Tracing: spans for every sampled request, to an OTLP collector.
#[derive(Clone, Debug)]
pub struct Traces {
    /// `http://HOST:PORT` of an OTLP/gRPC collector.
    pub endpoint: String,
    /// The probability that a request without a sampled `traceparent` starts a trace.
    pub sampling_ratio: f64,
}

/// Protections against clients that misbehave, by accident or on purpose.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request head (request line and headers); larger gets 431.
    pub max_header_bytes: usize,
    /// Time a client has to send a complete request head (slowloris protection).
    pub header_read_timeout: Duration,
    /// Most connections open at once per listener; more are closed at accept.
    pub max_connections: usize,
    /// An opaque TCP or upgraded connection with no traffic this long is closed.
    pub idle_timeout: Duration,
    /// How long to wait for a connection's first bytes to tell its protocol; a client that
    /// says nothing for this long (server-first protocols) is treated as opaque TCP.
    pub detect_timeout: Duration,
    /// HTTP/2 streams open at once per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before they finish, at once, before the connection
    /// is closed (rapid-reset protection).
    pub max_pending_resets: usize,
    /// An HTTP/1.1 connection may wait this long between requests (keep-alive); the
    /// header-read timeout starts only with a request's first byte.
    pub keepalive_timeout: Duration,
    /// A request body on its way to the app or an upstream may stall this long between two
    /// pieces; then 408 and its stream or connection is freed.
    pub body_idle_timeout: Duration,
    /// A whole request body must arrive within this; then 408.
    pub body_timeout: Duration,
    /// The app or upstream must send the response head within this of the request's end;
    /// then 504 and the stream is dropped.
    pub response_timeout: Duration,
}

impl Limits {
    pub(crate) fn deadlines(&self) -> crate::deadline::Deadlines {
        crate::deadline::Deadlines {
            body_idle: self.body_idle_timeout,
            body_total: self.body_timeout,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(3600),
            detect_timeout: Duration::from_secs(1),
            max_concurrent_streams: 256,
            max_pending_resets: 20,
            keepalive_timeout: Duration::from_secs(300),
            body_idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(600),
            response_timeout: Duration::from_secs(60),
        }
    }
}

/// A join token: a secret, shown to nobody.
#[derive(Clone)]
pub struct JoinToken(pub String);

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

/// The inbound listener and the local app it protects.
#[derive(Clone, Debug)]
pub struct InboundSpec {
    pub listen: SocketAddr,
    pub target: InboundTarget,
    /// Ports on which plaintext (no mTLS) is accepted, counted and labelled: for migrating a
    /// workload into the mesh. Policy sees such callers without an identity.
    pub permissive_ports: Vec<u16>,
}

/// Where inbound traffic goes once allowed.
#[derive(Clone, Copy, Debug)]
pub enum InboundTarget {
    /// Explicit mode: one app address; `port` is the workload's declared port policy sees.
    App { app: SocketAddr, port: u16 },
    /// Transparent mode: connections were redirected here by `bulkhead-proxy init`; each goes
    /// to the workload address and port it was originally sent to (never loopback), and that
    /// port is the one policy sees.
    Transparent,
}

/// A declared upstream: a local plain listener whose traffic goes over mTLS to `address`,
/// which must present `identity`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSpec {
    pub name: String,
    pub listen: SocketAddr,
    pub address: SocketAddr,
    pub identity: SpiffeId,
    /// The destination's declared port, for egress policy. Defaults to `address`'s port.
    pub port: u16,
    /// The destination workload (`namespace/name`), for egress policy; optional.
    pub workload: Option<bulkhead_policy::model::WorkloadRef>,
}

impl FromStr for UpstreamSpec {
    type Err = String;

    /// `name=payments,listen=127.0.0.1:9001,address=127.0.0.1:15006,identity=spiffe://…`
    /// with optional `port=8080` and `workload=shop/payments`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut name, mut listen, mut address, mut identity) = (None, None, None, None);
        let (mut port, mut workload) = (None, None);
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not key=value"))?;
            let addr = |v: &str| {
                SocketAddr::from_str(v).map_err(|_| format!("{k}={v:?} is not an IP:port address"))
            };
            match k.trim() {
                "name" => name = Some(v.to_string()),
                "listen" => listen = Some(addr(v)?),
                "address" => address = Some(addr(v)?),
                "identity" => identity = Some(SpiffeId::parse(v).map_err(|e| e.to_string())?),
                "port" => {
                    port =
                        Some(v.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                            format!("port={v:?} is not a port between 1 and 65535")
                        })?)
                }
                "workload" => {
                    workload = Some(
                        bulkhead_policy::model::parse_workload(v)
                            .map_err(|e| format!("workload={e}"))?,
                    );
                }
                other => {
                    return Err(format!(
                        "unknown key {other:?}; expected name, listen, address, identity, port, workload"
                    ));
                }
            }
        }
        let need = |what: &str| {
            format!(
                "missing {what}= (expected name=…,listen=IP:PORT,address=IP:PORT,identity=spiffe://…)"
            )
        };
        let name = name.ok_or_else(|| need("name"))?;
        if !bulkhead_policy::is_valid_name(&name) {
            return Err(format!(
                "name {name:?} must be lowercase letters, digits or '-'"
            ));
        }
        let address: SocketAddr = address.ok_or_else(|| need("address"))?;
        Ok(UpstreamSpec {
            name,
            listen: listen.ok_or_else(|| need("listen"))?,
            address,
            identity: identity.ok_or_else(|| need("identity"))?,
            port: port.unwrap_or(address.port()),
            workload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_parses() {
        let u: UpstreamSpec =
            "name=payments,listen=127.0.0.1:0,address=127.0.0.1:9,identity=spiffe://td/ns/a/sa/b"
                .parse()
                .unwrap();
        assert_eq!(u.name, "payments");
        assert_eq!(u.identity.as_str(), "spiffe://td/ns/a/sa/b");
    }

    #[test]
    fn token_is_redacted_in_debug() {
        let t = JoinToken("bhj.id.secret".into());
        assert_eq!(format!("{t:?}"), "JoinToken(<redacted>)");
    }

    #[test]
    fn upstream_errors_say_what_is_wrong() {
        let e = "name=p,listen=nope".parse::<UpstreamSpec>().unwrap_err();
        assert_eq!(e, "listen=\"nope\" is not an IP:port address");
        let e = "name=p,listen=127.0.0.1:1,address=127.0.0.1:2"
            .parse::<UpstreamSpec>()
            .unwrap_err();
        assert!(e.starts_with("missing identity="), "{e}");
        let e = "colour=red".parse::<UpstreamSpec>().unwrap_err();
        assert!(e.starts_with("unknown key \"colour\""), "{e}");
    }
}
