//! The certificate authority: a root key that signs X.509-SVIDs from CSRs.

use crate::error::IdentityError;
use crate::spiffe::SpiffeId;
use crate::svid::{LocalKey, Svid};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use std::time::{Duration, SystemTime};

/// Istio and Linkerd default to 24 h; we default to 1 h and rotate at half-life.
pub const DEFAULT_SVID_LIFETIME: Duration = Duration::from_secs(3600);

const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Tolerate this much clock skew between the CA and its peers.
const BACKDATE: Duration = Duration::from_secs(60);

/// A CA able to sign. Holds its private key; never serialize it outside the control plane's
/// data directory.
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Makes a new self-signed root for `trust_domain`.
    pub fn generate(trust_domain: &str, now: SystemTime) -> Result<Ca, IdentityError> {
        // Validate the trust domain by building an ID in it.
        SpiffeId::parse(&format!("spiffe://{trust_domain}/ca"))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Signing(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "bulkhead");
        dn.push(
            DnType::CommonName,
            format!("bulkhead root CA {trust_domain}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}")
                .try_into()
                .map_err(|e: rcgen::Error| IdentityError::Signing(e.to_string()))?,
        )];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Signing(e.to_string()))?;
        let cert_der = cert.der().clone();
        let cert_pem = cert.pem();
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            issuer: Issuer::new(params, key),
            cert_der,
            cert_pem,
        })
    }

    /// Loads a CA from its certificate and PKCS#8 key, both PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, IdentityError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| IdentityError::CaLoad(e.to_string()))?;
        let cert_der = CertificateDer::from(
            rustls_pemfile::certs(&mut cert_pem.as_bytes())
                .next()
                .ok_or_else(|| IdentityError::CaLoad("no certificate in PEM".into()))?
                .map_err(|e| IdentityError::CaLoad(e.to_string()))?
                .to_vec(),
        );
        let root_id = crate::svid::ca_uri_san(&cert_der).ok_or_else(|| {
            IdentityError::CaLoad(
                "CA certificate has no spiffe:// URI SAN naming its trust domain".into(),
            )
        })?;
        let trust_domain = root_id.trim_start_matches("spiffe://").to_string();
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| IdentityError::CaLoad(e.to_string()))?;
        Ok(Ca {
            trust_domain,
            issuer,
            cert_der,
            cert_pem: cert_pem.to_string(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// PEM of the CA's private key, for the control plane's data directory (mode 0600).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Signs an X.509-SVID for `id` over the public key in `csr_der`. Everything the CSR asks
    /// for besides its key is ignored: the identity is the caller's decision, not the CSR's.
    pub fn sign_csr(
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
        Ok(vec![cert.der().clone(), self.cert_der.clone()])
    }

    /// Issues an SVID whose key is made here, for the control plane's own use (its serving
    /// certificate and the admin credential).
    pub fn issue_local(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Svid, IdentityError> {
        let key = LocalKey::generate()?;
        let chain = self.sign_csr(&key.csr_der(Some(id))?, id, lifetime, now)?;
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
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
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

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // and no leading zero byte to trim
    SerialNumber::from_slice(&bytes)
}
