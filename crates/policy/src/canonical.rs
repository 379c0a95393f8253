//! The one request policy judges: built here, and only here, from what arrived on the wire.
//!
//! A sidecar, `bulkhead policy test` and `explain`, `impact` and the recommender all turn a
//! raw method, request target, authority or `Host`, headers and peer address into the same
//! [`CanonicalRequest`], or into the same [`Refusal`] (answered `400` by a sidecar). What
//! policy sees is therefore what CI tested, and the canonical path is also what the app
//! receives, so the app can never read a path differently from the policy that judged it.
//!
//! What is canonicalised (docs/policy.md, "The canonical request", has the table):
//! - path: percent-encoded unreserved characters (`ALPHA DIGIT - . _ ~`) are decoded
//!   (RFC 3986 §6.2.2); other escapes are kept with their hex in upper case; bytes a URI may
//!   not hold raw (`"`, `{`, non-ASCII …) are percent-encoded. Refused: an encoded `/`, a
//!   `\` (raw or encoded), NUL or another control character (raw or encoded), a malformed
//!   escape, an empty segment (one trailing `/` is fine), a `.` or `..` segment (after
//!   decoding, so `%2e%2e` is caught), and a `;` anywhere (raw or `%3B`): Tomcat and Jetty
//!   strip `;params` per segment and resolve `/orders/..;/admin` to `/admin`.
//! - method: refused unless an HTTP token in upper case. Methods are case-sensitive (RFC
//!   9110 §9.1) and an app may route `delete` differently from `DELETE`; upper-casing it
//!   here would change what the app receives, so a lower-case method never reaches policy
//!   or the app.
//! - host: from the request target's authority, else the `Host` header; lower case, port
//!   dropped, one trailing dot dropped, IPv6 brackets removed. Two `Host` headers, or an
//!   authority and a `Host` that name different hosts, are refused.
//! - headers: every value of a repeated header is kept (see [`crate::Headers`]).
//! - peer address: an IPv4-mapped IPv6 address (`::ffff:10.1.2.3`) is unmapped.
//!
//! This module must never widen what a request means: when in doubt it refuses. It is pure
//! and allocates only when the request is not already in canonical form.

use crate::eval::{Headers, Http};
use core::net::{IpAddr, Ipv6Addr};
use std::borrow::Cow;
use std::fmt;

/// Why a request was refused before any policy judged it. A sidecar answers `400` with the
/// text; the label names it in metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the method must be an HTTP token in upper case (methods are case-sensitive: `delete` is not DELETE)"
    )]
    Method,
    #[error("the path must start with '/'")]
    PathStart,
    #[error("the path holds a '%' that is not followed by two hex digits")]
    MalformedEscape,
    #[error("the path holds an encoded '/' (%2F)")]
    EncodedSlash,
    #[error("the path holds a '\\' (raw or encoded)")]
    Backslash,
    #[error("the path holds NUL or a control character (raw or encoded)")]
    ControlCharacter,
    #[error("the path holds an empty segment ('//')")]
    EmptySegment,
    #[error("the path holds a '.' or '..' segment (also when encoded, as %2e)")]
    DotSegment,
    #[error(
        "the path holds a ';' (path parameters: some servers strip them and resolve /a/..;/b to /b)"
    )]
    PathParameter,
    #[error("the host is malformed")]
    MalformedHost,
    #[error("the request has more than one Host header")]
    ManyHosts,
    #[error("the Host header names another host than the request target")]
    HostMismatch,
}

impl Refusal {
    /// A short snake_case name for metric labels and log fields.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Method => "method",
            Refusal::PathStart => "path_start",
            Refusal::MalformedEscape => "malformed_escape",
            Refusal::EncodedSlash => "encoded_slash",
            Refusal::Backslash => "backslash",
            Refusal::ControlCharacter => "control_character",
            Refusal::EmptySegment => "empty_segment",
            Refusal::DotSegment => "dot_segment",
            Refusal::PathParameter => "path_parameter",
            Refusal::MalformedHost => "malformed_host",
            Refusal::ManyHosts => "many_hosts",
            Refusal::HostMismatch => "host_mismatch",
        }
    }
}

