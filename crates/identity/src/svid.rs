//! X.509-SVIDs: the local key and CSR a proxy makes, the certificate it gets back, and the
//! checks the SPIFFE X.509-SVID spec puts on a peer's leaf.

use crate::error::{IdentityError, SvidError};
use bulkhead_spiffe::{SpiffeId, TrustDomain};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// A private key made in this process, and the CSR that asks the CA to certify it.
pub struct LocalKey {
    key: KeyPair,
}

impl LocalKey {
    pub fn generate() -> Result<LocalKey, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Signing(e.to_string()))?;
        Ok(LocalKey { key })
    }

    /// A CSR for the public key, optionally naming the identity the caller expects. The CA
    /// decides the identity; it refuses a CSR that asks for another one.
    pub fn csr_der(&self, requested: Option<&SpiffeId>) -> Result<Vec<u8>, IdentityError> {
        let mut params = CertificateParams::default();
        if let Some(id) = requested {
            params.subject_alt_names =
                vec![rcgen::SanType::URI(id.as_str().try_into().map_err(
                    |e: rcgen::Error| IdentityError::Signing(e.to_string()),
                )?)];
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "bulkhead");
        params.distinguished_name = dn;
        let csr = params
            .serialize_request(&self.key)
            .map_err(|e| IdentityError::Signing(e.to_string()))?;
        Ok(csr.der().to_vec())
    }

    /// Pairs the key with the chain the CA returned, after checking the leaf certifies this
    /// key and is a valid SVID.
    pub fn into_svid(self, chain: Vec<CertificateDer<'static>>) -> Result<Svid, IdentityError> {
        let leaf = chain
            .first()
            .ok_or_else(|| IdentityError::IssuedCert("empty certificate chain".into()))?;
        let (_, cert) = X509Certificate::from_der(leaf)
            .map_err(|e| IdentityError::IssuedCert(e.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != self.key.public_key_raw() {
            return Err(IdentityError::IssuedCert(
                "certificate is for a different public key".into(),
            ));
        }
        let id = spiffe_id_of(leaf).map_err(|e| IdentityError::IssuedCert(e.to_string()))?;
        let not_after =
            UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
        let not_before =
            UNIX_EPOCH + Duration::from_secs(cert.validity().not_before.timestamp().max(0) as u64);
        let serial = cert.raw_serial_as_string();
        Ok(Svid {
            id,
            chain,
            key: Arc::new(PrivatePkcs8KeyDer::from(self.key.serialize_der())),
            not_before,
            not_after,
            serial,
        })
    }
}

/// A certified identity: the chain (leaf first) and its private key. Cloning copies the key
/// within this process (a credentials set rebuilt around the same SVID); it never leaves it.
#[derive(Clone)]
pub struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivatePkcs8KeyDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.as_str())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Colon-separated hex serial, as `openssl x509 -serial` would show it.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The SHA-256 fingerprint (hex) of the certificate that signed this SVID: the issuing
    /// CA's, as [`crate::Ca::fingerprint`] names it. `None` if the chain holds only the leaf.
    pub fn issuer_fingerprint(&self) -> Option<String> {
        self.chain.get(1).map(|c| fingerprint(c))
    }

    /// PEM of the chain and of the key. Only for a credential kept on its own host: the admin
    /// credential the control plane writes for the CLI, and a proxy's own credential file.
    pub fn to_pem(&self) -> (String, String) {
        let certs = self
            .chain
            .iter()
            .map(|c| pem_block("CERTIFICATE", c))
            .collect::<String>();
        (certs, pem_block("PRIVATE KEY", self.key.secret_pkcs8_der()))
    }

    /// Reads a chain and PKCS#8 key from PEM (the admin credential).
    pub fn from_pem(certs_pem: &str, key_pem: &str) -> Result<Svid, IdentityError> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(certs_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| IdentityError::IssuedCert(e.to_string()))?;
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| IdentityError::IssuedCert(e.to_string()))?;
        LocalKey { key }.into_svid(chain)
    }
}

pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The SPIFFE ID of a leaf certificate, checked per the X.509-SVID spec: exactly one URI
/// SAN, a valid SPIFFE ID, and no CA flag.
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<SpiffeId, SvidError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|_| SvidError::Malformed)?;
    if cert.is_ca() {
        return Err(SvidError::CaLeaf);
    }
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(_) => return Err(SvidError::Malformed),
    };
    match uris.as_slice() {
        [] => Err(SvidError::NoSpiffeId),
        [one] => SpiffeId::parse(one).map_err(|e| SvidError::BadId(e.to_string())),
        many => Err(SvidError::ManyUriSans(many.len())),
    }
}

