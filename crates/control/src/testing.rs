//! What the control plane's unit tests share: a scratch directory removed on drop, a store and
//! a whole plane's state each in one, and requests as the listener hands them to a handler.
#![allow(clippy::unwrap_used)]

use crate::change::ProxyBounds;
use crate::flows::FlowRetention;
use crate::listener::PeerInfo;
use crate::service::State;
use crate::store::{HistoryRetention, Store};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A new, empty directory of its own under the system's temp dir, removed with all it holds
/// on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// `bulkhead-{name}-{pid}-{random}`: tests running at once never share one.
    pub(crate) fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "bulkhead-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A store opened with the default retention in a [`TempDir`] of its own.
pub(crate) struct TempStore {
    pub(crate) store: Store,
    _dir: TempDir,
}

pub(crate) fn temp_store(name: &str) -> TempStore {
    let dir = TempDir::new(name);
    let store = Store::open(&dir.path().join("state.redb")).unwrap();
    TempStore { store, _dir: dir }
}

/// A control plane's state in a fresh data directory (removed on drop), without a listener:
/// the handlers are called as tonic calls them, with the peer the TLS layer would have
/// verified ([`from`]).
pub(crate) struct Plane {
    pub(crate) state: State,
    _dir: TempDir,
}

/// The SVID lifetime of every test plane.
const LIFETIME: Duration = Duration::from_secs(3600);

impl Plane {
    /// Trust domain td.test, the default bounds, retentions and anomaly options.
    pub(crate) fn new(name: &str) -> Plane {
        let dir = TempDir::new(name);
        let (data, cas) = crate::datadir::DataDir::open(dir.path(), "td.test", LIFETIME).unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        let state = State::new(data, cas, store, LIFETIME, FlowRetention::default()).unwrap();
        Plane { state, _dir: dir }
    }

    /// [`Plane::new`] with these proxy bounds and revision history retention.
    pub(crate) fn with(name: &str, bounds: ProxyBounds, history: HistoryRetention) -> Plane {
        let dir = TempDir::new(name);
        let (data, cas) = crate::datadir::DataDir::open(dir.path(), "td.test", LIFETIME).unwrap();
        let store = Store::open_with(&dir.path().join("state.redb"), history).unwrap();
        let current = store.resources().unwrap();
        let state = State::build(
            data,
            cas,
            store,
            LIFETIME,
            FlowRetention::default(),
            &crate::anomaly::Anomalies::default(),
            bounds,
            current,
            None,
        )
        .unwrap();
        Plane { state, _dir: dir }
    }
}

/// The peer the listener hands over after a TLS handshake with `spiffe_id`'s SVID.
pub(crate) fn peer(spiffe_id: &str) -> PeerInfo {
    PeerInfo {
        remote: "127.0.0.1:40000".parse().unwrap(),
        identity: Some(bulkhead_identity::SpiffeId::parse(spiffe_id).unwrap()),
        cert_not_after: None,
        cert_ca_sha256: None,
        cert_serial: None,
    }
}

/// A request from `spiffe_id`, as the listener hands it over after the TLS handshake.
pub(crate) fn from<T>(spiffe_id: &str, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.extensions_mut().insert(peer(spiffe_id));
    req
}
