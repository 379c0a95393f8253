//! The iptables backend: `iptables-restore --noflush` / `ip6tables-restore --noflush` input,
//! one per family, generated from a [`Plan`] and the tables as `iptables-save` printed them.
//!
//! Each table section declares our chains (creating or flushing them), deletes every jump
//! into them from other chains, adds the rules and one jump per hook, and deletes the chains
//! this plan does not use; so the result is the same however many times it runs, and
//! switching modes (say `--ipv6 drop` to `capture`) leaves nothing of the old one. It must
//! never touch a rule that does not jump into a `BULKHEAD_*` chain.

use super::{Family, Plan, UdpPlan};
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// Our chains in the `nat` table: the TCP redirects.
pub const NAT_CHAINS: [&str; 4] = [
    "BULKHEAD_INBOUND",
    "BULKHEAD_IN_REDIRECT",
    "BULKHEAD_OUTBOUND",
    "BULKHEAD_REDIRECT",
];

/// Our chains in the `filter` table: the admin port, UDP, and IPv6 when it is dropped.
pub const FILTER_CHAINS: [&str; 2] = ["BULKHEAD_IN_FILTER", "BULKHEAD_OUT_FILTER"];

/// One table's part of a script.
struct Section<'a> {
    table: &'static str,
    chains: &'static [&'static str],
    /// `(chain, rule)` in order; empty: our chains go.
    rules: Vec<(&'static str, String)>,
    /// Jumps from the built-in chains: `-A` (after what is there) or `-I` (before it).
    hooks: Vec<String>,
    current: &'a str,
}

impl Section<'_> {
    fn write(&self, s: &mut String) {
        let _ = writeln!(s, "*{}", self.table);
        for chain in self.chains {
            let _ = writeln!(s, ":{chain} - [0:0]");
        }
        for line in table_lines(self.current, self.table) {
            let Some(rest) = line.strip_prefix("-A ") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let from = words.next().unwrap_or_default();
            let words: Vec<&str> = words.collect();
            let jumps_to_ours = words
                .windows(2)
                .any(|w| matches!(w[0], "-j" | "-g") && self.chains.contains(&w[1]));
            if jumps_to_ours && !self.chains.contains(&from) {
                let _ = writeln!(s, "-D {rest}");
            }
        }
        if self.rules.is_empty() {
            for chain in self.chains {
                let _ = writeln!(s, "-X {chain}");
            }
        } else {
            for (chain, rule) in &self.rules {
                let _ = writeln!(s, "-A {chain} {rule}");
            }
            for hook in &self.hooks {
                let _ = writeln!(s, "{hook}");
            }
        }
        s.push_str("COMMIT\n");
    }
}

/// The lines of `table`'s section in `iptables-save` output (all tables, or just that one).
fn table_lines<'a>(save: &'a str, table: &str) -> impl Iterator<Item = &'a str> {
    let header = format!("*{table}");
    let mut inside = false;
    save.lines().filter(move |line| {
        if line.starts_with('*') {
            inside = *line == header;
            return false;
        }
        if *line == "COMMIT" {
            inside = false;
        }
        inside
    })
}

/// The `iptables-restore --noflush` (or `ip6tables-restore`) input that installs `plan` for
/// `family`, given that family's tables as they are now (`iptables-save`).
pub fn iptables_install(plan: &Plan, family: Family, current: &str) -> String {
    let mut s = format!(
        "# bulkhead-proxy init: transparent capture ({})\n",
        match (family, plan.captures(family)) {
            (Family::V4, _) => "IPv4",
            (Family::V6, true) => "IPv6",
            (Family::V6, false) => "IPv6 dropped",
        }
    );
    Section {
        table: "nat",
        chains: &NAT_CHAINS,
        rules: if plan.captures(family) {
            nat_rules(plan, family)
        } else {
            Vec::new()
        },
        hooks: vec![
            format!("-A PREROUTING -p tcp -j {}", NAT_CHAINS[0]),
            format!("-A OUTPUT -p tcp -j {}", NAT_CHAINS[2]),
        ],
        current,
    }
    .write(&mut s);
    Section {
        table: "filter",
        chains: &FILTER_CHAINS,
        rules: filter_rules(plan, family),
        // First in their chains: an ACCEPT someone else put there must not open a way round.
        hooks: vec![
            format!("-I INPUT -j {}", FILTER_CHAINS[0]),
            format!("-I OUTPUT -j {}", FILTER_CHAINS[1]),
        ],
        current,
    }
    .write(&mut s);
    s
}