/// A certificate's serial as colon-separated hex (as [`Svid::serial`] shows it), if it parses.
pub fn serial_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    Some(cert.raw_serial_as_string())
}

/// When a certificate starts being valid, if it parses.
pub fn not_before_of(cert_der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let secs = u64::try_from(cert.validity().not_before.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// When a certificate stops being valid, if it parses.
pub fn not_after_of(cert_der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// SHA-256 of a certificate's DER, lowercase hex: how Bulkhead names CAs and bundle roots.
pub fn fingerprint(cert_der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(cert_der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A certificate's subject as text (`CN=…, O=…`), if it parses.
pub fn subject_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    Some(cert.subject().to_string())
}

/// The trust domain a CA certificate names in a `spiffe://<trust-domain>` URI SAN, if it has
/// one.
pub(crate) fn ca_trust_domain(cert_der: &[u8]) -> Option<TrustDomain> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => TrustDomain::from_id(u).ok(),
        _ => None,
    })
}

/// Who is refused although their certificate chains to the bundle: revoked identities and
/// revoked certificates. Asked at every handshake, so a list behind it that changes takes
/// effect at the next one. Implementations answer from memory; they must not block.
pub trait RevocationCheck: Send + Sync + std::fmt::Debug {
    /// Whether the leaf of `id` with `serial` (colon-separated hex, as [`serial_of`] gives
    /// it) is revoked.
    fn is_revoked(&self, id: &SpiffeId, serial: &str) -> bool;
}

/// A list of revoked identities and certificate serials, as the control plane pushes it: the
/// value a [`RevocationCheck`] answers from. Sets, so asking costs two lookups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevokedSet {
    identities: std::collections::BTreeSet<String>,
    serials: std::collections::BTreeSet<String>,
}

impl RevokedSet {
    /// Revoked SPIFFE IDs (every certificate of each), and revoked certificates by serial
    /// (colon-separated hex, as [`serial_of`] gives it).
    pub fn new(
        identities: impl IntoIterator<Item = String>,
        serials: impl IntoIterator<Item = String>,
    ) -> RevokedSet {
        RevokedSet {
            identities: identities.into_iter().collect(),
            serials: serials.into_iter().collect(),
        }
    }

    pub fn identities(&self) -> impl Iterator<Item = &str> {
        self.identities.iter().map(String::as_str)
    }

    pub fn serials(&self) -> impl Iterator<Item = &str> {
        self.serials.iter().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.identities.is_empty() && self.serials.is_empty()
    }

    /// Whether the certificate of `id` with `serial` is refused.
    pub fn refuses(&self, id: &str, serial: &str) -> bool {
        self.identities.contains(id) || (!serial.is_empty() && self.serials.contains(serial))
    }
}

/// The root certificates a peer's chain must lead to, with the trust domain they serve, and
/// optionally the revocations a peer must not be named by.
///
/// The trust domain is configuration (the control plane's `--trust-domain`), not a property
/// of the roots: an enterprise root brought by the operator names no SPIFFE trust domain.
///
/// A bundle may also carry the roots of federated trust domains (SPIFFE federation): a peer
/// whose SPIFFE ID is in such a domain is verified against that domain's roots alone, and a
/// peer of our own domain against ours alone, so a federated CA never vouches for our
/// identities or a third domain's.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
    revocations: Option<Arc<dyn RevocationCheck>>,
    /// Federated trust domain → its roots (never our own trust domain).
    federated: Arc<BTreeMap<String, Vec<CertificateDer<'static>>>>,
}

impl TrustBundle {
    /// A bundle of `roots` for `trust_domain`.
    pub fn for_trust_domain(
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<TrustBundle, IdentityError> {
        SpiffeId::parse(&format!("spiffe://{trust_domain}/bundle")).map_err(|e| {
            IdentityError::Bundle(format!("trust domain {trust_domain:?} is not valid: {e}"))
        })?;
        if roots.is_empty() {
            return Err(IdentityError::Bundle("no root certificates".into()));
        }
        for root in &roots {
            X509Certificate::from_der(root).map_err(|e| {
                IdentityError::Bundle(format!("a root certificate does not parse: {e}"))
            })?;
        }
        Ok(TrustBundle {
            trust_domain: trust_domain.to_string(),
            roots,
            revocations: None,
            federated: Arc::default(),
        })
    }

    /// The same bundle, also trusting each federated trust domain's roots for that domain's
    /// identities only. Refused if a domain is our own or not a valid trust domain, has no
    /// roots, or a root does not parse.
    pub fn with_federated(
        mut self,
        federated: BTreeMap<String, Vec<CertificateDer<'static>>>,
    ) -> Result<TrustBundle, IdentityError> {
        for (td, roots) in &federated {
            if td == &self.trust_domain {
                return Err(IdentityError::Bundle(format!(
                    "trust domain {td:?} is this mesh's own; it cannot be federated"
                )));
            }
            // Checks the name and the roots as for our own domain.
            TrustBundle::for_trust_domain(td, roots.clone())?;
        }
        self.federated = Arc::new(federated);
        Ok(self)
    }

    /// The federated trust domains and their roots.
    pub fn federated(&self) -> &BTreeMap<String, Vec<CertificateDer<'static>>> {
        &self.federated
    }

