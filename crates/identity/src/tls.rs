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
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
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
            ExpectedServer::Exact(e) if e.trust_domain() != found.trust_domain() => {
                Err(SvidError::WrongTrustDomain {
                    expected: e.trust_domain().to_string(),
                    found: found.to_string(),
                })
            }
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
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier(verifier)))
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
        .unwrap_or(ServerName::IpAddress(core::net::Ipv4Addr::LOCALHOST.into()))
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
        )
        .map_err(|e| chain_error(e, end_entity))?;
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

/// webpki's client verifier, its errors named as [`chain_error`] names them.
#[derive(Debug)]
struct SpiffeClientVerifier(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| chain_error(e, end_entity))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// webpki refuses a leaf with the CA flag before looking for its issuer, but says so only in
/// an opaque `Other` error: name it as the SVID rule it breaks, so logs and metrics can.
fn chain_error(e: rustls::Error, end_entity: &CertificateDer<'_>) -> rustls::Error {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(_))
            if spiffe_id_of(end_entity) == Err(SvidError::CaLeaf) =>
        {
            svid_error(SvidError::CaLeaf)
        }
        e => e,
    }
}

fn svid_error(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ca, SpiffeId};
    use std::time::{Duration, SystemTime};

    /// Runs a handshake in memory; returns the first error either side raises.
    fn handshake(client: ClientConfig, server: ServerConfig) -> Result<(), rustls::Error> {
        let mut c = rustls::ClientConnection::new(Arc::new(client), server_name())?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf)
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd)
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            }
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf)
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd)
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            }
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General("handshake did not finish".into()))
    }

    #[test]
    fn a_server_in_another_trust_domain_is_named_as_such() {
        let want = ExpectedServer::Exact(SpiffeId::parse("spiffe://td/server").unwrap());
        let elsewhere = SpiffeId::parse("spiffe://elsewhere/server").unwrap();
        assert!(matches!(
            want.check(&elsewhere),
            Err(SvidError::WrongTrustDomain { .. })
        ));
        let sibling = SpiffeId::parse("spiffe://td/other").unwrap();
        assert!(matches!(
            want.check(&sibling),
            Err(SvidError::UnexpectedIdentity { .. })
        ));
    }

    #[test]
    fn expired_and_not_yet_valid_certificates_are_refused() {
        let now = SystemTime::now();
        let ca = Ca::generate("td", now - Duration::from_secs(3600)).unwrap();
        let bundle = TrustBundle::from_pem(ca.cert_pem()).unwrap();
        let server_id = SpiffeId::parse("spiffe://td/server").unwrap();
        let client_id = SpiffeId::parse("spiffe://td/client").unwrap();
        let server = ca
            .issue_local(&server_id, Duration::from_secs(3600), now)
            .unwrap();
        let sc = || server_config(&server, &bundle, ClientAuth::Required, &[b"http/1.1"]).unwrap();
        let cc = |svid: &Svid| {
            client_config(
                Some(svid),
                &bundle,
                ExpectedServer::Exact(server_id.clone()),
                &[b"http/1.1"],
            )
            .unwrap()
        };
        let valid = ca
            .issue_local(&client_id, Duration::from_secs(60), now)
            .unwrap();
        handshake(cc(&valid), sc()).expect("a valid client certificate is accepted");
        // Issued 10 minutes ago for 1 minute (plus the CA's 60 s backdate): expired.
        let expired = ca
            .issue_local(
                &client_id,
                Duration::from_secs(60),
                now - Duration::from_secs(600),
            )
            .unwrap();
        let err = handshake(cc(&expired), sc()).unwrap_err();
        assert!(format!("{err:?}").contains("Expired"), "{err:?}");
        // Issued for 10 minutes from now, backdated 60 s: not yet valid.
        let future = ca
            .issue_local(
                &client_id,
                Duration::from_secs(60),
                now + Duration::from_secs(600),
            )
            .unwrap();
        let err = handshake(cc(&future), sc()).unwrap_err();
        assert!(format!("{err:?}").contains("NotValidYet"), "{err:?}");
    }
}