/// The input that removes what [`iptables_install`] installed for `family`, given its tables
/// as they are now. Valid (and a no-op) when nothing is installed.
pub fn iptables_remove(family: Family, current: &str) -> String {
    let mut s = format!("# bulkhead-proxy init --remove ({})\n", family.name());
    for (table, chains) in [("nat", &NAT_CHAINS[..]), ("filter", &FILTER_CHAINS[..])] {
        Section {
            table,
            chains,
            rules: Vec::new(),
            hooks: Vec::new(),
            current,
        }
        .write(&mut s);
    }
    s
}

fn nat_rules(plan: &Plan, family: Family) -> Vec<(&'static str, String)> {
    let [inbound, in_redirect, outbound, redirect] = NAT_CHAINS;
    let mut rules = vec![(inbound, "-i lo -j RETURN".to_string())];
    redirect_tcp(
        &mut rules,
        inbound,
        &plan.exclude_inbound_ports,
        in_redirect,
        plan.inbound_port,
    );
    rules.push((
        outbound,
        format!("-m owner --uid-owner {} -j RETURN", plan.proxy_uid),
    ));
    rules.push((outbound, format!("-d {} -j RETURN", family.loopback())));
    if let Some(control) = plan.control.filter(|c| Family::of(c.ip()) == family) {
        rules.push((
            outbound,
            format!(
                "-d {} -p tcp --dport {} -j RETURN",
                Family::host(control.ip()),
                control.port()
            ),
        ));
    }
    for net in &plan.exclude_cidrs {
        if Family::of(net.addr()) == family {
            rules.push((outbound, format!("-d {net} -j RETURN")));
        }
    }
    redirect_tcp(
        &mut rules,
        outbound,
        &plan.exclude_outbound_ports,
        redirect,
        plan.outbound_port,
    );
    rules
}

/// The end of a capturing chain: TCP to the excluded ports returns; the rest of TCP jumps to
/// the redirect chain, which sends it to the proxy's port.
fn redirect_tcp(
    rules: &mut Vec<(&'static str, String)>,
    chain: &'static str,
    excluded: &BTreeSet<u16>,
    redirect: &'static str,
    to_port: u16,
) {
    for port in excluded {
        rules.push((chain, format!("-p tcp --dport {port} -j RETURN")));
    }
    rules.push((chain, format!("-p tcp -j {redirect}")));
    rules.push((redirect, format!("-p tcp -j REDIRECT --to-ports {to_port}")));
}

/// The filter rules; none when there is nothing to filter.
fn filter_rules(plan: &Plan, family: Family) -> Vec<(&'static str, String)> {
    let [input, output] = FILTER_CHAINS;
    let drop_family = !plan.captures(family);
    if !plan.guard_admin && !drop_family && plan.udp == UdpPlan::Allow {
        return Vec::new();
    }
    let uid = plan.proxy_uid;
    let mut rules = Vec::new();
    if plan.guard_admin {
        rules.push((
            output,
            format!(
                "-o lo -p tcp --dport {} -m owner ! --uid-owner {uid} -m conntrack --ctstate NEW -j REJECT --reject-with tcp-reset",
                plan.admin_port
            ),
        ));
    }
    rules.push((output, "-o lo -j RETURN".to_string()));
    rules.push((input, "-i lo -j RETURN".to_string()));
    if drop_family {
        rules.push((output, "-j DROP".to_string()));
        rules.push((input, "-j DROP".to_string()));
    } else if let UdpPlan::Drop {
        dns_servers,
        allow_ports,
    } = &plan.udp
    {
        let established = "-p udp -m conntrack --ctstate ESTABLISHED -j RETURN";
        rules.push((output, format!("-m owner --uid-owner {uid} -j RETURN")));
        rules.push((output, established.to_string()));
        rules.push((input, established.to_string()));
        for dns in dns_servers {
            if Family::of(*dns) == family && !dns.is_loopback() {
                rules.push((
                    output,
                    format!("-d {} -p udp --dport 53 -j RETURN", Family::host(*dns)),
                ));
            }
        }
        for port in allow_ports {
            rules.push((output, format!("-p udp --dport {port} -j RETURN")));
            rules.push((input, format!("-p udp --dport {port} -j RETURN")));
        }
        rules.push((output, "-p udp -j DROP".to_string()));
        rules.push((input, "-p udp -j DROP".to_string()));
    }
    // Chain order does not matter to iptables; grouping keeps the text readable.
    rules.sort_by_key(|(chain, _)| *chain != input);
    rules
}
