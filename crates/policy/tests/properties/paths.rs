//! Path matching and the canonical path: the linear glob matcher agrees with the
//! backtracking one it replaced, and the canonical path is unique, stable and unambiguous.

use super::config;
use proptest::prelude::*;

/// The glob matcher this crate had before matching became linear: backtracking over `**`,
/// exponential in their number on long paths. It is kept here, for small inputs, as the
/// reference the linear matcher must agree with.
fn reference_glob(pat: &[&str], segs: &[&str]) -> bool {
    match pat.split_first() {
        None => segs.is_empty(),
        Some((&"**", rest)) => (0..=segs.len()).any(|i| reference_glob(rest, &segs[i..])),
        Some((p, rest)) => match segs.split_first() {
            Some((s, srest)) => reference_one(p, s) && reference_glob(rest, srest),
            None => false,
        },
    }
}

fn reference_one(pat: &str, seg: &str) -> bool {
    let parts: Vec<&str> = pat.split('*').collect();
    if parts.len() == 1 {
        return pat == seg;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !seg.starts_with(first) || seg.len() < first.len() + last.len() || !seg.ends_with(last) {
        return false;
    }
    let mut rest = &seg[first.len()..seg.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The documented meaning of a pattern: exact, prefix (one final `*`), or glob.
fn reference_matches(pattern: &str, path: &str) -> bool {
    let stars = pattern.matches('*').count();
    if stars == 0 {
        return pattern == path;
    }
    if stars == 1 && pattern.ends_with('*') {
        return path.starts_with(&pattern[..pattern.len() - 1]);
    }
    reference_glob(
        &pattern[1..].split('/').collect::<Vec<_>>(),
        &path.get(1..).unwrap_or("").split('/').collect::<Vec<_>>(),
    )
}

fn glob_pattern() -> impl Strategy<Value = String> {
    let seg = prop::sample::select(vec!["a", "b", "*", "**", "a*", "*b", "a*b", "*a*", "ab"]);
    prop::collection::vec(seg, 1..7).prop_map(|segs| format!("/{}", segs.join("/")))
}

fn request_path() -> impl Strategy<Value = String> {
    let seg = prop::sample::select(vec!["a", "b", "ab", "ba", "aab", "abb", "x"]);
    (prop::collection::vec(seg, 0..8), any::<bool>()).prop_map(|(segs, slash)| {
        format!(
            "/{}{}",
            segs.join("/"),
            if slash && !segs.is_empty() { "/" } else { "" }
        )
    })
}

/// Unreserved characters, some of them percent-encoded (in either case of hex).
fn spelled(c: char, how: u8) -> String {
    match how % 3 {
        0 => c.to_string(),
        1 => format!("%{:02X}", c as u32),
        _ => format!("%{:02x}", c as u32),
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// The linear matcher agrees with the backtracking reference on every small input.
    #[test]
    fn globs_agree_with_the_backtracking_reference(pattern in glob_pattern(), paths in prop::collection::vec(request_path(), 1..16)) {
        let compiled = bulkhead_policy::PathPattern::try_from(pattern.clone())
            .map_err(|e| TestCaseError::fail(format!("{pattern}: {e}")))?;
        for path in &paths {
            prop_assert_eq!(compiled.matches(path), reference_matches(&pattern, path), "{} vs {}", pattern, path);
        }
    }

    /// The canonical path of any text, if there is one, is a fixed point, borrowed as is the
    /// second time, and holds nothing the sidecar refuses.
    #[test]
    fn canonical_paths_are_fixed_points_without_ambiguity(raw in "/[ -~\u{80}-\u{10ffff}]{0,24}") {
        if let Ok(c) = bulkhead_policy::canonical::path(&raw) {
            let again = bulkhead_policy::canonical::path(&c);
            prop_assert!(matches!(again, Ok(std::borrow::Cow::Borrowed(x)) if x == c), "{raw:?} -> {c:?} -> {again:?}");
            let body = c.trim_start_matches('/');
            let body = body.strip_suffix('/').unwrap_or(body);
            prop_assert!(body.is_empty() || body.split('/').all(|s| !s.is_empty() && s != "." && s != ".."), "{c}");
            for bad in [";", "\\", "%2F", "%5C", "%3B", "%00"] {
                prop_assert!(!c.to_ascii_uppercase().contains(bad), "{c} holds {bad}");
            }
            prop_assert!(c.bytes().all(|b| b.is_ascii_graphic()), "{c:?}");
        }
    }

    /// Spelling unreserved characters with escapes never changes the canonical path.
    #[test]
    fn escaped_unreserved_characters_are_the_same_path(
        segs in prop::collection::vec(prop::collection::vec((prop::sample::select("abcXYZ019-._~".chars().collect::<Vec<_>>()), any::<u8>()), 1..6), 1..5)
    ) {
        let plain: String = segs.iter().map(|s| format!("/{}", s.iter().map(|(c, _)| c).collect::<String>())).collect();
        let escaped: String = segs.iter().map(|s| format!("/{}", s.iter().map(|(c, how)| spelled(*c, *how)).collect::<String>())).collect();
        let a = bulkhead_policy::canonical::path(&plain).map(|c| c.into_owned());
        let b = bulkhead_policy::canonical::path(&escaped).map(|c| c.into_owned());
        prop_assert_eq!(a, b, "{} vs {}", plain, escaped);
    }
}
