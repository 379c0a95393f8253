//! The worst case of path matching: globs with several `**` against a path as long as a
//! sidecar accepts (its 64 KiB header limit). With the backtracking matcher this crate had,
//! `/**/v1/**/v1/**/debug` took 15.8 s to decide a 4.8 KB path and grew exponentially in the
//! number of `**`; the matcher now advances a set of pattern positions once per path segment,
//! so its cost is bounded by path length times pattern length.
//!
//! Each input is a path that does not match (the work a denial of the deny rule costs,
//! since every position stays alive to the end), decided through a whole `PolicySet` as a
//! sidecar does, and, for the 64 KiB inputs, the matcher alone.
//!
//! Run: `cargo bench -p bulkhead-policy --bench glob` (figures in BENCHMARKS.md).

mod glob_case;
use bulkhead_policy::{PathPattern, load};
use criterion::{BenchmarkId, Criterion, Throughput};
use glob_case::{DECL, api, decide, no_debug, path};
use std::hint::black_box;
use std::time::Duration;

/// [`no_debug`] on `pattern`, then shop/anyone allowing everything else: a path the glob does
/// not match is allowed.
fn policy(pattern: &str) -> String {
    format!(
        "{}---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: anyone, namespace: shop}}\nspec:\n  selector: {{workload: api}}\n  action: allow\n  rules:\n    - name: all\n",
        no_debug(pattern)
    )
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    let subject = api();
    let mut g = c.benchmark_group("glob worst case, decide");
    for (pattern, sizes) in [
        ("/**/v1/**/v1/**/debug", &[4_800usize, 65_535][..]),
        ("/**/v1/**/debug", &[63_000][..]),
    ] {
        let files = vec![
            ("decl.yaml".to_string(), DECL.to_string()),
            ("p.yaml".to_string(), policy(pattern)),
        ];
        let (_, set) = load(&files, 1).expect("compiles");
        for &size in sizes {
            let target = path(size);
            assert!(
                decide(&set, &subject, &target).is_allow(),
                "not denied: the path must not match"
            );
            g.throughput(Throughput::Bytes(target.len() as u64));
            g.bench_with_input(
                BenchmarkId::new(pattern, format!("{} bytes", target.len())),
                &target,
                |b, t| b.iter(|| decide(&set, &subject, black_box(t)).is_allow()),
            );
        }
    }
    g.finish();
    let mut g = c.benchmark_group("glob worst case, matcher alone");
    let pattern = PathPattern::try_from("/**/v1/**/v1/**/debug".to_string()).expect("glob");
    let target = path(65_535);
    g.throughput(Throughput::Bytes(target.len() as u64));
    g.bench_function("/**/v1/**/v1/**/debug, 65,534 bytes", |b| {
        b.iter(|| pattern.matches(black_box(&target)))
    });
    g.finish();
    c.final_summary();
}
