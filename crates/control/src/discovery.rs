//! Prometheus service discovery from the control plane (`bulkhead control
//! --prometheus-sd-file PATH`): a `file_sd` JSON file listing every connected proxy's
//! `/metrics` address (the `--admin` address each reports on its configuration stream) and
//! the control plane's own `--metrics` address, rewritten whole, atomically (a temporary
//! file renamed over it), at every connect and disconnect. Prometheus re-reads it on change.
//!
//! Each proxy's group carries `job="bulkhead-proxies"`, `namespace`, `workload` and, when
//! the proxy has one, `instance` (its instance, kept across restarts); the control plane's
//! carries `job="bulkhead-control"`: one scrape job reading the file gives the job names the
//! alert rules and the dashboard expect. Nothing here is secret: addresses and names.

use crate::error::ControlError;
use bulkhead_policy::model::ResourceName;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One connected proxy, as a scrape target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub address: SocketAddr,
    pub workload: ResourceName,
    pub instance: String,
}

impl Target {
    /// The target a proxy's report names: its admin address, with an unspecified IP
    /// (`0.0.0.0`, `[::]`) read as the IP its stream comes from. `None` when it reported
    /// none or something that is not an address (a peer's word: never trusted further).
    pub(crate) fn reported(
        admin: &str,
        remote: Option<SocketAddr>,
        workload: &ResourceName,
        instance: &str,
    ) -> Option<Target> {
        let mut address: SocketAddr = admin.parse().ok()?;
        if address.port() == 0 {
            return None;
        }
        if address.ip().is_unspecified() {
            address.set_ip(remote?.ip());
        }
        Some(Target {
            address,
            workload: workload.clone(),
            instance: instance.chars().take(64).collect(),
        })
    }
}

/// The file and what it lists now. Clones share.
#[derive(Clone)]
pub(crate) struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    control: Option<SocketAddr>,
    targets: Mutex<BTreeMap<u64, Target>>,
    next: AtomicU64,
}

/// A proxy listed while this lives (its configuration stream is open).
pub(crate) struct Listed {
    discovery: Discovery,
    key: u64,
}

impl Drop for Listed {
    fn drop(&mut self) {
        let inner = &self.discovery.inner;
        inner
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        self.discovery.write_logged();
    }
}

impl Discovery {
    /// Writes the file now, listing the control plane alone (`control`: its `--metrics`
    /// address, if it serves one).
    pub(crate) fn start(
        path: PathBuf,
        control: Option<SocketAddr>,
    ) -> Result<Discovery, ControlError> {
        let discovery = Discovery {
            inner: Arc::new(Inner {
                path,
                control,
                targets: Mutex::default(),
                next: AtomicU64::new(0),
            }),
        };
        discovery.write().map_err(|source| ControlError::SdFile {
            path: discovery.inner.path.clone(),
            source,
        })?;
        Ok(discovery)
    }

    /// Lists `target` until the returned value is dropped.
    pub(crate) fn list(&self, target: Target) -> Listed {
        let key = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, target);
        self.write_logged();
        Listed {
            discovery: self.clone(),
            key,
        }
    }

    fn write_logged(&self) {
        if let Err(e) = self.write() {
            tracing::warn!(path = %self.inner.path.display(), error = %e, "could not rewrite the Prometheus file_sd file");
        }
    }

    /// The file's JSON now.
    pub(crate) fn json(&self) -> serde_json::Value {
        let targets = self
            .inner
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect::<Vec<_>>();
        groups(self.inner.control, &targets)
    }

    /// Writes the file whole: a temporary file beside it, renamed over it. The lock is held
    /// while writing so that the last change is the one that stays.
    fn write(&self) -> std::io::Result<()> {
        static WRITING: Mutex<()> = Mutex::new(());
        let _one_at_a_time = WRITING.lock().unwrap_or_else(|e| e.into_inner());
        let text = format!("{:#}\n", self.json());
        let path = &self.inner.path;
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }
}

/// The `file_sd` groups: one per proxy (each has its own labels), the control plane first.
pub(crate) fn groups(control: Option<SocketAddr>, targets: &[Target]) -> serde_json::Value {
    let mut out = Vec::new();
    if let Some(mut addr) = control {
        // Bound to every interface: Prometheus on this host reaches it on loopback.
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        out.push(serde_json::json!({
            "targets": [addr.to_string()],
            "labels": {"job": "bulkhead-control"},
        }));
    }
    for t in targets {
        let mut labels = serde_json::json!({
            "job": "bulkhead-proxies",
            "namespace": t.workload.namespace,
            "workload": t.workload.name,
        });
        if !t.instance.is_empty() {
            labels["instance"] = serde_json::Value::String(t.instance.clone());
        }
        out.push(serde_json::json!({
            "targets": [t.address.to_string()],
            "labels": labels,
        }));
    }
    serde_json::Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orders() -> ResourceName {
        ResourceName {
            namespace: "shop".into(),
            name: "orders".into(),
        }
    }

    #[test]
    fn a_reported_address_is_checked_and_an_unspecified_ip_is_the_streams() {
        let remote: SocketAddr = "10.0.0.7:40000".parse().unwrap();
        let t = |admin: &str| Target::reported(admin, Some(remote), &orders(), "i-1");
        assert_eq!(
            t("0.0.0.0:15000").unwrap().address.to_string(),
            "10.0.0.7:15000"
        );
        assert_eq!(
            t("[::]:15000").unwrap().address.to_string(),
            "10.0.0.7:15000"
        );
        assert_eq!(
            t("127.0.0.1:15001").unwrap().address.to_string(),
            "127.0.0.1:15001"
        );
        for bad in ["", "localhost:15000", "127.0.0.1:0", "127.0.0.1"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_file_lists_the_connected_and_is_rewritten_on_disconnect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sd.json");
        let control = "0.0.0.0:7444".parse().ok();
        let d = Discovery::start(path.clone(), control).unwrap();
        let read = || -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
        };
        assert_eq!(
            read(),
            serde_json::json!([{"targets": ["127.0.0.1:7444"], "labels": {"job": "bulkhead-control"}}])
        );
        let listed = d.list(Target {
            address: "10.0.0.7:15000".parse().unwrap(),
            workload: orders(),
            instance: "i-1".into(),
        });
        assert_eq!(
            read()[1],
            serde_json::json!({"targets": ["10.0.0.7:15000"], "labels": {"job": "bulkhead-proxies", "namespace": "shop", "workload": "orders", "instance": "i-1"}})
        );
        drop(listed);
        assert_eq!(read().as_array().unwrap().len(), 1);
        assert!(!dir.path().join("sd.json.tmp").exists());
    }
}
