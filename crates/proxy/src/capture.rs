//! Transparent capture: the NAT rules that send a workload's TCP traffic through its sidecar
//! without the app knowing, and the socket option that recovers where a redirected
//! connection was going.
//!
//! `bulkhead-proxy init` runs once, as root, inside the workload's network namespace (an init
//! container, or `ip netns exec`), before the app starts:
//!
//! - inbound: TCP arriving on any interface but `lo`, to any port not excluded, is redirected
//!   to the proxy's inbound port; the admin port ([`ADMIN_PORT`]) is always excluded;
//! - outbound: TCP the namespace sends is redirected to the proxy's outbound port, except
//!   the proxy's own (by uid, or it would loop back into itself), loopback, the control
//!   plane, and the excluded CIDRs and ports.
//!
//! IPv4 only: IPv6 traffic is neither captured nor blocked, so a workload that must not
//! bypass the mesh needs IPv6 off in its namespace.
//!
//! Everything here is pure text generation except [`init`], which hands that text to
//! `iptables-restore` or `nft` in one transaction. It must never touch anything but its own:
//! the `BULKHEAD_*` chains of the `nat` table and the jumps into them (iptables), or
//! `table ip bulkhead` (nftables). Re-running it replaces what it installed, never adds twice.

use ipnet::Ipv4Net;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, ExitStatus, Stdio};

/// The proxy's admin port, never captured inbound (monitoring must reach it as it is).
pub const ADMIN_PORT: u16 = 15000;

/// The iptables chains init owns, in the `nat` table. Jumps into them from any other chain
/// are removed on re-init and on `--remove`.
pub const IPTABLES_CHAINS: [&str; 4] = [
    "BULKHEAD_INBOUND",
    "BULKHEAD_IN_REDIRECT",
    "BULKHEAD_OUTBOUND",
    "BULKHEAD_REDIRECT",
];

/// The nftables table init owns.
pub const NFT_TABLE: &str = "bulkhead";

/// Which firewall front end installs the rules.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-restore --noflush` into the `nat` table (legacy or nf_tables variant).
    Iptables,
    /// `nft -f -` with a table of its own, `ip bulkhead`.
    Nftables,
}

/// `bulkhead-proxy init`: install (or remove) the rules that capture the namespace's TCP
/// traffic. Run as root inside the workload's network namespace, before the app starts.
#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// Port the proxy takes redirected inbound connections on.
    #[arg(long, default_value_t = 15006, value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
    /// Port the proxy takes redirected outbound connections on.
    #[arg(long, default_value_t = 15001, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// The uid the proxy runs as: its own connections are never captured.
    #[arg(long, required_unless_present = "remove")]
    pub proxy_uid: Option<u32>,
    /// Destination ports whose outbound traffic is not captured (comma list).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Ports whose inbound traffic is not captured (comma list); the admin port 15000 is
    /// always excluded.
    #[arg(long, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// IPv4 destinations (CIDR, or an address for /32) whose outbound traffic is not
    /// captured (comma list).
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
    pub exclude_cidrs: Vec<Ipv4Net>,
    /// The control plane's address (IPv4:PORT); connections to it are never captured.
    #[arg(long)]
    pub control: Option<SocketAddrV4>,
    /// Which firewall front end to use.
    #[arg(long, value_enum, default_value_t = Backend::Iptables)]
    pub backend: Backend,
    /// Remove what init installed instead (succeeds when there is nothing to remove).
    #[arg(long)]
    pub remove: bool,
    /// Print the rules that would be applied and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_cidr(s: &str) -> Result<Ipv4Net, String> {
    let net = match s.parse::<Ipv4Net>() {
        Ok(net) => net,
        Err(_) => s.parse::<Ipv4Addr>().map(Ipv4Net::from).map_err(|_| {
            format!("{s:?} is not an IPv4 CIDR like 10.96.0.0/12 (capture is IPv4 only)")
        })?,
    };
    Ok(net.trunc())
}

