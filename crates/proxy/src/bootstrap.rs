//! Joining the mesh: make a key here, send only a CSR and the join token (or the pod's
//! service-account token, `--service-account-token-file`), get an SVID back.
//!
//! The trust domain is the one `--identity` names, or else the one a root of the bundle file
//! names in its `spiffe://` URI (a root Bulkhead generated has one; an enterprise root does
//! not). After the join it is the SVID's: the control plane's decision.

use crate::credentials::control_identity;
use crate::{Config, ProxyError};
use bulkhead_api::channel::{self, Replicas};
use bulkhead_api::v1::JoinRequest;
use bulkhead_api::v1::identity_client::IdentityClient;
use bulkhead_identity::tls::{ExpectedServer, client_config};
use bulkhead_identity::{IdentityError, LocalKey, Svid, TrustBundle};
use bulkhead_policy::model::ResourceName;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

pub(crate) struct Joined {
    pub svid: Svid,
    pub bundle: TrustBundle,
    pub workload: ResourceName,
    /// The proxy instance this join made (`bulkhead revoke proxy INSTANCE`).
    pub instance: String,
}

/// Joins: with the credential a previous run of this proxy kept, if it has one that is
/// still valid and accepted, else with the join token. The credential is (re)written after.
pub(crate) async fn join(
    config: &Config,
    sealed: Option<&crate::sealed::Sealed>,
    replicas: &Arc<Replicas>,
) -> Result<Joined, ProxyError> {
    let bundle = trust_bundle(config)?;
    let mut joined = None;
    let mut refused = None;
    if let Some(stored) = sealed
        .map(crate::sealed::Sealed::load)
        .transpose()?
        .flatten()
    {
        let path = sealed
            .map(|s| s.path.display().to_string())
            .unwrap_or_default();
        let left = stored
            .svid
            .not_after()
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        if left < Duration::from_secs(5) {
            tracing::warn!(credential = path, spiffe_id = %stored.svid.id(), "the kept credential has expired; joining with the token");
        } else {
            match rejoin(replicas, &bundle, &stored).await {
                Ok(j) => {
                    tracing::info!(credential = path, spiffe_id = %j.svid.id(), instance = j.instance, "rejoined with the kept credential (no token spent)");
                    joined = Some(j);
                }
                Err(Refused(why)) => {
                    tracing::warn!(
                        credential = path,
                        reason = why,
                        "the kept credential was refused; joining with the token"
                    );
                    refused = Some(format!("the credential kept in {path} was refused ({why})"));
                }
            }
        }
    }
    let joined = match joined {
        Some(j) => j,
        None => join_with_token(config, bundle, replicas)
            .await
            .map_err(|e| match (e, refused) {
                (ProxyError::Join { addr, message }, Some(why)) => ProxyError::Join {
                    addr,
                    message: match config.service_account_token_file {
                        Some(_) => format!("{why}; with the service-account token: {message}"),
                        None => format!("{why}; with the join token: {message}"),
                    },
                },
                (e, _) => e,
            })?,
    };
    if let Some(sealed) = sealed {
        sealed.store(&joined.svid, &joined.workload, &joined.instance)?;
    }
    Ok(joined)
}

/// Why the kept credential could not be used.
struct Refused(String);

