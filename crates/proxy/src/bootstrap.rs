//! Joining the mesh: make a key here, send only a CSR and the join token, get an SVID back.
//!
//! The trust domain is the one `--identity` names, or else the one a root of the bundle file
//! names in its `spiffe://` URI (a root Bulkhead generated has one; an enterprise root does
//! not). After the join it is the SVID's: the control plane's decision.

use crate::credentials::control_identity;
use crate::{Config, ProxyError};
use bulkhead_api::channel;
use bulkhead_api::v1::JoinRequest;
use bulkhead_api::v1::identity_client::IdentityClient;
use bulkhead_identity::tls::{ExpectedServer, client_config};
use bulkhead_identity::{IdentityError, LocalKey, Svid, TrustBundle};
use bulkhead_policy::model::ResourceName;
use std::time::Duration;
use tonic::Code;

pub(crate) struct Joined {
    pub svid: Svid,
    pub bundle: TrustBundle,
    pub workload: ResourceName,
    /// The proxy instance this join made (`bulkhead revoke proxy INSTANCE`).
    pub instance: String,
}

pub(crate) async fn join(config: &Config) -> Result<Joined, ProxyError> {
    let fail = |message: String| ProxyError::Join {
        addr: config.control.clone(),
        message,
    };
    let bundle = match &config.identity {
        Some(id) => TrustBundle::from_pem_for(id.trust_domain(), &config.trust_bundle_pem),
        None => TrustBundle::from_pem(&config.trust_bundle_pem),
    }
    .map_err(|e| match e {
        IdentityError::NoTrustDomain => fail(format!(
            "{e}: pass --identity spiffe://<trust-domain>/… to name the mesh's trust domain"
        )),
        e => ProxyError::Bundle(e),
    })?;
    let tls = client_config(
        None,
        &bundle,
        ExpectedServer::Exact(control_identity(&bundle)?),
        &[b"h2"],
    )?;
    let mut client = IdentityClient::new(channel::connect(config.control.clone(), tls));
    let key = LocalKey::generate()?;
    let request = JoinRequest {
        token: config.token.0.clone(),
        csr_der: key.csr_der(config.identity.as_ref())?,
        proxy_version: crate::VERSION.to_string(),
    };
    // The control plane may still be starting: retry only "unavailable", briefly.
    let mut delay = Duration::from_millis(100);
    let response = loop {
        match client.join(request.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == Code::Unavailable && delay < Duration::from_secs(5) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(s) if s.code() == Code::Unavailable => {
                return Err(fail(format!(
                    "{} (is `bulkhead control` running there?)",
                    s.message()
                )));
            }
            Err(s) => return Err(fail(s.message().to_string())),
        }
    };
    let chain = response
        .cert_chain_der
        .into_iter()
        .map(Into::into)
        .collect();
    let svid = key.into_svid(chain)?;
    if svid.id().trust_domain() != bundle.trust_domain() {
        return Err(fail(format!(
            "the control plane issued {} outside trust domain {}",
            svid.id(),
            bundle.trust_domain()
        )));
    }
    let bundle = TrustBundle::for_trust_domain(
        bundle.trust_domain(),
        response
            .trust_bundle_der
            .into_iter()
            .map(Into::into)
            .collect(),
    )
    .map_err(ProxyError::Bundle)?;
    Ok(Joined {
        svid,
        bundle,
        workload: ResourceName {
            namespace: response.namespace,
            name: response.workload,
        },
        instance: response.instance,
    })
}