/// A request as it arrived, before canonicalisation.
#[derive(Clone, Copy, Debug)]
pub struct RawRequest<'a> {
    pub method: &'a str,
    /// The request target's path and query, as received (`/orders/1?x=y`). An absolute-form
    /// target gives its path and query here and its authority in `authority`.
    pub target: &'a str,
    /// The authority of the request target (absolute form, or HTTP/2 `:authority`).
    pub authority: Option<&'a str>,
}

/// The request every enforcement point and every offline tool judges. Build it with
/// [`CanonicalRequest::new`]; hand policy [`CanonicalRequest::http`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalRequest<'a> {
    method: &'a str,
    path: Cow<'a, str>,
    query: Option<&'a str>,
    host: Option<Cow<'a, str>>,
}

impl<'a> CanonicalRequest<'a> {
    /// Canonicalises `raw` with the values of its `Host` headers (as received, in order).
    pub fn new<I>(raw: RawRequest<'a>, host_headers: I) -> Result<Self, Refusal>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let method = method(raw.method)?;
        let (path, query) = match raw.target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (raw.target, None),
        };
        let path = self::path(path)?;
        let host = host(raw.authority, host_headers)?;
        Ok(CanonicalRequest {
            method,
            path,
            query,
            host,
        })
    }

    pub fn method(&self) -> &str {
        self.method
    }

    /// The canonical path, without the query: what policy matches and what the app receives.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The query string as received, without its `?`; for the app only.
    pub fn query(&self) -> Option<&'a str> {
        self.query
    }

    /// Lower case, without port, trailing dot or brackets.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// Whether the canonical path differs from the one received, so the request target the
    /// app receives must be rewritten.
    pub fn path_rewritten(&self) -> bool {
        matches!(self.path, Cow::Owned(_))
    }

    /// The request target the app receives: the canonical path and the query as received.
    pub fn target(&self) -> Cow<'_, str> {
        match self.query {
            None => Cow::Borrowed(self.path()),
            Some(q) => Cow::Owned(format!("{}?{q}", self.path)),
        }
    }

    /// What policy sees of this request.
    pub fn http<'s>(&'s self, headers: &'s dyn Headers) -> Http<'s> {
        Http {
            method: self.method,
            path: &self.path,
            host: self.host.as_deref(),
            headers,
        }
    }
}

impl fmt::Display for CanonicalRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.target())?;
        if let Some(h) = &self.host {
            write!(f, " (host {h})")?;
        }
        Ok(())
    }
}

