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
}

/// Failures of the identity machinery itself (signing, key handling, configuration).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    InvalidId { id: String, reason: &'static str },
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
    #[error("this credential is bound to {bound}; it cannot be used to obtain {requested}")]
    IdentityMismatch { bound: String, requested: String },
    #[error("could not sign certificate: {0}")]
    Signing(String),
    #[error("could not load CA from PEM: {0}")]
    CaLoad(String),
    #[error("issued certificate does not fit the local key or is not a valid SVID: {0}")]
    IssuedCert(String),
    #[error("trust bundle is empty or unreadable: {0}")]
    Bundle(String),
    #[error("TLS configuration failed: {0}")]
    Tls(String),
}