    /// The roots that may vouch for an identity of `trust_domain`: ours for our own domain,
    /// a federated domain's for it, none for any other.
    pub fn roots_for(&self, trust_domain: &str) -> Option<&[CertificateDer<'static>]> {
        if trust_domain == self.trust_domain {
            Some(&self.roots)
        } else {
            self.federated.get(trust_domain).map(Vec::as_slice)
        }
    }

    /// Whether `trust_domain` is ours or federated.
    pub fn trusts_domain(&self, trust_domain: &str) -> bool {
        self.roots_for(trust_domain).is_some()
    }

    /// The same bundle, refusing every peer `check` names: every TLS configuration built from
    /// it (server and client) asks `check` at each handshake.
    pub fn with_revocations(mut self, check: Arc<dyn RevocationCheck>) -> TrustBundle {
        self.revocations = Some(check);
        self
    }

    /// Refuses a leaf (of `id`) that the bundle's revocation check names.
    pub fn check_revoked(&self, id: &SpiffeId, leaf_der: &[u8]) -> Result<(), SvidError> {
        let Some(check) = &self.revocations else {
            return Ok(());
        };
        let serial = serial_of(leaf_der).unwrap_or_default();
        if check.is_revoked(id, &serial) {
            return Err(SvidError::Revoked {
                id: id.to_string(),
                serial,
            });
        }
        Ok(())
    }

    /// Builds a bundle whose trust domain is read from the `spiffe://` URI SAN of its roots
    /// (a root Bulkhead generated has one). Fails if no root names a trust domain.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<TrustBundle, IdentityError> {
        if roots.is_empty() {
            return Err(IdentityError::Bundle("no root certificates".into()));
        }
        let trust_domain = roots
            .iter()
            .find_map(|r| ca_trust_domain(r))
            .ok_or(IdentityError::NoTrustDomain)?;
        TrustBundle::for_trust_domain(trust_domain.as_str(), roots)
    }

    /// Reads PEM roots; the trust domain as [`TrustBundle::new`] finds it.
    pub fn from_pem(pem: &str) -> Result<TrustBundle, IdentityError> {
        TrustBundle::new(read_pem_roots(pem)?)
    }

    /// Reads PEM roots for `trust_domain`.
    pub fn from_pem_for(trust_domain: &str, pem: &str) -> Result<TrustBundle, IdentityError> {
        TrustBundle::for_trust_domain(trust_domain, read_pem_roots(pem)?)
    }

    /// The SHA-256 fingerprint (hex) of each root, in bundle order.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(|r| fingerprint(r)).collect()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn to_pem(&self) -> String {
        self.roots
            .iter()
            .map(|c| pem_block("CERTIFICATE", c))
            .collect()
    }

    pub(crate) fn root_store(&self) -> Result<RootCertStore, IdentityError> {
        root_store_of(&self.roots)
    }
}

/// A rustls root store of `roots`.
pub(crate) fn root_store_of(
    roots: &[CertificateDer<'static>],
) -> Result<RootCertStore, IdentityError> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store
            .add(root.clone())
            .map_err(|e| IdentityError::Bundle(e.to_string()))?;
    }
    Ok(store)
}

