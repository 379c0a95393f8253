//! The matchable values of a rule: identities, methods, paths. Each parses from the string an
//! operator writes and serializes back to that same string.

use bulkhead_spiffe::{Rule, SpiffeId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Which source identities a rule accepts.
///
/// `spiffe://td/ns/shop/sa/orders` matches exactly; a trailing `/*` (`spiffe://td/ns/shop/*`)
/// matches every identity below that path; `spiffe://td/*` matches the whole trust domain;
/// a lone `*` matches any authenticated identity. The IDs and prefixes are read with the one
/// SPIFFE grammar ([`bulkhead_spiffe`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum IdentityPattern {
    Any,
    Exact(SpiffeId),
    /// Stored with the trailing slash: `spiffe://td/ns/shop/`.
    Prefix(String),
}

impl IdentityPattern {
    pub fn matches(&self, id: &str) -> bool {
        match self {
            IdentityPattern::Any => true,
            IdentityPattern::Exact(e) => e.as_str() == id,
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
        let Some(rest) = s.strip_prefix(bulkhead_spiffe::SCHEME) else {
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
        let id = if prefix { &s[..s.len() - 2] } else { &s };
        let (domain, path) = bulkhead_spiffe::parse_parts(id).map_err(|e| match e.rule() {
            r if r.is_trust_domain() && r != Rule::TrustDomainTooLong => format!(
                "identity {s:?}: the trust domain must be lowercase letters, digits, '.', '-' or '_'"
            ),
            r if r.is_path() => format!(
                "identity {s:?}: path segments must be non-empty letters, digits, '.', '-' or '_'"
            ),
            r => format!("identity {s:?}: {}", r.reason()),
        })?;
        if prefix {
            return Ok(IdentityPattern::Prefix(format!("{id}/")));
        }
        if path.is_root() {
            return Err(format!(
                "identity {s:?} names a trust domain, not a workload; write \"spiffe://{domain}/*\" to match the whole trust domain"
            ));
        }
        // parse_parts accepted it whole and the path is not empty: a workload's ID.
        SpiffeId::try_from(s)
            .map(IdentityPattern::Exact)
            .map_err(|e| e.to_string())
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
            IdentityPattern::Exact(e) => f.write_str(e.as_str()),
            IdentityPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// An HTTP method, upper case. Unknown tokens are refused rather than never matching.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Method(String);

/// The methods a rule may name.
pub const KNOWN_METHODS: &[&str] = &[
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
        if KNOWN_METHODS.contains(&upper.as_str()) {
            Ok(Method(upper))
        } else {
            Err(format!(
                "unknown HTTP method {s:?}; expected one of {}",
                KNOWN_METHODS.join(", ")
            ))
        }
    }
}

impl From<Method> for String {
    fn from(m: Method) -> String {
        m.0
    }
}

/// An HTTP path pattern, matched against the canonical request path
/// ([`crate::canonical`]).
///
/// - `/charge` matches exactly.
/// - A single final `*` makes a prefix: `/orders/*` matches `/orders/1` and `/orders/1/items`.
/// - Otherwise `*` matches within one segment and `**` any number of whole segments:
///   `/users/*/profile`, `/api/**/health`.
///
/// A pattern must itself be in canonical form (a request path can match nothing else), so
/// `/%61dmin` and `/a/../b` are refused with the form to write instead.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
    Glob(Glob),
}

/// A glob path pattern, compiled once into its segments. Matching simulates the pattern as
/// a set of positions (an NFA over segments), so its cost is bounded by the path length
/// times the pattern length: no input can make it backtrack.
#[derive(Clone, Debug)]
pub struct Glob {
    text: String,
    segs: Box<[GlobSeg]>,
}

#[derive(Clone, Debug)]
enum GlobSeg {
    /// `**`: any number of whole segments, none included.
    AnyDepth,
    /// A segment without `*`.
    Literal(Box<str>),
    /// A segment with `*`: its literal parts, split on `*` (so at least two).
    Wild(Box<[Box<str>]>),
}

/// The most segments a glob may have: positions are kept in one `u64`.
pub const MAX_GLOB_SEGMENTS: usize = 63;

impl Glob {
    fn new(text: String) -> Result<Glob, String> {
        let segs: Vec<GlobSeg> = text[1..]
            .split('/')
            .map(|seg| match seg {
                "**" => GlobSeg::AnyDepth,
                s if !s.contains('*') => GlobSeg::Literal(s.into()),
                s => GlobSeg::Wild(s.split('*').map(Box::from).collect()),
            })
            .collect();
        if segs.len() > MAX_GLOB_SEGMENTS {
            return Err(format!(
                "path {text:?} has {} segments; a pattern with wildcards may have at most {MAX_GLOB_SEGMENTS}",
                segs.len()
            ));
        }
        Ok(Glob {
            text,
            segs: segs.into(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `path` (starting with '/') matches. One pass over the path's segments; at
    /// each, every live pattern position is advanced, so the work is at most the number of
    /// path segments times the number of pattern segments, each step a linear-time segment
    /// comparison.
    pub fn matches(&self, path: &str) -> bool {
        let m = self.segs.len();
        let accept = 1u64 << m;
        let mut live = self.closure(1);
        for seg in path.get(1..).unwrap_or("").split('/') {
            let mut next = 0u64;
            let mut rest = live & (accept - 1);
            while rest != 0 {
                let i = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                match &self.segs[i] {
                    GlobSeg::AnyDepth => next |= 1 << i,
                    GlobSeg::Literal(l) if **l == *seg => next |= 1 << (i + 1),
                    GlobSeg::Literal(_) => {}
                    GlobSeg::Wild(parts) if wild_matches(parts, seg) => next |= 1 << (i + 1),
                    GlobSeg::Wild(_) => {}
                }
            }
            live = self.closure(next);
            if live == 0 {
                return false;
            }
        }
        live & accept != 0
    }

    /// Adds the positions reachable without consuming a segment: past every `**`.
    fn closure(&self, mut live: u64) -> u64 {
        for (i, seg) in self.segs.iter().enumerate() {
            if live & (1 << i) != 0 && matches!(seg, GlobSeg::AnyDepth) {
                live |= 1 << (i + 1);
            }
        }
        live
    }
}

impl PartialEq for Glob {
    fn eq(&self, other: &Glob) -> bool {
        self.text == other.text
    }
}

impl Eq for Glob {}

impl std::hash::Hash for Glob {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.text.hash(h)
    }
}

impl PathPattern {
    #[inline]
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(e) => e == path,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
            PathPattern::Glob(g) => g.matches(path),
        }
    }
}

/// One segment against the literal parts of a segment pattern with `*` (never crossing
/// '/'): the first part is a prefix, the last a suffix, and each middle part is found
/// leftmost after the one before, which is optimal for `*` and linear (`str::find`).
fn wild_matches(parts: &[Box<str>], seg: &str) -> bool {
    let (first, last) = match (parts.first(), parts.last()) {
        (Some(f), Some(l)) if parts.len() >= 2 => (&**f, &**l),
        _ => return false,
    };
    if seg.len() < first.len() + last.len() || !seg.starts_with(first) || !seg.ends_with(last) {
        return false;
    }
    let mut rest = &seg[first.len()..seg.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(&**mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Characters a regular expression would use that a path pattern reads literally; `lint`
/// warns about patterns holding them, and refusals mention it.
pub(crate) fn looks_like_regex(p: &str) -> bool {
    p.contains(".*")
        || p.contains(".+")
        || p.contains("\\")
        || p.starts_with('^')
        || p.ends_with('$')
        || p.contains('[')
        || p.contains('(')
        || p.contains('|')
        || p.contains('{')
        || p.contains('+')
}

impl TryFrom<String> for PathPattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let regex_hint = |msg: String| match looks_like_regex(&s) {
            true => format!(
                "{msg} (this looks like a regular expression; paths are literal, with * for part of one segment and ** for any number of segments)"
            ),
            false => msg,
        };
        if !s.starts_with('/') {
            return Err(regex_hint(format!("path {s:?} must start with '/'")));
        }
        if s.contains('?') || s.contains('#') {
            return Err(format!("path {s:?} must not hold a query or fragment"));
        }
        match crate::canonical::path(&s) {
            Err(why) => {
                return Err(regex_hint(format!(
                    "path {s:?} can never match: {why}, and the sidecar refuses such requests with 400 before any policy"
                )));
            }
            Ok(c) if c != s => {
                return Err(regex_hint(format!(
                    "path {s:?} is not in canonical form: write {c:?} (requests are matched after percent-encoded letters, digits and -._~ are decoded, and other escapes upper-cased)"
                )));
            }
            Ok(_) => {}
        }
        let stars = s.matches('*').count();
        if stars == 0 {
            return Ok(PathPattern::Exact(s));
        }
        if stars == 1 && s.ends_with('*') {
            // `/orders/*` and `/orders*` are prefixes.
            return Ok(PathPattern::Prefix(s[..s.len() - 1].to_string()));
        }
        for seg in s[1..].split('/') {
            if seg.contains("**") && seg != "**" {
                return Err(format!(
                    "path {s:?}: '**' must be a whole segment (/a/**/b)"
                ));
            }
        }
        Ok(PathPattern::Glob(Glob::new(s)?))
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
            PathPattern::Glob(g) => f.write_str(g.as_str()),
            PathPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// The protocol a port speaks, as declared on a workload or service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

impl Protocol {
    /// Whether requests on this protocol have methods, paths, hosts and headers.
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }

    /// The protocol named by [`Protocol::as_str`].
    pub fn from_name(name: &str) -> Option<Protocol> {
        [
            Protocol::Http,
            Protocol::Http2,
            Protocol::Grpc,
            Protocol::Tcp,
        ]
        .into_iter()
        .find(|p| p.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }
}

/// A port or an inclusive range of ports: `8080` or `"9000-9100"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "PortSpec", into = "PortSpec")]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum PortSpec {
    One(u64),
    Range(String),
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl TryFrom<PortSpec> for PortRange {
    type Error = String;
    fn try_from(p: PortSpec) -> Result<Self, String> {
        let port = |n: u64| match u16::try_from(n) {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("port {n} is not between 1 and 65535")),
        };
        match p {
            PortSpec::One(n) => {
                let p = port(n)?;
                Ok(PortRange { first: p, last: p })
            }
            PortSpec::Range(s) => {
                let parse = |t: &str| {
                    t.trim()
                        .parse::<u64>()
                        .map_err(|_| format!("{s:?} is not a port or a range like \"9000-9100\""))
                        .and_then(port)
                };
                let (first, last) = match s.split_once('-') {
                    Some((a, b)) => (parse(a)?, parse(b)?),
                    None => (parse(&s)?, parse(&s)?),
                };
                if first > last {
                    return Err(format!("port range {s:?} is empty: {first} > {last}"));
                }
                Ok(PortRange { first, last })
            }
        }
    }
}

impl From<PortRange> for PortSpec {
    fn from(r: PortRange) -> PortSpec {
        if r.first == r.last {
            PortSpec::One(u64::from(r.first))
        } else {
            PortSpec::Range(format!("{}-{}", r.first, r.last))
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A request host: exact (`api.shop.local`) or a suffix wildcard (`*.shop.local`).
/// Compared case-insensitively, without the port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum HostPattern {
    Exact(String),
    /// Stored with the leading dot: `.shop.local`.
    Suffix(String),
}

impl HostPattern {
    /// `host` must already be lower case and without a port.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(e) => e == host,
            HostPattern::Suffix(s) => host.ends_with(s.as_str()) && host.len() > s.len(),
        }
    }
}

impl TryFrom<String> for HostPattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        let (body, suffix) = match lower.strip_prefix("*.") {
            Some(rest) => (rest.to_string(), true),
            None => (lower.clone(), false),
        };
        let ok = !body.is_empty()
            && body.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return Err(format!(
                "host {s:?} must be a DNS name (api.shop.local) or a suffix wildcard (*.shop.local), without a port"
            ));
        }
        Ok(if suffix {
            HostPattern::Suffix(format!(".{body}"))
        } else {
            HostPattern::Exact(body)
        })
    }
}

impl From<HostPattern> for String {
    fn from(h: HostPattern) -> String {
        match h {
            HostPattern::Exact(e) => e,
            HostPattern::Suffix(s) => format!("*{s}"),
        }
    }
}

/// A lower-case HTTP header name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HeaderName(String);

impl HeaderName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for HeaderName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if ok {
            Ok(HeaderName(s.to_ascii_lowercase()))
        } else {
            Err(format!("{s:?} is not a valid HTTP header name"))
        }
    }
}

