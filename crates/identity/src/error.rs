/// Why an X.509 certificate is not an acceptable SVID. Each reason is distinct so that logs
/// and metrics can name it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate could not be parsed as X.509")]
    Malformed,
    #[error("certificate has no URI SAN holding a SPIFFE ID")]
    NoSpiffeId,
    #[error("certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    ManyUriSans(usize),
    #[error("leaf certificate has the CA flag set")]
    CaLeaf,
    #[error("SPIFFE ID in certificate is invalid: {0}")]
    BadId(String),
    #[error("peer identity {found} is not the expected {expected}")]
    UnexpectedIdentity { expected: String, found: String },
    #[error("peer identity {found} is outside trust domain {expected}")]
    WrongTrustDomain { expected: String, found: String },
    #[error("peer identity {id} (certificate serial {serial}) is revoked")]
    Revoked { id: String, serial: String },
}

/// Failures of the identity machinery itself (signing, key handling, configuration).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    InvalidId(#[from] bulkhead_spiffe::SpiffeIdError),
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
    #[error(transparent)]
    Reserved(#[from] bulkhead_spiffe::ReservedId),
    #[error("this credential is bound to {bound}; it cannot be used to obtain {requested}")]
    IdentityMismatch { bound: String, requested: String },
    #[error("could not sign certificate: {0}")]
    Signing(String),
    #[error("could not load CA from PEM: {0}")]
    CaLoad(String),
    #[error("issued certificate does not fit the local key or is not a valid SVID: {0}")]
    IssuedCert(String),
    #[error("trust bundle is unusable: {0}")]
    Bundle(String),
    #[error(
        "no root certificate of the trust bundle names a trust domain (a spiffe:// URI SAN, which a root from your own PKI does not have); the trust domain has to be given"
    )]
    NoTrustDomain,
    #[error("TLS configuration failed: {0}")]
    Tls(String),
    #[error("root {subject} cannot be published in a SPIFFE bundle: {reason}")]
    BundleKey {
        subject: String,
        reason: &'static str,
    },
}

/// Why a CA brought by the operator (a certificate, its key and the chain to a root) cannot
/// be used. Each message says what is wrong with which certificate, and what to bring instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaImportError {
    #[error("the CA certificate file holds no PEM certificate")]
    NoCertificate,
    #[error("{what} is not valid PEM/X.509: {reason}")]
    Unreadable { what: &'static str, reason: String },
    #[error(
        "the private key file holds no usable private key ({reason}); give an unencrypted PKCS#8, SEC1 or PKCS#1 key in PEM"
    )]
    Key { reason: String },
    #[error(
        "the private key does not belong to {subject}: its public key differs from the certificate's; pass the key that was certified"
    )]
    KeyMismatch { subject: String },
    #[error(
        "{subject} is not a CA certificate (basicConstraints CA:TRUE is missing); import the intermediate CA's certificate, not a leaf"
    )]
    NotCa { subject: String },
    #[error("{subject} may not sign certificates: its key usage lacks keyCertSign")]
    NoCertSign { subject: String },
    #[error(
        "the chain stops at {subject}: no certificate given is its issuer ({issuer}); pass --chain with every certificate up to and including the self-signed root"
    )]
    ChainIncomplete { subject: String, issuer: String },
    #[error(
        "{subject} in the chain is not on the path from the CA certificate to its root; remove it"
    )]
    Unrelated { subject: String },
    #[error("the chain is longer than {max} certificates")]
    ChainTooLong { max: usize },
    #[error("cannot sign with this CA: {0}")]
    Signing(String),
    #[error(
        "a test certificate signed by this CA does not verify against the chain's root {root} ({reason}); check the chain's signatures, validity dates, key usages and name constraints"
    )]
    DoesNotVerify { root: String, reason: String },
}
