//! The control plane's JWT-SVID signing key: made at the first start, kept in
//! `DATA_DIR/jwt-svid.key` (PKCS#8 PEM, 0600) beside the CA keys, and never sent anywhere.
//! Proxies receive only its public half (`TrustBundle.jwt_keys`) and ask
//! `Identity.SignJwtSvid` for a token of their own identity.
//!
//! It rotates with the CA set: when another CA starts signing (`ca switch`), a new JWT key
//! replaces it, and the old key's public half stays in the bundle until every token it
//! signed has expired ([`LIFETIME`] and the validators' leeway), so no valid token fails.
//!
//! With replicas on etcd the key is one for all: it travels with the CA files, sealed like
//! the CA keys (`store/etcd_ca.rs`), so a token fetched through one replica validates at
//! every replica's sidecars, and a rotation on one replica is taken up by the others.

use crate::error::ControlError;
use base64::Engine;
use bulkhead_api::v1 as pb;
use bulkhead_identity::jwt::JwtKey;
#[cfg(test)]
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// How long a JWT-SVID is valid (at most the X.509-SVID lifetime).
pub(crate) const LIFETIME: Duration = Duration::from_secs(300);
/// Its file in the data directory (with replicas on etcd, also sealed in etcd's CA files).
pub(crate) const FILE: &str = "jwt-svid.key";
const MAX_AUDIENCES: usize = 8;
const MAX_AUDIENCE_LEN: usize = 256;

/// The key that signs, and the one it replaced while that one's tokens may be valid.
pub(crate) struct Keys {
    pub(crate) current: std::sync::Arc<JwtKey>,
    previous: Option<(bulkhead_identity::jwt::JwtPublicKey, u64)>,
}

impl Keys {
    pub(crate) fn new(current: JwtKey) -> Keys {
        Keys {
            current: std::sync::Arc::new(current),
            previous: None,
        }
    }

    /// The public keys a validator needs at `now_unix`: the current one, and the previous
    /// one until its last token has expired.
    pub(crate) fn public(&self, now_unix: u64) -> Vec<bulkhead_identity::jwt::JwtPublicKey> {
        let mut keys = vec![self.current.public_jwk()];
        if let Some((old, until)) = &self.previous
            && now_unix < *until
        {
            keys.push(old.clone());
        }
        keys
    }

    /// A new signing key, kept in `dir`; the current one's public half is kept for its
    /// tokens' lifetime.
    pub(crate) fn rotate(&self, dir: &Path, now_unix: u64) -> Result<Keys, ControlError> {
        let key = JwtKey::generate()?;
        store(dir, &key)?;
        tracing::info!(
            kid = key.kid(),
            previous = self.current.kid(),
            "rotated the JWT-SVID signing key with the CA"
        );
        Ok(Keys {
            current: std::sync::Arc::new(key),
            previous: Some((
                self.current.public_jwk(),
                now_unix + LIFETIME.as_secs() + 60,
            )),
        })
    }
}

impl Keys {
    /// With replicas on etcd: the key another replica made (its `ca switch`), written into
    /// `dir` from etcd, taken up as the signing key; the current one's public half is kept
    /// for its tokens' lifetime. `None` if `dir` holds the current key.
    pub(crate) fn take_up(&self, dir: &Path, now_unix: u64) -> Result<Option<Keys>, ControlError> {
        let key = load_or_create(dir)?;
        if key.kid() == self.current.kid() {
            return Ok(None);
        }
        tracing::info!(
            kid = key.kid(),
            previous = self.current.kid(),
            "took up the JWT-SVID signing key another replica rotated with the CA"
        );
        Ok(Some(Keys {
            current: std::sync::Arc::new(key),
            previous: Some((
                self.current.public_jwk(),
                now_unix + LIFETIME.as_secs() + 60,
            )),
        }))
    }
}

/// Loads the key, or makes and keeps one.
pub(crate) fn load_or_create(dir: &Path) -> Result<JwtKey, ControlError> {
    let path = dir.join(FILE);
    let fail = |source: std::io::Error| ControlError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(pem) => {
            let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            let der = base64::engine::general_purpose::STANDARD
                .decode(body.trim())
                .map_err(|e| fail(std::io::Error::other(format!("not a PEM key: {e}"))))?;
            Ok(JwtKey::from_pkcs8(&der)?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = JwtKey::generate()?;
            store(dir, &key)?;
            tracing::info!(kid = key.kid(), "made the JWT-SVID signing key");
            Ok(key)
        }
        Err(e) => Err(fail(e)),
    }
}

/// Writes `key` to `DATA_DIR/jwt-svid.key` (0600), atomically.
fn store(dir: &Path, key: &JwtKey) -> Result<(), ControlError> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(key.pkcs8_der());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    crate::datadir::write_file(&dir.join(FILE), pem.as_bytes(), 0o600)
}

/// A JWT public key (ours or a federated domain's) as proxies receive it.
pub(crate) fn wire_public(jwk: &bulkhead_identity::jwt::JwtPublicKey) -> pb::JwtPublicKey {
    pb::JwtPublicKey {
        kid: jwk.kid.clone(),
        x: jwk.x.clone(),
        y: jwk.y.clone(),
    }
}

/// 1 to 8 audiences, each 1 to 256 printable ASCII characters.
pub(crate) fn check_audience(audience: &[String]) -> Result<(), String> {
    if audience.is_empty() || audience.len() > MAX_AUDIENCES {
        return Err(format!(
            "a JWT-SVID needs 1 to {MAX_AUDIENCES} audiences; {} given",
            audience.len()
        ));
    }
    for a in audience {
        if a.is_empty() || a.len() > MAX_AUDIENCE_LEN || !a.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "audience {a:?}: 1 to {MAX_AUDIENCE_LEN} printable characters, no spaces"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_rotated_key_keeps_the_old_one_for_its_tokens_lifetime_only() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap().kid(), first.kid());
        let keys = Keys::new(first);
        let old = keys.current.kid().to_string();
        let next = keys.rotate(dir.path(), 1_000).unwrap();
        assert_ne!(next.current.kid(), old);
        assert_eq!(
            load_or_create(dir.path()).unwrap().kid(),
            next.current.kid()
        );
        let kids = |at| {
            next.public(at)
                .into_iter()
                .map(|k| k.kid)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kids(1_000),
            vec![next.current.kid().to_string(), old.clone()]
        );
        assert_eq!(
            kids(1_000 + LIFETIME.as_secs() + 60),
            vec![next.current.kid().to_string()]
        );
    }

    #[test]
    fn audiences_are_bounded() {
        assert!(check_audience(&["orders".into()]).is_ok());
        assert!(check_audience(&[]).is_err());
        assert!(check_audience(&["".into()]).is_err());
        assert!(check_audience(&["a b".into()]).is_err());
        assert!(check_audience(&vec!["a".to_string(); 9]).is_err());
    }
}
