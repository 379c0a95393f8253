//! A real etcd cluster for the replica tests: members of Debian's `etcd` (`/usr/bin/etcd`,
//! package `etcd-server`) on free loopback ports, each with its own data directory in one
//! temporary directory, killed when the cluster is dropped. [`EtcdCluster::start_tls`]: one
//! member that serves clients over TLS only and asks for a client certificate, with the
//! certificates made by `openssl`.

use crate::{Proc, TempDir, free_port};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One etcd member.
pub struct Member {
    pub name: String,
    /// `http://127.0.0.1:PORT`, where clients reach it.
    pub client_url: String,
    /// `127.0.0.1:PORT` where it answers `GET /health` in plain HTTP.
    health_addr: String,
    proc: Option<Proc>,
}

/// The files of a TLS member, in the cluster's directory: `ca.pem` signed the member's
/// serving certificate (for 127.0.0.1) and `client.pem`/`client.key`, the certificate it
/// asks clients for; `other-ca.pem` signed neither.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca: PathBuf,
}

/// Several etcd members forming one cluster.
pub struct EtcdCluster {
    pub members: Vec<Member>,
    pub dir: TempDir,
}

impl EtcdCluster {
    /// Starts `n` members of `etcd` (the path from `crate::tool`, or /usr/bin/etcd) and
    /// waits until every member reports itself healthy.
    pub fn start(etcd: PathBuf, n: usize) -> EtcdCluster {
        EtcdCluster::start_in(TempDir::new().unwrap(), etcd, n, None)
    }

    /// Starts one member serving clients over TLS only (`https://`, a client certificate
    /// required), its certificates made with `openssl`, and waits until it is healthy.
    pub fn start_tls(etcd: PathBuf, openssl: PathBuf) -> (EtcdCluster, EtcdTls) {
        let dir = TempDir::new().unwrap();
        let tls = make_certificates(dir.path(), &openssl);
        (EtcdCluster::start_in(dir, etcd, 1, Some(&tls)), tls)
    }

    fn start_in(dir: TempDir, etcd: PathBuf, n: usize, tls: Option<&EtcdTls>) -> EtcdCluster {
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
            let scheme = if tls.is_some() { "https" } else { "http" };
            let client_url = format!("{scheme}://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut health_addr = format!("127.0.0.1:{client}");
            let mut args: Vec<String> = [
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
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            if let Some(tls) = tls {
                // /health in plain HTTP on a port of its own: the client port asks for a
                // certificate.
                health_addr = format!("127.0.0.1:{}", free_port());
                let path = |p: &PathBuf| p.to_str().unwrap().to_string();
                args.extend([
                    "--cert-file".to_string(),
                    path(&dir.path().join("server.pem")),
                    "--key-file".to_string(),
                    path(&dir.path().join("server.key")),
                    "--client-cert-auth".to_string(),
                    "--trusted-ca-file".to_string(),
                    path(&tls.ca),
                    "--listen-metrics-urls".to_string(),
                    format!("http://{health_addr}"),
                ]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let proc = Proc::spawn(&format!("etcd-{name}"), dir.path(), &etcd, &args, &[]);
            members.push(Member {
                name,
                client_url,
                health_addr,
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
        let addr = m.health_addr.parse().expect("a loopback address");
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

/// Makes, with `openssl` in `dir`, a CA, a serving certificate for 127.0.0.1 and a client
/// certificate it signed, and another CA (P-256 keys, valid one day).
fn make_certificates(dir: &std::path::Path, openssl: &std::path::Path) -> EtcdTls {
    let run = |args: &[&str]| {
        let mut openssl = std::process::Command::new(openssl);
        crate::stdout_of(
            openssl.args(args).current_dir(dir),
            &format!("openssl {args:?}"),
        );
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    for (name, subject) in [("ca", "/CN=etcd test CA"), ("other-ca", "/CN=another CA")] {
        let (keyfile, pem) = (format!("{name}.key"), format!("{name}.pem"));
        let mut args = vec!["req", "-x509"];
        args.extend(key);
        args.extend([
            "-keyout", &keyfile, "-out", &pem, "-days", "1", "-subj", subject,
        ]);
        run(&args);
    }
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, subject) in [("server", "/CN=etcd"), ("client", "/CN=bulkhead")] {
        let (keyfile, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let mut args = vec!["req"];
        args.extend(key);
        args.extend(["-keyout", &keyfile, "-out", &csr, "-subj", subject]);
        run(&args);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "1",
            "-extfile",
            &ext,
        ]);
    }
    EtcdTls {
        ca: dir.join("ca.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
        other_ca: dir.join("other-ca.pem"),
    }
}
