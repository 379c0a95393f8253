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

/// The path segment under which the mesh names its own components. Every identity under
/// `spiffe://<td>/bulkhead` belongs to the mesh: the control plane issues those to itself
/// ([`crate::Ca::issue_local`]) and no workload can obtain one ([`crate::Ca::sign_csr`]
/// refuses them).
pub const RESERVED_SEGMENT: &str = "bulkhead";

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

    /// Whether this identity belongs to the mesh itself: its path is `/bulkhead` or under it.
    pub fn is_reserved(&self) -> bool {
        let path = &self.path()[1..];
        path == RESERVED_SEGMENT
            || path
                .strip_prefix(RESERVED_SEGMENT)
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// What a reserved identity is for, in words; `None` if it is not reserved.
    pub fn reserved_for(&self) -> Option<&'static str> {
        if !self.is_reserved() {
            return None;
        }
        Some(match &self.path()[1 + RESERVED_SEGMENT.len()..] {
            "/control" => {
                "the control plane's own identity, which proxies and the CLI trust as the control plane"
            }
            "/admin" => "the admin credential, which may change policy and mint join tokens",
            _ => "reserved for the mesh's own components",
        })
    }

    /// Refuses an identity the mesh reserves, saying what it is for and what to use instead.
    pub fn refuse_reserved(&self) -> Result<(), IdentityError> {
        match self.reserved_for() {
            Some(purpose) => Err(IdentityError::Reserved {
                id: self.to_string(),
                trust_domain: self.trust_domain().to_string(),
                purpose,
            }),
            None => Ok(()),
        }
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
    fn the_mesh_reserves_everything_under_its_own_segment() {
        for reserved in [
            "spiffe://td/bulkhead",
            "spiffe://td/bulkhead/control",
            "spiffe://td/bulkhead/admin",
            "spiffe://td/bulkhead/anything/deeper",
        ] {
            let id = SpiffeId::parse(reserved).unwrap();
            assert!(id.is_reserved(), "{reserved}");
            assert!(id.reserved_for().is_some(), "{reserved}");
        }
        assert!(
            SpiffeId::parse("spiffe://td/bulkhead/admin")
                .unwrap()
                .reserved_for()
                .unwrap()
                .contains("admin credential")
        );
        for workload in [
            "spiffe://td/ns/bulkhead/sa/admin",
            "spiffe://td/bulkheads/admin",
            "spiffe://td/bulkhead-x",
            "spiffe://bulkhead/ns/a/sa/b",
        ] {
            let id = SpiffeId::parse(workload).unwrap();
            assert!(!id.is_reserved(), "{workload}");
            assert_eq!(id.reserved_for(), None);
        }
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