impl From<HeaderName> for String {
    fn from(h: HeaderName) -> String {
        h.0
    }
}

/// A gRPC service (`shop.Payments`) or method (`shop.Payments/Charge`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GrpcName(String);

impl GrpcName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for GrpcName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ident = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
                && !t.starts_with('.')
                && !t.ends_with('.')
        };
        let ok = match s.split_once('/') {
            Some((svc, method)) => ident(svc) && ident(method) && !method.contains('.'),
            None => ident(&s),
        };
        if ok {
            Ok(GrpcName(s))
        } else {
            Err(format!(
                "{s:?} is not a gRPC service (package.Service) or method (package.Service/Method)"
            ))
        }
    }
}

impl From<GrpcName> for String {
    fn from(g: GrpcName) -> String {
        g.0
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
        // The SPIFFE ID's limits hold for patterns too.
        let long = format!("spiffe://td/{}", "a".repeat(2040));
        assert_eq!(
            id(&long).unwrap_err(),
            format!("identity {long:?}: longer than 2048 bytes")
        );
        assert!(id(&format!("spiffe://{}/*", "t".repeat(256))).is_err());
        assert!(id(&format!("spiffe://{}/*", "t".repeat(255))).is_ok());
    }

    #[test]
    fn path_forms() {
        let p = PathPattern::try_from("/orders/*".to_string()).unwrap();
        assert!(p.matches("/orders/1"));
        assert!(!p.matches("/order"));
        let e = PathPattern::try_from("/charge".to_string()).unwrap();
        assert!(e.matches("/charge") && !e.matches("/charge/x"));
        assert!(PathPattern::try_from("charge".to_string()).is_err());
        assert!(
            PathPattern::try_from("/a*/b".to_string())
                .unwrap()
                .matches("/abc/b")
        );
    }

