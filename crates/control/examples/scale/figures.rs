//! Readings and statistics for the scale benchmark: `/proc` figures of the control plane,
//! nearest-rank percentiles, the printed rows.

use crate::Result;
use bulkhead_api::v1::ProxyConfig;
use std::time::Duration;

/// A `kB` field of `/proc/PID/status` (VmRSS, VmHWM …).
pub fn proc_status_kb(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}

/// User + system CPU time of a process, from `/proc/PID/stat` (USER_HZ is 100 on Linux).
pub fn proc_cpu(pid: &str) -> Result<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = text.rsplit_once(')').ok_or("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let ticks: u64 = fields.get(11).ok_or("short stat")?.parse::<u64>()?
        + fields.get(12).ok_or("short stat")?.parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

/// The protobuf size of a configuration message (computed by hand: this crate does not
/// depend on prost directly).
pub fn encoded_len(m: &ProxyConfig) -> usize {
    fn varint(mut v: u64) -> usize {
        let mut n = 1;
        while v >= 0x80 {
            v >>= 7;
            n += 1;
        }
        n
    }
    fn field(len: usize) -> usize {
        if len == 0 {
            0
        } else {
            1 + varint(len as u64) + len
        }
    }
    let revision = if m.revision == 0 {
        0
    } else {
        1 + varint(m.revision)
    };
    revision
        + m.resources
            .iter()
            .map(|r| {
                let inner = field(r.kind.len())
                    + field(r.namespace.len())
                    + field(r.name.len())
                    + field(r.json.len());
                1 + varint(inner as u64) + inner
            })
            .sum::<usize>()
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub struct Dist {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

pub fn dist(values: &[Duration]) -> Dist {
    let mut v = values.to_vec();
    v.sort();
    Dist {
        p50: percentile(&v, 50.0),
        p90: percentile(&v, 90.0),
        p99: percentile(&v, 99.0),
        max: *v.last().unwrap_or(&Duration::ZERO),
    }
}

pub fn row(name: &str, d: &Dist) {
    println!(
        "  {name:<34} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
        ms(d.p50),
        ms(d.p90),
        ms(d.p99),
        ms(d.max)
    );
}

/// A line `bench/control_scale.sh` puts beside the same line of the other store.
pub fn figure(name: &str, value: String) {
    println!("figure: {name}|{value}");
}

pub fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}
