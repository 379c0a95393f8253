//! SPIFFE IDs as the SPIFFE ID specification defines them: the one grammar every crate of the
//! mesh reads identities with. Nothing else in the workspace takes a `spiffe://` string apart.
//!
//! `spiffe://<trust-domain><path>`: a trust domain of lowercase letters, digits, `.`, `-` and
//! `_` (at most 255 bytes); a path of `/`-separated segments of letters, digits, `.`, `-` and
//! `_`, none empty, `.` or `..`, no trailing slash; no port, user info, query or fragment (their
//! characters are not in the grammar); at most 2048 bytes in all. A workload's ID
//! ([`SpiffeId`]) has a path; the trust domain's own ID (`spiffe://td`) has none, and only
//! [`parse_parts`] takes it, for prefixes such as a policy's `spiffe://td/*`.
//!
//! Pure: no I/O; nothing allocated but the strings it returns.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// The scheme every SPIFFE ID starts with.
pub const SCHEME: &str = "spiffe://";

/// The most bytes a SPIFFE ID may have, scheme included.
pub const MAX_ID_LEN: usize = 2048;

/// The most bytes a trust domain name may have.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// The rule of the grammar a string breaks, each with its own variant; the text
/// ([`Rule::reason`]) is what operators read in refusals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// More than [`MAX_ID_LEN`] bytes.
    TooLong,
    /// Does not start with `spiffe://`.
    Scheme,
    /// Nothing between `spiffe://` and the path.
    EmptyTrustDomain,
    /// A trust domain of more than [`MAX_TRUST_DOMAIN_LEN`] bytes.
    TrustDomainTooLong,
    /// A trust domain character outside `[a-z0-9._-]` (upper case, `:port`, `user@`…).
    TrustDomainChar,
    /// A workload ID without a path.
    NoPath,
    /// `//` in the path, or a trailing `/`.
    EmptySegment,
    /// A `.` or `..` segment.
    DotSegment,
    /// A path character outside `[a-zA-Z0-9._-]` (a space, `?`, `#`, `%`…), or a path that
    /// does not start with `/`.
    PathChar,
    /// A path where a trust domain's own ID (`spiffe://td`) was expected.
    NotTrustDomainId,
}

impl Rule {
    /// The rule broken, in words.
    pub fn reason(self) -> &'static str {
        match self {
            Rule::TooLong => "longer than 2048 bytes",
            Rule::Scheme => "scheme must be spiffe://",
            Rule::EmptyTrustDomain => "trust domain is empty",
            Rule::TrustDomainTooLong => "trust domain is longer than 255 bytes",
            Rule::TrustDomainChar => {
                "trust domain may hold only lowercase letters, digits, '.', '-' and '_'"
            }
            Rule::NoPath => "a workload SPIFFE ID needs a path",
            Rule::EmptySegment => "path has an empty segment or a trailing slash",
            Rule::DotSegment => "path has a '.' or '..' segment",
            Rule::PathChar => "path segments may hold only letters, digits, '.', '-' and '_'",
            Rule::NotTrustDomainId => "a trust domain's own ID has no path",
        }
    }

    /// Whether the trust domain is what is wrong (rather than the path or the whole).
    pub fn is_trust_domain(self) -> bool {
        matches!(
            self,
            Rule::EmptyTrustDomain | Rule::TrustDomainTooLong | Rule::TrustDomainChar
        )
    }

    /// Whether a path segment is what is wrong.
    pub fn is_path(self) -> bool {
        matches!(self, Rule::EmptySegment | Rule::DotSegment | Rule::PathChar)
    }
}

/// A string that is not a SPIFFE ID (or trust domain, or path): what it was (its first 200
/// characters) and the rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeIdError {
    input: String,
    rule: Rule,
}

impl SpiffeIdError {
    fn new(input: &str, rule: Rule) -> SpiffeIdError {
        SpiffeIdError {
            input: input.chars().take(200).collect(),
            rule,
        }
    }

    pub fn rule(&self) -> Rule {
        self.rule
    }

    /// The refused string, cut to its first 200 characters.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// The rule broken, in words.
    pub fn reason(&self) -> &'static str {
        self.rule.reason()
    }
}

/// `invalid SPIFFE ID "<input>": <reason>`.
impl fmt::Display for SpiffeIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid SPIFFE ID {:?}: {}",
            self.input,
            self.rule.reason()
        )
    }
}

impl std::error::Error for SpiffeIdError {}

