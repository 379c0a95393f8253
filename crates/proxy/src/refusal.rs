//! Every refusal the proxy makes on its own (not a policy denial, which is a `Decision`, and
//! not a refused TLS handshake, which has its own reasons): counted in
//! `bulkhead_refusals_total{direction, reason}` and logged — at most one line per reason
//! every [`LOG_WINDOW`], saying how many went unlogged since, so that a flood of refusals
//! costs a counter increment each and not a log line each.
//!
//! It must never decide anything: callers refuse, this only counts and says so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why something was refused or cut. Each is one value of the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Refusal {
    /// A listener at `--max-connections` closed a new connection at accept.
    TooManyConnections,
    /// A request head was not complete within `--header-read-timeout-secs` of its first
    /// byte (slowloris); the connection is closed.
    HeaderTimeout,
    /// A request head over `--max-header-bytes`: 431.
    HeaderTooLarge,
    /// An HTTP/2 client reset streams faster than it let them finish: GOAWAY
    /// (ENHANCE_YOUR_CALM) and the connection closed.
    RapidReset,
    /// An ambiguous request path: 400.
    BadPath,
    /// Inbound: an opaque TCP relay (or non-HTTP plaintext) to a port declared for HTTP,
    /// whose HTTP rules it would bypass.
    OpaqueToHttpPort,
    /// Inbound: multiplexed HTTP to a port declared `tcp`, which is only ever relayed.
    HttpToTcpPort,
    /// Outbound: an idle or non-HTTP connection to a destination port declared for HTTP,
    /// refused without dialling the peer (which would refuse it).
    NotHttp,
    /// An `Upgrade` to a protocol the port does not allow (`h2c` never): the upgrade is
    /// stripped and the request served as plain HTTP/1.1.
    UpgradeRefused,
    /// The app or upstream answered `101` with another protocol than the one asked for.
    UpgradeMismatch,
    /// A request body stalled longer than `--body-idle-timeout-secs`: 408.
    BodyIdleTimeout,
    /// A request body not complete within `--body-timeout-secs`: 408.
    BodyTimeout,
    /// A request body that could not be read (bad chunked encoding, cut short): 400.
    BadRequestBody,
    /// No response head within `--response-timeout-secs` of the request's end: 504.
    ResponseTimeout,
    /// Transparent mode: the destination's address changed owner since the connection was
    /// routed: 503, and the connection closed.
    RouteChanged,
    /// An open TCP relay or upgraded connection closed because a new policy denies it.
    PolicyChanged,
    /// Transparent mode: a connection without an original destination.
    NoOriginalDestination,
}

impl Refusal {
    pub(crate) const ALL: [Refusal; 17] = [
        Refusal::TooManyConnections,
        Refusal::HeaderTimeout,
        Refusal::HeaderTooLarge,
        Refusal::RapidReset,
        Refusal::BadPath,
        Refusal::OpaqueToHttpPort,
        Refusal::HttpToTcpPort,
        Refusal::NotHttp,
        Refusal::UpgradeRefused,
        Refusal::UpgradeMismatch,
        Refusal::BodyIdleTimeout,
        Refusal::BodyTimeout,
        Refusal::BadRequestBody,
        Refusal::ResponseTimeout,
        Refusal::RouteChanged,
        Refusal::PolicyChanged,
        Refusal::NoOriginalDestination,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::HeaderTooLarge => "header_too_large",
            Refusal::RapidReset => "rapid_reset",
            Refusal::BadPath => "bad_path",
            Refusal::OpaqueToHttpPort => "opaque_to_http_port",
            Refusal::HttpToTcpPort => "http_to_tcp_port",
            Refusal::NotHttp => "not_http",
            Refusal::UpgradeRefused => "upgrade_refused",
            Refusal::UpgradeMismatch => "upgrade_mismatch",
            Refusal::BodyIdleTimeout => "body_idle_timeout",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::BadRequestBody => "bad_request_body",
            Refusal::ResponseTimeout => "response_timeout",
            Refusal::RouteChanged => "route_changed",
            Refusal::PolicyChanged => "policy_changed",
            Refusal::NoOriginalDestination => "no_original_destination",
        }
    }

    fn index(self) -> usize {
        Refusal::ALL
            .iter()
            .position(|r| *r == self)
            // Every variant is in ALL (the unit test checks it).
            .unwrap_or(0)
    }
}

/// At most one log line per reason in this window.
pub(crate) const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Whether a refusal may be logged now; one gate per reason.
pub(crate) struct LogGates {
    start: Instant,
    window_ms: u64,
    gates: [Gate; Refusal::ALL.len()],
}

#[derive(Default)]
struct Gate {
    /// Milliseconds since `start` from which the next line may be written.
    next_at: AtomicU64,
    /// Refusals not logged since the last line.
    unlogged: AtomicU64,
}

impl Default for LogGates {
    fn default() -> LogGates {
        LogGates::with_window(LOG_WINDOW)
    }
}

impl LogGates {
    pub(crate) fn with_window(window: Duration) -> LogGates {
        LogGates {
            start: Instant::now(),
            window_ms: window.as_millis() as u64,
            gates: Default::default(),
        }
    }

    /// `Some(n)` if this refusal should be logged, `n` being how many of its kind went
    /// unlogged since the last line; `None` if it is to be counted only.
    pub(crate) fn admit(&self, r: Refusal) -> Option<u64> {
        let gate = &self.gates[r.index()];
        let now = self.start.elapsed().as_millis() as u64;
        let next = gate.next_at.load(Ordering::Relaxed);
        if now >= next
            && gate
                .next_at
                .compare_exchange(
                    next,
                    now + self.window_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(gate.unlogged.swap(0, Ordering::Relaxed));
        }
        gate.unlogged.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_label_and_gate() {
        let labels: std::collections::HashSet<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn a_burst_is_logged_once_then_summed() {
        let gates = LogGates::with_window(Duration::from_millis(200));
        assert_eq!(gates.admit(Refusal::NotHttp), Some(0));
        for _ in 0..4999 {
            assert_eq!(gates.admit(Refusal::NotHttp), None);
        }
        // Another reason has its own gate.
        assert_eq!(gates.admit(Refusal::BadPath), Some(0));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(gates.admit(Refusal::NotHttp), Some(4999));
        assert_eq!(gates.admit(Refusal::NotHttp), None);
    }
}
