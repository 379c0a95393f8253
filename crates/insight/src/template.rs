//! Path templates: concrete request paths with their ids taken out, and sets of templates
//! folded into the path patterns a policy can say.
//!
//! [`template`] runs where requests are seen, so that `/orders/123` and `/orders/124` count
//! as one edge and no id, token or e-mail address is stored. [`generalise`] runs where
//! policies are written; everything it returns parses as a [`PathPattern`] and matches every
//! path its templates came from. It may match more (a trailing `*` is a prefix in the
//! language), never less.

use bulkhead_policy::PathPattern;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hasher;

/// A prefix with more distinct children than this is folded into `prefix/*`.
pub const DEFAULT_MAX_CHILDREN: usize = 5;

/// How many distinct path templates the control plane keeps per edge (an edge's key without
/// its path, [`crate::EdgeKey::without_path`]) by default. Templates catch ids; they cannot
/// catch words (`/wiki/Rust`, `/wiki/Go`), so without a bound one app serving word-like
/// paths would make a stored edge per word.
pub const DEFAULT_MAX_PATHS_PER_EDGE: u64 = 64;

/// The template a path is counted into once its edge holds as many templates as it may:
/// any path. Replayed (`impact`) or generalised (`recommend`) it stands for every path, so
/// a recommendation from a folded edge allows any path on it; it never stands for less.
pub const FOLDED_PATH: &str = "/*";

/// Generalises one concrete path: each segment that looks like an id becomes `*`, every other
/// segment stays; the query and fragment are dropped.
///
/// Ids are numbers, UUIDs, hex strings of 8 or more digits, base64url-like tokens of 16 or
/// more characters that hold a digit, and e-mail addresses. A segment holding a `*` also
/// becomes `*`: the policy language has no way to write a literal one.
///
/// `/orders/123/items/9` → `/orders/*/items/*`; `/healthz` and `/` stay as they are.
pub fn template(path: &str) -> String {
    template_segments(path).collect::<Vec<&str>>().join("/")
}

/// Feeds the template of `path` to `state` without building it: equal templates feed equal
/// input, so `template_hash(p)` agrees with `template_hash(&template(p))`, and different
/// templates feed different input. (A template is its own template.)
pub fn template_hash<H: Hasher>(path: &str, state: &mut H) {
    for seg in template_segments(path) {
        state.write(seg.as_bytes());
        // A byte no UTF-8 text holds ends each segment, so `a/bc` and `ab/c` differ.
        state.write_u8(0xff);
    }
}

/// The segments of `template(path)`, `/` between them: a segment never holds a `/`, so
/// splitting the joined template at `/` gives them back.
fn template_segments(path: &str) -> impl Iterator<Item = &str> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    path.split('/')
        .map(|seg| if looks_like_id(seg) { "*" } else { seg })
}

/// Runs for every segment of every request a sidecar counts: one pass over the bytes decides
/// the cheap cases, and the costlier checks run only where they can succeed.
fn looks_like_id(seg: &str) -> bool {
    if seg.is_empty() {
        return false;
    }
    let (mut digits, mut hex, mut star, mut at) = (true, true, false, false);
    for b in seg.bytes() {
        digits &= b.is_ascii_digit();
        hex &= b.is_ascii_hexdigit();
        star |= b == b'*';
        // An e-mail address holds a `@`, plain or as `%40`.
        at |= b == b'@' || b == b'%';
    }
    star || digits
        || is_uuid(seg)
        || (seg.len() >= 8 && hex)
        || is_token(seg)
        || (at && is_email(seg))
}

