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
    WireResource {
        kind: res.kind().to_string(),
        namespace: res.name().namespace.clone(),
        name: res.name().name.clone(),
        // Serializing the model cannot fail: it holds only strings, lists and enums.
        json: serde_json::to_string(res).unwrap_or_default(),
    }
}

/// Decodes a wire resource, re-checking every value.
pub fn resource_from_wire(
    w: &WireResource,
) -> Result<bulkhead_policy::model::Resource, bulkhead_policy::PolicyError> {
    serde_json::from_str(&w.json).map_err(|e| bulkhead_policy::PolicyError::Model {
        resource: format!("{} {}/{}", w.kind, w.namespace, w.name),
        message: e.to_string(),
    })
}