    #[test]
    fn path_globs() {
        let g = |p: &str| PathPattern::try_from(p.to_string()).unwrap();
        assert!(matches!(g("/users/*/profile"), PathPattern::Glob(_)));
        assert!(g("/users/*/profile").matches("/users/42/profile"));
        assert!(!g("/users/*/profile").matches("/users/42/x/profile"));
        assert!(g("/api/**/health").matches("/api/health"));
        assert!(g("/api/**/health").matches("/api/v1/x/health"));
        assert!(!g("/api/**/health").matches("/api/v1/healthz"));
        assert!(g("/files/*.pdf").matches("/files/report.pdf"));
        assert!(!g("/files/*.pdf").matches("/files/report.txt"));
        assert!(matches!(g("/orders*"), PathPattern::Prefix(_)));
        assert!(PathPattern::try_from("/a/b**".to_string()).is_err());
        assert!(PathPattern::try_from("/a?x=1".to_string()).is_err());
    }

    #[test]
    fn ports_hosts_headers_grpc() {
        let r: PortRange = serde_json::from_str("\"9000-9100\"").unwrap();
        assert!(r.contains(9050) && !r.contains(9101));
        let one: PortRange = serde_json::from_str("8080").unwrap();
        assert_eq!(one.to_string(), "8080");
        assert!(serde_json::from_str::<PortRange>("0").is_err());
        assert!(serde_json::from_str::<PortRange>("70000").is_err());
        assert!(serde_json::from_str::<PortRange>("\"9-1\"").is_err());
        let h = HostPattern::try_from("*.Shop.local".to_string()).unwrap();
        assert!(h.matches("api.shop.local") && !h.matches("shop.local"));
        assert!(HostPattern::try_from("a.b:80".to_string()).is_err());
        assert_eq!(
            HeaderName::try_from("X-Env".to_string()).unwrap().as_str(),
            "x-env"
        );
        assert!(HeaderName::try_from("bad header".to_string()).is_err());
        assert!(GrpcName::try_from("shop.Payments/Charge".to_string()).is_ok());
        assert!(GrpcName::try_from("shop.Payments/".to_string()).is_err());
    }

    #[test]
    fn methods() {
        assert_eq!(Method::try_from("get".to_string()).unwrap().as_str(), "GET");
        assert!(Method::try_from("FETCH".to_string()).is_err());
    }
}
