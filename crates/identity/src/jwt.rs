//! JWT-SVIDs (the SPIFFE JWT-SVID spec): a compact JWS signed ES256 (P-256) whose `sub` is
//! the SPIFFE ID, with `aud` and a short `exp`; the key is named by `kid`, and published in
//! a JWT bundle (a JWK Set of `use: "jwt-svid"` keys).
//!
//! [`JwtKey`] signs (it lives only in the control plane, beside the CA set); [`JwtBundle`]
//! validates. Sans-I/O: the caller stores the key and gives the time.

use crate::error::IdentityError;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bulkhead_spiffe::SpiffeId;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A JWT-SVID longer than this is refused unread.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

/// A JWT signing key (ECDSA P-256, ES256) and its key ID.
pub struct JwtKey {
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
    kid: String,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey").field("kid", &self.kid).finish()
    }
}

impl JwtKey {
    /// A new key.
    pub fn generate() -> Result<JwtKey, IdentityError> {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|e| IdentityError::Signing(format!("generating the JWT key: {e}")))?;
        JwtKey::from_pkcs8(doc.as_ref())
    }

    /// A key from its PKCS#8 DER (as [`JwtKey::pkcs8_der`] gave it).
    pub fn from_pkcs8(der: &[u8]) -> Result<JwtKey, IdentityError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|e| IdentityError::Signing(format!("the JWT key does not load: {e}")))?;
        // The key ID: the first 16 bytes of the public key's SHA-256, base64url.
        let digest = Sha256::digest(pair.public_key().as_ref());
        let kid = URL_SAFE_NO_PAD.encode(&digest[..16]);
        Ok(JwtKey {
            pair,
            pkcs8: der.to_vec(),
            kid,
        })
    }

    /// The private key, PKCS#8 DER: for the control plane's data directory only.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWT bundle's key: `kty`, `crv`, `x`, `y`, `kid`, `use`.
    pub fn public_jwk(&self) -> JwtPublicKey {
        let point = self.pair.public_key().as_ref();
        // Uncompressed: 0x04 || x || y.
        JwtPublicKey {
            kid: self.kid.clone(),
            x: URL_SAFE_NO_PAD.encode(point.get(1..33).unwrap_or_default()),
            y: URL_SAFE_NO_PAD.encode(point.get(33..65).unwrap_or_default()),
        }
    }

    /// Signs a JWT-SVID for `sub` with `audience` (at least one), valid from `now` for
    /// `lifetime`.
    pub fn sign_svid(
        &self,
        sub: &SpiffeId,
        audience: &[String],
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<String, IdentityError> {
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(IdentityError::Signing(
                "a JWT-SVID needs at least one audience, none empty".into(),
            ));
        }
        let iat = unix(now);
        let header = serde_json::json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let claims = serde_json::json!({
            "sub": sub.as_str(),
            "aud": audience,
            "iat": iat,
            "exp": iat + lifetime.as_secs().max(1),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|e| IdentityError::Signing(format!("signing the JWT-SVID: {e}")))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        ))
    }
}

/// A `jwt-svid` key of a JWT bundle (EC P-256).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtPublicKey {
    pub kid: String,
    pub x: String,
    pub y: String,
}

impl JwtPublicKey {
    /// The JWK as a SPIFFE bundle carries it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "use": "jwt-svid",
            "kty": "EC",
            "crv": "P-256",
            "kid": self.kid,
            "x": self.x,
            "y": self.y,
        })
    }

    /// Reads a JWK: `kty: EC`, `crv: P-256`, a `kid`, `x` and `y` of 32 bytes each.
    pub fn from_json(jwk: &serde_json::Value) -> Result<JwtPublicKey, String> {
        let field = |k: &str| {
            jwk.get(k)
                .and_then(|v| v.as_str())
                .ok_or_else(|| format!("a jwt-svid key has no {k}"))
        };
        if field("kty")? != "EC" || field("crv")? != "P-256" {
            return Err("only EC P-256 jwt-svid keys are supported".into());
        }
        let key = JwtPublicKey {
            kid: field("kid")?.to_string(),
            x: field("x")?.to_string(),
            y: field("y")?.to_string(),
        };
        key.point()?;
        Ok(key)
    }

    fn point(&self) -> Result<Vec<u8>, String> {
        let x = URL_SAFE_NO_PAD.decode(&self.x).map_err(|e| e.to_string())?;
        let y = URL_SAFE_NO_PAD.decode(&self.y).map_err(|e| e.to_string())?;
        if x.len() != 32 || y.len() != 32 || self.kid.is_empty() {
            return Err("a jwt-svid key needs a kid and 32-byte x and y".into());
        }
        Ok([&[4u8][..], &x, &y].concat())
    }
}

/// The JWT keys of one trust domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwtBundle {
    keys: BTreeMap<String, JwtPublicKey>,
}

/// What a valid JWT-SVID says.
#[derive(Clone, Debug, PartialEq)]
pub struct JwtClaims {
    pub sub: SpiffeId,
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl JwtBundle {
    pub fn new(keys: impl IntoIterator<Item = JwtPublicKey>) -> JwtBundle {
        JwtBundle {
            keys: keys.into_iter().map(|k| (k.kid.clone(), k)).collect(),
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &JwtPublicKey> {
        self.keys.values()
    }

    /// The bundle as a JWK Set document.
    pub fn to_jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": self.keys.values().map(JwtPublicKey::to_json).collect::<Vec<_>>(),
        })
    }

