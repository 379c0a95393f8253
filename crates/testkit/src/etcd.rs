//! A real etcd cluster for the replica tests: members of Debian's `etcd` (`/usr/bin/etcd`,
//! package `etcd-server`) on free loopback ports, each with its own data directory in one
//! temporary directory, killed when the cluster is dropped.

use crate::{Proc, TempDir};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One etcd member.
pub struct Member {
    pub name: String,
    /// `http://127.0.0.1:PORT`, where clients reach it.
    pub client_url: String,
    proc: Option<Proc>,
}

/// Several etcd members forming one cluster.
pub struct EtcdCluster {
    pub members: Vec<Member>,
    pub dir: TempDir,
}

/// A loopback port nothing listens on now (the listener is dropped before etcd binds it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl EtcdCluster {
    /// Starts `n` members of `etcd` (the path from `crate::tool`, or /usr/bin/etcd) and
    /// waits until every member reports itself healthy.
    pub fn start(etcd: PathBuf, n: usize) -> EtcdCluster {
        let dir = TempDir::new().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let data = dir.path().join(format!("{name}.etcd"));
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let args = [
                "--name",
                &name,
                "--data-dir",
                data.to_str().unwrap(),
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "bulkhead-test",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                "--logger",
                "zap",
            ];
            let proc = Proc::spawn(&format!("etcd-{name}"), dir.path(), &etcd, &args, &[]);
            members.push(Member {
                name,
                client_url,
                proc: Some(proc),
            });
        }
        let cluster = EtcdCluster { members, dir };
        for m in &cluster.members {
            cluster.wait_healthy(m, Duration::from_secs(30));
        }
        cluster
    }

    fn wait_healthy(&self, m: &Member, timeout: Duration) {
        let addr = m
            .client_url
            .trim_start_matches("http://")
            .parse()
            .expect("a loopback address");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(raw) = crate::http_raw(addr, "GET", "/health")
                && String::from_utf8_lossy(&raw).contains("\"health\":\"true\"")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {} is not healthy after {timeout:?}; its log:\n{}",
                m.name,
                m.proc.as_ref().map(Proc::log_text).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every member's client URL, comma-separated, as `bulkhead control --etcd` takes them.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills member `i` (SIGKILL); the others keep a quorum if they are a majority.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
    }
}
