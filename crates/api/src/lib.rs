//! The wire: protobuf messages and gRPC services between proxies, the CLI and the control
//! plane, plus conversions to and from the policy model. Only this crate knows protobuf.

#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod v1 {
    tonic::include_proto!("bulkhead.v1");
}

pub mod channel;

pub use v1::Resource as WireResource;

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
