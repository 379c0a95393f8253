//! Transparent capture: the rules that send a workload's TCP traffic through its sidecar
//! without the app knowing, the filters that keep the app from going around it, and the
//! socket option that recovers where a redirected connection was going.
//!
//! `bulkhead-proxy init` runs once, as root, inside the workload's network namespace (an init
//! container, or `ip netns exec`), before the app starts. For IPv4 and IPv6 alike:
//!
//! - inbound: TCP arriving on any interface but `lo`, to any port not excluded, is redirected
//!   to the proxy's inbound port; the admin port is always excluded;
//! - outbound: TCP the namespace sends is redirected to the proxy's outbound port, except
//!   the proxy's own (by uid, or it would loop back into itself), loopback, the control
//!   plane, and the excluded CIDRs and ports;
//! - the admin port: a new connection to it from any uid but the proxy's is reset, so a
//!   compromised app cannot read its sidecar's `/config` or `/metrics` (`--allow-app-admin`
//!   opens it); connections from other hosts are not affected;
//! - UDP (`--udp drop`, the default): the mesh does not carry UDP, so UDP in and out is
//!   dropped except DNS to the namespace's resolvers, loopback, the proxy's uid, replies, and
//!   the ports the operator opens (which are then outside the mesh);
//! - IPv6 is captured exactly like IPv4, or with `--ipv6 drop` dropped except on loopback;
//!   never neither. Only a namespace without IPv6 at all (no `/proc/net/if_inet6`) gets IPv4
//!   rules alone.
//!
//! Everything here is pure text generation except [`init`], which hands that text to
//! `iptables-restore`/`ip6tables-restore` or `nft`. It must never touch anything but its own:
//! the `BULKHEAD_*` chains of the `nat` and `filter` tables and the jumps into them
//! (iptables), or `table inet bulkhead` (nftables). Re-running it replaces what it installed,
//! never adds twice.

mod iptables;
mod nft;

pub use iptables::{FILTER_CHAINS, NAT_CHAINS, iptables_install, iptables_remove};
pub use nft::{NFT_TABLE, nft_install, nft_remove};

use ipnet::IpNet;
use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, ExitStatus, Stdio};

/// The proxy's admin port unless `--admin-port` says otherwise.
pub const ADMIN_PORT: u16 = 15000;

/// Where the kernel lists the namespace's IPv6 addresses; absent when IPv6 is off entirely.
const IF_INET6: &str = "/proc/net/if_inet6";

/// Which firewall front end installs the rules.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-restore --noflush` and `ip6tables-restore --noflush` into the `nat` and
    /// `filter` tables (legacy or nf_tables variant).
    Iptables,
    /// `nft -f -` with a table of its own, `inet bulkhead` (both families).
    Nftables,
}

/// What happens to IPv6 in the namespace.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Mode {
    /// Captured exactly as IPv4.
    Capture,
    /// Dropped, in and out, except on loopback.
    Drop,
}

/// What happens to UDP, which the mesh does not carry.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpMode {
    /// Dropped in and out, except DNS to the resolvers, loopback, the proxy's uid, replies
    /// and `--allow-udp-ports`.
    Drop,
    /// Left alone: UDP goes around the mesh, unauthenticated and unauthorized.
    Allow,
}

/// `bulkhead-proxy init`: install (or remove) the rules that capture the namespace's TCP
/// traffic, IPv4 and IPv6, and drop what the mesh cannot carry. Run as root inside the
/// workload's network namespace, before the app starts.
#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// Port the proxy takes redirected inbound connections on.
    #[arg(long, default_value_t = 15006, value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
    /// Port the proxy takes redirected outbound connections on.
    #[arg(long, default_value_t = 15001, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// The proxy's admin port: never captured inbound, and closed to every uid in the
    /// namespace but the proxy's (see --allow-app-admin).
    #[arg(long, default_value_t = ADMIN_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub admin_port: u16,
    /// Let the app (any uid) connect to the admin port, and so read the sidecar's /config
    /// and /metrics. Off by default: a compromised app should not learn its policy.
    #[arg(long)]
    pub allow_app_admin: bool,
    /// The uid the proxy runs as: its own connections are never captured.
    #[arg(long, required_unless_present = "remove")]
    pub proxy_uid: Option<u32>,
    /// Destination ports whose outbound TCP is not captured (comma list).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Ports whose inbound TCP is not captured (comma list); the admin port is always
    /// excluded.
    #[arg(long, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Destinations (IPv4 or IPv6 CIDR, or an address for /32 or /128) whose outbound TCP is
    /// not captured (comma list).
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
    pub exclude_cidrs: Vec<IpNet>,
    /// The control plane's address (IP:PORT, an IPv6 address in brackets); connections to it are never
    /// captured.
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// IPv6: `capture` it exactly as IPv4, or `drop` all of it but loopback. If the
    /// namespace has IPv6 on and its rules cannot be installed, init fails rather than leave
    /// IPv6 open.
    #[arg(long, value_enum, default_value_t = Ipv6Mode::Capture)]
    pub ipv6: Ipv6Mode,
    /// UDP, which the mesh does not carry (no mTLS, no identity, no policy): `drop` it in and
    /// out except DNS to the resolvers, loopback, the proxy's uid and --allow-udp-ports, or
    /// `allow` all of it around the mesh.
    #[arg(long, value_enum, default_value_t = UdpMode::Drop)]
    pub udp: UdpMode,
    /// The DNS resolvers the app may send UDP port 53 to (comma list of addresses); by
    /// default the nameservers of /etc/resolv.conf. DNS over TCP is captured like any TCP.
    #[arg(long, value_delimiter = ',', value_parser = parse_ip)]
    pub dns_servers: Option<Vec<IpAddr>>,
    /// UDP ports let through in both directions with --udp drop (comma list). Their traffic
    /// is OUTSIDE the mesh: not encrypted, not authenticated, not authorized, not counted.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    pub allow_udp_ports: Vec<u16>,
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

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net = match s.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => s.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
            format!("{s:?} is not a CIDR like 10.96.0.0/12 or fd00:10:96::/112, nor an address")
        })?,
    };
    Ok(net.trunc())
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse::<IpAddr>()
        .map_err(|_| format!("{s:?} is not an IPv4 or IPv6 address"))
}

