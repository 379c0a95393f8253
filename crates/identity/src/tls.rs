//! rustls configurations that speak only mTLS 1.3 between SPIFFE identities.
//!
//! A server built here requires (or, for the control plane's join endpoint, permits) a client
//! certificate chaining to the bundle; the caller reads the verified ID with
//! [`peer_identity`]. A client built here checks the server's chain *and* that its SPIFFE ID
//! is the one it meant to reach; host names play no part.

use crate::error::{IdentityError, SvidError};
use crate::spiffe::SpiffeId;
use crate::svid::{Svid, TrustBundle, spiffe_id_of};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use std::sync::Arc;

/// The crypto provider for every Bulkhead TLS endpoint (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Whether a server demands a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    /// Accept callers without a certificate; the handler must then decide (join endpoint).
    Optional,
}

/// Which server identity a client accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpectedServer {
    Exact(SpiffeId),
    /// Any workload of this trust domain (used by the CLI before it knows more).
    TrustDomain(String),
}

impl ExpectedServer {
    pub fn check(&self, found: &SpiffeId) -> Result<(), SvidError> {
        match self {
            ExpectedServer::Exact(e) if e == found => Ok(()),
            ExpectedServer::Exact(e) => Err(SvidError::UnexpectedIdentity {
                expected: e.to_string(),
                found: found.to_string(),
            }),
            ExpectedServer::TrustDomain(td) if td == found.trust_domain() => Ok(()),
            ExpectedServer::TrustDomain(td) => Err(SvidError::WrongTrustDomain {
                expected: td.clone(),
                found: found.to_string(),
            }),
        }
    }
}

/// An mTLS server configuration: TLS 1.3 only, our SVID, clients verified against `bundle`.
pub fn server_config(
    svid: &Svid,
    bundle: &TrustBundle,
    auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<ServerConfig, IdentityError> {
    let provider = provider();
    let roots = Arc::new(bundle.root_store()?);
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    let verifier = match auth {
        ClientAuth::Required => builder.build(),
        ClientAuth::Optional => builder.allow_unauthenticated().build(),
    }
    .map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(svid.chain().to_vec(), svid.private_key())
        .map_err(|e| IdentityError::Tls(e.to_string()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// An mTLS client configuration presenting `svid` (if any) and accepting only `expected`.
pub fn client_config(
    svid: Option<&Svid>,
    bundle: &TrustBundle,
    expected: ExpectedServer,
    alpn: &[&[u8]],
) -> Result<ClientConfig, IdentityError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: Arc::new(bundle.root_store()?),
        expected,
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match svid {
        Some(svid) => builder
            .with_client_auth_cert(svid.chain().to_vec(), svid.private_key())
            .map_err(|e| IdentityError::Tls(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The server name a client puts in its ClientHello. SPIFFE verification ignores it; it only
/// has to be syntactically valid.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("bulkhead.mesh")
        .unwrap_or(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}

/// The verified SPIFFE ID of the peer of a finished handshake, checked against our trust
/// domain. `None` certificates means the peer presented none.
pub fn peer_identity(
    certs: Option<&[CertificateDer<'_>]>,
    trust_domain: &str,
) -> Result<SpiffeId, SvidError> {
    let leaf = certs.and_then(|c| c.first()).ok_or(SvidError::NoSpiffeId)?;
    let id = spiffe_id_of(leaf)?;
    if id.trust_domain() != trust_domain {
        return Err(SvidError::WrongTrustDomain {
            expected: trust_domain.to_string(),
            found: id.to_string(),
        });
    }
    Ok(id)
}

/// Verifies a server's chain to the bundle and its SPIFFE ID; ignores DNS names.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<rustls::RootCertStore>,
    expected: ExpectedServer,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = spiffe_id_of(end_entity).map_err(svid_error)?;
        self.expected.check(&id).map_err(svid_error)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn svid_error(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}
