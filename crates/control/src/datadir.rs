//! The control plane's data directory: the CAs, the admin credential and its context file.
//!
//! ```text
//! DATA_DIR/ca.pem           the trust bundle: every root not retired; proxies join with it  0644
//! DATA_DIR/cas.json         the CA set: each CA's state and history (no secret)             0644
//! DATA_DIR/cas/<id>.pem     a CA's certificate, then its chain up to the root               0644
//! DATA_DIR/cas/<id>.key     its private key, deleted when the CA is retired                 0600
//! DATA_DIR/ca.key           the key of the root made at first start, until it is retired    0600
//! DATA_DIR/admin.pem        admin SVID chain, re-issued at each start and CA switch         0600
//! DATA_DIR/admin.key        admin private key                                               0600
//! DATA_DIR/admin.yaml       where the CLI finds the server and the above (and /metrics)     0600
//! DATA_DIR/state.redb       tokens, bindings, policies                                      0600
//! ```
//!
//! A data directory from before the CA set (only `ca.pem` and `ca.key`) is taken over as is:
//! its root becomes the active CA. Keys are read and written here and nowhere else.

use crate::cas::{CaFile, CaOrigin, CaRecord, CaSet, CaState, Member, short};
use crate::error::ControlError;
use crate::proxies::unix_now;
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
const BUNDLE_FILE: &str = "ca.pem";
const LEGACY_KEY_FILE: &str = "ca.key";
const CA_SET_FILE: &str = "cas.json";
const CA_DIR: &str = "cas";

