//! Certificate authorities that sign X.509-SVIDs from CSRs: a root the control plane makes
//! itself, or a CA the operator brings (an intermediate of an enterprise PKI, with the chain
//! up to its root). Either way the bundle holds the root, and an SVID presents the leaf and
//! every intermediate below the root.

use crate::error::{CaImportError, IdentityError};
use crate::svid::{LocalKey, Svid, fingerprint, pem_block, subject_of};
use bulkhead_spiffe::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, UnixTime};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Istio and Linkerd default to 24 h; we default to 1 h and rotate at half-life.
pub const DEFAULT_SVID_LIFETIME: Duration = Duration::from_secs(3600);

const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Tolerate this much clock skew between the CA and its peers.
const BACKDATE: Duration = Duration::from_secs(60);
/// The most certificates between an imported CA and its root.
const MAX_CHAIN: usize = 8;

/// A CA able to sign. Holds its private key; never serialize it outside the control plane's
/// data directory.
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The key as PEM, in the format it came in (for the data directory).
    key_pem: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    /// The certificates above this CA's own, up to and including the self-signed root;
    /// empty when this CA is the root.
    chain: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Makes a new self-signed root for `trust_domain`. Its common name carries a few bytes
    /// of its serial, so that two generations of roots are told apart by name too.
    pub fn generate(trust_domain: &str, now: SystemTime) -> Result<Ca, IdentityError> {
        check_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Signing(e.to_string()))?;
        let serial = random_serial_bytes();
        let tag: String = serial[..4].iter().map(|b| format!("{b:02x}")).collect();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "bulkhead");
        dn.push(
            DnType::CommonName,
            format!("bulkhead root CA {trust_domain} {tag}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // The SPIFFE X.509-SVID spec: a signing certificate sets keyCertSign and may set
        // cRLSign; digitalSignature is for leaves only.
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}")
                .try_into()
                .map_err(|e: rcgen::Error| IdentityError::Signing(e.to_string()))?,
        )];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Signing(e.to_string()))?;
        let cert_der = cert.der().clone();
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            issuer: Issuer::new(params, key),
            key_pem,
            cert_der,
            cert_pem,
            chain: Vec::new(),
        })
    }

    /// Loads a root CA from its certificate and key, both PEM; the trust domain is read from
    /// the root's `spiffe://` URI SAN (as [`Ca::generate`] makes it).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, IdentityError> {
        let certs = read_certs(cert_pem).map_err(IdentityError::CaLoad)?;
        let first = certs
            .first()
            .ok_or_else(|| IdentityError::CaLoad("no certificate in PEM".into()))?;
        let trust_domain = crate::svid::ca_trust_domain(first).ok_or_else(|| {
            IdentityError::CaLoad(
                "CA certificate has no spiffe:// URI SAN naming its trust domain".into(),
            )
        })?;
        Ca::load(trust_domain.as_str(), cert_pem, key_pem)
    }

    /// Loads a CA of `trust_domain` as [`Ca::certs_pem`] and [`Ca::key_pem`] wrote it: its
    /// certificate first, then the chain up to the root. Checks only that the key fits the
    /// certificate; [`Ca::import`] is the door for certificates from outside.
    pub fn load(trust_domain: &str, certs_pem: &str, key_pem: &str) -> Result<Ca, IdentityError> {
        check_trust_domain(trust_domain)?;
        let mut certs = read_certs(certs_pem).map_err(IdentityError::CaLoad)?;
        if certs.is_empty() {
            return Err(IdentityError::CaLoad("no certificate in PEM".into()));
        }
        let cert_der = certs.remove(0);
        let (key, key_pem) = read_key(key_pem).map_err(IdentityError::CaLoad)?;
        if !key_fits(&cert_der, &key) {
            return Err(IdentityError::CaLoad(
                "the private key does not belong to the CA certificate".into(),
            ));
        }
        Ca::assemble(trust_domain, key, key_pem, cert_der, certs).map_err(IdentityError::CaLoad)
    }

    /// Takes a CA the operator brings: `cert_pem` is the CA's certificate (an intermediate, or
    /// a root), `key_pem` its private key, `chain_pem` the certificates above it up to and
    /// including the self-signed root (in any order; empty if the CA is itself the root).
    ///
    /// Refused unless the key belongs to the certificate, the certificate is a CA allowed to
    /// sign certificates, the chain leads to a self-signed root, and an SVID this CA signs
    /// verifies against that root as peers will verify it (as a TLS server and as a client).
    pub fn import(
        trust_domain: &str,
        cert_pem: &str,
        key_pem: &str,
        chain_pem: &str,
        now: SystemTime,
    ) -> Result<Ca, CaImportError> {
        check_trust_domain(trust_domain).map_err(|e| CaImportError::Signing(e.to_string()))?;
        let unreadable = |what| move |reason| CaImportError::Unreadable { what, reason };
        let mut given = read_certs(cert_pem).map_err(unreadable("the CA certificate file"))?;
        if given.is_empty() {
            return Err(CaImportError::NoCertificate);
        }
        let cert_der = given.remove(0);
        given.extend(read_certs(chain_pem).map_err(unreadable("the chain file"))?);
        let (key, key_pem) = read_key(key_pem).map_err(|reason| CaImportError::Key { reason })?;
        let (_, cert) =
            X509Certificate::from_der(&cert_der).map_err(|e| CaImportError::Unreadable {
                what: "the CA certificate",
                reason: e.to_string(),
            })?;
        let subject = cert.subject().to_string();
        if !key_fits(&cert_der, &key) {
            return Err(CaImportError::KeyMismatch { subject });
        }
        if !cert.is_ca() {
            return Err(CaImportError::NotCa { subject });
        }
        if let Ok(Some(usage)) = cert.key_usage()
            && !usage.value.key_cert_sign()
        {
            return Err(CaImportError::NoCertSign { subject });
        }
        let chain = path_to_root(&cert_der, given)?;
        let ca = Ca::assemble(trust_domain, key, key_pem, cert_der, chain)
            .map_err(CaImportError::Signing)?;
        ca.check_peers_accept(now)?;
        Ok(ca)
    }

    fn assemble(
        trust_domain: &str,
        key: KeyPair,
        key_pem: String,
        cert_der: CertificateDer<'static>,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<Ca, String> {
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| e.to_string())?;
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            issuer,
            key_pem,
            cert_pem: pem_block("CERTIFICATE", &cert_der),
            cert_der,
            chain,
        })
    }

    /// Signs a short-lived test SVID and verifies it against the root alone, as a server
    /// certificate (how a client sidecar checks) and as a client certificate (how an inbound
    /// sidecar checks).
    fn check_peers_accept(&self, now: SystemTime) -> Result<(), CaImportError> {
        let root = self.root();
        let refused = |reason: String| CaImportError::DoesNotVerify {
            root: subject_of(root).unwrap_or_else(|| "(unparsable)".into()),
            reason,
        };
        let id = SpiffeId::parse(&format!("spiffe://{}/bulkhead/ca-check", self.trust_domain))
            .map_err(|e| CaImportError::Signing(e.to_string()))?;
        let probe = self
            .issue_local(&id, Duration::from_secs(300), now)
            .map_err(|e| CaImportError::Signing(e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(root.clone())
            .map_err(|e| refused(e.to_string()))?;
        let roots = Arc::new(roots);
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let at = UnixTime::since_unix_epoch(since_epoch);
        let provider = crate::tls::provider();
        let (leaf, intermediates) = probe
            .chain()
            .split_first()
            .ok_or_else(|| refused("no certificate was issued".into()))?;
        let parsed = rustls::server::ParsedCertificate::try_from(leaf)
            .map_err(|e| refused(e.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            at,
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| refused(e.to_string()))?;
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| refused(e.to_string()))?;
        clients
            .verify_client_cert(leaf, intermediates, at)
            .map_err(|e| refused(e.to_string()))?;
        Ok(())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// This CA's own certificate (the one that signs).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// This CA's own certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The certificates above this CA's, up to and including the root; empty for a root.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The self-signed root this CA chains to: the certificate a trust bundle holds.
    pub fn root(&self) -> &CertificateDer<'static> {
        self.chain.last().unwrap_or(&self.cert_der)
    }

    /// Whether this CA is itself the root.
    pub fn is_root(&self) -> bool {
        self.chain.is_empty()
    }

    /// This CA's certificate and then its chain, PEM: what [`Ca::load`] reads back.
    pub fn certs_pem(&self) -> String {
        std::iter::once(&self.cert_der)
            .chain(&self.chain)
            .map(|c| pem_block("CERTIFICATE", c))
            .collect()
    }

    /// SHA-256 of this CA's own certificate, lowercase hex: its name on the wire and in the
    /// CLI, and what [`crate::Svid::issuer_fingerprint`] finds in an SVID it signed.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// PEM of the CA's private key, for the control plane's data directory (mode 0600).
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// Signs an X.509-SVID for `id` over the public key in `csr_der`. Everything the CSR asks
    /// for besides its key is ignored: the identity is the caller's decision, not the CSR's.
    /// An identity the mesh reserves for itself ([`SpiffeId::is_reserved`]) is refused,
    /// whoever asks: only [`Ca::issue_local`] makes those.
    ///
    /// Returns the leaf, this CA's certificate, and any intermediates above it; the root
    /// travels only when this CA is the root.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        id.refuse_reserved()?;
        self.sign(csr_der, id, lifetime, now)
    }

    fn sign(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        self.check_domain(id)?;
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| IdentityError::BadCsr(e.to_string()))?;
        for san in &csr.params.subject_alt_names {
            let asked = match san {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            };
            if asked != id.as_str() {
                return Err(IdentityError::IdentityMismatch {
                    bound: id.to_string(),
                    requested: asked,
                });
            }
        }
        let params = svid_params(id, lifetime, now)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| IdentityError::Signing(e.to_string()))?;
        let above_root = self.chain.len().saturating_sub(1);
        Ok(std::iter::once(cert.der().clone())
            .chain(std::iter::once(self.cert_der.clone()))
            .chain(self.chain[..above_root].iter().cloned())
            .collect())
    }

    /// Issues an SVID whose key is made here, for the control plane's own use (its serving
    /// certificate and the admin credential): the one way to an identity the mesh reserves.
    pub fn issue_local(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Svid, IdentityError> {
        let key = LocalKey::generate()?;
        let chain = self.sign(&key.csr_der(Some(id))?, id, lifetime, now)?;
        key.into_svid(chain)
    }

    /// [`Ca::issue_local`] for a server that browsers reach by name or address (the web
    /// console): the SVID also carries `hosts` as DNS or IP SANs, which the X.509-SVID spec
    /// allows beside the one URI SAN. A host that is neither an IP address nor a valid DNS
    /// name is refused.
    pub fn issue_local_for_hosts(
        &self,
        id: &SpiffeId,
        hosts: &[String],
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Svid, IdentityError> {
        self.check_domain(id)?;
        let key = LocalKey::generate()?;
        let mut params = svid_params(id, lifetime, now)?;
        for host in hosts {
            params.subject_alt_names.push(match host.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if is_dns_name(host) => {
                    SanType::DnsName(host.as_str().try_into().map_err(|e: rcgen::Error| {
                        IdentityError::Signing(format!("host {host:?}: {e}"))
                    })?)
                }
                Err(_) => {
                    return Err(IdentityError::Signing(format!(
                        "{host:?} is neither an IP address nor a DNS name"
                    )));
                }
            });
        }
        let public = CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(key.csr_der(None)?),
        )
        .map_err(|e| IdentityError::BadCsr(e.to_string()))?
        .public_key;
        let cert = params
            .signed_by(&public, &self.issuer)
            .map_err(|e| IdentityError::Signing(e.to_string()))?;
        let above_root = self.chain.len().saturating_sub(1);
        let chain = std::iter::once(cert.der().clone())
            .chain(std::iter::once(self.cert_der.clone()))
            .chain(self.chain[..above_root].iter().cloned())
            .collect();
        key.into_svid(chain)
    }

    fn check_domain(&self, id: &SpiffeId) -> Result<(), IdentityError> {
        if id.trust_domain() != self.trust_domain {
            return Err(IdentityError::Signing(format!(
                "{id} is outside this CA's trust domain {}",
                self.trust_domain
            )));
        }
        Ok(())
    }
}

