//! The wire: protobuf messages and gRPC services between proxies, the CLI and the control
//! plane, plus conversions to and from the policy model. Only this crate knows protobuf.

#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod v1 {
    tonic::include_proto!("bulkhead.v1");
}

/// The SPIFFE Workload API (`proto/spiffe/workload.proto`), which the sidecar serves to apps
/// that want their own X.509-SVID (`bulkhead-proxy --workload-api`).
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod spiffe_workload {
    tonic::include_proto!("_");

    /// The metadata every Workload API call must carry (`workload.spiffe.io: true`).
    pub const HEADER: &str = "workload.spiffe.io";

    /// A JWT's claims as `ValidateJWTSVIDResponse.claims` carries them.
    pub fn claims_struct(
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> prost_types::Struct {
        prost_types::Struct {
            fields: claims.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
        }
    }

    fn value(v: &serde_json::Value) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match v {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(*b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            serde_json::Value::String(s) => Kind::StringValue(s.clone()),
            serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
                values: a.iter().map(value).collect(),
            }),
            serde_json::Value::Object(m) => Kind::StructValue(claims_struct(m)),
        };
        prost_types::Value { kind: Some(kind) }
    }
}

/// The part of etcd's v3 API that the control plane's own etcd client calls
/// (`proto/etcd/`: etcd's packages, methods and field numbers, only what is used), compiled
/// with protox like ours, so that building needs no protoc. Client stubs only.
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod etcd {
    /// Stored keys and watch events (etcd's `mvccpb`).
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// The KV, Watch and Lease services (etcd's `etcdserverpb`).
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

pub mod channel;
pub mod exposition;
pub mod otlp;
pub mod pieces;
pub mod process;

pub use v1::Resource as WireResource;

/// The proxies connected to one replica, as bytes another replica reads back
/// ([`proxies_from_bytes`]): what replicas on etcd share for `bulkhead get proxies`.
pub fn proxies_to_bytes(proxies: &[v1::ProxyStatus]) -> Vec<u8> {
    use prost::Message;
    v1::ListProxiesResponse {
        proxies: proxies.to_vec(),
    }
    .encode_to_vec()
}

/// What [`proxies_to_bytes`] wrote; `None` if the bytes are not that.
pub fn proxies_from_bytes(bytes: &[u8]) -> Option<Vec<v1::ProxyStatus>> {
    use prost::Message;
    v1::ListProxiesResponse::decode(bytes)
        .ok()
        .map(|r| r.proxies)
}

/// Encodes a checked policy resource for the wire.
pub fn resource_to_wire(res: &bulkhead_policy::model::Resource) -> WireResource {
    let name = res.name();
    WireResource {
        kind: res.kind().to_string(),
        namespace: name.namespace,
        name: name.name,
        // A resource that cannot be serialized goes out empty: the proxy refuses it (NACK)
        // and keeps its last good configuration, so the failure is loud, never a widening.
        json: res.to_json().unwrap_or_default(),
    }
}

/// Decodes a wire resource, re-checking every value.
pub fn resource_from_wire(
    w: &WireResource,
) -> Result<bulkhead_policy::model::Resource, bulkhead_policy::PolicyError> {
    bulkhead_policy::model::Resource::from_json(&w.json).map_err(|message| {
        bulkhead_policy::PolicyError::Model {
            resource: format!("{}/{}/{}", w.kind, w.namespace, w.name),
            message,
        }
    })
}

/// Encodes the mesh's address table for the wire.
pub fn endpoints_to_wire(endpoints: &bulkhead_policy::Endpoints) -> Vec<v1::Endpoint> {
    let mut out: Vec<v1::Endpoint> = endpoints
        .iter()
        .map(|(ip, e)| v1::Endpoint {
            address: ip.to_string(),
            namespace: e.workload.namespace.clone(),
            name: e.workload.name.clone(),
            identity: e.identity.clone(),
            ports: e
                .ports
                .iter()
                .map(|(port, protocol)| v1::EndpointPort {
                    port: u32::from(*port),
                    protocol: protocol.as_str().to_string(),
                })
                .collect(),
        })
        .collect();
    out.sort_by(|a, b| a.address.cmp(&b.address));
    out
}

/// Decodes the address table, refusing any entry that is not well formed: a proxy must not
/// route by a half-understood table.
pub fn endpoints_from_wire(wire: &[v1::Endpoint]) -> Result<bulkhead_policy::Endpoints, String> {
    let mut out = bulkhead_policy::Endpoints::default();
    for w in wire {
        let ip: std::net::IpAddr = w
            .address
            .parse()
            .map_err(|_| format!("endpoint address {:?} is not an IP address", w.address))?;
        if !bulkhead_policy::is_valid_name(&w.namespace) || !bulkhead_policy::is_valid_name(&w.name)
        {
            return Err(format!(
                "endpoint {ip}: {:?}/{:?} is not a workload name",
                w.namespace, w.name
            ));
        }
        if bulkhead_identity::SpiffeId::parse(&w.identity).is_err() {
            return Err(format!(
                "endpoint {ip}: identity {:?} is not a SPIFFE ID",
                w.identity
            ));
        }
        let ports = w
            .ports
            .iter()
            .map(|p| {
                let port = u16::try_from(p.port)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("endpoint {ip}: port {} is out of range", p.port))?;
                let protocol = bulkhead_policy::Protocol::from_name(&p.protocol)
                    .ok_or_else(|| format!("endpoint {ip}: unknown protocol {:?}", p.protocol))?;
                Ok((port, protocol))
            })
            .collect::<Result<Vec<_>, String>>()?;
        out.insert(
            ip,
            bulkhead_policy::Endpoint {
                workload: bulkhead_policy::model::ResourceName {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                },
                identity: w.identity.clone(),
                ports,
            },
        );
    }
    Ok(out)
}