/// What the CLI needs to reach the control plane as an admin. Written by the control plane.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminContext {
    pub server: SocketAddr,
    pub trust_domain: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Where the control plane serves `/metrics`, when it does (`--metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

pub(crate) struct DataDir {
    path: PathBuf,
}

impl DataDir {
    /// Opens (or initialises) the directory and loads the CA set, recording that the signing
    /// CA is used with `svid_lifetime`.
    pub(crate) fn open(
        path: &Path,
        trust_domain: &str,
        svid_lifetime: Duration,
    ) -> Result<(DataDir, CaSet), ControlError> {
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
        let dir = DataDir { path };
        let set = if dir.file(CA_SET_FILE).exists() {
            dir.load(trust_domain)?
        } else if dir.file(BUNDLE_FILE).exists() || dir.file(LEGACY_KEY_FILE).exists() {
            dir.take_over_legacy(trust_domain)?
        } else {
            dir.initialise(trust_domain)?
        };
        let set = set.with_lifetime(svid_lifetime).unwrap_or(set);
        dir.save(&set)?;
        Ok((dir, set))
    }

    /// Reads the CA set again from the files (written by another replica), recording that
    /// the signing CA is used with `svid_lifetime`.
    pub(crate) fn reload(
        &self,
        trust_domain: &str,
        svid_lifetime: Duration,
    ) -> Result<CaSet, ControlError> {
        let set = self.load(trust_domain)?;
        Ok(set.with_lifetime(svid_lifetime).unwrap_or(set))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self, relative: &str) -> PathBuf {
        self.path.join(relative)
    }

    fn read(&self, relative: &str) -> Result<String, ControlError> {
        let path = self.file(relative);
        std::fs::read_to_string(&path).map_err(|source| ControlError::DataDir { path, source })
    }

    fn ca_files_error(&self, source: bulkhead_identity::IdentityError) -> ControlError {
        ControlError::CaFiles {
            path: self.path.clone(),
            source,
        }
    }

    fn set_error(&self, e: crate::cas::CaChangeError) -> ControlError {
        ControlError::CaSet {
            path: self.file(CA_SET_FILE),
            message: e.to_string(),
        }
    }

    fn load(&self, trust_domain: &str) -> Result<CaSet, ControlError> {
        let text = self.read(CA_SET_FILE)?;
        let file: CaFile = serde_json::from_str(&text).map_err(|e| ControlError::CaSet {
            path: self.file(CA_SET_FILE),
            message: e.to_string(),
        })?;
        if file.trust_domain != trust_domain {
            return Err(ControlError::TrustDomainMismatch {
                path: self.path.clone(),
                found: file.trust_domain,
                wanted: trust_domain.to_string(),
            });
        }
        let mut members = Vec::new();
        for record in file.cas {
            let certs = self.read(&record.cert_file)?;
            if record.state == CaState::Retired {
                // A retired CA keeps its certificates for the record; its key must be gone
                // (a crash may have come between the record and the deletion).
                self.delete_key(&record);
                use rustls::pki_types::{CertificateDer, pem::PemObject};
                let certs = CertificateDer::pem_slice_iter(certs.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ControlError::CaSet {
                        path: self.file(&record.cert_file),
                        message: e.to_string(),
                    })?;
                let (Some(cert), Some(root)) = (certs.first(), certs.last()) else {
                    return Err(ControlError::CaSet {
                        path: self.file(&record.cert_file),
                        message: "no certificate".into(),
                    });
                };
                members.push(Member {
                    cert: cert.clone(),
                    root: root.clone(),
                    ca: None,
                    record,
                });
                continue;
            }
            let key = self.read(&record.key_file)?;
            let ca = Ca::load(trust_domain, &certs, &key).map_err(|e| self.ca_files_error(e))?;
            if ca.fingerprint() != record.sha256 {
                return Err(ControlError::CaSet {
                    path: self.file(&record.cert_file),
                    message: format!(
                        "holds CA {}, but {CA_SET_FILE} records {}",
                        short(&ca.fingerprint()),
                        short(&record.sha256)
                    ),
                });
            }
            members.push(Member::new(record, ca));
        }
        let set = CaSet::new(trust_domain, members).map_err(|e| self.set_error(e))?;
        tracing::info!(
            dir = %self.path.display(),
            signing_ca = short(&set.active().fingerprint()),
            roots = set.bundle().roots().len(),
            "loaded the CA set"
        );
        Ok(set)
    }

    /// A directory from before the CA set: `ca.pem` is its one root and `ca.key` its key.
    fn take_over_legacy(&self, trust_domain: &str) -> Result<CaSet, ControlError> {
        let ca = Ca::from_pem(&self.read(BUNDLE_FILE)?, &self.read(LEGACY_KEY_FILE)?)
            .map_err(|e| self.ca_files_error(e))?;
        if ca.trust_domain() != trust_domain {
            return Err(ControlError::TrustDomainMismatch {
                path: self.path.clone(),
                found: ca.trust_domain().to_string(),
                wanted: trust_domain.to_string(),
            });
        }
        let cert_file = self.write_ca_cert(&ca)?;
        tracing::info!(dir = %self.path.display(), ca = short(&ca.fingerprint()), "took over the root CA as the first of the CA set");
        self.first_set(trust_domain, ca, cert_file, LEGACY_KEY_FILE.into())
    }

    fn initialise(&self, trust_domain: &str) -> Result<CaSet, ControlError> {
        let ca = Ca::generate(trust_domain, SystemTime::now())?;
        write_file(&self.file(LEGACY_KEY_FILE), ca.key_pem().as_bytes(), 0o600)?;
        let cert_file = self.write_ca_cert(&ca)?;
        tracing::info!(dir = %self.path.display(), trust_domain, ca = short(&ca.fingerprint()), "created a new root CA");
        self.first_set(trust_domain, ca, cert_file, LEGACY_KEY_FILE.into())
    }

    fn first_set(
        &self,
        trust_domain: &str,
        ca: Ca,
        cert_file: String,
        key_file: String,
    ) -> Result<CaSet, ControlError> {
        let now = unix_now();
        let record = CaRecord {
            sha256: ca.fingerprint(),
            state: CaState::Active,
            origin: CaOrigin::Generated,
            cert_file,
            key_file,
            added_unix: now,
            activated_unix: now,
            deactivated_unix: 0,
            retired_unix: 0,
            longest_svid_lifetime_secs: 0,
        };
        CaSet::new(trust_domain, vec![Member::new(record, ca)]).map_err(|e| self.set_error(e))
    }

    fn write_ca_cert(&self, ca: &Ca) -> Result<String, ControlError> {
        self.ca_dir()?;
        let cert_file = format!("{CA_DIR}/{}.pem", short(&ca.fingerprint()));
        write_file(&self.file(&cert_file), ca.certs_pem().as_bytes(), 0o644)?;
        Ok(cert_file)
    }

    fn ca_dir(&self) -> Result<(), ControlError> {
        let dir = self.file(CA_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| ControlError::DataDir { path: dir, source })
    }

    /// Writes a new CA's certificates and key (0600); returns the member to add, not yet
    /// recorded in the set.
    pub(crate) fn store_new_ca(&self, ca: Ca, origin: CaOrigin) -> Result<Member, ControlError> {
        let cert_file = self.write_ca_cert(&ca)?;
        let key_file = format!("{CA_DIR}/{}.key", short(&ca.fingerprint()));
        write_file(&self.file(&key_file), ca.key_pem().as_bytes(), 0o600)?;
        let record = CaRecord {
            sha256: ca.fingerprint(),
            state: CaState::Trusted,
            origin,
            cert_file,
            key_file,
            added_unix: unix_now(),
            activated_unix: 0,
            deactivated_unix: 0,
            retired_unix: 0,
            longest_svid_lifetime_secs: 0,
        };
        Ok(Member::new(record, ca))
    }

    /// Records `set` (`cas.json`) and writes its bundle to `ca.pem`, each atomically.
    pub(crate) fn save(&self, set: &CaSet) -> Result<(), ControlError> {
        let json = serde_json::to_string_pretty(&set.file()).map_err(|e| ControlError::CaSet {
            path: self.file(CA_SET_FILE),
            message: e.to_string(),
        })?;
        write_file(&self.file(CA_SET_FILE), json.as_bytes(), 0o644)?;
        write_file(
            &self.file(BUNDLE_FILE),
            set.bundle().to_pem().as_bytes(),
            0o644,
        )
    }

    /// Deletes a retired CA's key. A failure is logged, not fatal: the CA is out of the
    /// bundle either way, and the next start tries again.
    pub(crate) fn delete_key(&self, record: &CaRecord) {
        let path = self.file(&record.key_file);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(ca = short(&record.sha256), file = %path.display(), "deleted the retired CA's key");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(ca = short(&record.sha256), file = %path.display(), error = %e, "could not delete the retired CA's key; delete it by hand");
            }
        }
    }

    /// Issues a fresh admin credential from `ca` (`admin.pem`, `admin.key`).
    pub(crate) fn write_admin_credential(&self, ca: &Ca) -> Result<(), ControlError> {
        let id = SpiffeId::parse(&format!("spiffe://{}{ADMIN_ID_PATH}", ca.trust_domain()))?;
        let admin = ca.issue_local(&id, ADMIN_LIFETIME, SystemTime::now())?;
        let (chain, key) = admin.to_pem();
        write_file(&self.file("admin.key"), key.as_bytes(), 0o600)?;
        write_file(&self.file("admin.pem"), chain.as_bytes(), 0o600)
    }

    /// Issues a fresh admin credential and writes the context file that points at it (and
    /// at the metrics listener, if there is one).
    pub(crate) fn write_admin_context(
        &self,
        ca: &Ca,
        server: SocketAddr,
        metrics: Option<SocketAddr>,
    ) -> Result<PathBuf, ControlError> {
        self.write_admin_credential(ca)?;
        let ctx = AdminContext {
            server: dialable(server),
            metrics: metrics.map(dialable),
            trust_domain: ca.trust_domain().to_string(),
            ca_file: self.file(BUNDLE_FILE),
            cert_file: self.file("admin.pem"),
            key_file: self.file("admin.key"),
        };
        let yaml = serde_saphyr::to_string(&ctx).map_err(|e| ControlError::DataDir {
            path: self.file(CONTEXT_FILE),
            source: std::io::Error::other(e.to_string()),
        })?;
        let file = self.file(CONTEXT_FILE);
        write_file(&file, yaml.as_bytes(), 0o600)?;
        Ok(file)
    }
}

/// A wildcard listen address is not dialable; a client on this host uses loopback.
fn dialable(addr: SocketAddr) -> SocketAddr {
    match addr.ip().is_unspecified() {
        true => SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port()),
        false => addr,
    }
}

/// Writes `bytes` to `path` atomically (temp file + rename) with `mode`.
pub(crate) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ControlError> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const HOUR: Duration = Duration::from_secs(3600);

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "bulkhead-datadir-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_ca_set_survives_a_restart_and_retired_keys_are_deleted() {
        let path = temp_dir("restart");
        let (dir, set) = DataDir::open(&path, "td.test", HOUR).unwrap();
        let first = set.active().fingerprint();
        assert_eq!(mode(&path.join("ca.key")), 0o600);
        assert_eq!(
            std::fs::read_to_string(path.join("ca.pem")).unwrap(),
            set.bundle().to_pem()
        );

        let member = dir
            .store_new_ca(
                Ca::generate("td.test", SystemTime::now()).unwrap(),
                CaOrigin::Generated,
            )
            .unwrap();
        let second = member.record.sha256.clone();
        assert_eq!(mode(&dir.file(&member.record.key_file)), 0o600);
        let set = set.with_added(member).unwrap();
        let set = set.with_switched(&second, unix_now(), HOUR).unwrap();
        let (set, retired) = set.with_retired(&first, unix_now(), true).unwrap();
        dir.save(&set).unwrap();
        dir.delete_key(&retired);
        assert!(
            !path.join("ca.key").exists(),
            "the retired root's key is gone"
        );

        let (_, again) = DataDir::open(&path, "td.test", HOUR).unwrap();
        assert_eq!(again.active().fingerprint(), second);
        assert_eq!(again.bundle().roots().len(), 1);
        assert_eq!(again.members().len(), 2);
        let ca_pem = std::fs::read_to_string(path.join("ca.pem")).unwrap();
        assert_eq!(ca_pem, again.bundle().to_pem());

        let err = DataDir::open(&path, "other.test", HOUR).err().unwrap();
        assert!(
            matches!(err, ControlError::TrustDomainMismatch { .. }),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&path);
    }

    #[test]
    fn a_directory_from_before_the_ca_set_is_taken_over() {
        let path = temp_dir("legacy");
        std::fs::create_dir_all(&path).unwrap();
        let ca = Ca::generate("td.test", SystemTime::now()).unwrap();
        std::fs::write(path.join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(path.join("ca.key"), ca.key_pem()).unwrap();
        let (_, set) = DataDir::open(&path, "td.test", HOUR).unwrap();
        assert_eq!(set.active().fingerprint(), ca.fingerprint());
        assert!(path.join("cas.json").exists());
        let (_, again) = DataDir::open(&path, "td.test", HOUR).unwrap();
        assert_eq!(again.active().fingerprint(), ca.fingerprint());
        let _ = std::fs::remove_dir_all(&path);
    }
}