/// The nameservers of a resolv.conf, in order, without duplicates (a zone index such as
/// `%eth0` is dropped; the rules match the address).
pub fn resolv_conf_nameservers(text: &str) -> Vec<IpAddr> {
    let mut servers = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        let addr = addr.split('%').next().unwrap_or(addr);
        if let Ok(ip) = addr.parse::<IpAddr>()
            && !servers.contains(&ip)
        {
            servers.push(ip);
        }
    }
    servers
}

/// Why init could not install or remove the rules.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("--proxy-uid is required: the uid the proxy runs as, whose traffic is never captured")]
    NoProxyUid,
    #[error(
        "--{first} and --{second} are both {port}: the proxy's inbound, outbound and admin ports must differ"
    )]
    SamePort {
        first: &'static str,
        second: &'static str,
        port: u16,
    },
    #[error("--allow-udp-ports needs --udp drop: with --udp allow every UDP port is already open")]
    UdpPortsWithAllow,
    #[error("cannot run `{command}`: {source}; {hint}")]
    Spawn {
        command: String,
        source: std::io::Error,
        hint: String,
    },
    #[error("cannot print the rules: {0}")]
    Print(std::io::Error),
    #[error("`{command}` failed ({status}): {stderr}; {hint}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
        hint: String,
    },
}

/// An IP version, for the tools and addresses that differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// The loopback destinations, never captured.
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    /// A single address as a CIDR, as iptables prints it.
    fn host(ip: IpAddr) -> String {
        match ip {
            IpAddr::V4(ip) => format!("{ip}/32"),
            IpAddr::V6(ip) => format!("{ip}/128"),
        }
    }
}

/// What init does with UDP, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UdpPlan {
    /// Nothing: UDP is outside the mesh.
    Allow,
    /// Dropped, in and out, but for these.
    Drop {
        /// UDP port 53 to these is let out (loopback ones need no rule).
        dns_servers: Vec<IpAddr>,
        /// Let through both ways.
        allow_ports: BTreeSet<u16>,
    },
}

/// What to capture, validated: the input of the rule generators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    /// Whether a new connection to the admin port from another uid than the proxy's is reset.
    pub guard_admin: bool,
    pub proxy_uid: u32,
    /// Always holds the admin port.
    pub exclude_inbound_ports: BTreeSet<u16>,
    pub exclude_outbound_ports: BTreeSet<u16>,
    /// Truncated to their network address, without duplicates, in the order given.
    pub exclude_cidrs: Vec<IpNet>,
    pub control: Option<SocketAddr>,
    pub ipv6: Ipv6Mode,
    pub udp: UdpPlan,
}