/// A DNS name of letters, digits and hyphens in dot-separated labels (no wildcard).
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn check_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    // A trust domain is valid when an ID in it is.
    SpiffeId::parse(&format!("spiffe://{trust_domain}/ca"))?;
    Ok(())
}

fn read_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// The first private key in `pem` (PKCS#8, SEC1 or PKCS#1, skipping other blocks such as EC
/// parameters), and that key alone as PEM in its own format.
fn read_key(pem: &str) -> Result<(KeyPair, String), String> {
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => "no private key block found".to_string(),
        e => e.to_string(),
    })?;
    let label = match &der {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    let key = KeyPair::try_from(&der).map_err(|e| e.to_string())?;
    Ok((key, pem_block(label, der.secret_der())))
}

/// Whether `key` is the private half of the public key `cert_der` certifies.
fn key_fits(cert_der: &[u8], key: &KeyPair) -> bool {
    X509Certificate::from_der(cert_der)
        .map(|(_, c)| c.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
        .unwrap_or(false)
}

/// Orders `pool` into the path from `cert` up to a self-signed root; refuses a path that
/// stops short, runs too long, or leaves a certificate unused.
fn path_to_root(
    cert: &CertificateDer<'static>,
    pool: Vec<CertificateDer<'static>>,
) -> Result<Vec<CertificateDer<'static>>, CaImportError> {
    struct Names {
        subject: Vec<u8>,
        issuer: Vec<u8>,
        subject_text: String,
        issuer_text: String,
    }
    let names = |der: &CertificateDer<'static>| {
        X509Certificate::from_der(der)
            .map(|(_, c)| Names {
                subject: c.subject().as_raw().to_vec(),
                issuer: c.issuer().as_raw().to_vec(),
                subject_text: c.subject().to_string(),
                issuer_text: c.issuer().to_string(),
            })
            .map_err(|e| CaImportError::Unreadable {
                what: "a chain certificate",
                reason: e.to_string(),
            })
    };
    let mut pool: Vec<(CertificateDer<'static>, Names)> = pool
        .into_iter()
        .map(|c| names(&c).map(|n| (c, n)))
        .collect::<Result<_, _>>()?;
    let mut path: Vec<CertificateDer<'static>> = Vec::new();
    let mut current = names(cert)?;
    while current.subject != current.issuer {
        if path.len() >= MAX_CHAIN {
            return Err(CaImportError::ChainTooLong { max: MAX_CHAIN });
        }
        let Some(at) = pool.iter().position(|(_, n)| n.subject == current.issuer) else {
            return Err(CaImportError::ChainIncomplete {
                subject: current.subject_text,
                issuer: current.issuer_text,
            });
        };
        let (der, next) = pool.remove(at);
        path.push(der);
        current = next;
    }
    if let Some((_, n)) = pool
        .iter()
        .find(|(der, _)| der != cert && !path.contains(der))
    {
        return Err(CaImportError::Unrelated {
            subject: n.subject_text.clone(),
        });
    }
    Ok(path)
}

