//! A real Prometheus (Debian's `prometheus` binary) for tests: started on a loopback port
//! with a configuration written into a directory of its own, queried through its HTTP API.

use crate::mesh::{WAIT, eventually};
use crate::{Proc, http};
use serde_json::Value;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

pub struct Prometheus {
    pub addr: SocketAddr,
    pub dir: TempDir,
    server: Proc,
}

/// Where a test keeps Prometheus' configuration and data, made before either starts, so
/// that what Prometheus reads (a `file_sd` file) can be written there first.
pub fn dir() -> TempDir {
    TempDir::new().unwrap()
}

impl Prometheus {
    /// Starts `bin` with `config` (YAML) as its configuration file in `dir`; returns once it
    /// is ready.
    pub fn start(bin: &Path, dir: TempDir, config: &str) -> Prometheus {
        let path = dir.path();
        std::fs::write(path.join("prometheus.yml"), config).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let addr: SocketAddr = listen.parse().unwrap();
        let mut server = Proc::spawn(
            "prometheus",
            path,
            bin,
            &[
                &format!("--config.file={}", path.join("prometheus.yml").display()),
                &format!("--storage.tsdb.path={}", path.join("tsdb").display()),
                &format!("--web.listen-address={listen}"),
            ],
            &[],
        );
        eventually(WAIT, "Prometheus ready", || {
            server.assert_running();
            std::net::TcpStream::connect(addr).is_ok()
                && http(addr, "GET", "/-/ready").status == 200
        });
        Prometheus { addr, dir, server }
    }

    /// A path in Prometheus' directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Prometheus' log, for failure messages.
    pub fn log_text(&self) -> String {
        self.server.log_text()
    }

    /// `GET /api/v1/<path>`: the whole answer, which must be a success.
    pub fn api(&self, path: &str) -> Value {
        let r = http(self.addr, "GET", &format!("/api/v1/{path}"));
        let v: Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {}", r.body));
        assert_eq!(v["status"], "success", "{path}: {v}");
        v
    }

    /// An instant query: the `data.result` array.
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let v = self.api(&format!("query?query={}", encode(promql)));
        v["data"]["result"].as_array().unwrap().clone()
    }

    /// An instant query's single value as a number (`None`: no series, or several).
    pub fn value(&self, promql: &str) -> Option<f64> {
        match self.query(promql).as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

/// Percent-encodes a query parameter (everything but unreserved characters).
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