/// Why init could not install or remove the rules.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("--proxy-uid is required: the uid the proxy runs as, whose traffic is never captured")]
    NoProxyUid,
    #[error("--inbound-port and --outbound-port are both {0}: the proxy needs two different ports")]
    SamePort(u16),
    #[error("cannot run `{command}`: {source}; {hint}")]
    Spawn {
        command: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("cannot print the rules: {0}")]
    Print(std::io::Error),
    #[error("`{command}` failed ({status}): {stderr}; {hint}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
        hint: &'static str,
    },
}

/// What to capture, validated: the input of the rule generators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub proxy_uid: u32,
    /// Always holds [`ADMIN_PORT`].
    pub exclude_inbound_ports: BTreeSet<u16>,
    pub exclude_outbound_ports: BTreeSet<u16>,
    /// Truncated to their network address, without duplicates, in the order given.
    pub exclude_cidrs: Vec<Ipv4Net>,
    pub control: Option<SocketAddrV4>,
}

impl TryFrom<&InitArgs> for Plan {
    type Error = CaptureError;

    fn try_from(args: &InitArgs) -> Result<Plan, CaptureError> {
        let proxy_uid = args.proxy_uid.ok_or(CaptureError::NoProxyUid)?;
        if args.inbound_port == args.outbound_port {
            return Err(CaptureError::SamePort(args.inbound_port));
        }
        let mut exclude_cidrs = Vec::new();
        for net in args.exclude_cidrs.iter().map(Ipv4Net::trunc) {
            if !exclude_cidrs.contains(&net) {
                exclude_cidrs.push(net);
            }
        }
        Ok(Plan {
            inbound_port: args.inbound_port,
            outbound_port: args.outbound_port,
            proxy_uid,
            exclude_inbound_ports: args
                .exclude_inbound_ports
                .iter()
                .copied()
                .chain([ADMIN_PORT])
                .collect(),
            exclude_outbound_ports: args.exclude_outbound_ports.iter().copied().collect(),
            exclude_cidrs,
            control: args.control,
        })
    }
}

/// The `iptables-restore --noflush` input that installs `plan` in the `nat` table, given the
/// table as it is now (`iptables-save -t nat`). Declaring our chains flushes them, every
/// existing jump into them is deleted and one jump per hook re-added, all in one commit: the
/// result is the same however many times it runs.
pub fn iptables_install(plan: &Plan, current_nat: &str) -> String {
    let [inbound, in_redirect, outbound, redirect] = IPTABLES_CHAINS;
    let mut s = String::from("# bulkhead-proxy init: transparent capture (IPv4)\n*nat\n");
    declare_and_unhook(&mut s, current_nat);
    let mut rule = |chain: &str, spec: &str| {
        let _ = writeln!(s, "-A {chain} {spec}");
    };
    rule(inbound, "-i lo -j RETURN");
    for port in &plan.exclude_inbound_ports {
        rule(inbound, &format!("-p tcp --dport {port} -j RETURN"));
    }
    rule(inbound, &format!("-p tcp -j {in_redirect}"));
    rule(
        in_redirect,
        &format!("-p tcp -j REDIRECT --to-ports {}", plan.inbound_port),
    );
    rule(
        outbound,
        &format!("-m owner --uid-owner {} -j RETURN", plan.proxy_uid),
    );
    rule(outbound, "-d 127.0.0.0/8 -j RETURN");
    if let Some(control) = plan.control {
        rule(
            outbound,
            &format!(
                "-d {}/32 -p tcp --dport {} -j RETURN",
                control.ip(),
                control.port()
            ),
        );
    }
    for net in &plan.exclude_cidrs {
        rule(outbound, &format!("-d {net} -j RETURN"));
    }
    for port in &plan.exclude_outbound_ports {
        rule(outbound, &format!("-p tcp --dport {port} -j RETURN"));
    }
    rule(outbound, &format!("-p tcp -j {redirect}"));
    rule(
        redirect,
        &format!("-p tcp -j REDIRECT --to-ports {}", plan.outbound_port),
    );
    rule("PREROUTING", &format!("-p tcp -j {inbound}"));
    rule("OUTPUT", &format!("-p tcp -j {outbound}"));
    s.push_str("COMMIT\n");
    s
}

