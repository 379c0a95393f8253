//! Decides one request of the worst shape for path globs, once, so that its cost can be
//! counted in instructions, free of the machine's noise:
//! `valgrind --tool=callgrind target/release/examples/glob_worst 65535` (BENCHMARKS.md).
//!
//! The policy denies `/**/v1/**/v1/**/debug`; the path is `/v1/v1/…/x`, BYTES long, which
//! keeps every `**` alive to the end and does not match. Before matching was linear, a
//! 4,800-byte path took 15.8 s.

#[path = "../benches/glob_case/mod.rs"]
mod glob_case;
use bulkhead_policy::PolicySet;
use glob_case::{DECL, api, decide, no_debug, path};

fn main() {
    let bytes: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("a path length in bytes"))
        .unwrap_or(65_535);
    let target = path(bytes);
    let set = format!("{DECL}{}", no_debug("/**/v1/**/v1/**/debug"));
    let (_, set): (_, PolicySet) =
        bulkhead_policy::load(&[("p.yaml".into(), set)], 1).expect("compiles");
    let decision = decide(&set, &api(), &target);
    println!("{} bytes: {decision}", target.len());
}
