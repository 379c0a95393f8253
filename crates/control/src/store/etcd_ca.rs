//! The CA set shared by replicas on etcd, so that any replica can sign: the data
//! directory's CA files (`cas.json`, `ca.pem`, each CA's certificates and, but for retired
//! CAs, its private key, and the JWT-SVID signing key) as one etcd value, `/bulkhead/ca/files`, written whole in one put.
//!
//! Private keys are sealed with AES-256-GCM under the secret key every replica is given
//! (`--etcd-secret-key-file`, 32 random bytes), a fresh random 96-bit nonce per seal, the
//! file's name as associated data (a sealed key cannot be passed off as another file). A key
//! is never written to etcd in clear; whoever reads etcd without the secret key learns the
//! certificates and the set's history, which are public anyway. A replica started with
//! another secret key cannot open them and refuses to start, naming the flag.
//!
//! It must never put a key in etcd unsealed, and never log a key or the secret key.

use crate::error::ControlError;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The etcd key that holds the CA files.
pub(crate) fn files_key() -> String {
    format!("{}ca/files", super::etcd::PREFIX)
}

/// The secret key CA keys are sealed under in etcd. Never printed.
pub struct SecretKey(LessSafeKey);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// Reads exactly 32 bytes from `path` (`head -c 32 /dev/urandom > FILE`), a file no
    /// other user may read.
    pub fn from_file(path: &Path) -> Result<SecretKey, ControlError> {
        let bad = |message: String| ControlError::SecretKey {
            path: path.to_path_buf(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad(format!(
                "it is readable by others (mode {:o}); chmod 600 it",
                meta.permissions().mode() & 0o777
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        if bytes.len() != 32 {
            return Err(bad(format!(
                "it holds {} bytes, not 32; make one with `head -c 32 /dev/urandom > FILE` and give every replica the same file",
                bytes.len()
            )));
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| bad("AES-256-GCM refused the key".into()))?;
        Ok(SecretKey(LessSafeKey::new(key)))
    }

    fn seal(&self, name: &str, plain: &[u8]) -> String {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut sealed = plain.to_vec();
        // Sealing with a 32-byte key and a fresh nonce cannot fail but for a message over
        // 64 GiB; a CA key is a few hundred bytes.
        let _ = self.0.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(name.as_bytes()),
            &mut sealed,
        );
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&sealed);
        STANDARD.encode(out)
    }

    fn open(&self, name: &str, sealed: &str) -> Option<Vec<u8>> {
        let raw = STANDARD.decode(sealed).ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = rest.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

/// One file of the data directory as etcd keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Stored {
    /// Certificates and the set's record: public.
    Clear { text: String },
    /// A private key: nonce, ciphertext and tag, base64.
    Sealed { aes256gcm: String },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Files {
    files: BTreeMap<String, Stored>,
}

/// The files of `set` in `dir`, keys sealed: the record, the bundle, each CA's certificates,
/// the key of each CA not retired, and the JWT-SVID signing key.
pub(crate) fn collect(
    dir: &Path,
    set: &crate::cas::CaFile,
    secret: &SecretKey,
) -> Result<Files, ControlError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| ControlError::DataDir { path, source })
    };
    let mut files = BTreeMap::new();
    for name in ["cas.json", "ca.pem"] {
        let text = String::from_utf8_lossy(&read(name)?).into_owned();
        files.insert(name.to_string(), Stored::Clear { text });
    }
    for record in &set.cas {
        let text = String::from_utf8_lossy(&read(&record.cert_file)?).into_owned();
        files.insert(record.cert_file.clone(), Stored::Clear { text });
        if record.state != crate::cas::CaState::Retired {
            let key = read(&record.key_file)?;
            files.insert(
                record.key_file.clone(),
                Stored::Sealed {
                    aes256gcm: secret.seal(&record.key_file, &key),
                },
            );
        }
    }
    // The JWT-SVID signing key, one for every replica, sealed like the CA keys.
    let jwt = crate::jwt_svid::FILE;
    if dir.join(jwt).exists() {
        let key = read(jwt)?;
        files.insert(
            jwt.to_string(),
            Stored::Sealed {
                aes256gcm: secret.seal(jwt, &key),
            },
        );
    }
    Ok(Files { files })
}

