//! rustls configurations that speak only mTLS 1.3 between SPIFFE identities.
//!
//! A server built here requires (or, for the control plane's join endpoint, permits) a client
//! certificate chaining to the bundle; the caller reads the verified ID with
//! [`peer_identity`]. A client built here checks the server's chain *and* that its SPIFFE ID
//! is the one it meant to reach; host names play no part. Either side also refuses a peer the
//! bundle's [`RevocationCheck`](crate::RevocationCheck) names, at every handshake.
//!
//! No session is ever resumed: servers keep no session cache and send no tickets, clients
//! store none. A resumed TLS 1.3 session carries the authentication of the handshake that
//! made it, certificate included, so resumption would let a peer in on a certificate that has
//! since expired or been revoked. Every connection presents and verifies a certificate.

use crate::error::{IdentityError, SvidError};
use crate::svid::{Svid, TrustBundle, not_after_of, not_before_of, root_store_of, spiffe_id_of};
use bulkhead_spiffe::SpiffeId;
use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig,
    SignatureScheme,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

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

/// An mTLS server configuration: TLS 1.3 only, our SVID, clients verified against `bundle`
/// (and refused if its revocation check names them); no session resumption.
pub fn server_config(
    svid: &Svid,
    bundle: &TrustBundle,
    auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<ServerConfig, IdentityError> {
    let provider = provider();
    let verifier_of = |roots: &[CertificateDer<'static>]| {
        let roots = Arc::new(root_store_of(roots)?);
        let builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
        match auth {
            ClientAuth::Required => builder.build(),
            ClientAuth::Optional => builder.allow_unauthenticated().build(),
        }
        .map_err(|e| IdentityError::Tls(e.to_string()))
    };
    let verifier = verifier_of(bundle.roots())?;
    let federated = bundle
        .federated()
        .iter()
        .map(|(td, roots)| Ok((td.clone(), verifier_of(roots)?)))
        .collect::<Result<HashMap<_, _>, IdentityError>>()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
            inner: verifier,
            federated,
            bundle: bundle.clone(),
        }))
        .with_single_cert(svid.chain().to_vec(), svid.private_key())
        .map_err(|e| IdentityError::Tls(e.to_string()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // No resumption: no stateful cache, and no tickets (stateless ones were never made).
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// An mTLS client configuration presenting `svid` (if any) and accepting only `expected`
/// (and not if the bundle's revocation check names it); no session resumption.
pub fn client_config(
    svid: Option<&Svid>,
    bundle: &TrustBundle,
    expected: ExpectedServer,
    alpn: &[&[u8]],
) -> Result<ClientConfig, IdentityError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: Arc::new(bundle.root_store()?),
        federated: bundle
            .federated()
            .iter()
            .map(|(td, roots)| Ok((td.clone(), Arc::new(root_store_of(roots)?))))
            .collect::<Result<_, IdentityError>>()?,
        expected,
        algorithms: provider.signature_verification_algorithms,
        bundle: bundle.clone(),
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
    config.resumption = Resumption::disabled();
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

/// The verified SPIFFE ID of the peer of a finished handshake, in our trust domain or one
/// the bundle federates with. The handshake's verifier has already checked that the chain
/// ends in the roots of the ID's own trust domain.
pub fn peer_identity_in(
    certs: Option<&[CertificateDer<'_>]>,
    bundle: &TrustBundle,
) -> Result<SpiffeId, SvidError> {
    let leaf = certs.and_then(|c| c.first()).ok_or(SvidError::NoSpiffeId)?;
    let id = spiffe_id_of(leaf)?;
    if !bundle.trusts_domain(id.trust_domain()) {
        return Err(SvidError::WrongTrustDomain {
            expected: bundle.trust_domain().to_string(),
            found: id.to_string(),
        });
    }
    Ok(id)
}

/// The trust domain whose roots must vouch for `leaf`: the one its SPIFFE ID names when that
/// domain is federated, else our own (a leaf of any other domain, or with no valid ID, is
/// then refused by our roots or by the trust domain check).
fn federated_domain_of<'a, T>(
    federated: &'a HashMap<String, T>,
    leaf: &CertificateDer<'_>,
) -> Option<&'a T> {
    let id = spiffe_id_of(leaf).ok()?;
    federated.get(id.trust_domain())
}

/// Verifies a server's chain to the bundle (to the roots of the trust domain its SPIFFE ID
/// names), its SPIFFE ID and that it is not revoked; ignores DNS names.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<rustls::RootCertStore>,
    /// Each federated trust domain's roots, for that domain's identities only.
    federated: HashMap<String, Arc<rustls::RootCertStore>>,
    expected: ExpectedServer,
    algorithms: WebPkiSupportedAlgorithms,
    bundle: TrustBundle,
}

