//! Joining a test mesh from the test itself, the way a proxy does (a local key, a CSR, a join
//! token), and watching a configuration as that proxy: shared by the e2e and ca_rotation
//! binaries.

use bulkhead_api::v1::config_client::ConfigClient;
use bulkhead_api::v1::identity_client::IdentityClient;
use bulkhead_api::v1::{JoinRequest, ProxyConfig, WatchRequest};
use bulkhead_identity::tls::{ExpectedServer, client_config};
use bulkhead_identity::{SpiffeId, Svid, TrustBundle};
use bulkhead_testkit::mesh::{Mesh, TD};

/// The mesh's trust bundle (its `ca.pem`) and the control plane's identity, as a proxy
/// expects it.
pub fn mesh_trust(mesh: &Mesh) -> (TrustBundle, ExpectedServer) {
    let pem = std::fs::read_to_string(mesh.data().join("ca.pem")).unwrap();
    let bundle = TrustBundle::from_pem_for(TD, &pem).unwrap();
    let control = SpiffeId::parse(&format!("spiffe://{TD}/bulkhead/control")).unwrap();
    (bundle, ExpectedServer::Exact(control))
}

/// Joins the mesh as `identity` with its join token, over an anonymous TLS connection to the
/// control plane, and returns the SVID it got.
pub async fn join_as(mesh: &Mesh, identity: &str) -> Svid {
    let token = std::fs::read_to_string(mesh.token(identity)).unwrap();
    let (bundle, control) = mesh_trust(mesh);
    let anonymous = client_config(None, &bundle, control, &[b"h2"]).unwrap();
    let key = bulkhead_identity::LocalKey::generate().unwrap();
    let joined = IdentityClient::new(bulkhead_api::channel::connect(mesh.control_addr, anonymous))
        .join(JoinRequest {
            token,
            csr_der: key.csr_der(None).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    key.into_svid(joined.cert_chain_der.into_iter().map(Into::into).collect())
        .unwrap()
}

/// Joins as `identity` and connects to the control plane presenting the SVID it got, as that
/// proxy would.
pub async fn channel_as(mesh: &Mesh, identity: &str) -> tonic::transport::Channel {
    let svid = join_as(mesh, identity).await;
    let (bundle, control) = mesh_trust(mesh);
    let tls = client_config(Some(&svid), &bundle, control, &[b"h2"]).unwrap();
    bulkhead_api::channel::connect(mesh.control_addr, tls)
}

/// Opens the configuration stream of the workload `shop/{workload}` over `channel`, without
/// acknowledging anything.
pub async fn watch(
    channel: tonic::transport::Channel,
    workload: &str,
) -> Result<tonic::Streaming<ProxyConfig>, tonic::Status> {
    let stream = ConfigClient::new(channel)
        .watch(WatchRequest {
            namespace: "shop".into(),
            workload: workload.into(),
            ..Default::default()
        })
        .await?;
    Ok(stream.into_inner())
}
