//! The nftables backend: one `nft -f` script that builds `table inet bulkhead` (both
//! families in one table; `table ip bulkhead` where the namespace has no IPv6 at all).
//!
//! The script declares the table, deletes it and rebuilds it in one transaction, so re-running
//! replaces it; it also deletes the `ip bulkhead` table of earlier versions. It must never
//! touch another table.

use super::{Plan, UdpPlan};
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

/// The nftables table init owns (family `inet`, or `ip` without IPv6).
pub const NFT_TABLE: &str = "bulkhead";

/// Creates-then-deletes each of our tables: valid whether or not they exist.
fn clear(s: &mut String, ipv6: bool) {
    let families: &[&str] = if ipv6 { &["ip", "inet"] } else { &["ip"] };
    for family in families {
        let _ = writeln!(s, "table {family} {NFT_TABLE}");
        let _ = writeln!(s, "delete table {family} {NFT_TABLE}");
    }
}

fn ports(set: &BTreeSet<u16>) -> String {
    set.iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `ip` or `ip6`, as nft names an address's family in a match.
fn proto(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    }
}

/// The `nft -f` script that installs `plan`; `ipv6`: whether the namespace has IPv6 at all.
pub fn nft_install(plan: &Plan, ipv6: bool) -> String {
    let family = if ipv6 { "inet" } else { "ip" };
    let drop_v6 = ipv6 && !plan.captures(super::Family::V6);
    let mut s = format!(
        "# bulkhead-proxy init: transparent capture ({})\n",
        match (ipv6, drop_v6) {
            (false, _) => "IPv4; IPv6 is off",
            (true, false) => "IPv4 and IPv6",
            (true, true) => "IPv4; IPv6 dropped",
        }
    );
    clear(&mut s, ipv6);
    let _ = writeln!(s, "table {family} {NFT_TABLE} {{");
    let mut chain = |name: &str, hook: &str, priority: i32, rules: &[String]| {
        let _ = writeln!(s, "\tchain {name} {{");
        let _ = writeln!(
            s,
            "\t\ttype {} hook {hook} priority {priority}; policy accept;",
            if priority < 0 { "nat" } else { "filter" }
        );
        for rule in rules {
            let _ = writeln!(s, "\t\t{rule}");
        }
        s.push_str("\t}\n");
    };
    let skip_v6 = || drop_v6.then(|| "meta nfproto ipv6 return".to_string());

    let mut inbound = vec!["iifname \"lo\" return".to_string()];
    inbound.extend(skip_v6());
    inbound.push(format!(
        "tcp dport {{ {} }} return",
        ports(&plan.exclude_inbound_ports)
    ));
    inbound.push(format!(
        "meta l4proto tcp redirect to :{}",
        plan.inbound_port
    ));
    chain("inbound", "prerouting", -100, &inbound);

    let mut outbound: Vec<String> = skip_v6().into_iter().collect();
    outbound.push(format!("meta skuid {} return", plan.proxy_uid));
    outbound.push("ip daddr 127.0.0.0/8 return".to_string());
    if ipv6 {
        outbound.push("ip6 daddr ::1 return".to_string());
    }
    let ours = |ip: IpAddr| ipv6 || ip.is_ipv4();
    if let Some(control) = plan.control.filter(|c| ours(c.ip())) {
        outbound.push(format!(
            "{} daddr {} tcp dport {} return",
            proto(control.ip()),
            control.ip(),
            control.port()
        ));
    }
    // One rule per CIDR: an anonymous set refuses overlapping intervals.
    for net in plan.exclude_cidrs.iter().filter(|n| ours(n.addr())) {
        outbound.push(format!("{} daddr {} return", proto(net.addr()), cidr(net)));
    }
    if !plan.exclude_outbound_ports.is_empty() {
        outbound.push(format!(
            "tcp dport {{ {} }} return",
            ports(&plan.exclude_outbound_ports)
        ));
    }
    outbound.push(format!(
        "meta l4proto tcp redirect to :{}",
        plan.outbound_port
    ));
    chain("outbound", "output", -100, &outbound);

    if plan.guard_admin || drop_v6 || plan.udp != UdpPlan::Allow {
        let (mut output, mut input) = (Vec::new(), Vec::new());
        if plan.guard_admin {
            output.push(format!(
                "oifname \"lo\" tcp dport {} meta skuid != {} ct state new reject with tcp reset",
                plan.admin_port, plan.proxy_uid
            ));
        }
        output.push("oifname \"lo\" return".to_string());
        input.push("iifname \"lo\" return".to_string());
        if drop_v6 {
            output.push("meta nfproto ipv6 drop".to_string());
            input.push("meta nfproto ipv6 drop".to_string());
        }
        if let UdpPlan::Drop {
            dns_servers,
            allow_ports,
        } = &plan.udp
        {
            let established = "meta l4proto udp ct state established return".to_string();
            output.push(format!("meta skuid {} return", plan.proxy_uid));
            output.push(established.clone());
            input.push(established);
            for dns in dns_servers.iter().filter(|d| ours(**d) && !d.is_loopback()) {
                output.push(format!("{} daddr {dns} udp dport 53 return", proto(*dns)));
            }
            if !allow_ports.is_empty() {
                let rule = format!("udp dport {{ {} }} return", ports(allow_ports));
                output.push(rule.clone());
                input.push(rule);
            }
            output.push("meta l4proto udp drop".to_string());
            input.push("meta l4proto udp drop".to_string());
        }
        chain("output", "output", 0, &output);
        chain("input", "input", 0, &input);
    }
    s.push_str("}\n");
    s
}

/// A CIDR as nft lists it back: a single address without its prefix length.
fn cidr(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// The `nft -f` script that removes our tables, whether or not they exist.
pub fn nft_remove(ipv6: bool) -> String {
    let mut s = String::from("# bulkhead-proxy init --remove\n");
    clear(&mut s, ipv6);
    s
}