impl Plan {
    /// Validates `args`; `resolv_conf` is the namespace's /etc/resolv.conf, read only when
    /// `--udp drop` has no `--dns-servers`.
    pub fn new(
        args: &InitArgs,
        resolv_conf: impl FnOnce() -> String,
    ) -> Result<Plan, CaptureError> {
        let proxy_uid = args.proxy_uid.ok_or(CaptureError::NoProxyUid)?;
        let ports = [
            ("inbound-port", args.inbound_port),
            ("outbound-port", args.outbound_port),
            ("admin-port", args.admin_port),
        ];
        for (i, (first, a)) in ports.iter().enumerate() {
            if let Some((second, _)) = ports[i + 1..].iter().find(|(_, b)| b == a) {
                return Err(CaptureError::SamePort {
                    first,
                    second,
                    port: *a,
                });
            }
        }
        let mut exclude_cidrs = Vec::new();
        for net in args.exclude_cidrs.iter().map(IpNet::trunc) {
            if !exclude_cidrs.contains(&net) {
                exclude_cidrs.push(net);
            }
        }
        let udp = match args.udp {
            UdpMode::Allow if !args.allow_udp_ports.is_empty() => {
                return Err(CaptureError::UdpPortsWithAllow);
            }
            UdpMode::Allow => UdpPlan::Allow,
            UdpMode::Drop => UdpPlan::Drop {
                dns_servers: match &args.dns_servers {
                    Some(servers) => {
                        let mut unique = Vec::new();
                        for s in servers {
                            if !unique.contains(s) {
                                unique.push(*s);
                            }
                        }
                        unique
                    }
                    None => resolv_conf_nameservers(&resolv_conf()),
                },
                allow_ports: args.allow_udp_ports.iter().copied().collect(),
            },
        };
        Ok(Plan {
            inbound_port: args.inbound_port,
            outbound_port: args.outbound_port,
            admin_port: args.admin_port,
            guard_admin: !args.allow_app_admin,
            proxy_uid,
            exclude_inbound_ports: args
                .exclude_inbound_ports
                .iter()
                .copied()
                .chain([args.admin_port])
                .collect(),
            exclude_outbound_ports: args.exclude_outbound_ports.iter().copied().collect(),
            exclude_cidrs,
            control: args.control,
            ipv6: args.ipv6,
            udp,
        })
    }

    /// Whether `family`'s TCP is redirected to the proxy (else, for IPv6, it is dropped).
    pub fn captures(&self, family: Family) -> bool {
        family == Family::V4 || self.ipv6 == Ipv6Mode::Capture
    }
}

/// Installs the rules `args` describe in the current network namespace (or removes them with
/// `--remove`); with `--dry-run` prints them to stdout instead.
pub fn init(args: &InitArgs) -> Result<(), CaptureError> {
    let plan = if args.remove {
        None
    } else {
        Some(Plan::new(args, || {
            std::fs::read_to_string("/etc/resolv.conf").unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read /etc/resolv.conf: no DNS resolver is let through the UDP filter (pass --dns-servers)");
                String::new()
            })
        })?)
    };
    if let Some(UdpPlan::Drop { dns_servers, .. }) = plan.as_ref().map(|p| &p.udp) {
        tracing::info!(?dns_servers, "UDP is dropped except DNS to these resolvers");
    }
    let ipv6_on = std::path::Path::new(IF_INET6).exists();
    if !ipv6_on {
        tracing::info!("IPv6 is off in this network namespace (no {IF_INET6}): IPv4 rules only");
    }
    // IPv6 first: should it fail, nothing of this run is in force and the error says why.
    let families: &[Family] = if ipv6_on {
        &[Family::V6, Family::V4]
    } else {
        &[Family::V4]
    };
    let mut steps: Vec<(Family, &str, Vec<&str>, String)> = Vec::new();
    match args.backend {
        Backend::Iptables => {
            for &family in families {
                let current = match run(family.save(), &[], None) {
                    Ok(current) => current,
                    // A dry run shows the rules for a namespace without any, rather than nothing.
                    Err(e) if args.dry_run => {
                        tracing::warn!(
                            "cannot read the {} tables ({}); printing the rules as for empty ones",
                            family.name(),
                            e.brief()
                        );
                        String::new()
                    }
                    Err(e) => return Err(e.with_hint(hint(family, args, true))),
                };
                let script = match &plan {
                    Some(plan) => iptables_install(plan, family, &current),
                    None => iptables_remove(family, &current),
                };
                steps.push((family, family.restore(), vec!["--noflush"], script));
            }
        }
        Backend::Nftables => {
            let script = match &plan {
                Some(plan) => nft_install(plan, ipv6_on),
                None => nft_remove(ipv6_on),
            };
            let family = if ipv6_on { Family::V6 } else { Family::V4 };
            steps.push((family, "nft", vec!["-f", "-"], script));
        }
    }
    if args.dry_run {
        let mut out = std::io::stdout().lock();
        for (_, _, _, script) in &steps {
            out.write_all(script.as_bytes())
                .map_err(CaptureError::Print)?;
        }
        return out.flush().map_err(CaptureError::Print);
    }
    for (family, program, flags, script) in &steps {
        run(program, flags, Some(script)).map_err(|e| e.with_hint(hint(*family, args, false)))?;
    }
    let backend = args.backend;
    match &plan {
        Some(plan) => tracing::info!(
            ?backend,
            ipv6 = if !ipv6_on {
                "off in this namespace"
            } else if plan.ipv6 == Ipv6Mode::Capture {
                "captured"
            } else {
                "dropped"
            },
            udp = if plan.udp == UdpPlan::Allow {
                "allowed"
            } else {
                "dropped"
            },
            "transparent capture installed"
        ),
        None => tracing::info!(?backend, "transparent capture removed"),
    }
    Ok(())
}