/// The `iptables-restore --noflush` input that removes what [`iptables_install`] installed,
/// given the `nat` table as it is now. Valid (and a no-op) when nothing is installed.
pub fn iptables_remove(current_nat: &str) -> String {
    let mut s = String::from("# bulkhead-proxy init --remove\n*nat\n");
    declare_and_unhook(&mut s, current_nat);
    for chain in IPTABLES_CHAINS {
        let _ = writeln!(s, "-X {chain}");
    }
    s.push_str("COMMIT\n");
    s
}

/// Declares (creating or flushing) our chains and deletes every rule of another chain that
/// jumps into one of them, as `iptables-save` printed it.
fn declare_and_unhook(s: &mut String, current_nat: &str) {
    for chain in IPTABLES_CHAINS {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for line in current_nat.lines() {
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let from = words.next().unwrap_or_default();
        let words: Vec<&str> = words.collect();
        let jumps_to_ours = words
            .windows(2)
            .any(|w| matches!(w[0], "-j" | "-g") && IPTABLES_CHAINS.contains(&w[1]));
        if jumps_to_ours && !IPTABLES_CHAINS.contains(&from) {
            let _ = writeln!(s, "-D {rest}");
        }
    }
}

/// The `nft -f` script that installs `plan` as `table ip bulkhead`: the table is created
/// empty, deleted and rebuilt in one transaction, so re-running replaces it.
pub fn nft_install(plan: &Plan) -> String {
    let ports = |set: &BTreeSet<u16>| {
        set.iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = String::from("# bulkhead-proxy init: transparent capture (IPv4)\n");
    let _ = writeln!(s, "table ip {NFT_TABLE}");
    let _ = writeln!(s, "delete table ip {NFT_TABLE}");
    let _ = writeln!(s, "table ip {NFT_TABLE} {{");
    s.push_str("\tchain inbound {\n");
    s.push_str("\t\ttype nat hook prerouting priority -100; policy accept;\n");
    s.push_str("\t\tiifname \"lo\" return\n");
    let _ = writeln!(
        s,
        "\t\ttcp dport {{ {} }} return",
        ports(&plan.exclude_inbound_ports)
    );
    let _ = writeln!(s, "\t\tmeta l4proto tcp redirect to :{}", plan.inbound_port);
    s.push_str("\t}\n");
    s.push_str("\tchain outbound {\n");
    s.push_str("\t\ttype nat hook output priority -100; policy accept;\n");
    let _ = writeln!(s, "\t\tmeta skuid {} return", plan.proxy_uid);
    s.push_str("\t\tip daddr 127.0.0.0/8 return\n");
    if let Some(control) = plan.control {
        let _ = writeln!(
            s,
            "\t\tip daddr {} tcp dport {} return",
            control.ip(),
            control.port()
        );
    }
    // One rule per CIDR: an anonymous set refuses overlapping intervals.
    for net in &plan.exclude_cidrs {
        let _ = writeln!(s, "\t\tip daddr {net} return");
    }
    if !plan.exclude_outbound_ports.is_empty() {
        let _ = writeln!(
            s,
            "\t\ttcp dport {{ {} }} return",
            ports(&plan.exclude_outbound_ports)
        );
    }
    let _ = writeln!(
        s,
        "\t\tmeta l4proto tcp redirect to :{}",
        plan.outbound_port
    );
    s.push_str("\t}\n}\n");
    s
}

/// The `nft -f` script that removes `table ip bulkhead`, whether or not it exists.
pub fn nft_remove() -> String {
    format!("# bulkhead-proxy init --remove\ntable ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n")
}

/// Installs the rules `args` describe in the current network namespace (or removes them with
/// `--remove`), in one transaction; with `--dry-run` prints them to stdout instead.
pub fn init(args: &InitArgs) -> Result<(), CaptureError> {
    let plan = if args.remove {
        None
    } else {
        Some(Plan::try_from(args)?)
    };
    let (program, flags, script) = match args.backend {
        Backend::Iptables => {
            let current = match run("iptables-save", &["-t", "nat"], None) {
                Ok(current) => current,
                // A dry run shows the rules for a namespace without any, rather than nothing.
                Err(e) if args.dry_run => {
                    let why = match e {
                        CaptureError::Failed { stderr, .. } => stderr,
                        other => other.to_string(),
                    };
                    tracing::warn!(
                        "cannot read the nat table ({why}); printing the rules as for an empty one"
                    );
                    String::new()
                }
                Err(e) => return Err(e),
            };
            let script = match &plan {
                Some(plan) => iptables_install(plan, &current),
                None => iptables_remove(&current),
            };
            ("iptables-restore", &["--noflush"][..], script)
        }
        Backend::Nftables => {
            let script = match &plan {
                Some(plan) => nft_install(plan),
                None => nft_remove(),
            };
            ("nft", &["-f", "-"][..], script)
        }
    };
    if args.dry_run {
        let mut out = std::io::stdout().lock();
        return out
            .write_all(script.as_bytes())
            .and_then(|()| out.flush())
            .map_err(CaptureError::Print);
    }
    run(program, flags, Some(&script))?;
    match (&plan, args.backend) {
        (Some(_), backend) => tracing::info!(?backend, "transparent capture installed"),
        (None, backend) => tracing::info!(?backend, "transparent capture removed"),
    }
    Ok(())
}

/// Runs `program` (found on PATH) with `stdin` fed in; its stdout if it exits with 0.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CaptureError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let package = if program.starts_with("iptables") {
        "install iptables (apt-get install iptables) or pass --backend nftables"
    } else {
        "install nftables (apt-get install nftables) or pass --backend iptables"
    };
    let spawn_err = |source: std::io::Error| CaptureError::Spawn {
        hint: if source.kind() == std::io::ErrorKind::NotFound {
            package
        } else {
            PRIVILEGE_HINT
        },
        command: command.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error (the program exited early) shows up as its exit status and stderr.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(CaptureError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            hint: PRIVILEGE_HINT,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const PRIVILEGE_HINT: &str = "run `bulkhead-proxy init` as root (or with CAP_NET_ADMIN) inside the workload's network namespace; `--dry-run` prints the rules without applying them";

/// Where a redirected connection was going before REDIRECT rewrote it (`SO_ORIGINAL_DST`,
/// IPv4). For a connection that was not redirected this is its own local address, or an
/// error when conntrack does not track it.
#[cfg(target_os = "linux")]
pub fn original_dst(stream: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    let addr = socket2::SockRef::from(stream).original_dst_v4()?;
    addr.as_socket().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST returned an address that is not IPv4",
        )
    })
}