impl SpiffeServerVerifier {
    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        cert: &ParsedCertificate<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let roots = federated_domain_of(&self.federated, end_entity).unwrap_or(&self.roots);
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            cert,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )
    }
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
        self.verify_chain(end_entity, &cert, intermediates, now)
            .map_err(|e| {
                chain_error(e, end_entity, |at| {
                    self.verify_chain(end_entity, &cert, intermediates, at)
                })
            })?;
        let id = spiffe_id_of(end_entity).map_err(svid_error)?;
        self.expected.check(&id).map_err(svid_error)?;
        self.bundle
            .check_revoked(&id, end_entity)
            .map_err(svid_error)?;
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

/// webpki's client verifier (for a federated trust domain's identity, one with that domain's
/// roots alone), its errors named as [`chain_error`] names them, and a client the bundle's
/// revocation check names refused.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    federated: HashMap<String, Arc<dyn ClientCertVerifier>>,
    bundle: TrustBundle,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let inner = federated_domain_of(&self.federated, end_entity).unwrap_or(&self.inner);
        let verified = inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| {
                chain_error(e, end_entity, |at| {
                    inner
                        .verify_client_cert(end_entity, intermediates, at)
                        .map(|_| ())
                })
            })?;
        // Only a valid SVID can be revoked; one that is not is refused later, by the caller's
        // `peer_identity`, with its own reason.
        if let Ok(id) = spiffe_id_of(end_entity) {
            self.bundle
                .check_revoked(&id, end_entity)
                .map_err(svid_error)?;
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Names a chain verification failure for logs and metrics.
///
/// - webpki refuses a leaf with the CA flag before looking for its issuer, but says so only
///   in an opaque `Other` error: name it as the SVID rule it breaks.
/// - webpki checks a certificate's dates before its issuer, so a certificate from a CA we do
///   not know that has also expired (or is not valid yet) would be named by its dates. The
///   CA is the graver fault: `verify_at` runs the same verification at a moment inside the
///   leaf's validity, and if the issuer is unknown then too, that is the error.
fn chain_error(
    e: rustls::Error,
    end_entity: &CertificateDer<'_>,
    verify_at: impl Fn(UnixTime) -> Result<(), rustls::Error>,
) -> rustls::Error {
    use rustls::Error::InvalidCertificate;
    match e {
        InvalidCertificate(CertificateError::Other(_))
            if spiffe_id_of(end_entity) == Err(SvidError::CaLeaf) =>
        {
            svid_error(SvidError::CaLeaf)
        }
        InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => {
            let inside = match (not_before_of(end_entity), not_after_of(end_entity)) {
                (Some(from), Some(until)) => match until.duration_since(from) {
                    Ok(span) => from + span / 2,
                    Err(_) => return e,
                },
                _ => return e,
            };
            let at = UnixTime::since_unix_epoch(
                inside.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO),
            );
            match verify_at(at) {
                Err(
                    unknown @ InvalidCertificate(
                        CertificateError::UnknownIssuer | CertificateError::BadSignature,
                    ),
                ) => unknown,
                _ => e,
            }
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
    use std::collections::BTreeMap;
    use std::time::{Duration, SystemTime};

    /// Moves what `from` has to send into `to`, which then processes it.
    fn pass<A, B>(
        from: &mut rustls::ConnectionCommon<A>,
        to: &mut rustls::ConnectionCommon<B>,
    ) -> Result<(), rustls::Error> {
        let io = |e: std::io::Error| rustls::Error::General(e.to_string());
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).map_err(io)?;
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).map_err(io)?;
        }
        to.process_new_packets()?;
        Ok(())
    }

    /// Runs a handshake in memory; returns how the client saw it finish (full or resumed),
    /// or the first error either side raises.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
    ) -> Result<rustls::HandshakeKind, rustls::Error> {
        let mut c = rustls::ClientConnection::new(Arc::new(client), server_name())?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..20 {
            pass(&mut *c, &mut *s)?;
            pass(&mut *s, &mut *c)?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return c
                    .handshake_kind()
                    .ok_or_else(|| rustls::Error::General("no handshake kind".into()));
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

    struct Pair {
        ca: Ca,
        bundle: TrustBundle,
        server_id: SpiffeId,
        server: Svid,
        client: Svid,
    }

    fn pair() -> Pair {
        let now = SystemTime::now();
        let ca = Ca::generate("td", now).unwrap();
        let bundle = TrustBundle::from_pem(ca.cert_pem()).unwrap();
        let server_id = SpiffeId::parse("spiffe://td/server").unwrap();
        let server = ca
            .issue_local(&server_id, Duration::from_secs(3600), now)
            .unwrap();
        let client = ca
            .issue_local(
                &SpiffeId::parse("spiffe://td/client").unwrap(),
                Duration::from_secs(3600),
                now,
            )
            .unwrap();
        Pair {
            ca,
            bundle,
            server_id,
            server,
            client,
        }
    }

    fn configs(p: &Pair, bundle: &TrustBundle) -> (ClientConfig, ServerConfig) {
        let client = client_config(
            Some(&p.client),
            bundle,
            ExpectedServer::Exact(p.server_id.clone()),
            &[b"http/1.1"],
        )
        .unwrap();
        let server =
            server_config(&p.server, bundle, ClientAuth::Required, &[b"http/1.1"]).unwrap();
        (client, server)
    }

    #[test]
    fn no_session_is_ever_resumed() {
        use rustls::HandshakeKind::{Full, Resumed};
        let p = pair();
        let (client, server) = configs(&p, &p.bundle);
        // The harness can see a resumption: the same configurations with rustls' defaults
        // for session storage, tickets and the client's cache resume the second time.
        let (mut client_on, mut server_on) = (client.clone(), server.clone());
        server_on.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
        server_on.send_tls13_tickets = 2;
        client_on.resumption = Resumption::default();
        assert_eq!(handshake(client_on.clone(), server_on.clone()), Ok(Full));
        assert_eq!(handshake(client_on, server_on.clone()), Ok(Resumed));
        // Ours never do, whichever side would offer it: our client keeps no session…
        assert_eq!(handshake(client.clone(), server_on.clone()), Ok(Full));
        assert_eq!(handshake(client.clone(), server_on), Ok(Full));
        // …and our server offers none to a client that would keep one.
        assert_eq!(handshake(client.clone(), server.clone()), Ok(Full));
        assert_eq!(handshake(client.clone(), server.clone()), Ok(Full));
        let mut eager_client = client.clone();
        eager_client.resumption = Resumption::default();
        assert_eq!(handshake(eager_client.clone(), server.clone()), Ok(Full));
        assert_eq!(handshake(eager_client, server), Ok(Full));
    }

    fn svid_error_of(e: &rustls::Error) -> Option<SvidError> {
        match e {
            rustls::Error::InvalidCertificate(CertificateError::Other(o)) => {
                o.0.downcast_ref::<SvidError>().cloned()
            }
            _ => None,
        }
    }

    #[derive(Debug)]
    struct Revoked(Vec<String>);

    impl crate::RevocationCheck for Revoked {
        fn is_revoked(&self, id: &SpiffeId, serial: &str) -> bool {
            self.0.iter().any(|r| r == id.as_str() || r == serial)
        }
    }

    #[test]
    fn both_sides_refuse_a_revoked_peer_at_the_handshake() {
        let p = pair();
        let (client, server) = configs(&p, &p.bundle);
        assert!(handshake(client.clone(), server.clone()).is_ok());

        // Both sides' configurations over the bundle with `revoked` revoked.
        let revoking = |revoked: &str| {
            let bundle = p
                .bundle
                .clone()
                .with_revocations(Arc::new(Revoked(vec![revoked.to_string()])));
            configs(&p, &bundle)
        };
        let (_, strict_server) = revoking("spiffe://td/client");
        let err = handshake(client.clone(), strict_server).unwrap_err();
        assert_eq!(
            svid_error_of(&err),
            Some(SvidError::Revoked {
                id: "spiffe://td/client".into(),
                serial: p.client.serial().into()
            })
        );

        let (strict_client, _) = revoking(p.server.serial());
        let err = handshake(strict_client, server.clone()).unwrap_err();
        assert_eq!(
            svid_error_of(&err),
            Some(SvidError::Revoked {
                id: "spiffe://td/server".into(),
                serial: p.server.serial().into()
            })
        );

        // Another serial of the same identity is not this one.
        let (c, s) = revoking("00:11");
        assert!(handshake(c, s).is_ok());
    }

    #[test]
    fn an_expired_certificate_from_an_unknown_ca_is_named_by_its_ca() {
        let p = pair();
        let now = SystemTime::now();
        let (_, server) = configs(&p, &p.bundle);
        let stranger = Ca::generate("td", now - Duration::from_secs(7200)).unwrap();
        let old = |ca: &Ca| {
            ca.issue_local(
                &SpiffeId::parse("spiffe://td/client").unwrap(),
                Duration::from_secs(60),
                now - Duration::from_secs(600),
            )
            .unwrap()
        };
        let client_with = |svid: &Svid| {
            client_config(
                Some(svid),
                &p.bundle,
                ExpectedServer::Exact(p.server_id.clone()),
                &[b"http/1.1"],
            )
            .unwrap()
        };
        let err = handshake(client_with(&old(&stranger)), server.clone()).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
        // From our own CA, the same dates are what is wrong.
        let err = handshake(client_with(&old(&p.ca)), server).unwrap_err();
        assert!(format!("{err:?}").contains("Expired"), "{err:?}");
    }

    #[test]
    fn a_leaf_without_the_client_auth_purpose_is_refused_as_such() {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose, SanType,
        };
        let p = pair();
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut root = CertificateParams::default();
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root_cert = root.self_signed(&root_key).unwrap();
        let issuer = Issuer::new(root, root_key);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut leaf = CertificateParams::default();
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.subject_alt_names = vec![SanType::URI("spiffe://td/client".try_into().unwrap())];
        let leaf_cert = leaf.signed_by(&key, &issuer).unwrap();
        let svid = Svid::from_pem(&leaf_cert.pem(), &key.serialize_pem()).unwrap();
        let bundle = TrustBundle::for_trust_domain(
            "td",
            vec![p.ca.cert_der().clone(), root_cert.der().clone()],
        )
        .unwrap();
        let server =
            server_config(&p.server, &bundle, ClientAuth::Required, &[b"http/1.1"]).unwrap();
        let client = client_config(
            Some(&svid),
            &bundle,
            ExpectedServer::Exact(p.server_id.clone()),
            &[b"http/1.1"],
        )
        .unwrap();
        let err = handshake(client, server).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    CertificateError::InvalidPurpose
                        | CertificateError::InvalidPurposeContext { .. }
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_federated_ca_vouches_only_for_its_own_trust_domain() {
        let p = pair();
        let now = SystemTime::now();
        let other = Ca::generate("other.test", now).unwrap();
        // A CA that can sign identities of `td` (and so forge ours), federated as if it
        // were other.test's root beside the real one.
        let forger = Ca::generate("td", now).unwrap();
        let third = Ca::generate("third.test", now).unwrap();
        let federated = p
            .bundle
            .clone()
            .with_federated(BTreeMap::from([(
                "other.test".to_string(),
                vec![other.cert_der().clone(), forger.cert_der().clone()],
            )]))
            .unwrap();
        let server = server_config(&p.server, &federated, ClientAuth::Required, &[b"h2"]).unwrap();
        let client_of = |svid: &Svid| {
            client_config(
                Some(svid),
                &federated,
                ExpectedServer::Exact(p.server_id.clone()),
                &[b"h2"],
            )
            .unwrap()
        };
        let issue = |ca: &Ca, id: &str| {
            ca.issue_local(&SpiffeId::parse(id).unwrap(), Duration::from_secs(600), now)
                .unwrap()
        };
        // other.test's own identity, from its own root: accepted, and named as such.
        let visitor = issue(&other, "spiffe://other.test/ns/shop/sa/frontend");
        handshake(client_of(&visitor), server.clone()).expect("a federated peer is accepted");
        let id = peer_identity_in(Some(visitor.chain()), &federated).unwrap();
        assert_eq!(id.as_str(), "spiffe://other.test/ns/shop/sa/frontend");
        assert!(peer_identity(Some(visitor.chain()), "td").is_err());
        // One of our identities from a root of the federated domain: refused.
        let forged = issue(&forger, "spiffe://td/client");
        let err = handshake(client_of(&forged), server.clone()).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
        // A third domain's identity: no roots of its own here, refused.
        let stranger = issue(&third, "spiffe://third.test/client");
        let err = handshake(client_of(&stranger), server.clone()).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
        // The same rule as a client: a server claiming our identity from other.test's root is
        // refused; other.test's own server is accepted.
        let forged_server = issue(&forger, "spiffe://td/server");
        let server_of =
            |svid: &Svid| server_config(svid, &federated, ClientAuth::Required, &[b"h2"]).unwrap();
        let err = handshake(client_of(&p.client), server_of(&forged_server)).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
        let theirs = issue(&other, "spiffe://other.test/ns/shop/sa/orders");
        let to_theirs = client_config(
            Some(&p.client),
            &federated,
            ExpectedServer::Exact(theirs.id().clone()),
            &[b"h2"],
        )
        .unwrap();
        handshake(to_theirs, server_of(&theirs)).expect("a federated server is accepted");
        // Our own domain cannot be federated.
        assert!(
            p.bundle
                .clone()
                .with_federated(BTreeMap::from([(
                    "td".to_string(),
                    vec![other.cert_der().clone()]
                )]))
                .is_err()
        );
    }
}