/// `8-4-4-4-12` hex digits.
fn is_uuid(seg: &str) -> bool {
    seg.len() == 36
        && seg.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Base64url (with optional `=` padding), at least 16 long, with at least one digit.
fn is_token(seg: &str) -> bool {
    if seg.len() < 16 {
        return false;
    }
    let body = seg.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && body.bytes().any(|b| b.is_ascii_digit())
}

/// `local@domain.tld`, with the `@` plain or percent-encoded.
fn is_email(seg: &str) -> bool {
    let split = seg.split_once('@').or_else(|| seg.split_once("%40"));
    split.is_some_and(|(local, domain)| {
        !local.is_empty()
            && domain
                .split_once('.')
                .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
    })
}

/// Folds a set of templates into path patterns with [`DEFAULT_MAX_CHILDREN`]; see
/// [`generalise_with`].
pub fn generalise(templates: &BTreeSet<String>) -> Vec<String> {
    generalise_with(templates, DEFAULT_MAX_CHILDREN)
}

/// Folds a set of templates into path patterns of the policy language, sorted:
///
/// - a prefix with more than `max_children` distinct next segments becomes `prefix/*` (or
///   `prefix/**` when the prefix itself holds a `*`, so it stays a glob that covers any
///   depth). The root is never folded: that would allow every path;
/// - the prefix itself is kept beside the fold when it was seen: `/orders` and `/orders/*`;
/// - a template covered by another one that is a prefix pattern (`/orders/*/items/*` under
///   `/orders/*`) is dropped, since it adds nothing;
/// - templates that are not valid paths in the language (no leading `/`) are left out; the
///   caller decides how to report them.
pub fn generalise_with(templates: &BTreeSet<String>, max_children: usize) -> Vec<String> {
    let valid: Vec<Vec<&str>> = templates
        .iter()
        .filter(|t| PathPattern::try_from(t.to_string()).is_ok())
        .map(|t| t[1..].split('/').collect())
        .collect();
    let members: Vec<&[&str]> = valid.iter().map(|v| v.as_slice()).collect();
    let mut out = BTreeSet::new();
    fold(&members, 0, max_children, &mut out);
    let prefixes: Vec<String> = out
        .iter()
        .filter_map(|p| match PathPattern::try_from(p.clone()) {
            Ok(PathPattern::Prefix(prefix)) => Some(prefix),
            _ => None,
        })
        .collect();
    out.into_iter()
        .filter(|p| {
            !prefixes
                .iter()
                .any(|prefix| p.starts_with(prefix.as_str()) && *p != format!("{prefix}*"))
        })
        .collect()
}

/// `members` share their first `depth` segments.
fn fold(members: &[&[&str]], depth: usize, max_children: usize, out: &mut BTreeSet<String>) {
    let Some(first) = members.first() else {
        return;
    };
    let prefix = format!("/{}", first[..depth].join("/"));
    let mut children: BTreeMap<&str, Vec<&[&str]>> = BTreeMap::new();
    for m in members {
        match m.get(depth) {
            Some(seg) => children.entry(seg).or_default().push(m),
            None => {
                out.insert(prefix.clone());
            }
        }
    }
    if depth > 0 && children.len() > max_children {
        out.insert(if prefix.contains('*') {
            format!("{prefix}/**")
        } else {
            format!("{prefix}/*")
        });
        return;
    }
    for group in children.values() {
        fold(group, depth + 1, max_children, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_become_stars() {
        assert_eq!(template("/orders/123"), "/orders/*");
        assert_eq!(template("/orders/123/items/9"), "/orders/*/items/*");
    }

    #[test]
    fn plain_paths_stay() {
        assert_eq!(template("/healthz"), "/healthz");
        assert_eq!(template("/"), "/");
        assert_eq!(template("/orders/"), "/orders/");
        assert_eq!(template("/api/v2/orders"), "/api/v2/orders");
        assert_eq!(template("/files/report-2023.pdf"), "/files/report-2023.pdf");
    }

    #[test]
    fn the_query_and_fragment_are_dropped() {
        assert_eq!(template("/search?q=shoes&page=2"), "/search");
        assert_eq!(template("/orders/7?x=1#top"), "/orders/*");
        assert_eq!(template("/?q=1"), "/");
    }

    #[test]
    fn uuids_become_stars() {
        assert_eq!(
            template("/carts/3f2504e0-4f89-11d3-9a0c-0305e82c3301/items"),
            "/carts/*/items"
        );
        assert_eq!(
            template("/carts/3F2504E0-4F89-11D3-9A0C-0305E82C3301"),
            "/carts/*"
        );
    }

    #[test]
    fn long_hex_becomes_a_star_and_short_hex_stays() {
        assert_eq!(
            template("/commits/9fceb02d0ae598e95dc970b74767f19372d61af8"),
            "/commits/*"
        );
        assert_eq!(template("/blobs/deadbeef"), "/blobs/*");
        assert_eq!(template("/colors/c0ffee"), "/colors/c0ffee");
        assert_eq!(template("/cafe"), "/cafe");
    }

    #[test]
    fn tokens_with_digits_become_stars() {
        assert_eq!(template("/reset/dGhpcyBpcyBhIHRva2Vu42"), "/reset/*");
        assert_eq!(template("/s/Ab3_dE-fGhIjKlMn"), "/s/*");
        assert_eq!(template("/s/aGVsbG8gd29ybGQx=="), "/s/*");
        // Long, but no digit: a word, not a token.
        assert_eq!(
            template("/docs/getting-started-guide"),
            "/docs/getting-started-guide"
        );
        // Holds a digit, but too short.
        assert_eq!(template("/v/abc123"), "/v/abc123");
    }

    #[test]
    fn email_addresses_become_stars() {
        assert_eq!(template("/users/ada@example.com/prefs"), "/users/*/prefs");
        assert_eq!(template("/users/ada%40example.com"), "/users/*");
        assert_eq!(template("/at/@handle"), "/at/@handle");
    }

    #[test]
    fn literal_stars_become_wildcards() {
        assert_eq!(template("/a*b/c"), "/*/c");
    }

    /// A small deterministic generator (xorshift64*), so the property tests need no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// A path built from segments of every kind `template` tells apart (ids of each kind,
        /// words, near misses, stars, queries, fragments, empty segments, non-ASCII), and from
        /// random characters, so templates often collide and often almost do.
        fn path(&mut self) -> String {
            const SEGMENTS: &[&str] = &[
                "orders",
                "items",
                "1",
                "42",
                "007",
                "deadbeef",
                "deadbee",
                "DEADBEEFCAFE",
                "c0ffee",
                "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
                "3f2504e0-4f89-11d3-9a0c-0305e82c330",
                "dGhpcyBpcyBhIHRva2Vu42",
                "aGVsbG8gd29ybGQx==",
                "getting-started-guide",
                "abc123",
                "ada@example.com",
                "ada%40example.com",
                "@handle",
                "a@b.",
                "a*b",
                "*",
                "",
                "x?y=1",
                "z#top",
                "é",
                "v2",
            ];
            const CHARS: &[u8] = b"0123456789abcdefABCXYZ-_=@.%*?#/";
            let mut p = String::new();
            if self.below(8) != 0 {
                p.push('/');
            }
            for i in 0..self.below(6) {
                if i > 0 {
                    p.push('/');
                }
                if self.below(4) == 0 {
                    for _ in 0..self.below(40) {
                        p.push(char::from(CHARS[self.below(CHARS.len())]));
                    }
                } else {
                    p.push_str(SEGMENTS[self.below(SEGMENTS.len())]);
                }
            }
            p
        }
    }

    fn hash_of(path: &str) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        template_hash(path, &mut h);
        h.finish()
    }

    #[test]
    fn template_hash_agrees_with_template() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let paths: Vec<String> = (0..3_000).map(|_| rng.path()).collect();
        let mut equal_pairs = 0;
        for (i, p) in paths.iter().enumerate() {
            let t = template(p);
            assert_eq!(template(&t), t, "a template is its own template: {p:?}");
            assert_eq!(hash_of(p), hash_of(&t), "{p:?} hashes as its template");
            // Against other paths, and near misses: equal hashes exactly for equal templates.
            for _ in 0..8 {
                let q = &paths[rng.below(paths.len())];
                let u = template(q);
                assert_eq!(hash_of(p) == hash_of(q), t == u, "hashes of {p:?}, {q:?}");
                equal_pairs += usize::from(t == u);
            }
            let mut near = t.clone();
            near.push(if i % 2 == 0 { '/' } else { 'x' });
            if template(&near) != t {
                assert_ne!(hash_of(p), hash_of(&near), "{p:?} vs {near:?}");
            }
            let mut shorter = t.clone();
            if shorter.pop().is_some() && template(&shorter) != t {
                assert_ne!(hash_of(p), hash_of(&shorter), "{p:?} vs {shorter:?}");
            }
        }
        // The generator must make equal templates often, or the test proves little.
        assert!(equal_pairs > 500, "only {equal_pairs} equal pairs");
    }

    /// `looks_like_id` as it was written first, plainly: the faster one must agree with it.
    fn looks_like_id_plainly(seg: &str) -> bool {
        !seg.is_empty()
            && (seg.contains('*')
                || seg.bytes().all(|b| b.is_ascii_digit())
                || is_uuid(seg)
                || (seg.len() >= 8 && seg.bytes().all(|b| b.is_ascii_hexdigit()))
                || is_token(seg)
                || is_email(seg))
    }

    #[test]
    fn looks_like_id_agrees_with_its_plain_form() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for _ in 0..20_000 {
            let path = rng.path();
            for seg in path.split('/') {
                assert_eq!(looks_like_id(seg), looks_like_id_plainly(seg), "{seg:?}");
            }
        }
    }

    #[test]
    fn template_hash_keeps_segment_borders() {
        assert_ne!(hash_of("/a/bc"), hash_of("/ab/c"));
        assert_ne!(hash_of("/a"), hash_of("/a/"));
        assert_eq!(hash_of("/orders/1?x"), hash_of("/orders/*"));
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// Every pattern `generalise` returns must be one the policy language accepts.
    fn check(templates: &[&str], max: usize, expected: &[&str]) {
        let got = generalise_with(&set(templates), max);
        assert_eq!(got, expected);
        for p in &got {
            assert!(
                PathPattern::try_from(p.clone()).is_ok(),
                "{p} does not parse"
            );
        }
    }

    #[test]
    fn few_children_are_kept_as_they_are() {
        check(
            &["/healthz", "/orders", "/orders/*/items"],
            5,
            &["/healthz", "/orders", "/orders/*/items"],
        );
    }

    #[test]
    fn the_root_itself_is_kept() {
        check(&["/", "/healthz"], 5, &["/", "/healthz"]);
    }

    #[test]
    fn more_than_n_children_fold_into_a_prefix() {
        let templates = ["/api/a", "/api/b", "/api/c", "/api/d", "/api/e", "/api/f/x"];
        check(&templates, 5, &["/api/*"]);
        check(&templates[..5], 5, &templates[..5]);
    }

    #[test]
    fn a_prefix_seen_itself_is_kept_beside_its_fold() {
        check(
            &["/api", "/api/a", "/api/b", "/api/c"],
            2,
            &["/api", "/api/*"],
        );
    }

    #[test]
    fn the_root_is_never_folded() {
        check(&["/a", "/b", "/c", "/d"], 2, &["/a", "/b", "/c", "/d"]);
    }

    #[test]
    fn a_fold_below_a_star_stays_a_glob_of_any_depth() {
        let got = generalise_with(&set(&["/users/*/a", "/users/*/b/c", "/users/*/d"]), 2);
        assert_eq!(got, vec!["/users/*/**"]);
        let p = PathPattern::try_from(got[0].clone()).unwrap();
        assert!(p.matches("/users/7/b/c"));
        assert!(!p.matches("/orders/7/b"));
    }

    #[test]
    fn templates_under_a_prefix_pattern_are_dropped() {
        check(
            &["/orders", "/orders/*", "/orders/*/items/*", "/ordersx"],
            5,
            &["/orders", "/orders/*", "/ordersx"],
        );
    }

    #[test]
    fn invalid_templates_are_left_out() {
        check(&["*", "orders", "/ok"], 5, &["/ok"]);
    }

    #[test]
    fn generalised_patterns_match_every_path_they_came_from() {
        let paths = [
            "/orders/1",
            "/orders/2/items/3",
            "/users/ada@example.com/profile",
            "/users/42/profile",
            "/a/b1",
            "/a/b2",
            "/a/b3",
            "/a/b4",
            "/a/b5",
            "/a/b6/deep",
            "/",
        ];
        let templates: BTreeSet<String> = paths.iter().map(|p| template(p)).collect();
        let patterns: Vec<PathPattern> = generalise(&templates)
            .into_iter()
            .map(|p| PathPattern::try_from(p).unwrap())
            .collect();
        for path in paths {
            assert!(
                patterns.iter().any(|p| p.matches(path)),
                "{path} is not matched by {patterns:?}"
            );
        }
    }
}