/// Transparent capture needs Linux netfilter; elsewhere there is no original destination.
#[cfg(not(target_os = "linux"))]
pub fn original_dst(_stream: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "transparent capture (SO_ORIGINAL_DST) needs Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn args(flags: &[&str]) -> InitArgs {
        let argv = std::iter::once("init").chain(flags.iter().copied());
        Cli::try_parse_from(argv).unwrap().init
    }

    fn plan(flags: &[&str]) -> Plan {
        Plan::try_from(&args(flags)).unwrap()
    }

    const FULL: &[&str] = &[
        "--proxy-uid",
        "1337",
        "--exclude-inbound-ports",
        "22,8443",
        "--exclude-outbound-ports",
        "53,3306",
        "--exclude-cidrs",
        "10.96.0.0/12,169.254.169.254",
        "--control",
        "10.0.0.1:7443",
    ];

    /// What `iptables-save -t nat` prints once the FULL plan is installed.
    const INSTALLED_NAT: &str = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:BULKHEAD_INBOUND - [0:0]
-A PREROUTING -s 192.168.0.0/16 -j DNAT --to-destination 10.0.0.9
-A PREROUTING -p tcp -j BULKHEAD_INBOUND
-A OUTPUT -p tcp -j BULKHEAD_OUTBOUND
-A BULKHEAD_INBOUND -p tcp -j BULKHEAD_IN_REDIRECT
COMMIT
";

    #[test]
    fn iptables_rules_for_one_configuration() {
        let expected = "\
# bulkhead-proxy init: transparent capture (IPv4)
*nat
:BULKHEAD_INBOUND - [0:0]
:BULKHEAD_IN_REDIRECT - [0:0]
:BULKHEAD_OUTBOUND - [0:0]
:BULKHEAD_REDIRECT - [0:0]
-A BULKHEAD_INBOUND -i lo -j RETURN
-A BULKHEAD_INBOUND -p tcp --dport 22 -j RETURN
-A BULKHEAD_INBOUND -p tcp --dport 8443 -j RETURN
-A BULKHEAD_INBOUND -p tcp --dport 15000 -j RETURN
-A BULKHEAD_INBOUND -p tcp -j BULKHEAD_IN_REDIRECT
-A BULKHEAD_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A BULKHEAD_OUTBOUND -m owner --uid-owner 1337 -j RETURN
-A BULKHEAD_OUTBOUND -d 127.0.0.0/8 -j RETURN
-A BULKHEAD_OUTBOUND -d 10.0.0.1/32 -p tcp --dport 7443 -j RETURN
-A BULKHEAD_OUTBOUND -d 10.96.0.0/12 -j RETURN
-A BULKHEAD_OUTBOUND -d 169.254.169.254/32 -j RETURN
-A BULKHEAD_OUTBOUND -p tcp --dport 53 -j RETURN
-A BULKHEAD_OUTBOUND -p tcp --dport 3306 -j RETURN
-A BULKHEAD_OUTBOUND -p tcp -j BULKHEAD_REDIRECT
-A BULKHEAD_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j BULKHEAD_INBOUND
-A OUTPUT -p tcp -j BULKHEAD_OUTBOUND
COMMIT
";
        assert_eq!(iptables_install(&plan(FULL), ""), expected);
    }

    #[test]
    fn iptables_reinstall_replaces_the_jumps_instead_of_adding_more() {
        let script = iptables_install(&plan(FULL), INSTALLED_NAT);
        let deletes: Vec<&str> = script.lines().filter(|l| l.starts_with("-D ")).collect();
        // Jumps from the hooks go; rules inside our chains are flushed, not deleted; other
        // rules of the table are left alone.
        assert_eq!(
            deletes,
            [
                "-D PREROUTING -p tcp -j BULKHEAD_INBOUND",
                "-D OUTPUT -p tcp -j BULKHEAD_OUTBOUND"
            ]
        );
        // Every delete comes before the one jump per hook that is added back.
        let last_delete = script.rfind("-D ").unwrap();
        assert!(script.find("-A PREROUTING").unwrap() > last_delete);
        assert_eq!(script.matches("-A PREROUTING").count(), 1);
        assert_eq!(script.matches("-A OUTPUT").count(), 1);
        // The same text as on a fresh table, apart from the deletes.
        let without_deletes: String = script
            .lines()
            .filter(|l| !l.starts_with("-D "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(without_deletes, iptables_install(&plan(FULL), ""));
    }

    #[test]
    fn iptables_remove_unhooks_then_deletes_our_chains_only() {
        let expected = "\
# bulkhead-proxy init --remove
*nat
:BULKHEAD_INBOUND - [0:0]
:BULKHEAD_IN_REDIRECT - [0:0]
:BULKHEAD_OUTBOUND - [0:0]
:BULKHEAD_REDIRECT - [0:0]
-D PREROUTING -p tcp -j BULKHEAD_INBOUND
-D OUTPUT -p tcp -j BULKHEAD_OUTBOUND
-X BULKHEAD_INBOUND
-X BULKHEAD_IN_REDIRECT
-X BULKHEAD_OUTBOUND
-X BULKHEAD_REDIRECT
COMMIT
";
        assert_eq!(iptables_remove(INSTALLED_NAT), expected);
        // Nothing installed: the chains are created and deleted again, nothing else.
        assert!(!iptables_remove("").contains("-D "));
    }

    #[test]
    fn nft_rules_for_one_configuration() {
        let expected = "\
# bulkhead-proxy init: transparent capture (IPv4)
table ip bulkhead
delete table ip bulkhead
table ip bulkhead {
\tchain inbound {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\tiifname \"lo\" return
\t\ttcp dport { 22, 8443, 15000 } return
\t\tmeta l4proto tcp redirect to :15006
\t}
\tchain outbound {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta skuid 1337 return
\t\tip daddr 127.0.0.0/8 return
\t\tip daddr 10.0.0.1 tcp dport 7443 return
\t\tip daddr 10.96.0.0/12 return
\t\tip daddr 169.254.169.254/32 return
\t\ttcp dport { 53, 3306 } return
\t\tmeta l4proto tcp redirect to :15001
\t}
}
";
        assert_eq!(nft_install(&plan(FULL)), expected);
        // Idempotent by construction: the table is emptied and rebuilt in one transaction.
        assert!(nft_remove().ends_with("table ip bulkhead\ndelete table ip bulkhead\n"));
    }

    #[test]
    fn defaults_capture_everything_but_the_admin_port_and_loopback() {
        let p = plan(&["--proxy-uid", "0"]);
        assert_eq!(
            (p.inbound_port, p.outbound_port, p.proxy_uid),
            (15006, 15001, 0)
        );
        assert_eq!(p.exclude_inbound_ports, BTreeSet::from([ADMIN_PORT]));
        let nft = nft_install(&p);
        assert!(nft.contains("tcp dport { 15000 } return"));
        // No empty set (nft refuses `{ }`), no control plane rule.
        assert!(!nft.contains("{  }") && !nft.contains("dport {  }"));
        assert_eq!(nft.matches("tcp dport").count(), 1);
        let ipt = iptables_install(&p, "");
        assert!(ipt.contains("-A BULKHEAD_INBOUND -p tcp --dport 15000 -j RETURN\n"));
        assert!(!ipt.contains("--dport 7443"));
    }

    #[test]
    fn arguments_are_checked() {
        assert!(
            Cli::try_parse_from(["init"]).is_err(),
            "--proxy-uid required"
        );
        assert!(Cli::try_parse_from(["init", "--remove"]).is_ok());
        assert!(
            Cli::try_parse_from(["init", "--proxy-uid", "1", "--exclude-cidrs", "fd00::/8"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["init", "--proxy-uid", "1", "--inbound-port", "0"]).is_err());
        let same = args(&["--proxy-uid", "1", "--inbound-port", "15001"]);
        assert!(matches!(
            Plan::try_from(&same),
            Err(CaptureError::SamePort(15001))
        ));
        // CIDRs are truncated to their network and deduplicated.
        let p = plan(&[
            "--proxy-uid",
            "1",
            "--exclude-cidrs",
            "10.1.2.3/16,10.1.0.0/16",
        ]);
        assert_eq!(p.exclude_cidrs, ["10.1.0.0/16".parse::<Ipv4Net>().unwrap()]);
        let ipt = args(&["--proxy-uid", "1", "--backend", "nftables"]);
        assert_eq!(ipt.backend, Backend::Nftables);
    }
}
