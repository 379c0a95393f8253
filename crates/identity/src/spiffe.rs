//! SPIFFE IDs as the SPIFFE ID specification defines them.

use crate::error::IdentityError;
use std::fmt;

/// A validated SPIFFE ID: `spiffe://<trust-domain>/<path>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the path starts (the '/' after the trust domain).
    path_at: usize,
}

const MAX_LEN: usize = 2048;

impl SpiffeId {
    /// Parses per the SPIFFE ID spec: lowercase trust domain of `[a-z0-9.-_]`, path segments of
    /// `[a-zA-Z0-9.-_]`, no empty, `.` or `..` segments, no trailing slash, no query, fragment,
    /// port or user info. A workload ID must have a path.
    pub fn parse(s: &str) -> Result<SpiffeId, IdentityError> {
        let bad = |reason| IdentityError::InvalidId {
            id: s.chars().take(200).collect(),
            reason,
        };
        if s.len() > MAX_LEN {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("scheme must be spiffe://"))?;
        let (domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if domain.is_empty() {
            return Err(bad("trust domain is empty"));
        }
        if !domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(bad(
                "trust domain may hold only lowercase letters, digits, '.', '-' and '_'",
            ));
        }
        if path.is_empty() {
            return Err(bad("a workload SPIFFE ID needs a path"));
        }
        for seg in path[1..].split('/') {
            if seg.is_empty() {
                return Err(bad("path has an empty segment or a trailing slash"));
            }
            if seg == "." || seg == ".." {
                return Err(bad("path has a '.' or '..' segment"));
            }
            if !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(bad(
                    "path segments may hold only letters, digits, '.', '-' and '_'",
                ));
            }
        }
        Ok(SpiffeId {
            id: s.to_string(),
            path_at: "spiffe://".len() + domain.len(),
        })
    }

    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub fn for_service_account(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, IdentityError> {
        SpiffeId::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    pub fn trust_domain(&self) -> &str {
        &self.id["spiffe://".len()..self.path_at]
    }

    pub fn path(&self) -> &str {
        &self.id[self.path_at..]
    }

    /// The namespace, if the path has the Kubernetes shape `/ns/<ns>/sa/<sa>`.
    pub fn namespace(&self) -> Option<&str> {
        let mut segs = self.path()[1..].split('/');
        match (
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(_), None) => Some(ns),
            _ => None,
        }
    }

    /// The service account, if the path has the shape `/ns/<ns>/sa/<sa>`.
    pub fn service_account(&self) -> Option<&str> {
        self.namespace()?;
        self.path().rsplit('/').next()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        let id = SpiffeId::parse("spiffe://bulkhead.local/ns/shop/sa/orders").unwrap();
        assert_eq!(id.trust_domain(), "bulkhead.local");
        assert_eq!(id.path(), "/ns/shop/sa/orders");
        assert_eq!(id.namespace(), Some("shop"));
        assert_eq!(id.service_account(), Some("orders"));
        let other = SpiffeId::parse("spiffe://td/bulkhead/control").unwrap();
        assert_eq!(other.namespace(), None);
    }

    #[test]
    fn invalid_ids() {
        for bad in [
            "http://td/x",
            "spiffe://",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://TD/x",
            "spiffe://td/a//b",
            "spiffe://td/a/",
            "spiffe://td/./a",
            "spiffe://td/../a",
            "spiffe://td/a?b",
            "spiffe://td/a#b",
            "spiffe://td:80/a",
            "spiffe://u@td/a",
            "spiffe://td/a b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} must be refused");
        }
        assert!(SpiffeId::parse(&format!("spiffe://td/{}", "a".repeat(2100))).is_err());
    }
}
