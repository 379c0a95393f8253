//! Tidy checks: the invariants ARCHITECTURE.md states about the crate graph, checked on every
//! `cargo test` so that a change that breaks one fails here and not in review.
//!
//! - Workspace dependencies point one way, as the table below says; a new crate must be added
//!   to the table (and to ARCHITECTURE.md's code map) before the check passes.
//! - The pure crates (`spiffe`, `policy`, `insight`, `identity`) depend on no runtime, socket, store or
//!   wire crate, and their non-test code names no `std::net`, `std::fs`, `tokio` or clock.
//! - Only `api` knows protobuf (prost and its code generators).
//! - Only `proxy`, `control`, `sample-app`, `testkit` and `api`'s `channel` and `otlp` name
//!   a socket: the CLI, for one, opens none of its own.
//!
//! It reads `cargo metadata` and the source files as text; it runs nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each workspace crate and the workspace crates it may depend on (normal and build
/// dependencies). Dev-dependencies may add `bulkhead-testkit`.
const LAYERS: &[(&str, &[&str])] = &[
    ("bulkhead-spiffe", &[]),
    ("bulkhead-policy", &["bulkhead-spiffe"]),
    ("bulkhead-identity", &["bulkhead-spiffe"]),
    ("bulkhead-insight", &["bulkhead-policy", "bulkhead-spiffe"]),
    ("bulkhead-api", &["bulkhead-policy", "bulkhead-identity"]),
    (
        "bulkhead-proxy",
        &[
            "bulkhead-policy",
            "bulkhead-identity",
            "bulkhead-api",
            "bulkhead-insight",
        ],
    ),
    (
        "bulkhead-control",
        &[
            "bulkhead-policy",
            "bulkhead-identity",
            "bulkhead-api",
            "bulkhead-insight",
        ],
    ),
    (
        "bulkhead-kubernetes",
        &[
            "bulkhead-policy",
            "bulkhead-identity",
            "bulkhead-api",
            "bulkhead-insight",
            "bulkhead-control",
        ],
    ),
    ("bulkhead-sample-app", &[]),
    ("bulkhead-testkit", &["bulkhead-identity"]),
    (
        "bulkhead-cli",
        &[
            "bulkhead-policy",
            "bulkhead-identity",
            "bulkhead-api",
            "bulkhead-insight",
            "bulkhead-proxy",
            "bulkhead-control",
            "bulkhead-kubernetes",
            "bulkhead-sample-app",
        ],
    ),
];

/// The crates that must stay pure: no I/O, no runtime, no clock.
const PURE: &[&str] = &[
    "bulkhead-spiffe",
    "bulkhead-policy",
    "bulkhead-insight",
    "bulkhead-identity",
];

/// Registry crates a pure crate may not depend on: runtimes, sockets, stores, the wire.
const NOT_IN_PURE: &[&str] = &[
    "tokio",
    "mio",
    "socket2",
    "hyper",
    "hyper-util",
    "tonic",
    "prost",
    "axum",
    "redb",
    "tokio-rustls",
];

/// Protobuf crates: only `bulkhead-api` may depend on them.
const PROTOBUF: &[&str] = &[
    "prost",
    "prost-types",
    "protox",
    "tonic-prost",
    "tonic-prost-build",
];

/// What the non-test source of a pure crate may not name.
const NOT_IN_PURE_SOURCE: &[&str] = &[
    "std::net",
    "std::fs",
    "tokio",
    "SystemTime::now",
    "Instant::now",
];

/// The crates whose code may open sockets: the sidecar, the control plane, the sample app the
/// demo and tests serve, and the harness that only tests use.
const SOCKET_CRATES: &[&str] = &[
    "bulkhead-proxy",
    "bulkhead-control",
    "bulkhead-sample-app",
    "bulkhead-testkit",
];

/// And the modules of other crates that may: `api`'s dialer of the control plane and its
/// exporter of spans to a collector; `kubernetes`' injection webhook (an HTTPS server) and
/// its TokenReview client.
const SOCKET_MODULES: &[&str] = &[
    "crates/api/src/channel.rs",
    "crates/api/src/channel/replicas.rs",
    "crates/api/src/otlp.rs",
    "crates/kubernetes/src/webhook.rs",
    "crates/kubernetes/src/attest.rs",
];

/// What opens a socket, as source names it: socket types, and tonic's dialer and server.
/// Address types (`SocketAddr`, `IpAddr`) are values and allowed.
const SOCKET_NAMES: &[&str] = &[
    "std::net::Tcp",
    "std::net::Udp",
    "tokio::net",
    "TcpListener",
    "TcpStream",
    "UdpSocket",
    "UnixStream",
    "UnixListener",
    "socket2",
    "transport::Endpoint",
    "transport::Server",
];

#[derive(Debug)]
struct Dep {
    name: String,
    kind: Option<String>,
}

#[derive(Debug)]
struct Package {
    name: String,
    manifest: PathBuf,
    deps: Vec<Dep>,
    /// The source files of its integration-test targets.
    tests: Vec<PathBuf>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/testkit is two levels below the workspace root")
        .to_path_buf()
}

