//! The matchable values of a rule: identities, methods, paths. Each parses from the string an
//! operator writes and serializes back to that same string.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Which source identities a rule accepts.
///
/// `spiffe://td/ns/shop/sa/orders` matches exactly; a trailing `/*` (`spiffe://td/ns/shop/*`)
/// matches every identity below that path; `spiffe://td/*` matches the whole trust domain;
/// a lone `*` matches any authenticated identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum IdentityPattern {
    Any,
    Exact(String),
    /// Stored with the trailing slash: `spiffe://td/ns/shop/`.
    Prefix(String),
}

impl IdentityPattern {
    pub fn matches(&self, id: &str) -> bool {
        match self {
            IdentityPattern::Any => true,
            IdentityPattern::Exact(e) => e == id,
            IdentityPattern::Prefix(p) => id.starts_with(p.as_str()),
        }
    }
}

impl TryFrom<String> for IdentityPattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "*" {
            return Ok(IdentityPattern::Any);
        }
        let Some(rest) = s.strip_prefix("spiffe://") else {
            return Err(format!(
                "identity {s:?} must start with \"spiffe://\" (e.g. spiffe://bulkhead.local/ns/shop/sa/orders), or be \"*\""
            ));
        };
        let (body, prefix) = match rest.strip_suffix("/*") {
            Some(b) => (b, true),
            None => (rest, false),
        };
        if body.is_empty() || body.contains('*') {
            return Err(format!(
                "identity {s:?}: \"*\" is allowed only as a whole final segment (spiffe://td/ns/shop/*)"
            ));
        }
        let (domain, path) = body.split_once('/').unwrap_or((body, ""));
        let domain_ok = domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if domain.is_empty() || !domain_ok {
            return Err(format!(
                "identity {s:?}: the trust domain must be lowercase letters, digits, '.', '-' or '_'"
            ));
        }
        let path_ok = path.is_empty()
            || path.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            });
        if !path_ok {
            return Err(format!(
                "identity {s:?}: path segments must be non-empty letters, digits, '.', '-' or '_'"
            ));
        }
        if !prefix && path.is_empty() {
            return Err(format!(
                "identity {s:?} names a trust domain, not a workload; write \"spiffe://{domain}/*\" to match the whole trust domain"
            ));
        }
        Ok(if prefix {
            IdentityPattern::Prefix(format!("spiffe://{body}/"))
        } else {
            IdentityPattern::Exact(s)
        })
    }
}

impl From<IdentityPattern> for String {
    fn from(p: IdentityPattern) -> String {
        p.to_string()
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityPattern::Any => f.write_str("*"),
            IdentityPattern::Exact(e) => f.write_str(e),
            IdentityPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// An HTTP method, upper case. Unknown tokens are refused rather than never matching.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Method(String);

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

impl Method {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Method {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let upper = s.to_ascii_uppercase();
        if METHODS.contains(&upper.as_str()) {
            Ok(Method(upper))
        } else {
            Err(format!(
                "unknown HTTP method {s:?}; expected one of {}",
                METHODS.join(", ")
            ))
        }
    }
}

impl From<Method> for String {
    fn from(m: Method) -> String {
        m.0
    }
}

/// An HTTP path: exact (`/charge`), or a prefix ending in `*` (`/orders/*`, `/*`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
}

impl PathPattern {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(e) => e == path,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

impl TryFrom<String> for PathPattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!("path {s:?} must start with '/'"));
        }
        match s.strip_suffix('*') {
            Some(p) if !p.contains('*') => Ok(PathPattern::Prefix(p.to_string())),
            None if !s.contains('*') => Ok(PathPattern::Exact(s)),
            _ => Err(format!(
                "path {s:?}: '*' is allowed only at the end (a prefix such as /orders/*)"
            )),
        }
    }
}

impl From<PathPattern> for String {
    fn from(p: PathPattern) -> String {
        p.to_string()
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Exact(e) => f.write_str(e),
            PathPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Result<IdentityPattern, String> {
        IdentityPattern::try_from(s.to_string())
    }

    #[test]
    fn identity_forms() {
        let exact = id("spiffe://td/ns/a/sa/b").unwrap();
        assert!(exact.matches("spiffe://td/ns/a/sa/b"));
        assert!(!exact.matches("spiffe://td/ns/a/sa/bb"));
        let ns = id("spiffe://td/ns/a/*").unwrap();
        assert!(ns.matches("spiffe://td/ns/a/sa/b"));
        assert!(!ns.matches("spiffe://td/ns/ab/sa/b"));
        let domain = id("spiffe://td/*").unwrap();
        assert!(domain.matches("spiffe://td/ns/a/sa/b"));
        assert!(!domain.matches("spiffe://tdx/ns/a/sa/b"));
        assert!(id("*").unwrap().matches("spiffe://x/y"));
        for bad in [
            "orders",
            "spiffe://",
            "spiffe://td",
            "spiffe://TD/x",
            "spiffe://td/a*",
            "spiffe://td//x",
            "spiffe://td/../x",
        ] {
            assert!(id(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(ns.to_string(), "spiffe://td/ns/a/*");
    }

    #[test]
    fn path_forms() {
        let p = PathPattern::try_from("/orders/*".to_string()).unwrap();
        assert!(p.matches("/orders/1"));
        assert!(!p.matches("/order"));
        let e = PathPattern::try_from("/charge".to_string()).unwrap();
        assert!(e.matches("/charge") && !e.matches("/charge/x"));
        assert!(PathPattern::try_from("charge".to_string()).is_err());
        assert!(PathPattern::try_from("/a*/b".to_string()).is_err());
    }

    #[test]
    fn methods() {
        assert_eq!(Method::try_from("get".to_string()).unwrap().as_str(), "GET");
        assert!(Method::try_from("FETCH".to_string()).is_err());
    }
}
