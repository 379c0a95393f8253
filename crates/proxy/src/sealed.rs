//! The proxy's own credential on disk, so that a proxy killed and started again with the same
//! command rejoins by itself: its private key and certificate chain, in a file only its own
//! user can read (0600), rewritten atomically at every renewal.
//!
//! On start, a proxy with an unexpired credential renews with it over mTLS (Identity.Renew:
//! the same path as its periodic renewal, for its own identity and instance), and only falls
//! back to the join token when the file is missing, expired or refused. The join token stays
//! single-use: restarts never widen it. `bulkhead revoke proxy INSTANCE` (or `revoke
//! identity`) makes the file useless at once.
//!
//! A file readable by anyone else, or owned by another user, is refused: its key may have
//! been read. The proxy says so and does not start; the operator deletes the file and revokes
//! the instance the header names.
//!
//! One credential is one running proxy: the file is claimed with an exclusive lock on
//! `<credential>.lock` (held until the process ends, so a `kill -9` releases it), and a
//! second proxy started with the same token file while the first runs is refused, naming the
//! first one's pid, instead of rejoining as the same instance.

use crate::ProxyError;
use bulkhead_identity::Svid;
use bulkhead_policy::model::ResourceName;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const KEY_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const KEY_END: &str = "-----END PRIVATE KEY-----";

/// Where the credential is kept, claimed by this process for as long as it runs.
#[derive(Clone, Debug)]
pub(crate) struct Sealed {
    pub path: PathBuf,
    /// The locked `<credential>.lock`; the lock goes with the last clone (or the process).
    _claim: std::sync::Arc<std::fs::File>,
}

/// A credential read back.
pub(crate) struct Stored {
    pub svid: Svid,
    pub workload: ResourceName,
    pub instance: String,
}

fn err(path: &Path, message: String) -> ProxyError {
    ProxyError::Credential {
        path: path.to_path_buf(),
        message,
    }
}

impl Sealed {
    /// Claims the credential at `path` for this process, or says which process holds it.
    pub(crate) fn claim(path: &Path) -> Result<Sealed, ProxyError> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| {
                err(
                    &lock_path,
                    format!("cannot open the credential's lock: {e}"),
                )
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("another bulkhead-proxy (pid {pid})"),
                };
                return Err(err(
                    path,
                    format!(
                        "{holder} is running with this credential; one credential is one proxy. Give this proxy its own token file (`bulkhead token create`), or stop the other one first"
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(err(&lock_path, format!("cannot lock it: {e}")));
            }
        }
        // Who holds it, for the next one's error.
        let _ = file.set_len(0);
        let _ = write!(file, "{}", std::process::id());
        Ok(Sealed {
            path: path.to_path_buf(),
            _claim: std::sync::Arc::new(file),
        })
    }