/// Renews with the kept credential over mTLS, as the periodic renewal does: the same
/// identity and instance, a new key made here.
async fn rejoin(
    replicas: &Arc<Replicas>,
    bundle: &TrustBundle,
    stored: &crate::sealed::Stored,
) -> Result<Joined, Refused> {
    if stored.svid.id().trust_domain() != bundle.trust_domain() {
        return Err(Refused(format!(
            "it is for trust domain {}, the bundle for {}",
            stored.svid.id().trust_domain(),
            bundle.trust_domain()
        )));
    }
    let refused = |e: &dyn std::fmt::Display| Refused(e.to_string());
    let control = control_identity(bundle).map_err(|e| refused(&e))?;
    let tls = client_config(
        Some(&stored.svid),
        bundle,
        ExpectedServer::Exact(control),
        &[b"h2"],
    )
    .map_err(|e| refused(&e))?;
    let mut client = IdentityClient::new(channel::connect_to(replicas.clone(), tls));
    let key = LocalKey::generate().map_err(|e| refused(&e))?;
    let csr_der = key
        .csr_der(Some(stored.svid.id()))
        .map_err(|e| refused(&e))?;
    let mut delay = Duration::from_millis(100);
    let response = loop {
        match client
            .renew(bulkhead_api::v1::RenewRequest {
                csr_der: csr_der.clone(),
            })
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == Code::Unavailable && delay < Duration::from_secs(5) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(s) => return Err(Refused(s.message().to_string())),
        }
    };
    let svid = key
        .into_svid(
            response
                .cert_chain_der
                .into_iter()
                .map(Into::into)
                .collect(),
        )
        .map_err(|e| refused(&e))?;
    if svid.id() != stored.svid.id() {
        return Err(Refused(format!(
            "the control plane renewed {} as {}",
            stored.svid.id(),
            svid.id()
        )));
    }
    let bundle = issued_bundle(bundle, response.trust_bundle_der).map_err(|e| refused(&e))?;
    let workload = match (response.namespace.is_empty(), response.workload.is_empty()) {
        (false, false) => ResourceName {
            namespace: response.namespace,
            name: response.workload,
        },
        _ => stored.workload.clone(),
    };
    Ok(Joined {
        svid,
        bundle,
        workload,
        instance: if response.instance.is_empty() {
            stored.instance.clone()
        } else {
            response.instance
        },
    })
}

fn join_error(config: &Config, message: String) -> ProxyError {
    ProxyError::Join {
        addr: config.control.clone(),
        message,
    }
}

/// The roots a join or renewal answered with, for the trust domain already known.
fn issued_bundle(
    known: &TrustBundle,
    roots_der: Vec<Vec<u8>>,
) -> Result<TrustBundle, IdentityError> {
    TrustBundle::for_trust_domain(
        known.trust_domain(),
        roots_der.into_iter().map(Into::into).collect(),
    )
}

/// The bundle file's roots, for the trust domain `--identity` names or a root names.
fn trust_bundle(config: &Config) -> Result<TrustBundle, ProxyError> {
    let fail = |message: String| join_error(config, message);
    match &config.identity {
        Some(id) => TrustBundle::from_pem_for(id.trust_domain(), &config.trust_bundle_pem),
        None => TrustBundle::from_pem(&config.trust_bundle_pem),
    }
    .map_err(|e| match e {
        IdentityError::NoTrustDomain => fail(format!(
            "{e}: pass --identity spiffe://<trust-domain>/… to name the mesh's trust domain"
        )),
        e => ProxyError::Bundle(e),
    })
}

/// Joins with the join token, or with the service-account token (read now: the kubelet
/// rotates it) when `--service-account-token-file` is given.
async fn join_with_token(
    config: &Config,
    bundle: TrustBundle,
    replicas: &Arc<Replicas>,
) -> Result<Joined, ProxyError> {
    let fail = |message: String| join_error(config, message);
    let (token, service_account_token) = match &config.service_account_token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                fail(format!(
                    "cannot read --service-account-token-file {}: {e}",
                    path.display()
                ))
            })?;
            let text = text.trim().to_string();
            if text.is_empty() {
                return Err(fail(format!(
                    "--service-account-token-file {} is empty",
                    path.display()
                )));
            }
            (String::new(), text)
        }
        None if config.token.0.is_empty() => {
            return Err(fail(
                "the kept credential could not be used and there is no join token: create one with `bulkhead token create` and pass it with --token-file".into(),
            ));
        }
        None => (config.token.0.clone(), String::new()),
    };
    let attested = !service_account_token.is_empty();
    let tls = client_config(
        None,
        &bundle,
        ExpectedServer::Exact(control_identity(&bundle)?),
        &[b"h2"],
    )?;
    let mut client = IdentityClient::new(channel::connect_to(replicas.clone(), tls));
    let key = LocalKey::generate()?;
    let request = JoinRequest {
        token,
        csr_der: key.csr_der(config.identity.as_ref())?,
        proxy_version: crate::VERSION.to_string(),
        service_account_token,
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
            // The control plane answered that it could not ask the API server: its words.
            Err(s)
                if s.code() == Code::Unavailable
                    && attested
                    && s.message().contains("service-account token") =>
            {
                return Err(fail(s.message().to_string()));
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
    let bundle = issued_bundle(&bundle, response.trust_bundle_der).map_err(ProxyError::Bundle)?;
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