fn packages() -> Vec<Package> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut metadata = std::process::Command::new(cargo);
    metadata
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace_root());
    let out = crate::stdout_of(&mut metadata, "cargo metadata");
    let meta: serde_json::Value = serde_json::from_slice(&out).expect("metadata is JSON");
    meta["packages"]
        .as_array()
        .expect("packages is an array")
        .iter()
        .map(|p| Package {
            name: p["name"].as_str().unwrap_or_default().to_string(),
            manifest: PathBuf::from(p["manifest_path"].as_str().unwrap_or_default()),
            tests: p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| {
                    t["kind"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k == "test"))
                })
                .map(|t| PathBuf::from(t["src_path"].as_str().unwrap_or_default()))
                .collect(),
            deps: p["dependencies"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| Dep {
                    name: d["name"].as_str().unwrap_or_default().to_string(),
                    kind: d["kind"].as_str().map(str::to_string),
                })
                .collect(),
        })
        .collect()
}

#[test]
fn workspace_dependencies_point_one_way() {
    let layers: BTreeMap<&str, BTreeSet<&str>> = LAYERS
        .iter()
        .map(|(name, deps)| (*name, deps.iter().copied().collect()))
        .collect();
    let mut wrong = Vec::new();
    for p in packages() {
        let Some(allowed) = layers.get(p.name.as_str()) else {
            wrong.push(format!(
                "{} is not in the crate table of crates/testkit/src/tidy.rs: add it there and to ARCHITECTURE.md's code map, with the crates it may depend on",
                p.name
            ));
            continue;
        };
        for d in p.deps.iter().filter(|d| d.name.starts_with("bulkhead-")) {
            let dev = d.kind.as_deref() == Some("dev");
            let ok = allowed.contains(d.name.as_str()) || (dev && d.name == "bulkhead-testkit");
            if !ok {
                wrong.push(format!(
                    "{} depends on {}{}, which the crate graph does not allow",
                    p.name,
                    d.name,
                    if dev { " (dev)" } else { "" }
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn pure_crates_depend_on_no_runtime_socket_or_store() {
    let mut wrong = Vec::new();
    for p in packages()
        .iter()
        .filter(|p| PURE.contains(&p.name.as_str()))
    {
        for d in p.deps.iter().filter(|d| d.kind.as_deref() != Some("dev")) {
            if NOT_IN_PURE.contains(&d.name.as_str()) {
                wrong.push(format!("{} (pure) depends on {}", p.name, d.name));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn only_api_knows_protobuf() {
    let mut wrong = Vec::new();
    for p in packages().iter().filter(|p| p.name != "bulkhead-api") {
        for d in &p.deps {
            if PROTOBUF.contains(&d.name.as_str()) {
                wrong.push(format!("{} depends on {}", p.name, d.name));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The lines of a file before its first `#[cfg(test)]` (tests sit at the bottom), without
/// comment lines. Files named `tests.rs` are test modules and have no such lines.
fn non_test_lines(path: &Path) -> Vec<(usize, String)> {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return Vec::new();
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .enumerate()
        .take_while(|(_, l)| l.trim() != "#[cfg(test)]")
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect()
}

/// Each non-test line of `package`'s sources (below its `src/`, but the files `skip` names,
/// relative to the workspace root) that names one of `names`: `path:line: package names
/// `name``.
fn naming(package: &Package, names: &[&str], skip: &[&str]) -> Vec<String> {
    let src = package
        .manifest
        .parent()
        .expect("a manifest is in a directory")
        .join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        !files.is_empty(),
        "no sources found below {}",
        src.display()
    );
    let root = workspace_root();
    let mut found = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&root).unwrap_or(&file);
        if skip.iter().any(|m| relative == Path::new(m)) {
            continue;
        }
        for (line, text) in non_test_lines(&file) {
            for name in names.iter().filter(|n| text.contains(*n)) {
                found.push(format!(
                    "{}:{line}: {} names `{name}`",
                    file.display(),
                    package.name
                ));
            }
        }
    }
    found
}

#[test]
fn pure_crates_name_no_io_runtime_or_clock() {
    let wrong: Vec<String> = packages()
        .iter()
        .filter(|p| PURE.contains(&p.name.as_str()))
        .flat_map(|p| naming(p, NOT_IN_PURE_SOURCE, &[]))
        .map(|found| format!("{found}; the pure crates do no I/O and read no clock (use core::net for address types, take the time as an argument)"))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn only_proxy_control_sample_app_and_the_api_dialers_open_sockets() {
    let wrong: Vec<String> = packages()
        .iter()
        .filter(|p| !SOCKET_CRATES.contains(&p.name.as_str()))
        .flat_map(|p| naming(p, SOCKET_NAMES, SOCKET_MODULES))
        .map(|found| format!("{found}; only proxy, control, sample-app, kubernetes' webhook and attest, and api's channel and otlp open sockets (ARCHITECTURE.md)"))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A crate with `autotests = false` runs only the test files its manifest names: a file in
/// `tests/` that no `[[test]]` entry names is silently never built (a merge once dropped one).
#[test]
fn every_integration_test_file_is_a_test_target() {
    let mut wrong = Vec::new();
    for p in packages() {
        let Some(dir) = p.manifest.parent().map(|d| d.join("tests")) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for file in entries.flatten().map(|e| e.path()) {
            if file.extension().is_some_and(|e| e == "rs") && !p.tests.contains(&file) {
                wrong.push(format!(
                    "{} is not a test target of {}: add a [[test]] entry for it to {}",
                    file.display(),
                    p.name,
                    p.manifest.display()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
