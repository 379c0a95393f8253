//! Any request a peer can send, as bytes: the method, request target and Host header are
//! cut from the input at its first two NUL bytes. Canonicalising must never panic; a path
//! it accepts must be a fixed point (canonical again, unchanged) holding nothing it refuses,
//! and a glob must match it without panicking.
#![no_main]

use bulkhead_policy::{CanonicalRequest, PathPattern, RawRequest, canonical};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let (method, target, host) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let raw = RawRequest {
        method,
        target,
        authority: None,
    };
    let Ok(c) = CanonicalRequest::new(raw, [host.as_bytes()]) else {
        return;
    };
    let again = canonical::path(c.path()).expect("a canonical path is canonical");
    assert_eq!(again, c.path(), "a canonical path is a fixed point");
    assert!(!c.path().contains(';') && !c.path().contains('\\'));
    if let Ok(glob) = PathPattern::try_from("/**/a*/**/b".to_string()) {
        let _ = glob.matches(c.path());
    }
});
