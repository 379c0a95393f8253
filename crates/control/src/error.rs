use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the control plane could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "CA files in {path} are unusable ({source}); restore them from backup or move the directory aside to start a new trust domain"
    )]
    CaFiles {
        path: PathBuf,
        source: bulkhead_identity::IdentityError,
    },
    #[error(
        "data directory {path} belongs to trust domain {found:?}, not {wanted:?}; pass --trust-domain {found} or use another --data-dir"
    )]
    TrustDomainMismatch {
        path: PathBuf,
        found: String,
        wanted: String,
    },
    #[error("the CA set in {path} is unusable ({message}); restore the data directory from backup")]
    CaSet { path: PathBuf, message: String },
    #[error("identity: {0}")]
    Identity(#[from] bulkhead_identity::IdentityError),
    #[error("store {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error(
        "the disk holding {path} is full ({detail}); nothing was written. Free space on it and try again: the control plane carries on without a restart"
    )]
    DiskFull { path: PathBuf, detail: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write the Prometheus file_sd file {path}: {source}")]
    SdFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "etcd at {endpoints} did not answer ({message}); nothing was written. Check that a majority of the etcd members is up and reachable from this replica (etcdctl endpoint health), then try again"
    )]
    Etcd { endpoints: String, message: String },
    /// `--etcd` and its TLS options cannot be used as given (nothing was dialled).
    #[error("--etcd {endpoints}: {message}; nothing was started")]
    EtcdOptions { endpoints: String, message: String },
    #[error("the secret key file {path} cannot seal the CA keys kept in etcd: {message}")]
    SecretKey { path: PathBuf, message: String },
    #[error("server stopped: {0}")]
    Serve(String),
    /// The web console's options cannot be served as given (issue 21).
    #[error("console: {0}")]
    Console(String),
    /// The `--federation` file cannot be used as written.
    #[error("federation file {path}: {message}")]
    Federation { path: PathBuf, message: String },
}

/// An ID the control plane builds for itself that does not parse is an identity error, as it
/// was when `SpiffeId::parse` returned one.
impl From<bulkhead_identity::SpiffeIdError> for ControlError {
    fn from(e: bulkhead_identity::SpiffeIdError) -> ControlError {
        ControlError::Identity(e.into())
    }
}
