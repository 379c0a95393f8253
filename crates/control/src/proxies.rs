//! What the control plane knows of each proxy: connected or not, which revision it was sent,
//! which it put in force (ACK) or refused (NACK) and why, when it was last heard from, and
//! when its certificate expires. In memory: it is rebuilt as proxies reconnect.
//!
//! Every change is announced on a watch channel ([`Registry::subscribe`]), so that a caller
//! can wait for proxies to acknowledge a revision (`delivery.rs`) without polling.

use bulkhead_api::v1::ProxyStatus;
use bulkhead_policy::model::ResourceName;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

type Key = (String, ResourceName);

pub(crate) struct Registry {
    proxies: Mutex<BTreeMap<Key, ProxyStatus>>,
    /// Bumped after every change of any proxy's status.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            proxies: Mutex::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a proxy's new configuration stream says about it.
#[derive(Debug, Default)]
pub(crate) struct Connecting {
    pub remote: String,
    pub cert_not_after_unix: u64,
    pub cert_ca_sha256: String,
    /// The proxy instance its certificate belongs to (empty if not recorded).
    pub instance: String,
    pub version: String,
}

/// Marks a configuration stream open; dropping it marks the stream closed.
pub(crate) struct Connection {
    registry: Arc<Registry>,
    key: Key,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.registry.update(&self.key, |p| {
            p.connected = false;
            p.last_contact_unix = unix_now();
        });
    }
}

impl Registry {
    fn update(&self, key: &Key, f: impl FnOnce(&mut ProxyStatus)) {
        {
            // A poisoned lock only means another request panicked mid-update; the map is
            // still a best-effort status view, so keep serving it.
            let mut map = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = map.get_mut(key) {
                f(p);
            }
        }
        self.changed();
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees a change after every update of any proxy's status.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The revision last sent to this proxy (0 if none).
    pub(crate) fn sent_revision(&self, spiffe_id: &str, workload: &ResourceName) -> u64 {
        let map = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(spiffe_id.to_string(), workload.clone()))
            .map_or(0, |p| p.sent_revision)
    }

    /// Counts for the metrics, at `revision` (the newest) and `now_unix`: connected,
    /// disconnected with a certificate still valid, connected but behind, connected and
    /// refusing.
    pub(crate) fn counts(&self, revision: u64, now_unix: u64) -> crate::metrics::Fleet {
        let map = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        let mut f = crate::metrics::Fleet::default();
        for p in map.values() {
            if !p.connected {
                f.disconnected += i64::from(p.cert_not_after_unix > now_unix);
                continue;
            }
            f.connected += 1;
            f.behind += i64::from(p.acked_revision < revision);
            f.nacking += i64::from(p.nacked_revision != 0);
        }
        f
    }

    /// Every workload a proxy of which has connected since this control plane started.
    pub(crate) fn workloads(&self) -> BTreeSet<ResourceName> {
        let map = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        map.keys().map(|(_, w)| w.clone()).collect()
    }

    pub(crate) fn connect(
        self: &Arc<Self>,
        spiffe_id: &str,
        workload: &ResourceName,
        seen: Connecting,
    ) -> Connection {
        let key = (spiffe_id.to_string(), workload.clone());
        let mut map = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        let p = map.entry(key.clone()).or_insert_with(|| ProxyStatus {
            spiffe_id: spiffe_id.to_string(),
            namespace: workload.namespace.clone(),
            workload: workload.name.clone(),
            ..ProxyStatus::default()
        });
        p.connected = true;
        p.remote = seen.remote;
        p.cert_not_after_unix = seen.cert_not_after_unix;
        p.cert_ca_sha256 = seen.cert_ca_sha256;
        p.instance = seen.instance;
        p.version = seen.version;
        p.last_contact_unix = unix_now();
        drop(map);
        self.changed();
        Connection {
            registry: self.clone(),
            key,
        }
    }

    pub(crate) fn sent(&self, spiffe_id: &str, workload: &ResourceName, revision: u64) {
        self.update(&(spiffe_id.to_string(), workload.clone()), |p| {
            p.sent_revision = revision;
        });
    }

    /// Records the version a proxy reported (bounded: it is a peer's word).
    pub(crate) fn reported_version(&self, spiffe_id: &str, workload: &ResourceName, version: &str) {
        if version.is_empty() {
            return;
        }
        let version = bounded_version(version);
        self.update(&(spiffe_id.to_string(), workload.clone()), |p| {
            if p.version != version {
                p.version = version;
            }
        });
    }