    /// Validates a JWT-SVID: ES256 by a key of this bundle (by `kid`), `sub` a SPIFFE ID
    /// in `trust_domain`, `audience` among its `aud`, not expired at `now`.
    pub fn validate(
        &self,
        token: &str,
        audience: &str,
        trust_domain: &str,
        now: SystemTime,
    ) -> Result<JwtClaims, String> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(format!("the token is over {MAX_TOKEN_BYTES} bytes"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a compact JWS (three base64url parts)".into());
        };
        let json = |part: &str,
                    what: &str|
         -> Result<serde_json::Map<String, serde_json::Value>, String> {
            let bytes = URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|e| format!("the {what} is not base64url: {e}"))?;
            match serde_json::from_slice(&bytes) {
                Ok(serde_json::Value::Object(m)) => Ok(m),
                _ => Err(format!("the {what} is not a JSON object")),
            }
        };
        let header = json(h, "header")?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("ES256") {
            return Err("only alg ES256 is accepted".into());
        }
        let kid = header
            .get("kid")
            .and_then(|k| k.as_str())
            .ok_or("the header names no kid")?;
        let key = self
            .keys
            .get(kid)
            .ok_or_else(|| format!("no key {kid:?} in the JWT bundle of {trust_domain}"))?;
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|e| format!("the signature is not base64url: {e}"))?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.point()?)
            .verify(format!("{h}.{c}").as_bytes(), &sig)
            .map_err(|_| "the signature does not verify".to_string())?;
        let claims = json(c, "claims")?;
        let sub = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .ok_or("no sub claim")?;
        let sub = SpiffeId::parse(sub).map_err(|e| format!("sub: {e}"))?;
        if sub.trust_domain() != trust_domain {
            return Err(format!("sub {sub} is not in trust domain {trust_domain}"));
        }
        let auds: Vec<&str> = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => vec![a.as_str()],
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => return Err("no aud claim".into()),
        };
        if !auds.contains(&audience) {
            return Err(format!("audience {audience:?} is not among {auds:?}"));
        }
        let now = unix(now);
        let exp = claims
            .get("exp")
            .and_then(|e| e.as_u64())
            .ok_or("no exp claim")?;
        if exp + LEEWAY_SECS <= now {
            return Err("the token has expired".into());
        }
        if let Some(nbf) = claims.get("nbf").and_then(|n| n.as_u64())
            && nbf > now + LEEWAY_SECS
        {
            return Err("the token is not valid yet".into());
        }
        Ok(JwtClaims { sub, claims })
    }
}

/// The trust domain of a token's `sub`, read without checking anything: only to choose the
/// bundle [`JwtBundle::validate`] then checks it against (which checks `sub` again).
pub fn subject_trust_domain(token: &str) -> Option<String> {
    if token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let claims = URL_SAFE_NO_PAD.decode(token.split('.').nth(1)?).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&claims).ok()?;
    let sub = SpiffeId::parse(claims.get("sub")?.as_str()?).ok()?;
    Some(sub.trust_domain().to_string())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_signed_svid_validates_for_its_audience_only() {
        let key = JwtKey::generate().unwrap();
        let again = JwtKey::from_pkcs8(key.pkcs8_der()).unwrap();
        assert_eq!(again.kid(), key.kid());
        let bundle = JwtBundle::new([key.public_jwk()]);
        let parsed = JwtPublicKey::from_json(&bundle.to_jwks()["keys"][0]).unwrap();
        assert_eq!(parsed, key.public_jwk());
        let id = SpiffeId::parse("spiffe://td/ns/shop/sa/orders").unwrap();
        let now = SystemTime::now();
        let token = key
            .sign_svid(&id, &["payments".into()], now, Duration::from_secs(300))
            .unwrap();
        let ok = bundle.validate(&token, "payments", "td", now).unwrap();
        assert_eq!(ok.sub, id);
        assert!(
            bundle
                .validate(&token, "other", "td", now)
                .unwrap_err()
                .contains("audience")
        );
        assert!(
            bundle
                .validate(&token, "payments", "elsewhere", now)
                .is_err()
        );
        let later = now + Duration::from_secs(400);
        assert!(
            bundle
                .validate(&token, "payments", "td", later)
                .unwrap_err()
                .contains("expired")
        );
        // Another key's bundle, or a tampered token: refused.
        let stranger = JwtBundle::new([JwtKey::generate().unwrap().public_jwk()]);
        assert!(stranger.validate(&token, "payments", "td", now).is_err());
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged_claims = URL_SAFE_NO_PAD.encode(
            serde_json::json!({"sub": "spiffe://td/admin", "aud": ["payments"], "exp": unix(now) + 300}).to_string(),
        );
        parts[1] = &forged_claims;
        assert!(
            bundle
                .validate(&parts.join("."), "payments", "td", now)
                .unwrap_err()
                .contains("signature")
        );
        assert!(
            key.sign_svid(&id, &[], now, Duration::from_secs(1))
                .is_err()
        );
    }
}