fn svid_params(
    id: &SpiffeId,
    lifetime: Duration,
    now: SystemTime,
) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "bulkhead");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    // The SPIFFE X.509-SVID spec: a leaf sets digitalSignature. keyEncipherment means
    // nothing for an EC key (it encrypts no key; TLS 1.3 signs), so it is left out.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names =
        vec![SanType::URI(id.as_str().try_into().map_err(
            |e: rcgen::Error| IdentityError::Signing(e.to_string()),
        )?)];
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn random_serial_bytes() -> [u8; 16] {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // and no leading zero byte to trim
    bytes
}

fn random_serial() -> SerialNumber {
    SerialNumber::from_slice(&random_serial_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrustBundle;

    /// An enterprise PKI as an operator might have it: a root with no SPIFFE URI, and an
    /// intermediate it signed, both as PEM with their keys.
    struct Pki {
        root_pem: String,
        root_der: CertificateDer<'static>,
        intermediate_pem: String,
        intermediate_key: String,
    }

    /// A one-minute SVID for `spiffe://td.test/a`, from `now`.
    fn one_minute_svid(ca: &Ca, now: SystemTime) -> Svid {
        ca.issue_local(
            &SpiffeId::parse("spiffe://td.test/a").unwrap(),
            Duration::from_secs(60),
            now,
        )
        .unwrap()
    }

    fn ca_params(cn: &str, not_after: SystemTime) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Example Corp");
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (SystemTime::now() - Duration::from_secs(3600)).into();
        params.not_after = not_after.into();
        params
    }

    fn make_pki(intermediate_not_after: SystemTime) -> Pki {
        let year = SystemTime::now() + Duration::from_secs(365 * 24 * 3600);
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let root_params = ca_params("Example Root CA", year);
        let root = root_params.self_signed(&root_key).unwrap();
        let issuer = Issuer::new(root_params, root_key);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let intermediate = ca_params("Example Mesh Intermediate", intermediate_not_after)
            .signed_by(&key, &issuer)
            .unwrap();
        Pki {
            root_pem: root.pem(),
            root_der: root.der().clone(),
            intermediate_pem: intermediate.pem(),
            intermediate_key: key.serialize_pem(),
        }
    }

    fn year() -> SystemTime {
        SystemTime::now() + Duration::from_secs(365 * 24 * 3600)
    }

    #[test]
    fn an_imported_intermediate_signs_svids_that_present_it_and_chain_to_the_root() {
        let pki = make_pki(year());
        let now = SystemTime::now();
        let ca = Ca::import(
            "td.test",
            &pki.intermediate_pem,
            &pki.intermediate_key,
            &pki.root_pem,
            now,
        )
        .unwrap();
        assert!(!ca.is_root());
        assert_eq!(ca.root(), &pki.root_der);
        let id = SpiffeId::parse("spiffe://td.test/ns/shop/sa/orders").unwrap();
        let svid = ca.issue_local(&id, Duration::from_secs(60), now).unwrap();
        assert_eq!(svid.chain().len(), 2, "leaf and intermediate, not the root");
        assert_eq!(&svid.chain()[1], ca.cert_der());
        assert_eq!(svid.issuer_fingerprint(), Some(ca.fingerprint()));

        // The bundle holds only the root, whose trust domain comes from configuration.
        let bundle = TrustBundle::from_pem_for("td.test", &pki.root_pem).unwrap();
        assert_eq!(bundle.fingerprints(), vec![fingerprint(&pki.root_der)]);
        let err = TrustBundle::from_pem(&pki.root_pem).unwrap_err();
        assert!(matches!(err, crate::IdentityError::NoTrustDomain), "{err}");

        // What the data directory keeps loads back into the same CA.
        let again = Ca::load("td.test", &ca.certs_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        assert_eq!(again.root(), &pki.root_der);
        let chain = again
            .issue_local(&id, Duration::from_secs(60), now)
            .unwrap();
        assert_eq!(chain.chain().len(), 2);
    }

    #[test]
    fn the_chain_may_come_in_the_certificate_file_too() {
        let pki = make_pki(year());
        let both = format!("{}{}", pki.intermediate_pem, pki.root_pem);
        let ca = Ca::import(
            "td.test",
            &both,
            &pki.intermediate_key,
            "",
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(ca.root(), &pki.root_der);
    }

    #[test]
    fn import_refuses_what_peers_would_refuse_saying_why() {
        let pki = make_pki(year());
        let now = SystemTime::now();
        let import = |cert: &str, key: &str, chain: &str| {
            Ca::import("td.test", cert, key, chain, now)
                .unwrap_err()
                .to_string()
        };
        let other_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem();
        assert_eq!(
            import(&pki.intermediate_pem, &other_key, &pki.root_pem),
            "the private key does not belong to O=Example Corp, CN=Example Mesh Intermediate: its public key differs from the certificate's; pass the key that was certified"
        );
        assert!(
            import(&pki.intermediate_pem, "not a key", &pki.root_pem)
                .starts_with("the private key file holds no usable private key")
        );
        assert_eq!(
            import(&pki.intermediate_pem, &pki.intermediate_key, ""),
            "the chain stops at O=Example Corp, CN=Example Mesh Intermediate: no certificate given is its issuer (O=Example Corp, CN=Example Root CA); pass --chain with every certificate up to and including the self-signed root"
        );
        let stranger = Ca::generate("td.test", now).unwrap();
        assert!(
            import(
                &pki.intermediate_pem,
                &pki.intermediate_key,
                &format!("{}{}", pki.root_pem, stranger.cert_pem())
            )
            .contains("is not on the path from the CA certificate to its root"),
        );
        assert_eq!(
            import("", &pki.intermediate_key, ""),
            "the CA certificate file holds no PEM certificate"
        );

        // A leaf is not a CA.
        let leaf = one_minute_svid(&stranger, now);
        let (leaf_pem, leaf_key) = leaf.to_pem();
        assert!(
            import(&leaf_pem, &leaf_key, stranger.cert_pem()).contains("is not a CA certificate"),
        );

        // An expired intermediate: the test SVID does not verify.
        let old = make_pki(now - Duration::from_secs(60));
        let err = import(&old.intermediate_pem, &old.intermediate_key, &old.root_pem);
        assert!(
            err.starts_with(
                "a test certificate signed by this CA does not verify against the chain's root O=Example Corp, CN=Example Root CA"
            ) && err.contains("certificate expired"),
            "{err}"
        );
    }

    #[test]
    fn generated_roots_are_told_apart_by_name() {
        let now = SystemTime::now();
        let a = Ca::generate("td.test", now).unwrap();
        let b = Ca::generate("td.test", now).unwrap();
        assert_ne!(subject_of(a.cert_der()), subject_of(b.cert_der()));
        assert!(a.is_root() && a.root() == a.cert_der());
        let svid = one_minute_svid(&a, now);
        assert_eq!(
            svid.chain()[1],
            *a.cert_der(),
            "a root's SVIDs present the root"
        );
    }

    #[test]
    fn a_server_for_browsers_carries_its_hosts_beside_its_spiffe_id() {
        let now = SystemTime::now();
        let ca = Ca::generate("bulkhead.local", now).unwrap();
        let id = SpiffeId::parse("spiffe://bulkhead.local/bulkhead/console").unwrap();
        let hosts = ["127.0.0.1".to_string(), "console.example".to_string()];
        let svid = ca
            .issue_local_for_hosts(&id, &hosts, Duration::from_secs(60), now)
            .unwrap();
        assert_eq!(svid.id(), &id, "still an SVID: one URI SAN");
        let (_, cert) = X509Certificate::from_der(&svid.chain()[0]).unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(
            names[1].contains("127.0.0.1") || names[1].contains("[127, 0, 0, 1]"),
            "{names:?}"
        );
        assert!(names[2].contains("console.example"), "{names:?}");
        let bad =
            ca.issue_local_for_hosts(&id, &["no spaces".into()], Duration::from_secs(60), now);
        assert!(bad.is_err());
        let foreign = SpiffeId::parse("spiffe://other.local/bulkhead/console").unwrap();
        assert!(
            ca.issue_local_for_hosts(&foreign, &[], Duration::from_secs(60), now)
                .is_err()
        );
    }
}
