//! What sharing flows between replicas on etcd costs at the flow store's bound (see
//! `bench/flows_scale.sh` and ARCHITECTURE.md, "Replicas on etcd").
//!
//! The design before issue #18's measurement had each replica write the edges reported to
//! it, as one JSON value, to `flows/<id>` in etcd under its lease (at most 1 MiB, the most
//! recently seen first, halved until it fitted), and `ListEdges` read the others' values.
//! Now `ListEdges` asks the other replicas for their edges (JSON chunks over gRPC) when it
//! is called. This example builds edges the way sidecars report them (distinct keys:
//! caller, callee, port, method, path template, verdict, policy, rule), then measures, for
//! a set of sizes:
//!
//! - the JSON of one replica's edges, in bytes, and per edge (what the old design put into
//!   one etcd value; what the new one streams in chunks);
//! - how many of them the old design kept within 1 MiB (its halving);
//! - the time to encode one replica's edges, to decode three replicas', and to merge them
//!   into the union `ListEdges` answers (both designs pay the last two per call).
//!
//! ```text
//! target/release/examples/flows_scale [--edges 200000] [--replicas 3] [--out DIR]
//! ```
//!
//! `--out DIR` writes each replica-sized value to `DIR/flows-<edges>.json`, for
//! `bench/flows_scale.sh` to put into a real etcd.

use bulkhead_identity::SpiffeId;
use bulkhead_insight::{Edge, EdgeKey, EdgeStats, EdgeVerdict, merge_edges};
use bulkhead_policy::Protocol;
use bulkhead_policy::model::{Direction, ResourceName};
use std::path::PathBuf;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// What the old design wrote at most per replica.
const MAX_SHARED_FLOW_BYTES: usize = 1024 * 1024;
/// etcd's default request limit (`--max-request-bytes`).
const ETCD_REQUEST_LIMIT: usize = 1536 * 1024;
const NOW: u64 = 1_780_000_000;

fn workload(i: usize) -> ResourceName {
    ResourceName {
        namespace: format!("team-{}", i % 40),
        name: format!("service-{i}"),
    }
}

/// Edge `n` of a mesh of 2,000 workloads: each calls 20 others, on a few routes each, with
/// the policy and rule that allowed them.
fn edge(n: usize, replica: usize) -> Result<Edge> {
    let callee = n % 2000;
    let caller = (callee + 1 + (n / 2000) % 20) % 2000;
    let route = n / 40_000;
    let src = workload(caller);
    let dst = workload(callee);
    let identity = SpiffeId::parse(&format!(
        "spiffe://prod.example/ns/{}/sa/{}",
        src.namespace, src.name
    ))?;
    let at = NOW - (n as u64 % 3600) - replica as u64;
    Ok(Edge {
        key: EdgeKey {
            source_identity: Some(identity),
            source_workload: Some(src),
            policy: Some(format!("{}/allow-{}", dst.namespace, dst.name)),
            rule: Some(format!("callers-{}", route % 4)),
            destination: dst,
            port: 8080,
            protocol: Protocol::Http,
            method: Some(["GET", "POST", "PUT", "DELETE"][route % 4].to_string()),
            path: Some(format!("/api/v{}/items/*", route)),
            verdict: EdgeVerdict::Allow,
            direction: Direction::Ingress,
        },
        stats: EdgeStats {
            count: 1000 + n as u64,
            bytes_in: 512_000 + n as u64,
            bytes_out: 2_048_000 + n as u64,
            latency_sum_micros: 1_500_000 + n as u64,
            latency_max_micros: 25_000,
            first_seen: at - 7200,
            last_seen: at,
        },
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The old design's trimming: the most recently seen first, halved until the JSON fits.
fn trim_to_fit(mut edges: Vec<Edge>) -> Result<(usize, usize)> {
    edges.sort_by_key(|e| std::cmp::Reverse(e.stats.last_seen));
    let mut json = serde_json::to_vec(&edges)?;
    while json.len() > MAX_SHARED_FLOW_BYTES && !edges.is_empty() {
        edges.truncate(edges.len() / 2);
        json = serde_json::to_vec(&edges)?;
    }
    Ok((edges.len(), json.len()))
}

fn main() -> Result<()> {
    let mut max_edges = 200_000;
    let mut replicas = 3;
    let mut out: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--edges" => max_edges = value.parse()?,
            "--replicas" => replicas = value.parse()?,
            "--out" => out = Some(PathBuf::from(value)),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if replicas == 0 || max_edges == 0 {
        return Err("--edges and --replicas must be positive".into());
    }
    println!(
        "Flows shared through etcd: {replicas} replicas, sizes up to {max_edges} edges per replica"
    );
    println!(
        "  {:>9} {:>11} {:>8} {:>10} {:>12} {:>9} {:>10} {:>10} {:>10}",
        "edges/rep",
        "JSON bytes",
        "B/edge",
        "etcd fits",
        "fit in 1MiB",
        "encode ms",
        "decode ms",
        "merge ms",
        "union"
    );
    let mut sizes: Vec<usize> = [1_000, 5_000, 10_000, max_edges / replicas, max_edges]
        .into_iter()
        .filter(|&s| s > 0 && s <= max_edges)
        .collect();
    sizes.sort();
    sizes.dedup();
    for size in sizes {
        // Each replica saw its own callers of the same callees: the keys overlap by a third.
        let sets = (0..replicas)
            .map(|r| {
                (0..size)
                    .map(|n| edge(n + r * size / 3, r))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let t = Instant::now();
        let json = serde_json::to_vec(&sets[0])?;
        let encode = t.elapsed();
        let values = sets
            .iter()
            .map(serde_json::to_vec)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if let Some(dir) = &out {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(format!("flows-{size}.json")), &json)?;
        }
        let t = Instant::now();
        let decoded = values
            .iter()
            .map(|v| serde_json::from_slice::<Vec<Edge>>(v))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let decode = t.elapsed();
        let t = Instant::now();
        let union = merge_edges(decoded.into_iter().flatten());
        let merge = t.elapsed();
        let (fit, _) = trim_to_fit(sets[0].clone())?;
        println!(
            "  {size:>9} {:>11} {:>8.0} {:>10} {:>12} {:>9.1} {:>10.1} {:>10.1} {:>10}",
            json.len(),
            json.len() as f64 / size as f64,
            if json.len() <= ETCD_REQUEST_LIMIT {
                "yes"
            } else {
                "no"
            },
            fit,
            ms(encode),
            ms(decode),
            ms(merge),
            union.len()
        );
    }
    println!(
        "  (etcd fits: under etcd's default request limit of {ETCD_REQUEST_LIMIT} bytes; fit in 1MiB: the edges the old design kept)"
    );
    Ok(())
}