    pub(crate) fn ack(
        &self,
        spiffe_id: &str,
        workload: &ResourceName,
        revision: u64,
        error: Option<String>,
    ) {
        self.update(&(spiffe_id.to_string(), workload.clone()), |p| {
            p.last_contact_unix = unix_now();
            match error {
                None => {
                    p.acked_revision = revision;
                    if p.nacked_revision <= revision {
                        p.nacked_revision = 0;
                        p.nack_error.clear();
                    }
                }
                Some(e) => {
                    p.nacked_revision = revision;
                    p.nack_error = e;
                }
            }
        });
    }

    /// Records the bundle a proxy reports holding (the SHA-256 of each root).
    pub(crate) fn holds_bundle(
        &self,
        spiffe_id: &str,
        workload: &ResourceName,
        roots: Vec<String>,
    ) {
        // A peer's report: keep it small and hex, whatever it sends.
        let roots = roots
            .into_iter()
            .take(MAX_REPORTED_ROOTS)
            .filter(|r| r.len() == 64 && r.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        self.update(&(spiffe_id.to_string(), workload.clone()), |p| {
            p.bundle_sha256 = roots;
        });
    }

    /// Records a certificate issued to `spiffe_id` by the CA `ca_sha256` (a renewal).
    pub(crate) fn issued(&self, spiffe_id: &str, ca_sha256: &str, not_after_unix: u64) {
        let mut map = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        for ((id, _), p) in map.iter_mut() {
            if id == spiffe_id {
                p.cert_ca_sha256 = ca_sha256.to_string();
                p.cert_not_after_unix = not_after_unix;
            }
        }
    }

    /// How many proxies of `workload` have their configuration stream open.
    pub(crate) fn connected(&self, workload: &ResourceName) -> u32 {
        let map = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter(|((_, w), p)| w == workload && p.connected)
            .count() as u32
    }

    /// Every proxy's status; `bundle_current` says whether it holds exactly `bundle`.
    pub(crate) fn list(&self, bundle: &[String]) -> Vec<ProxyStatus> {
        let map = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        map.values()
            .cloned()
            .map(|mut p| {
                p.bundle_current = same_roots(&p.bundle_sha256, bundle);
                p
            })
            .collect()
    }
}

/// A version as a proxy reported it, kept to 64 printable characters.
pub(crate) fn bounded_version(v: &str) -> String {
    v.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

/// At most this many roots of a proxy's report are kept.
const MAX_REPORTED_ROOTS: usize = 32;

/// Whether two lists name the same roots, in any order.
pub(crate) fn same_roots(a: &[String], b: &[String]) -> bool {
    a.len() == b.len() && a.iter().all(|r| b.contains(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str) -> ResourceName {
        ResourceName {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    #[test]
    fn the_fleet_counted_for_the_metrics() {
        let registry = Arc::new(Registry::default());
        let now = 1_000_000;
        let seen = |not_after| Connecting {
            cert_not_after_unix: not_after,
            ..Connecting::default()
        };
        let id = |name: &str| format!("spiffe://td/ns/shop/sa/{name}");
        let orders = registry.connect(&id("orders"), &workload("orders"), seen(now + 3600));
        let _frontend = registry.connect(&id("frontend"), &workload("frontend"), seen(now + 3600));
        let payments = registry.connect(&id("payments"), &workload("payments"), seen(now + 3600));
        let stale = registry.connect(&id("old"), &workload("old"), seen(now - 1));
        registry.ack(&id("orders"), &workload("orders"), 3, None);
        registry.ack(&id("frontend"), &workload("frontend"), 2, None);
        registry.ack(&id("frontend"), &workload("frontend"), 3, Some("no".into()));
        let f = registry.counts(3, now);
        assert_eq!((f.connected, f.behind, f.nacking), (4, 3, 1));
        // Gone: payments with a valid certificate (it should be back), old with an expired one.
        drop((payments, stale));
        let f = registry.counts(3, now);
        assert_eq!((f.connected, f.disconnected, f.behind), (2, 1, 1));
        drop(orders);
        assert_eq!(registry.counts(3, now).disconnected, 2);
    }
}
