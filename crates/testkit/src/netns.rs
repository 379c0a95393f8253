//! A lab of network namespaces for end-to-end tests that need root: transparent capture,
//! and what actually crosses the wire between hosts.
//!
//! A hub namespace holds a Linux bridge; each host gets a namespace of its own, joined to the
//! bridge by a veth pair (`eth0` on the host's side), with an IPv4 address on a /24 of the
//! lab's and an IPv6 one (unique local, fd00::/8) on a /64 of the lab's. Every link is made
//! inside the lab's namespaces, never in the test's own, so nothing touches the machine's
//! network, and deleting the namespaces (on drop, also after a panic) removes everything.
//!
//! The test process never enters a namespace (that takes `setns`, and the workspace forbids
//! unsafe code): programs run there through `ip netns exec` ([`Lab::command`]).

use crate::{Proc, TempDir};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Returns true if `test` can run: root, `ip` and every program in `needs` (e.g.
/// `"iptables"`, `"tcpdump"`) on PATH or in an sbin directory. If not, with
/// `BULKHEAD_STRICT=1` in the environment it panics (CI must not skip silently); otherwise it
/// prints `skipped: <test>: <why>` to stderr and returns false.
pub fn can_run(test: &str, needs: &[&str]) -> bool {
    let mut why = Vec::new();
    if !is_root() {
        why.push("root".to_string());
    }
    let missing: Vec<&str> = std::iter::once(&"ip")
        .chain(needs)
        .filter(|p| find_program(p).is_none())
        .copied()
        .collect();
    if !missing.is_empty() {
        why.push(format!("the programs {}", missing.join(", ")));
    }
    if why.is_empty() {
        return true;
    }
    let needs = format!("needs {}", why.join(" and "));
    let fix = "; run it as root with the programs installed (./dev/test installs them on Debian)";
    crate::cannot_run(test, &format!("it {needs}"), fix, &needs);
    false
}

fn is_root() -> bool {
    // "Uid:\t<real>\t<effective>\t…": the effective uid decides.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The path of `program`: itself if it holds a `/`, else the first executable of that name
/// on PATH or in the sbin directories (which a non-login PATH often lacks).
pub fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// Labs made by this process so far: part of every name and subnet, so concurrent labs
/// never share either.
static LABS: AtomicU32 = AtomicU32::new(0);

/// Network namespaces on one bridge; deleted, with every link in them, on drop.
pub struct Lab {
    ip: PathBuf,
    hub: String,
    hosts: Vec<Host>,
    /// Namespaces created so far, in order; what drop deletes.
    made: Vec<String>,
    /// `/etc/netns/<ns>` directories made for [`Lab::set_resolv_conf`]; what drop deletes.
    etc: Vec<PathBuf>,
}

struct Host {
    name: String,
    ns: String,
    addr: Ipv4Addr,
    addr6: Ipv6Addr,
}

impl Lab {
    /// Creates the hub namespace with a bridge, and one namespace per host joined to it: host
    /// `i` gets `10.<a>.<b>.(i+2)/24` and `fd00:<a>:<b>::(i+2)/64` on `eth0`, where `a.b` comes
    /// from the pid and a per-process counter, and `lo` is up everywhere. The IPv6 address is
    /// usable at once (no duplicate address detection). Namespaces are named
    /// `bh<pid>x<n>-<host>` (the hub `bh<pid>x<n>`). Host names: lowercase letters, digits
    /// and `-`, distinct. Panics (after removing what it made) if any step fails.
    pub fn new(hosts: &[&str]) -> Lab {
        assert!(hosts.len() <= 250, "a lab holds at most 250 hosts");
        let ip = find_program("ip").expect("`ip` (iproute2) is needed: check with can_run first");
        let pid = std::process::id();
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        // The addresses live only inside the lab, so even a clash with another process would
        // be harmless; distinct subnets keep captures and logs unambiguous.
        let [_, _, a, b] = (pid.wrapping_mul(64).wrapping_add(n) & 0xffff).to_be_bytes();
        let hub = format!("bh{pid}x{n}");
        let mut lab = Lab {
            ip,
            hub: hub.clone(),
            hosts: Vec::new(),
            made: Vec::new(),
            etc: Vec::new(),
        };
        lab.add_namespace(&hub);
        lab.run_ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        lab.run_ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for (i, &name) in hosts.iter().enumerate() {
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'),
                "host name {name:?}: use lowercase letters, digits and -"
            );
            assert!(
                lab.hosts.iter().all(|h| h.name != name),
                "host {name:?} twice"
            );
            let ns = format!("{hub}-{name}");
            let addr = Ipv4Addr::new(10, a, b, i as u8 + 2);
            let addr6 = Ipv6Addr::new(0xfd00, a.into(), b.into(), 0, 0, 0, 0, i as u16 + 2);
            let veth = format!("v{i}");
            lab.add_namespace(&ns);
            lab.run_ip(&[
                "-n", &hub, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            lab.run_ip(&["-n", &hub, "link", "set", &veth, "master", "br0", "up"]);
            lab.run_ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            lab.run_ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            lab.run_ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            lab.hosts.push(Host {
                name: name.to_string(),
                ns,
                addr,
                addr6,
            });
        }
        lab
    }

    /// The host's address on the lab's bridge.
    pub fn ip(&self, host: &str) -> Ipv4Addr {
        self.host(host).addr
    }

    /// The host's IPv6 address on the lab's bridge (in fd00::/8).
    pub fn ip6(&self, host: &str) -> Ipv6Addr {
        self.host(host).addr6
    }

    /// The host's address of one family or the other: `ip6(host)` or `ip(host)`.
    pub fn addr(&self, host: &str, v6: bool) -> IpAddr {
        if v6 {
            self.ip6(host).into()
        } else {
            self.ip(host).into()
        }
    }

    /// Gives `host` its own `/etc/resolv.conf`: programs run with [`Lab::command`] (`ip netns
    /// exec`, which bind-mounts `/etc/netns/<ns>/resolv.conf` over it) read `text` there. The
    /// file goes with the lab.
    pub fn set_resolv_conf(&mut self, host: &str, text: &str) {
        let dir = Path::new("/etc/netns").join(self.ns(host));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        if !self.etc.contains(&dir) {
            self.etc.push(dir.clone());
        }
        let file = dir.join("resolv.conf");
        std::fs::write(&file, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
    }

    /// The host's namespace name, as `ip netns` knows it.
    pub fn ns(&self, host: &str) -> &str {
        &self.host(host).ns
    }

    /// `ip netns exec <ns> <program>`: add arguments and run it. `ip netns exec` execs the
    /// program, so the child's pid is the program's. A bare program name is looked up as
    /// [`find_program`] does.
    pub fn command(&self, host: &str, program: &Path) -> Command {
        let program = program
            .to_str()
            .and_then(find_program)
            .unwrap_or_else(|| program.to_path_buf());
        let mut cmd = Command::new(&self.ip);
        cmd.args(["netns", "exec", self.ns(host)]).arg(program);
        cmd
    }

    /// Starts tcpdump in the hub namespace on the bridge, writing every packet between the
    /// hosts to a pcap file as it arrives; returns once tcpdump is listening.
    pub fn capture(&self) -> Capture {
        let dir = TempDir::new().expect("a temporary directory for the capture");
        let mut cmd = Command::new(&self.ip);
        cmd.args(["netns", "exec", &self.hub])
            .arg(find_program("tcpdump").expect("tcpdump is needed: check with can_run first"))
            .args(["-i", "br0", "-n", "-U", "--immediate-mode", "-s", "0", "-w"])
            .arg(dir.path().join("bridge.pcap"));
        let proc = Proc::from_command("tcpdump", dir.path(), cmd);
        let mut capture = Capture { proc, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !capture.proc.log_text().contains("listening on") {
            capture.proc.assert_running();
            assert!(
                Instant::now() < deadline,
                "tcpdump did not start listening on the lab's bridge within 10 s; its log:\n{}",
                capture.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        capture
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name:?} in this lab"))
    }

    fn add_namespace(&mut self, ns: &str) {
        self.run_ip(&["netns", "add", ns]);
        self.made.push(ns.to_string());
        self.run_ip(&["-n", ns, "link", "set", "lo", "up"]);
    }

    fn run_ip(&self, args: &[&str]) {
        let out = Command::new(&self.ip)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.ip.display()));
        assert!(
            out.status.success(),
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

impl Drop for Lab {
    /// Deleting a namespace deletes its links (a veth pair goes with either end); a process
    /// still running in one keeps it alive, unnamed, until that process exits.
    fn drop(&mut self) {
        for dir in &self.etc {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                eprintln!("warning: could not delete {}: {e}", dir.display());
            }
        }
        for ns in self.made.iter().rev() {
            let status = Command::new(&self.ip)
                .args(["netns", "del", ns])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !status.is_ok_and(|s| s.success()) {
                eprintln!("warning: could not delete network namespace {ns}: `ip netns del {ns}`");
            }
        }
    }
}

/// A tcpdump on a lab's bridge; stopped (and its file deleted) on drop.
pub struct Capture {
    proc: Proc,
    dir: TempDir,
}

impl Capture {
    /// Stops tcpdump and returns the pcap file's contents, to search for plaintext. Waits a
    /// moment first so packets still on their way reach the file.
    pub fn stop(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(200));
        self.proc.kill();
        let file = self.dir.path().join("bridge.pcap");
        std::fs::read(&file).unwrap_or_else(|e| {
            panic!(
                "cannot read the capture {}: {e}; tcpdump's log:\n{}",
                file.display(),
                self.proc.log_text()
            )
        })
    }
}

/// Whether `needle` occurs in `haystack` (e.g. a marker in a [`Capture`]'s bytes).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_reach_each_other_over_the_bridge_and_everything_goes_on_drop() {
        if !can_run(
            "hosts_reach_each_other_over_the_bridge_and_everything_goes_on_drop",
            &["curl", "tcpdump"],
        ) {
            return;
        }
        let mut lab = Lab::new(&["a", "b"]);
        let (a, b) = (lab.ip("a"), lab.ip("b"));
        assert_eq!(a.octets()[0], 10);
        assert_eq!(a.octets()[3], 2);
        assert_eq!(b.octets()[3], 3);
        let (a6, b6) = (lab.ip6("a"), lab.ip6("b"));
        assert_eq!(a6.segments()[0], 0xfd00);
        assert_eq!((a6.segments()[7], b6.segments()[7]), (2, 3));
        assert_eq!(
            [a6.segments()[1], a6.segments()[2]],
            [u16::from(a.octets()[1]), u16::from(a.octets()[2])]
        );
        let names: Vec<String> = lab.made.clone();
        let capture = lab.capture();
        // Nothing listens on b:1, so a refusal proves the SYN reached b and the RST came back,
        // over either family.
        for url in [format!("http://{b}:1/"), format!("http://[{b6}]:1/")] {
            let out = lab
                .command("a", Path::new("curl"))
                .args(["-sS", "--max-time", "5"])
                .arg(&url)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("Couldn't connect") || stderr.contains("refused"),
                "{url}: {stderr}"
            );
        }
        let pcap = capture.stop();
        assert!(pcap.len() > 24, "no packet captured");
        assert!(contains(&pcap, &b.octets()), "no packet to {b} captured");
        assert!(contains(&pcap, &b6.octets()), "no packet to {b6} captured");

        // A resolv.conf of the host's own, seen there only, gone with the lab.
        lab.set_resolv_conf("a", "nameserver 10.9.9.9\n");
        let out = lab
            .command("a", Path::new("cat"))
            .arg("/etc/resolv.conf")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "nameserver 10.9.9.9\n"
        );
        let etc = Path::new("/etc/netns").join(lab.ns("a"));
        assert!(etc.exists());

        drop(lab);
        assert!(!etc.exists(), "{} left behind", etc.display());
        let list = namespaces();
        for ns in names {
            assert!(!list.contains(&ns), "{ns} still exists");
        }

        // A lab that fails half-way removes what it made, too.
        assert!(std::panic::catch_unwind(|| Lab::new(&["a", "a"])).is_err());
        let ours = format!("bh{}x", std::process::id());
        let left: Vec<String> = namespaces()
            .into_iter()
            .filter(|ns| ns.starts_with(&ours))
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    fn namespaces() -> Vec<String> {
        let out = Command::new(find_program("ip").unwrap())
            .args(["netns", "list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }
}
