//! The control plane's data directory: the CA, the admin credential and its context file.
//!
//! ```text
//! DATA_DIR/ca.pem       root certificate (the trust bundle)          0644
//! DATA_DIR/ca.key       root private key                              0600
//! DATA_DIR/admin.pem    admin SVID chain, re-issued at each start     0600
//! DATA_DIR/admin.key    admin private key                             0600
//! DATA_DIR/admin.yaml   where the CLI finds the server and the above  0600
//! DATA_DIR/state.redb   tokens, bindings, policies                    0600
//! ```

use crate::error::ControlError;
use bulkhead_api::channel::ADMIN_ID_PATH;
use bulkhead_identity::{Ca, SpiffeId};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub const CONTEXT_FILE: &str = "admin.yaml";
const ADMIN_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// What the CLI needs to reach the control plane as an admin. Written by the control plane.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminContext {
    pub server: SocketAddr,
    pub trust_domain: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

pub(crate) struct DataDir {
    path: PathBuf,
    pub(crate) ca: Ca,
}

impl DataDir {
    pub(crate) fn open(path: &Path, trust_domain: &str) -> Result<DataDir, ControlError> {
        let io = |source| ControlError::DataDir {
            path: path.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io)?;
        let path = std::fs::canonicalize(path).map_err(io)?;
        let (cert, key) = (path.join("ca.pem"), path.join("ca.key"));
        let ca = if cert.exists() || key.exists() {
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|source| ControlError::DataDir {
                    path: p.to_path_buf(),
                    source,
                })
            };
            let ca = Ca::from_pem(&read(&cert)?, &read(&key)?).map_err(|source| {
                ControlError::CaFiles {
                    path: path.clone(),
                    source,
                }
            })?;
            if ca.trust_domain() != trust_domain {
                return Err(ControlError::TrustDomainMismatch {
                    path,
                    found: ca.trust_domain().to_string(),
                    wanted: trust_domain.to_string(),
                });
            }
            tracing::info!(dir = %path.display(), "loaded root CA");
            ca
        } else {
            let ca = Ca::generate(trust_domain, SystemTime::now())?;
            write_file(&key, ca.key_pem().as_bytes(), 0o600)?;
            write_file(&cert, ca.cert_pem().as_bytes(), 0o644)?;
            tracing::info!(dir = %path.display(), trust_domain, "created a new root CA");
            ca
        };
        Ok(DataDir { path, ca })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Issues a fresh admin credential and writes the context file that points at it.
    pub(crate) fn write_admin_context(&self, server: SocketAddr) -> Result<PathBuf, ControlError> {
        let id = SpiffeId::parse(&format!(
            "spiffe://{}{ADMIN_ID_PATH}",
            self.ca.trust_domain()
        ))?;
        let admin = self
            .ca
            .issue_local(&id, ADMIN_LIFETIME, SystemTime::now())?;
        let (chain, key) = admin.to_pem();
        let (cert_file, key_file) = (self.path.join("admin.pem"), self.path.join("admin.key"));
        write_file(&key_file, key.as_bytes(), 0o600)?;
        write_file(&cert_file, chain.as_bytes(), 0o600)?;
        // A wildcard listen address is not dialable; the CLI on this host uses loopback.
        let server = match server.ip().is_unspecified() {
            true => SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), server.port()),
            false => server,
        };
        let ctx = AdminContext {
            server,
            trust_domain: self.ca.trust_domain().to_string(),
            ca_file: self.path.join("ca.pem"),
            cert_file,
            key_file,
        };
        let yaml = serde_saphyr::to_string(&ctx).map_err(|e| ControlError::DataDir {
            path: self.path.join(CONTEXT_FILE),
            source: std::io::Error::other(e.to_string()),
        })?;
        let file = self.path.join(CONTEXT_FILE);
        write_file(&file, yaml.as_bytes(), 0o600)?;
        Ok(file)
    }
}

/// Writes `bytes` to `path` atomically (temp file + rename) with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ControlError> {
    let io = |source| ControlError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