fn check_trust_domain(name: &str) -> Result<(), Rule> {
    if name.is_empty() {
        return Err(Rule::EmptyTrustDomain);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
    {
        return Err(Rule::TrustDomainChar);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(Rule::TrustDomainTooLong);
    }
    Ok(())
}

/// `""` (no path) or `/seg/seg…`.
fn check_path(path: &str) -> Result<(), Rule> {
    let Some(segments) = path.strip_prefix('/') else {
        // Only the empty path does not start with '/' (the caller splits at the first '/').
        return Ok(());
    };
    for seg in segments.split('/') {
        if seg.is_empty() {
            return Err(Rule::EmptySegment);
        }
        if seg == "." || seg == ".." {
            return Err(Rule::DotSegment);
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(Rule::PathChar);
        }
    }
    Ok(())
}

/// Checks `spiffe://<td><path>` whole, the path possibly empty; returns where the path starts.
fn check_id(s: &str) -> Result<usize, Rule> {
    if s.len() > MAX_ID_LEN {
        return Err(Rule::TooLong);
    }
    let rest = s.strip_prefix(SCHEME).ok_or(Rule::Scheme)?;
    let (domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    check_trust_domain(domain)?;
    check_path(path)?;
    Ok(SCHEME.len() + domain.len())
}

/// [`check_id`], and the path must not be empty.
fn check_workload_id(s: &str) -> Result<usize, Rule> {
    match check_id(s)? {
        at if at == s.len() => Err(Rule::NoPath),
        at => Ok(at),
    }
}

/// The path segment under which the mesh names its own components. Every identity under
/// `spiffe://<td>/bulkhead` belongs to the mesh: the control plane issues those to itself and
/// no workload can obtain one ([`SpiffeId::refuse_reserved`]).
pub const RESERVED_SEGMENT: &str = "bulkhead";

/// An identity under `spiffe://<td>/bulkhead`, asked for by or for a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservedId {
    pub id: String,
    pub trust_domain: String,
    /// What the mesh uses it for, in words.
    pub purpose: &'static str,
}

impl fmt::Display for ReservedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (id, td, purpose) = (&self.id, &self.trust_domain, self.purpose);
        write!(
            f,
            "{id} is reserved: identities under spiffe://{td}/bulkhead/ belong to the mesh itself ({purpose}) and only the control plane issues them, to itself; give the workload its own identity, such as spiffe://{td}/ns/<namespace>/sa/<account>"
        )
    }
}

impl std::error::Error for ReservedId {}