fn read_pem_roots(pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Bundle(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ca;

    #[test]
    fn csr_round_trip_binds_the_ca_chosen_identity() {
        let now = SystemTime::now();
        let ca = Ca::generate("td.test", now).unwrap();
        let key = LocalKey::generate().unwrap();
        let id = SpiffeId::parse("spiffe://td.test/ns/shop/sa/orders").unwrap();
        let chain = ca
            .sign_csr(
                &key.csr_der(Some(&id)).unwrap(),
                &id,
                crate::DEFAULT_SVID_LIFETIME,
                now,
            )
            .unwrap();
        let svid = key.into_svid(chain).unwrap();
        assert_eq!(svid.id(), &id);
        let (_, leaf) = X509Certificate::from_der(&svid.chain()[0]).unwrap();
        assert!(!leaf.is_ca());
        // The SPIFFE X.509-SVID spec: a leaf sets digitalSignature, never keyCertSign or
        // cRLSign; keyEncipherment has no meaning for an EC key, so it is not set.
        let ku = leaf.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        let ku = ku.value;
        assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
        assert!(!ku.key_encipherment() && !ku.key_agreement());
        // A signing certificate sets keyCertSign and may set cRLSign; digitalSignature
        // belongs to leaves.
        let (_, root) = X509Certificate::from_der(ca.cert_der()).unwrap();
        let ku = root.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let life = svid.not_after().duration_since(svid.not_before()).unwrap();
        assert_eq!(life, crate::DEFAULT_SVID_LIFETIME + Duration::from_secs(60));
    }

    #[test]
    fn reserved_identities_come_only_from_issue_local() {
        let now = SystemTime::now();
        let ca = Ca::generate("td.test", now).unwrap();
        for path in ["/bulkhead/admin", "/bulkhead/control", "/bulkhead/anything"] {
            let id = SpiffeId::parse(&format!("spiffe://td.test{path}")).unwrap();
            let key = LocalKey::generate().unwrap();
            // Whatever the CSR asks for, even exactly that identity.
            for csr in [key.csr_der(Some(&id)).unwrap(), key.csr_der(None).unwrap()] {
                let err = ca
                    .sign_csr(&csr, &id, Duration::from_secs(60), now)
                    .unwrap_err();
                assert!(matches!(err, IdentityError::Reserved(_)), "{err}");
                assert!(
                    err.to_string().starts_with(&format!(
                        "spiffe://td.test{path} is reserved: identities under spiffe://td.test/bulkhead/ belong to the mesh itself"
                    )),
                    "{err}"
                );
            }
            let own = ca.issue_local(&id, Duration::from_secs(60), now).unwrap();
            assert_eq!(own.id(), &id);
        }
        // A CSR naming a reserved identity for a workload identity is refused as a mismatch.
        let key = LocalKey::generate().unwrap();
        let admin = SpiffeId::parse("spiffe://td.test/bulkhead/admin").unwrap();
        let workload = SpiffeId::parse("spiffe://td.test/ns/a/sa/b").unwrap();
        let err = ca
            .sign_csr(
                &key.csr_der(Some(&admin)).unwrap(),
                &workload,
                Duration::from_secs(60),
                now,
            )
            .unwrap_err();
        assert!(
            matches!(err, IdentityError::IdentityMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn svid_for_another_key_is_refused() {
        let now = SystemTime::now();
        let ca = Ca::generate("td.test", now).unwrap();
        let id = SpiffeId::parse("spiffe://td.test/a").unwrap();
        let other = LocalKey::generate().unwrap();
        let chain = ca
            .sign_csr(
                &other.csr_der(None).unwrap(),
                &id,
                Duration::from_secs(60),
                now,
            )
            .unwrap();
        let mine = LocalKey::generate().unwrap();
        assert!(mine.into_svid(chain).is_err());
    }

    #[test]
    fn csr_asking_for_another_identity_is_refused() {
        let now = SystemTime::now();
        let ca = Ca::generate("td.test", now).unwrap();
        let key = LocalKey::generate().unwrap();
        let wanted = SpiffeId::parse("spiffe://td.test/ns/shop/sa/payments").unwrap();
        let bound = SpiffeId::parse("spiffe://td.test/ns/shop/sa/orders").unwrap();
        let err = ca
            .sign_csr(
                &key.csr_der(Some(&wanted)).unwrap(),
                &bound,
                Duration::from_secs(60),
                now,
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "this credential is bound to spiffe://td.test/ns/shop/sa/orders; it cannot be used to obtain spiffe://td.test/ns/shop/sa/payments"
        );
    }

    #[test]
    fn ca_signs_only_in_its_trust_domain() {
        let now = SystemTime::now();
        let ca = Ca::generate("td.test", now).unwrap();
        let key = LocalKey::generate().unwrap();
        let id = SpiffeId::parse("spiffe://elsewhere/a").unwrap();
        assert!(
            ca.sign_csr(
                &key.csr_der(Some(&id)).unwrap(),
                &id,
                Duration::from_secs(60),
                now
            )
            .is_err()
        );
    }

    #[test]
    fn ca_reloads_from_pem_and_still_signs() {
        let now = SystemTime::now();
        let ca = Ca::generate("td.test", now).unwrap();
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.trust_domain(), "td.test");
        let id = SpiffeId::parse("spiffe://td.test/a").unwrap();
        let svid = again
            .issue_local(&id, Duration::from_secs(60), now)
            .unwrap();
        let bundle = TrustBundle::from_pem(ca.cert_pem()).unwrap();
        assert_eq!(bundle.trust_domain(), "td.test");
        assert_eq!(svid.chain()[1], *ca.cert_der());
    }
}