/// What to do when a step for `family` fails: install the tools, or the way out for IPv6.
fn hint(family: Family, args: &InitArgs, reading: bool) -> String {
    let tools = match (args.backend, family) {
        (Backend::Nftables, _) => {
            "install nftables (Debian: apt-get install nftables) or pass --backend iptables"
        }
        (Backend::Iptables, Family::V4) => {
            "install iptables (Debian: apt-get install iptables) or pass --backend nftables"
        }
        (Backend::Iptables, Family::V6) => {
            "IPv6 is on in this namespace and must be captured or dropped: install ip6tables (Debian: apt-get install iptables) or pass --backend nftables"
        }
    };
    let mut hint = format!("{tools}; {PRIVILEGE_HINT}");
    if family == Family::V6 && args.ipv6 == Ipv6Mode::Capture && !reading && !args.remove {
        hint.push_str(
            "; if this kernel cannot redirect IPv6 (no ip6table_nat / nft inet nat), pass --ipv6 drop to drop all IPv6 but loopback instead",
        );
    }
    hint
}

impl CaptureError {
    fn with_hint(self, new: String) -> CaptureError {
        match self {
            CaptureError::Spawn {
                command, source, ..
            } => CaptureError::Spawn {
                command,
                source,
                hint: new,
            },
            CaptureError::Failed {
                command,
                status,
                stderr,
                ..
            } => CaptureError::Failed {
                command,
                status,
                stderr,
                hint: new,
            },
            other => other,
        }
    }

    /// The error without its hint, for a warning.
    fn brief(&self) -> String {
        match self {
            CaptureError::Failed { stderr, .. } => stderr.clone(),
            CaptureError::Spawn {
                command, source, ..
            } => format!("cannot run `{command}`: {source}"),
            other => other.to_string(),
        }
    }
}

/// Runs `program` (found on PATH or in an sbin directory) with `stdin` fed in; its stdout if
/// it exits with 0. Errors carry a privilege hint that callers replace with a better one.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CaptureError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let spawn_err = |source: std::io::Error| CaptureError::Spawn {
        hint: PRIVILEGE_HINT.to_string(),
        command: command.clone(),
        source,
    };
    let mut child = Command::new(find_program(program))
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
            hint: PRIVILEGE_HINT.to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program` from PATH, or from an sbin directory a non-login PATH often lacks; the bare
/// name (so that spawning reports it missing) when neither has it.
fn find_program(program: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(Into::into))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| program.into())
}

const PRIVILEGE_HINT: &str = "run `bulkhead-proxy init` as root (or with CAP_NET_ADMIN) inside the workload's network namespace; `--dry-run` prints the rules without applying them";

/// Where a redirected connection was going before REDIRECT rewrote it: `SO_ORIGINAL_DST`
/// for IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6, chosen by the accepted socket's own address
/// (an IPv4 connection on a dual-stack listener is IPv4 to netfilter, and is answered as an
/// IPv4 address). For a connection that was not redirected this is its own local address, or
/// an error when conntrack does not track it; see [`was_redirected`].
#[cfg(target_os = "linux")]
pub fn original_dst(stream: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let v4 = match stream.local_addr()? {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(local) => local.ip().to_ipv4_mapped().is_some(),
    };
    let addr = if v4 {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket().map(canonical).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the original destination is not an IP address",
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

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, as a dual-stack listener sees
/// an IPv4 peer) turned back into IPv4, so policy CIDRs and the endpoint table see one form.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Whether a connection accepted at `local` with original destination `original` came
/// through a REDIRECT rule. One that did not (someone connected to the proxy's port itself)
/// must be refused: forwarding it to its "original" destination would reach the proxy again.
pub fn was_redirected(local: SocketAddr, original: SocketAddr) -> bool {
    canonical(local) != canonical(original)
}

/// Whether `ip` is an address of this network namespace: binding a socket to it succeeds
/// (with the default `ip_nonlocal_bind` 0). Inbound connections are forwarded to their
/// original destination only if it is one, so that the sidecar never relays them elsewhere.
pub fn is_local_address(ip: IpAddr) -> bool {
    let domain = match ip {
        IpAddr::V4(_) => socket2::Domain::IPV4,
        IpAddr::V6(_) => socket2::Domain::IPV6,
    };
    socket2::Socket::new(domain, socket2::Type::STREAM, None)
        .and_then(|s| s.bind(&SocketAddr::new(ip, 0).into()))
        .is_ok()
}

#[cfg(test)]
mod tests;
