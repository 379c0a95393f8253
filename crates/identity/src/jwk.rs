//! A root as the SPIFFE bundle format publishes it: one JSON Web Key per root certificate,
//! `use: "x509-svid"`, the certificate in `x5c` and its public key's parameters (`kty`, and
//! `crv`/`x`/`y` for EC or `n`/`e` for RSA), never a `kid` (the X.509-SVID spec, 6.1).
//!
//! Only the values: the control plane writes the JSON. Sans-I/O like the rest of the crate.

use crate::error::IdentityError;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

/// The key type and its public parameters, base64url without padding as JWK has them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyParams {
    Ec {
        crv: &'static str,
        x: String,
        y: String,
    },
    Rsa {
        n: String,
        e: String,
    },
}

/// One `x509-svid` entry of a SPIFFE bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct X509SvidKey {
    pub params: KeyParams,
    /// The root certificate, DER in standard base64 (RFC 7517 `x5c`).
    pub x5c: String,
}

const P256: &str = "1.2.840.10045.3.1.7";
const P384: &str = "1.3.132.0.34";
const P521: &str = "1.3.132.0.35";

/// The JWK of a root certificate (DER).
pub fn x509_svid_key(cert_der: &[u8]) -> Result<X509SvidKey, IdentityError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|_| IdentityError::BundleKey {
        subject: "(unparsable)".into(),
        reason: "it is not an X.509 certificate",
    })?;
    let refuse = |reason| IdentityError::BundleKey {
        subject: cert.subject().to_string(),
        reason,
    };
    let spki = cert.public_key();
    let params = match spki.parsed() {
        Ok(PublicKey::EC(point)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string());
            let (crv, size) = match curve.as_deref() {
                Some(P256) => ("P-256", 32),
                Some(P384) => ("P-384", 48),
                Some(P521) => ("P-521", 66),
                _ => return Err(refuse("its elliptic curve is not P-256, P-384 or P-521")),
            };
            let data = point.data();
            if data.len() != 1 + 2 * size || data[0] != 4 {
                return Err(refuse("its EC point is not an uncompressed point"));
            }
            KeyParams::Ec {
                crv,
                x: URL_SAFE_NO_PAD.encode(&data[1..=size]),
                y: URL_SAFE_NO_PAD.encode(&data[1 + size..]),
            }
        }
        Ok(PublicKey::RSA(rsa)) => KeyParams::Rsa {
            n: URL_SAFE_NO_PAD.encode(unsigned(rsa.modulus)),
            e: URL_SAFE_NO_PAD.encode(unsigned(rsa.exponent)),
        },
        _ => return Err(refuse("its key is neither EC nor RSA")),
    };
    Ok(X509SvidKey {
        params,
        x5c: STANDARD.encode(cert_der),
    })
}

/// A big-endian integer without its leading zero bytes (JWK's base64urlUInt).
fn unsigned(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn a_generated_root_is_an_ec_p256_key_with_its_certificate() {
        let ca = crate::Ca::generate("td", SystemTime::now()).unwrap();
        let key = x509_svid_key(ca.cert_der()).unwrap();
        assert_eq!(STANDARD.decode(&key.x5c).unwrap(), ca.cert_der().to_vec());
        let KeyParams::Ec { crv, x, y } = key.params else {
            panic!("not EC: {:?}", key.params)
        };
        assert_eq!(crv, "P-256");
        assert_eq!(URL_SAFE_NO_PAD.decode(x).unwrap().len(), 32);
        assert_eq!(URL_SAFE_NO_PAD.decode(y).unwrap().len(), 32);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(x509_svid_key(b"not a certificate").is_err());
        assert!(x509_svid_key(&[]).is_err());
        assert_eq!(unsigned(&[0, 0, 1, 0]), &[1, 0]);
        assert_eq!(unsigned(&[0]), &[] as &[u8]);
    }
}