/// The peer address policy compares with CIDRs: an IPv4-mapped IPv6 address is the IPv4
/// address it carries.
pub fn peer_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The method, if it is an HTTP token with no lower-case letter.
pub fn method(m: &str) -> Result<&str, Refusal> {
    let ok = !m.is_empty() && m.bytes().all(|b| is_tchar(b) && !b.is_ascii_lowercase());
    if ok { Ok(m) } else { Err(Refusal::Method) }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// What a path byte written raw is: kept, percent-encoded, or a reason to refuse.
enum RawByte {
    Keep,
    Encode,
    Refuse(Refusal),
}

fn raw_byte(b: u8) -> RawByte {
    match b {
        b'\\' => RawByte::Refuse(Refusal::Backslash),
        b';' => RawByte::Refuse(Refusal::PathParameter),
        0..=0x1f | 0x7f => RawByte::Refuse(Refusal::ControlCharacter),
        // pchar (RFC 3986 §3.3) less ';', and the segment separator.
        b if is_unreserved(b) => RawByte::Keep,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
        | b'/' => RawByte::Keep,
        // Space, '"', '<', '>', '[', ']', '^', '`', '{', '|', '}', '#', '?' and non-ASCII.
        _ => RawByte::Encode,
    }
}

/// What an escape `%XX` decodes to: the character itself, the escape kept, or a refusal.
fn escaped_byte(v: u8) -> Result<bool, Refusal> {
    match v {
        b'/' => Err(Refusal::EncodedSlash),
        b'\\' => Err(Refusal::Backslash),
        b';' => Err(Refusal::PathParameter),
        0..=0x1f | 0x7f => Err(Refusal::ControlCharacter),
        v => Ok(is_unreserved(v)),
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_escape(out: &mut Vec<u8>, v: u8) {
    out.extend_from_slice(&[b'%', HEX[usize::from(v >> 4)], HEX[usize::from(v & 15)]]);
}

/// The canonical form of a request path (without its query), or why it is refused.
pub fn path(raw: &str) -> Result<Cow<'_, str>, Refusal> {
    if !raw.starts_with('/') {
        return Err(Refusal::PathStart);
    }
    let bytes = raw.as_bytes();
    // Fast path: nothing to decode or encode, so the path is borrowed as it came.
    let mut first_change = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            // An escape already in canonical form (upper-case hex, a byte that stays
            // encoded) is kept; any other needs the slow path, which also refuses.
            let upper = |j: usize| {
                bytes
                    .get(j)
                    .is_some_and(|&d| matches!(d, b'0'..=b'9' | b'A'..=b'F'))
            };
            let value = (upper(i + 1) && upper(i + 2))
                .then(|| hex(bytes[i + 1]).zip(hex(bytes[i + 2])))
                .flatten()
                .map(|(hi, lo)| hi << 4 | lo);
            match value.map(escaped_byte) {
                Some(Ok(false)) => {
                    i += 3;
                    continue;
                }
                Some(Err(r)) => return Err(r),
                Some(Ok(true)) | None => {
                    first_change = Some(i);
                    break;
                }
            }
        }
        match raw_byte(b) {
            RawByte::Keep => {}
            RawByte::Refuse(r) => return Err(r),
            RawByte::Encode => {
                first_change = Some(i);
                break;
            }
        }
        i += 1;
    }
    let canonical = match first_change {
        None => Cow::Borrowed(raw),
        Some(start) => Cow::Owned(rewrite(bytes, start)?),
    };
    check_segments(&canonical)?;
    Ok(canonical)
}

/// Builds the canonical path from `bytes`, whose first `start` bytes are already canonical.
fn rewrite(bytes: &[u8], start: usize) -> Result<String, Refusal> {
    let mut out = Vec::with_capacity(bytes.len() + 8);
    out.extend_from_slice(&bytes[..start]);
    let mut i = start;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(Refusal::MalformedEscape);
            };
            let v = hi << 4 | lo;
            if escaped_byte(v)? {
                out.push(v);
            } else {
                push_escape(&mut out, v);
            }
            i += 3;
            continue;
        }
        match raw_byte(b) {
            RawByte::Keep => out.push(b),
            RawByte::Encode => push_escape(&mut out, b),
            RawByte::Refuse(r) => return Err(r),
        }
        i += 1;
    }
    // Every byte pushed is ASCII: unreserved, pchar or the three bytes of an escape.
    String::from_utf8(out).map_err(|_| Refusal::MalformedEscape)
}

/// No empty segment but one trailing, no `.` or `..` segment.
fn check_segments(path: &str) -> Result<(), Refusal> {
    let body = &path[1..];
    if body.is_empty() {
        return Ok(());
    }
    // One trailing slash after a segment is fine ("/a/b/"); "//" is an empty segment.
    let body = body.strip_suffix('/').unwrap_or(body);
    for seg in body.split('/') {
        match seg {
            "" => return Err(Refusal::EmptySegment),
            "." | ".." => return Err(Refusal::DotSegment),
            _ => {}
        }
    }
    Ok(())
}

/// The request's host: the authority's if the target has one, else the `Host` header's.
/// `None` when neither names a host.
pub fn host<'a, I>(
    authority: Option<&'a str>,
    host_headers: I,
) -> Result<Option<Cow<'a, str>>, Refusal>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let mut headers = host_headers.into_iter();
    let header = match (headers.next(), headers.next()) {
        (_, Some(_)) => return Err(Refusal::ManyHosts),
        (Some(h), None) => Some(std::str::from_utf8(h).map_err(|_| Refusal::MalformedHost)?),
        (None, None) => None,
    };
    let from_authority = authority.map(canonical_host).transpose()?.flatten();
    let from_header = header.map(canonical_host).transpose()?.flatten();
    match (from_authority, from_header) {
        (Some(a), Some(h)) if a != h => Err(Refusal::HostMismatch),
        (Some(a), _) => Ok(Some(a)),
        (None, h) => Ok(h),
    }
}