/// The short id of a CA the data directory `dir` already records (`cas.json`) that the
/// shared set does not hold, if any: its key would be overwritten by taking the shared set.
pub(crate) fn foreign_cas(dir: &Path, shared: &Files) -> Option<String> {
    let ours: crate::cas::CaFile =
        serde_json::from_slice(&std::fs::read(dir.join("cas.json")).ok()?).ok()?;
    let theirs: crate::cas::CaFile = match shared.files.get("cas.json") {
        Some(Stored::Clear { text }) => serde_json::from_str(text).ok()?,
        _ => return None,
    };
    ours.cas
        .iter()
        .find(|o| !theirs.cas.iter().any(|t| t.sha256 == o.sha256))
        .map(|o| crate::cas::short(&o.sha256))
}

impl Files {
    /// Whether it holds the file `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.files.contains_key(name)
    }

    pub(crate) fn to_json(&self) -> String {
        // Strings only: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub(crate) fn from_json(json: &[u8]) -> Result<Files, ControlError> {
        serde_json::from_slice(json).map_err(|e| ControlError::Store {
            path: PathBuf::from(files_key()),
            message: format!("the CA files in etcd are unreadable: {e}"),
        })
    }

    /// Writes every file into `dir` (keys 0600, the rest 0644), opening sealed keys with
    /// `secret`. Refuses, writing nothing, if any key does not open or any name leaves
    /// the directory.
    pub(crate) fn write_into(&self, dir: &Path, secret: &SecretKey) -> Result<(), ControlError> {
        let mut out = Vec::new();
        for (name, stored) in &self.files {
            let safe = !name.is_empty()
                && !name.starts_with('/')
                && name
                    .split('/')
                    .all(|p| !p.is_empty() && p != "." && p != "..");
            if !safe {
                return Err(ControlError::Store {
                    path: PathBuf::from(files_key()),
                    message: format!(
                        "the CA files in etcd name {name:?}, outside the data directory"
                    ),
                });
            }
            match stored {
                Stored::Clear { text } => out.push((name, text.as_bytes().to_vec(), 0o644)),
                Stored::Sealed { aes256gcm } => match secret.open(name, aes256gcm) {
                    Some(key) => out.push((name, key, 0o600)),
                    None => {
                        return Err(ControlError::SecretKey {
                            path: PathBuf::from("--etcd-secret-key-file"),
                            message: format!(
                                "the CA key {name} in etcd does not open with it: every replica must be given the same secret key file as the replica that stored the CA set"
                            ),
                        });
                    }
                },
            }
        }
        for (name, bytes, mode) in out {
            let path = dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| ControlError::DataDir {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            crate::datadir::write_file(&path, &bytes, mode)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path, bytes: &[u8]) -> PathBuf {
        let path = dir.join("secret.key");
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    #[test]
    fn a_sealed_key_opens_only_with_its_secret_and_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let secret = SecretKey::from_file(&key_file(dir.path(), &[7; 32])).unwrap();
        let sealed = secret.seal("cas/a.key", b"-----BEGIN PRIVATE KEY-----");
        assert!(!sealed.contains("PRIVATE"));
        assert_eq!(
            secret.open("cas/a.key", &sealed).as_deref(),
            Some(&b"-----BEGIN PRIVATE KEY-----"[..])
        );
        assert_eq!(secret.open("cas/b.key", &sealed), None);
        let other = SecretKey::from_file(&key_file(dir.path(), &[8; 32])).unwrap();
        assert_eq!(other.open("cas/a.key", &sealed), None);
        // Two seals of one key differ (a fresh nonce each time).
        assert_ne!(
            sealed,
            secret.seal("cas/a.key", b"-----BEGIN PRIVATE KEY-----")
        );
    }

    #[test]
    fn a_secret_key_file_must_be_32_private_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let short = SecretKey::from_file(&key_file(dir.path(), &[1; 16])).unwrap_err();
        assert!(
            short.to_string().contains("holds 16 bytes, not 32"),
            "{short}"
        );
        let path = key_file(dir.path(), &[1; 32]);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let open = SecretKey::from_file(&path).unwrap_err();
        assert!(open.to_string().contains("chmod 600"), "{open}");
    }
}