    /// Reads the credential, if there is one. A file others can read, or owned by another
    /// user, or that does not parse, is an error that names what to do.
    pub(crate) fn load(&self) -> Result<Option<Stored>, ProxyError> {
        let path = &self.path;
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(path, format!("cannot read it: {e}"))),
        };
        let mode = meta.permissions().mode() & 0o777;
        // The owner of /proc/self is this process's effective user.
        let me = std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .map_err(|e| {
                err(
                    path,
                    format!("cannot tell which user this proxy runs as: {e}"),
                )
            })?;
        if mode & 0o077 != 0 || meta.uid() != me {
            return Err(err(
                path,
                format!(
                    "it is mode {mode:o} and owned by uid {} (this proxy runs as uid {me}): someone else may have read its private key. Delete it, revoke the instance its header names (`bulkhead revoke proxy INSTANCE`), and start the proxy with a new join token",
                    meta.uid()
                ),
            ));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| err(path, format!("cannot read it: {e}")))?;
        let header = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        let (namespace, name) = header("workload")
            .split_once('/')
            .map(|(n, w)| (n.to_string(), w.to_string()))
            .ok_or_else(|| err(path, "its header names no workload; delete it".into()))?;
        let key_pem = match (text.find(KEY_BEGIN), text.find(KEY_END)) {
            (Some(a), Some(b)) if a < b => &text[a..b + KEY_END.len()],
            _ => return Err(err(path, "it holds no private key; delete it".into())),
        };
        let svid = Svid::from_pem(&text, key_pem).map_err(|e| {
            err(
                path,
                format!("it does not hold a usable credential ({e}); delete it"),
            )
        })?;
        Ok(Some(Stored {
            svid,
            workload: ResourceName { namespace, name },
            instance: header("instance"),
        }))
    }

    /// Writes the credential: a new file made 0600, synced, then renamed over the old one, so
    /// a crash leaves the old credential or the new one, never half of either.
    pub(crate) fn store(
        &self,
        svid: &Svid,
        workload: &ResourceName,
        instance: &str,
    ) -> Result<(), ProxyError> {
        let path = &self.path;
        let (certs, key) = svid.to_pem();
        let text = format!(
            "# bulkhead-proxy credential: this proxy's own key and certificate, to rejoin after a restart.\n# Never copy it elsewhere; `bulkhead revoke proxy {instance}` disables it.\n# identity: {}\n# workload: {workload}\n# instance: {instance}\n{key}{certs}",
            svid.id()
        );
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(path, format!("cannot write it: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "bulkhead-sealed-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("orders.token.credential")
    }

    #[test]
    fn a_credential_round_trips_only_while_only_its_owner_can_read_it() {
        let now = SystemTime::now();
        let ca = bulkhead_identity::Ca::generate("td", now).unwrap();
        let id = bulkhead_identity::SpiffeId::parse("spiffe://td/ns/shop/sa/orders").unwrap();
        let svid = ca.issue_local(&id, Duration::from_secs(3600), now).unwrap();
        let sealed = Sealed::claim(&temp("rt")).unwrap();
        assert!(sealed.load().unwrap().is_none(), "no file yet");
        let workload = ResourceName {
            namespace: "shop".into(),
            name: "orders".into(),
        };
        sealed.store(&svid, &workload, "0a1b2c3d4e5f").unwrap();
        let mode = std::fs::metadata(&sealed.path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let back = sealed.load().unwrap().unwrap();
        assert_eq!(back.svid.id(), svid.id());
        assert_eq!(back.svid.serial(), svid.serial());
        assert_eq!(back.workload, workload);
        assert_eq!(back.instance, "0a1b2c3d4e5f");
        // A second store replaces it whole.
        sealed.store(&svid, &workload, "0a1b2c3d4e5f").unwrap();
        assert!(!sealed.path.with_extension("tmp").exists());

        std::fs::set_permissions(&sealed.path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = sealed.load().err().unwrap().to_string();
        assert!(
            refused.contains("mode 644") && refused.contains("bulkhead revoke proxy"),
            "{refused}"
        );
        std::fs::write(&sealed.path, "# workload: shop/orders\nnot pem\n").unwrap();
        std::fs::set_permissions(&sealed.path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let refused = sealed.load().err().unwrap().to_string();
        assert!(refused.contains("holds no private key"), "{refused}");
        let _ = std::fs::remove_dir_all(sealed.path.parent().unwrap());
    }

    #[test]
    fn one_credential_is_claimed_by_one_proxy_at_a_time() {
        let path = temp("claim");
        let first = Sealed::claim(&path).unwrap();
        let second = Sealed::claim(&path).err().unwrap().to_string();
        assert!(
            second.contains(&format!(
                "another bulkhead-proxy (pid {}) is running with this credential",
                std::process::id()
            )) && second.contains("its own token file"),
            "{second}"
        );
        // Clones share the claim; it goes with the last one.
        let clone = first.clone();
        drop(first);
        assert!(Sealed::claim(&path).is_err(), "a clone still holds it");
        drop(clone);
        Sealed::claim(&path).unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
