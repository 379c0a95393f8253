//! Join tokens: `bhj.<id>.<secret>`. Only a SHA-256 of the secret is stored; a token is bound
//! to one SPIFFE ID and one workload, expires, and has a use limit.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bulkhead_identity::SpiffeId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const PREFIX: &str = "bhj";

/// What the store keeps for a token. The secret itself is never stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TokenRecord {
    pub secret_sha256: String,
    pub spiffe_id: SpiffeId,
    pub namespace: String,
    pub workload: String,
    pub expires_unix: u64,
    pub uses_left: u32,
}

/// Why a token was not accepted. The text goes back to the caller, so it names no secret.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    #[error(
        "join token is malformed (expected bhj.<id>.<secret>, as printed by `bulkhead token create`)"
    )]
    Malformed,
    #[error("join token is not known to this control plane")]
    Unknown,
    #[error("join token expired; create a new one with `bulkhead token create`")]
    Expired,
    #[error("join token has been used up; create a new one with `bulkhead token create`")]
    UsedUp,
}

/// A new token: its id, the secret's hash for storage, and the full token for the user.
pub(crate) fn mint() -> (String, String, String) {
    // Never starting with '-': `bulkhead token delete ID` would read it as a flag.
    let id = loop {
        let id = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 12]>());
        if !id.starts_with('-') {
            break id;
        }
    };
    let secret = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let hash = hash(&secret);
    let token = format!("{PREFIX}.{id}.{secret}");
    (id, hash, token)
}

/// Splits a token into id and secret.
pub(crate) fn parse(token: &str) -> Result<(&str, &str), TokenError> {
    let mut parts = token.trim().split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(PREFIX), Some(id), Some(secret), None) if !id.is_empty() && !secret.is_empty() => {
            Ok((id, secret))
        }
        _ => Err(TokenError::Malformed),
    }
}

pub(crate) fn hash(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The rules of redeeming, the same in every store: the stored `record` (if any) must hold
/// the presented secret's hash, be unexpired and have a use left; then `issue` acts on it,
/// and only if it succeeds is one use spent. The caller writes the returned record back in
/// the transaction it read it in.
pub(crate) fn spend<T, E: From<TokenError>>(
    record: Option<TokenRecord>,
    secret_hash: &str,
    now_unix: u64,
    issue: impl FnOnce(&TokenRecord) -> Result<T, E>,
) -> Result<(TokenRecord, T), E> {
    let mut record = match record {
        Some(r) if same_hash(&r.secret_sha256, secret_hash) => r,
        _ => return Err(TokenError::Unknown.into()),
    };
    if now_unix >= record.expires_unix {
        return Err(TokenError::Expired.into());
    }
    if record.uses_left == 0 {
        return Err(TokenError::UsedUp.into());
    }
    let issued = issue(&record)?;
    record.uses_left -= 1;
    Ok((record, issued))
}

/// Compares two hex digests without an early exit.
pub(crate) fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_token_parses_and_hashes_back() {
        let (id, h, token) = mint();
        let (pid, secret) = parse(&token).unwrap();
        assert_eq!(pid, id);
        assert!(same_hash(&hash(secret), &h));
        assert!(!same_hash(&hash("other"), &h));
        assert!(!token.contains(&h));
    }

    #[test]
    fn token_ids_never_read_as_flags() {
        // One in 64 base64url ids starts with '-'; 2,000 draws miss that with odds 1e-14.
        assert!((0..2_000).all(|_| !mint().0.starts_with('-')));
    }

    #[test]
    fn malformed_tokens() {
        for t in ["", "bhj", "bhj..x", "xyz.a.b", "bhj.a.b.c"] {
            assert_eq!(parse(t), Err(TokenError::Malformed), "{t}");
        }
    }
}
