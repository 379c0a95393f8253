//! The web console (issue 21): the live service graph, every decision explained, each
//! workload's reach and blast radius, the policies with their history and recommendations,
//! a live tap and the anomaly events, in a browser.
//!
//! It exists so that operators can look rather than read tables, and it is one more reader
//! of the admin API's state, never a second source of truth: every view is computed from the
//! [`State`] the gRPC Admin handlers use (the snapshot, history, stored edges, proxies,
//! events, tap sessions) with the same pure functions the CLI uses (`bulkhead_insight`,
//! `bulkhead_policy`).
//!
//! What it must never do:
//! - change anything: the console is read-only (no policy, token or CA change through it), so
//!   the only POSTs are the login exchange and the logout, and no GET changes state;
//! - show anything without a session: every API answer and every page is 401 without the
//!   admin client certificate or a session cookie, and carries no data (the static script
//!   and style sheet, the same for everyone, are the only exception);
//! - serve plain HTTP beyond loopback (`--console-insecure-http` is refused elsewhere);
//! - let a page run code or style it did not load from the console itself (a strict CSP).
//!
//! Modules: `auth` (login tokens, sessions, cookies, the checks on every request), `serve`
//! (the listener, TLS with a certificate from the mesh's CA, security headers), `views`
//! (graph, edge decisions, events), `workload`, `policies` (JSON views), `live` (server-sent
//! events and tap), `assets` (the embedded front end, built from `console/`).

mod assets;
mod auth;
mod live;
mod policies;
mod serve;
mod views;
mod workload;

pub(crate) use auth::create_token;
pub(crate) use serve::spawn;

use std::net::SocketAddr;
use std::sync::OnceLock;
use tokio::sync::watch;

/// How the console is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleTransport {
    /// HTTPS with a certificate the control plane issues from its own CA (the default).
    Https,
    /// Plain HTTP, allowed on a loopback address only (`--console-insecure-http`).
    InsecureHttpOnLoopback,
}

/// `bulkhead control --console ADDR [--console-host NAME]… [--console-insecure-http]`.
#[derive(Clone, Debug)]
pub struct ConsoleOptions {
    pub listen: SocketAddr,
    pub transport: ConsoleTransport,
    /// Names (DNS or IP) browsers use to reach the console besides the listen address: they
    /// go into its certificate, and only requests naming one of them (or the listen
    /// address) in their Host header are answered.
    pub hosts: Vec<String>,
}

impl ConsoleOptions {
    /// The names a request may carry in its Host header (without the port), the first being
    /// the one the console's address is printed with. Refuses plain HTTP off loopback, and
    /// an unspecified listen address with no name to reach it by.
    pub(crate) fn names(&self) -> Result<Vec<String>, crate::ControlError> {
        let ip = self.listen.ip();
        if self.transport == ConsoleTransport::InsecureHttpOnLoopback && !ip.is_loopback() {
            return Err(crate::ControlError::Console(format!(
                "--console-insecure-http serves plain HTTP, which is allowed on a loopback address only, not {ip}; drop the flag to serve HTTPS with a certificate from the mesh's CA"
            )));
        }
        let mut names: Vec<String> = Vec::new();
        for h in &self.hosts {
            let h = h.trim().trim_start_matches('[').trim_end_matches(']');
            if h.is_empty() || h.contains(['/', ':', ' ']) && h.parse::<std::net::IpAddr>().is_err()
            {
                return Err(crate::ControlError::Console(format!(
                    "--console-host {h:?} is not a host name or an IP address"
                )));
            }
            names.push(h.to_ascii_lowercase());
        }
        if !ip.is_unspecified() {
            names.push(ip.to_string());
        } else if names.is_empty() {
            return Err(crate::ControlError::Console(format!(
                "the console listens on {ip}, which browsers cannot name; pass --console-host with the name or address they will use"
            )));
        }
        if ip.is_loopback() {
            names.push("localhost".into());
        }
        names.dedup();
        Ok(names)
    }
}

/// What the rest of the control plane holds of the console: whether it is served and where,
/// its login tokens and sessions, and the signal that new flows were stored.
#[derive(Default)]
pub(crate) struct Console {
    /// Set once, when the console's listener is bound.
    served: OnceLock<Served>,
    auth: auth::Auth,
    /// Bumped after every stored flow report: live views recompute.
    flows: watch::Sender<u64>,
    /// Compiled sets and revision times, for replays.
    memo: views::Memo,
    /// Revision diffs, which never change once made.
    diffs: policies::Diffs,
    /// The bound on open live streams.
    streams: live::Streams,
}

#[derive(Clone, Debug)]
pub(crate) struct Served {
    /// `https://127.0.0.1:7445/`
    pub url: String,
    pub secure: bool,
    /// Host header values answered: each name with the port.
    pub hosts: Vec<String>,
    /// The origin every POST must come from: the URL without its path.
    pub origins: Vec<String>,
}

impl Console {
    /// Called after each flow report is stored (edges, and any anomaly events it raised).
    pub(crate) fn flows_reported(&self) {
        self.flows.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn served(&self) -> Option<&Served> {
        self.served.get()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn options(listen: &str, transport: ConsoleTransport, hosts: &[&str]) -> ConsoleOptions {
        ConsoleOptions {
            listen: listen.parse().unwrap(),
            transport,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    #[test]
    fn plain_http_is_refused_off_loopback() {
        let e = options(
            "10.0.0.1:7445",
            ConsoleTransport::InsecureHttpOnLoopback,
            &[],
        )
        .names()
        .unwrap_err()
        .to_string();
        assert!(e.contains("loopback address only, not 10.0.0.1"), "{e}");
        let ok = options(
            "127.0.0.1:7445",
            ConsoleTransport::InsecureHttpOnLoopback,
            &[],
        )
        .names()
        .unwrap();
        assert_eq!(ok, vec!["127.0.0.1", "localhost"]);
        let v6 = options("[::1]:7445", ConsoleTransport::InsecureHttpOnLoopback, &[]);
        assert_eq!(v6.names().unwrap(), vec!["::1", "localhost"]);
    }

    #[test]
    fn an_unspecified_address_needs_a_name() {
        let e = options("0.0.0.0:7445", ConsoleTransport::Https, &[])
            .names()
            .unwrap_err()
            .to_string();
        assert!(e.contains("pass --console-host"), "{e}");
        let named = options(
            "0.0.0.0:7445",
            ConsoleTransport::Https,
            &["Console.Example"],
        );
        assert_eq!(named.names().unwrap(), vec!["console.example"]);
        let bad = options("0.0.0.0:7445", ConsoleTransport::Https, &["a/b"]);
        assert!(bad.names().is_err());
    }
}