/// One host as written (`Orders.Shop:8080`, `[FD00::1]:80`, `orders.shop.`), canonical.
fn canonical_host(raw: &str) -> Result<Option<Cow<'_, str>>, Refusal> {
    let raw = raw.trim_matches(|c| c == ' ' || c == '\t');
    if raw.is_empty() {
        return Ok(None);
    }
    let port_ok = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = raw.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or(Refusal::MalformedHost)?;
        let after_ok = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        let ip: Ipv6Addr = inside.parse().map_err(|_| Refusal::MalformedHost)?;
        if !after_ok {
            return Err(Refusal::MalformedHost);
        }
        return Ok(Some(Cow::Owned(ip.to_string())));
    }
    let name = match raw.rsplit_once(':') {
        Some((name, port)) if port_ok(port) => name,
        Some(_) => return Err(Refusal::MalformedHost),
        None => raw,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let ok = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        return Err(Refusal::MalformedHost);
    }
    Ok(Some(match name.bytes().any(|b| b.is_ascii_uppercase()) {
        true => Cow::Owned(name.to_ascii_lowercase()),
        false => Cow::Borrowed(name),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(p: &str) -> Result<String, Refusal> {
        path(p).map(Cow::into_owned)
    }

    #[test]
    fn paths_already_canonical_are_borrowed() {
        for p in [
            "/",
            "/charge",
            "/orders/1",
            "/a/b/",
            "/a:b@c!$&'()*+,=",
            "/x-y_z.~",
            "/caf%C3%A9",
            "/%25",
        ] {
            assert!(matches!(path(p), Ok(Cow::Borrowed(b)) if b == p), "{p}");
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_upper_cased() {
        for (raw, want) in [
            ("/%61dmin/users", "/admin/users"),
            ("/%7E%7e", "/~~"),
            ("/a%2Db%5fc", "/a-b_c"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a%20b", "/a%20b"),
            ("/%3a%40", "/%3A%40"),
            ("/a/%2e%2eb", "/a/..b"),
            ("/%25", "/%25"),
            ("/{id}", "/%7Bid%7D"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/a|b^c", "/a%7Cb%5Ec"),
        ] {
            assert_eq!(canon(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for (raw, why) in [
            ("x", Refusal::PathStart),
            ("", Refusal::PathStart),
            ("*", Refusal::PathStart),
            ("/a/../admin", Refusal::DotSegment),
            ("/./admin", Refusal::DotSegment),
            ("/a/.", Refusal::DotSegment),
            ("/a/..", Refusal::DotSegment),
            ("/a/../", Refusal::DotSegment),
            ("/%2e%2e/admin", Refusal::DotSegment),
            ("/.%2E/admin", Refusal::DotSegment),
            ("/a/%2e/b", Refusal::DotSegment),
            ("/a//b", Refusal::EmptySegment),
            ("//", Refusal::EmptySegment),
            ("/a%2Fb", Refusal::EncodedSlash),
            ("/a%2fb", Refusal::EncodedSlash),
            ("/a\\b", Refusal::Backslash),
            ("/a%5cb", Refusal::Backslash),
            ("/a%00", Refusal::ControlCharacter),
            ("/a%0d%0a", Refusal::ControlCharacter),
            ("/a%7F", Refusal::ControlCharacter),
            ("/a\u{1}", Refusal::ControlCharacter),
            ("/orders/..;/admin", Refusal::PathParameter),
            ("/orders;jsessionid=1", Refusal::PathParameter),
            ("/orders/%3B/x", Refusal::PathParameter),
            ("/orders/%3b", Refusal::PathParameter),
            ("/a%", Refusal::MalformedEscape),
            ("/a%2", Refusal::MalformedEscape),
            ("/a%zz", Refusal::MalformedEscape),
            ("/a%%41", Refusal::MalformedEscape),
        ] {
            assert_eq!(canon(raw), Err(why), "{raw:?}");
        }
    }

    #[test]
    fn canonical_paths_are_fixed_points() {
        for raw in ["/%61dmin", "/caf%c3%a9", "/{x}", "/a%20b/", "/%7e"] {
            let once = canon(raw).unwrap();
            assert!(
                matches!(path(&once), Ok(Cow::Borrowed(_))),
                "{raw} -> {once}"
            );
        }
    }

    #[test]
    fn methods_are_upper_case_tokens() {
        for ok in ["GET", "DELETE", "M-SEARCH", "PROPFIND", "X1"] {
            assert_eq!(method(ok), Ok(ok));
        }
        for bad in ["", "delete", "Delete", "GET ", "G\u{e9}T", "GE/T"] {
            assert_eq!(method(bad), Err(Refusal::Method), "{bad:?}");
        }
    }

    fn h(authority: Option<&str>, headers: &[&str]) -> Result<Option<String>, Refusal> {
        host(authority, headers.iter().map(|h| h.as_bytes())).map(|h| h.map(Cow::into_owned))
    }

    #[test]
    fn hosts() {
        let some = |s: &str| Ok(Some(s.to_string()));
        assert_eq!(h(None, &["Orders.Shop:8080"]), some("orders.shop"));
        assert_eq!(h(None, &["orders.shop."]), some("orders.shop"));
        assert_eq!(h(None, &["orders.shop.:80"]), some("orders.shop"));
        assert_eq!(h(None, &["[FD00::1]:443"]), some("fd00::1"));
        assert_eq!(h(None, &["[fd00:0::1]"]), some("fd00::1"));
        assert_eq!(h(None, &["10.1.2.3:80"]), some("10.1.2.3"));
        assert_eq!(h(None, &["a:"]), some("a"));
        assert_eq!(h(None, &[]), Ok(None));
        assert_eq!(h(None, &[""]), Ok(None));
        assert_eq!(h(Some("API.shop:1"), &[]), some("api.shop"));
        assert_eq!(h(Some("api.shop"), &["API.SHOP:8080"]), some("api.shop"));
        assert_eq!(
            h(Some("api.shop"), &["admin.shop"]),
            Err(Refusal::HostMismatch)
        );
        assert_eq!(h(None, &["a", "b"]), Err(Refusal::ManyHosts));
        assert_eq!(h(None, &["a", "a"]), Err(Refusal::ManyHosts));
        for bad in [
            "orders.shop..",
            ".shop",
            "a b",
            "user@host",
            "fd00::1",
            "[fd00::1",
            "[nope]",
            "[fd00::1]x",
            "host:port",
            "a/b",
            "caf\u{e9}.shop",
        ] {
            assert_eq!(h(None, &[bad]), Err(Refusal::MalformedHost), "{bad:?}");
        }
        assert_eq!(
            host(None, [&b"\xff"[..]]),
            Err(Refusal::MalformedHost),
            "not UTF-8"
        );
    }

    #[test]
    fn mapped_addresses_are_unmapped() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(peer_ip(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(peer_ip(v6), v6);
    }

    #[test]
    fn a_whole_request() {
        let raw = RawRequest {
            method: "GET",
            target: "/%61dmin/users?x=%2F&y",
            authority: None,
        };
        let c = CanonicalRequest::new(raw, [&b"Orders.Shop:8080"[..]]).unwrap();
        assert_eq!(c.path(), "/admin/users");
        assert_eq!(c.query(), Some("x=%2F&y"));
        assert_eq!(c.host(), Some("orders.shop"));
        assert!(c.path_rewritten());
        assert_eq!(c.target(), "/admin/users?x=%2F&y");
        assert_eq!(c.to_string(), "GET /admin/users?x=%2F&y (host orders.shop)");
        let raw = RawRequest {
            method: "delete",
            target: "/",
            authority: None,
        };
        assert_eq!(
            CanonicalRequest::new(raw, std::iter::empty()),
            Err(Refusal::Method)
        );
    }
}
