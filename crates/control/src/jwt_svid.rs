//! The control plane's JWT-SVID signing key: made at the first start, kept in
//! `DATA_DIR/jwt-svid.key` (PKCS#8 PEM, 0600) beside the CA keys, and never sent anywhere.
//! Proxies receive only its public half (`TrustBundle.jwt_keys`) and ask
//! `Identity.SignJwtSvid` for a token of their own identity.

use crate::error::ControlError;
use base64::Engine;
use bulkhead_api::v1 as pb;
use bulkhead_identity::jwt::JwtKey;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// How long a JWT-SVID is valid (at most the X.509-SVID lifetime).
pub(crate) const LIFETIME: Duration = Duration::from_secs(300);
const FILE: &str = "jwt-svid.key";
const MAX_AUDIENCES: usize = 8;
const MAX_AUDIENCE_LEN: usize = 256;

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
            let b64 = base64::engine::general_purpose::STANDARD.encode(key.pkcs8_der());
            let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
            for chunk in b64.as_bytes().chunks(64) {
                pem.push_str(&String::from_utf8_lossy(chunk));
                pem.push('\n');
            }
            pem.push_str("-----END PRIVATE KEY-----\n");
            let tmp = dir.join(format!("{FILE}.tmp"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(fail)?;
            f.write_all(pem.as_bytes()).map_err(fail)?;
            f.sync_all().map_err(fail)?;
            std::fs::rename(&tmp, &path).map_err(fail)?;
            tracing::info!(kid = key.kid(), "made the JWT-SVID signing key");
            Ok(key)
        }
        Err(e) => Err(fail(e)),
    }
}

/// The public key as proxies receive it.
pub(crate) fn wire_key(key: &JwtKey) -> pb::JwtPublicKey {
    wire_public(&key.public_jwk())
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