/// A trust domain name: `bulkhead.local` (without the scheme).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// A bare name (`bulkhead.local`).
    pub fn parse(name: &str) -> Result<TrustDomain, SpiffeIdError> {
        check_trust_domain(name).map_err(|rule| SpiffeIdError::new(name, rule))?;
        Ok(TrustDomain(name.to_string()))
    }

    /// The trust domain's own ID, `spiffe://bulkhead.local` (a trailing `/` is taken too, as
    /// a CA certificate's URI SAN may carry one).
    pub fn from_id(id: &str) -> Result<TrustDomain, SpiffeIdError> {
        let (td, path) = parse_parts(id.strip_suffix('/').unwrap_or(id))?;
        match path.is_root() {
            true => Ok(td),
            false => Err(SpiffeIdError::new(id, Rule::NotTrustDomainId)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<name>`.
    pub fn id(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The path of a SPIFFE ID: `/ns/shop/sa/orders`, or empty for a trust domain's own ID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffePath(String);

impl SpiffePath {
    /// `""` or `/seg/seg…`.
    pub fn parse(path: &str) -> Result<SpiffePath, SpiffeIdError> {
        let bad = |rule| SpiffeIdError::new(path, rule);
        if !path.is_empty() && !path.starts_with('/') {
            return Err(bad(Rule::PathChar));
        }
        check_path(path).map_err(bad)?;
        Ok(SpiffePath(path.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether there is no path (the trust domain's own ID).
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The segments, without their slashes; none for the empty path.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        segments(&self.0)
    }
}

impl fmt::Display for SpiffePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.strip_prefix('/')
        .into_iter()
        .flat_map(|rest| rest.split('/'))
}

fn namespace_segment(path: &str) -> Option<&str> {
    let mut segs = segments(path);
    match (segs.next(), segs.next()) {
        (Some("ns"), Some(ns)) => Some(ns),
        _ => None,
    }
}

/// [`SpiffeId::namespace_segment`] of a string, without making a [`SpiffeId`] of it (for
/// judging requests, which borrow the peer's ID); `None` if `id` is not a workload's ID.
pub fn namespace_of(id: &str) -> Option<&str> {
    let path_at = check_workload_id(id).ok()?;
    namespace_segment(&id[path_at..])
}

/// The trust domain of a workload's SPIFFE ID (`spiffe://td/path` → `td`), without
/// allocating; `None` if `id` is not one.
pub fn trust_domain_of(id: &str) -> Option<&str> {
    let path_at = check_workload_id(id).ok()?;
    id.get(SCHEME.len()..path_at)
}

/// Any SPIFFE ID, the trust domain's own (no path) included, as its two parts.
pub fn parse_parts(s: &str) -> Result<(TrustDomain, SpiffePath), SpiffeIdError> {
    let path_at = check_id(s).map_err(|rule| SpiffeIdError::new(s, rule))?;
    Ok((
        TrustDomain(s[SCHEME.len()..path_at].to_string()),
        SpiffePath(s[path_at..].to_string()),
    ))
}

/// A workload's SPIFFE ID: `spiffe://<trust-domain>/<path>`, checked, with a path.
///
/// Compared, ordered and hashed as its text, so that a map keyed by `SpiffeId` is looked up
/// with a `&str` ([`Borrow<str>`](std::borrow::Borrow)) and reads as the string it is
/// ([`Deref`](std::ops::Deref)).
#[derive(Clone, Debug)]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the path starts (the '/' after the trust domain).
    path_at: usize,
}

impl SpiffeId {
    /// Parses per the SPIFFE ID spec (see the crate's documentation); the ID must have a path.
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        let path_at = check_workload_id(s).map_err(|rule| SpiffeIdError::new(s, rule))?;
        Ok(SpiffeId {
            id: s.to_string(),
            path_at,
        })
    }

    /// The ID of `path` in `trust_domain`; the path must not be empty.
    pub fn new(trust_domain: &TrustDomain, path: &SpiffePath) -> Result<SpiffeId, SpiffeIdError> {
        let id = format!("{SCHEME}{trust_domain}{path}");
        if path.is_root() {
            return Err(SpiffeIdError::new(&id, Rule::NoPath));
        }
        if id.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::new(&id, Rule::TooLong));
        }
        Ok(SpiffeId {
            path_at: SCHEME.len() + trust_domain.0.len(),
            id,
        })
    }

    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub fn for_service_account(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    pub fn into_string(self) -> String {
        self.id
    }

    /// The trust domain's name, without the scheme.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.path_at]
    }

    /// The path, starting with '/'.
    pub fn path(&self) -> &str {
        &self.id[self.path_at..]
    }

    /// The path's segments, without their slashes.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        segments(self.path())
    }

    /// The namespace, if the path has the Kubernetes shape `/ns/<ns>/sa/<sa>`.
    pub fn namespace(&self) -> Option<&str> {
        self.kubernetes().map(|(ns, _)| ns)
    }

    /// The service account, if the path has the shape `/ns/<ns>/sa/<sa>`.
    pub fn service_account(&self) -> Option<&str> {
        self.kubernetes().map(|(_, sa)| sa)
    }

    /// `<ns>` of a path that starts `/ns/<ns>`, whatever follows (`/ns/shop`,
    /// `/ns/shop/sa/orders`, `/ns/shop/anything/else`).
    pub fn namespace_segment(&self) -> Option<&str> {
        namespace_segment(self.path())
    }

    /// Whether this identity belongs to the mesh itself: its path is `/bulkhead` or under it.
    pub fn is_reserved(&self) -> bool {
        self.segments().next() == Some(RESERVED_SEGMENT)
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
    pub fn refuse_reserved(&self) -> Result<(), ReservedId> {
        match self.reserved_for() {
            Some(purpose) => Err(ReservedId {
                id: self.to_string(),
                trust_domain: self.trust_domain().to_string(),
                purpose,
            }),
            None => Ok(()),
        }
    }

    fn kubernetes(&self) -> Option<(&str, &str)> {
        let mut segs = self.segments();
        match (
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl PartialEq for SpiffeId {
    fn eq(&self, other: &SpiffeId) -> bool {
        self.id == other.id
    }
}

impl Eq for SpiffeId {}

impl std::hash::Hash for SpiffeId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state)
    }
}

impl PartialOrd for SpiffeId {
    fn partial_cmp(&self, other: &SpiffeId) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SpiffeId {
    fn cmp(&self, other: &SpiffeId) -> std::cmp::Ordering {
        self.id.cmp(&other.id)
    }
}

impl std::borrow::Borrow<str> for SpiffeId {
    fn borrow(&self) -> &str {
        &self.id
    }
}

impl std::ops::Deref for SpiffeId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.id
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.id
    }
}

impl PartialEq<str> for SpiffeId {
    fn eq(&self, other: &str) -> bool {
        self.id == other
    }
}

impl PartialEq<&str> for SpiffeId {
    fn eq(&self, other: &&str) -> bool {
        self.id == *other
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::parse(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;
    fn try_from(s: String) -> Result<SpiffeId, SpiffeIdError> {
        match check_workload_id(&s) {
            Ok(path_at) => Ok(SpiffeId { id: s, path_at }),
            Err(rule) => Err(SpiffeIdError::new(&s, rule)),
        }
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.id
    }
}

/// As the string it is, so that a field holding one serializes exactly as a `String` did.
impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SpiffeId, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::try_from(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
