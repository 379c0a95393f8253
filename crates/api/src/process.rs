//! The families every Bulkhead process serves beside its own metrics, with the names the
//! Prometheus client libraries give them, so that the dashboards and alerts people already
//! have for any process work on ours: `bulkhead_build_info{version,component}` and
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`, read from `/proc/self` at each scrape. Where there is no
//! `/proc` (not Linux), only the build info is served: a number we cannot read is left out,
//! never made up.
//!
//! Written as OpenMetrics text, the format the rest of `/metrics` is encoded in, and put
//! before its `# EOF` by [`with_process_families`]; `exposition` turns the whole page into
//! the 0.0.4 text format when the scraper asks for that.

use std::fmt::Write as _;

/// Linux reports CPU times and start times in clock ticks of `USER_HZ`, which is 100 on
/// every architecture Linux exports it to user space on (`sysconf(_SC_CLK_TCK)`); the
/// Prometheus client libraries make the same assumption.
const TICKS_PER_SECOND: f64 = 100.0;

/// What `/proc` says about this process now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// Reads `/proc/self`; `None` where it cannot (no `/proc`).
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        ProcessStats::parse(&stat, &status, &boot, open_fds, &limits)
    }

    /// The numbers from the texts of `/proc/self/stat`, `/proc/self/status`, `/proc/stat`
    /// and `/proc/self/limits`.
    pub fn parse(
        stat: &str,
        status: &str,
        boot: &str,
        open_fds: u64,
        limits: &str,
    ) -> Option<ProcessStats> {
        // The command name is in parentheses and may hold spaces and parentheses itself:
        // the fields that follow start after the last `)`, with the state (field 3).
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let (utime, stime, start_ticks) = (field(14)?, field(15)?, field(22)?);
        let btime: u64 = boot
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let kib = |key: &str| -> Option<u64> {
            let rest = status.lines().find_map(|l| l.strip_prefix(key))?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        };
        let max_fds = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok());
        Some(ProcessStats {
            cpu_seconds: (utime + stime) as f64 / TICKS_PER_SECOND,
            resident_bytes: kib("VmRSS:").unwrap_or(0) * 1024,
            virtual_bytes: kib("VmSize:").unwrap_or(0) * 1024,
            open_fds,
            max_fds,
            start_time_seconds: btime as f64 + start_ticks as f64 / TICKS_PER_SECOND,
        })
    }
}

/// The build info and process families, in OpenMetrics text. `component` is `proxy` or
/// `control`.
pub fn families(component: &str, stats: Option<&ProcessStats>) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = write_families(&mut out, component, stats);
    out
}

fn write_families(
    out: &mut String,
    component: &str,
    stats: Option<&ProcessStats>,
) -> std::fmt::Result {
    writeln!(
        out,
        "# HELP bulkhead_build Which Bulkhead build this process runs (always 1)."
    )?;
    writeln!(out, "# TYPE bulkhead_build info")?;
    writeln!(
        out,
        "bulkhead_build_info{{version=\"{}\",component=\"{component}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )?;
    let Some(s) = stats else {
        return Ok(());
    };
    let mut family = |name: &str, kind: &str, help: &str, sample: &str, value: String| {
        writeln!(out, "# HELP {name} {help}")?;
        writeln!(out, "# TYPE {name} {kind}")?;
        writeln!(out, "{sample} {value}")
    };
    family(
        "process_cpu_seconds",
        "counter",
        "Total user and system CPU time spent in seconds.",
        "process_cpu_seconds_total",
        s.cpu_seconds.to_string(),
    )?;
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        "process_resident_memory_bytes",
        s.resident_bytes.to_string(),
    )?;
    family(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        "process_virtual_memory_bytes",
        s.virtual_bytes.to_string(),
    )?;
    family(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        "process_open_fds",
        s.open_fds.to_string(),
    )?;
    if let Some(max) = s.max_fds {
        family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            "process_max_fds",
            max.to_string(),
        )?;
    }
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        "process_start_time_seconds",
        s.start_time_seconds.to_string(),
    )
}

/// `openmetrics` (a page `prometheus-client` encoded) with the build info and process
/// families of this process, read now, before its `# EOF`.
pub fn with_process_families(openmetrics: String, component: &str) -> String {
    let extra = families(component, ProcessStats::read().as_ref());
    let body = openmetrics.strip_suffix("# EOF\n").unwrap_or(&openmetrics);
    let mut out = String::with_capacity(body.len() + extra.len() + 6);
    out.push_str(body);
    out.push_str(&extra);
    out.push_str("# EOF\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_texts_as_linux_writes_them() {
        let stat = "4242 (bulkhead (x) y) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 50 0 0 20 0 3 0 12345 100000000 2000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let status = "Name:\tbulkhead\nVmSize:\t  97656 kB\nVmRSS:\t    8000 kB\n";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 5\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        let s = ProcessStats::parse(stat, status, boot, 9, limits).unwrap();
        assert_eq!(
            s,
            ProcessStats {
                cpu_seconds: 3.0,
                resident_bytes: 8_192_000,
                virtual_bytes: 99_999_744,
                open_fds: 9,
                max_fds: Some(1024),
                start_time_seconds: 1_700_000_123.45,
            }
        );
        assert_eq!(
            ProcessStats::parse("garbage", status, boot, 1, limits),
            None
        );
    }

    #[test]
    fn this_process_reads_and_the_families_sit_before_eof() {
        let page = with_process_families("# EOF\n".to_string(), "proxy");
        assert!(page.ends_with("# EOF\n"));
        assert!(page.contains("bulkhead_build_info{version=\""), "{page}");
        assert!(page.contains(",component=\"proxy\"} 1\n"), "{page}");
        if std::path::Path::new("/proc/self/stat").exists() {
            let s = ProcessStats::read().unwrap();
            assert!(s.resident_bytes > 0 && s.open_fds > 0 && s.start_time_seconds > 1e9);
            assert!(page.contains("\nprocess_resident_memory_bytes "), "{page}");
            assert!(page.contains("\nprocess_cpu_seconds_total "), "{page}");
        }
    }
}
