//! TLS client configurations per destination identity and application protocol, built from
//! the current credentials on first use and rebuilt when the credentials change.

use crate::credentials::TlsSet;
use bulkhead_identity::tls::{ExpectedServer, client_config};
use bulkhead_identity::{IdentityError, SpiffeId};
use rustls::ClientConfig;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The application protocol spoken inside an mTLS connection between sidecars (ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Alpn {
    Http1,
    H2,
    /// HTTP/2 framing carrying the HTTP/1.1 requests of many app connections at once; the
    /// receiving sidecar forwards each as HTTP/1.1 (see `crate::mux`).
    Mux,
    /// Opaque TCP: the bytes are relayed as they are.
    Tcp,
}

impl Alpn {
    pub(crate) const ALL: [&'static [u8]; 4] = [MUX_ALPN, b"h2", b"http/1.1", TCP_ALPN];

    pub(crate) fn id(self) -> &'static [u8] {
        match self {
            Alpn::Http1 => b"http/1.1",
            Alpn::H2 => b"h2",
            Alpn::Mux => MUX_ALPN,
            Alpn::Tcp => TCP_ALPN,
        }
    }

    pub(crate) fn of(negotiated: Option<&[u8]>) -> Option<Alpn> {
        match negotiated? {
            b"http/1.1" => Some(Alpn::Http1),
            b"h2" => Some(Alpn::H2),
            MUX_ALPN => Some(Alpn::Mux),
            TCP_ALPN => Some(Alpn::Tcp),
            _ => None,
        }
    }
}

const TCP_ALPN: &[u8] = b"bulkhead.dev/tcp";
const MUX_ALPN: &[u8] = b"bulkhead.dev/h1-mux";

/// At most this many configurations are kept; past it the cache starts over (each entry is
/// cheap to rebuild, and a proxy talks to few identities).
const MAX_ENTRIES: usize = 1024;

/// Configurations built from one credential set.
type Built = (Arc<TlsSet>, HashMap<(SpiffeId, Alpn), Arc<ClientConfig>>);

#[derive(Default)]
pub(crate) struct ClientConfigs {
    cache: Mutex<Option<Built>>,
}

impl ClientConfigs {
    /// A configuration that presents `set`'s SVID and requires the server to be `identity`.
    pub(crate) fn get(
        &self,
        set: &Arc<TlsSet>,
        identity: &SpiffeId,
        alpn: Alpn,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let mut guard = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = matches!(&*guard, Some((s, m)) if Arc::ptr_eq(s, set) && m.len() < MAX_ENTRIES);
        if !fresh {
            *guard = None;
        }
        let (_, map) = guard.get_or_insert_with(|| (set.clone(), HashMap::new()));
        if let Some(c) = map.get(&(identity.clone(), alpn)) {
            return Ok(c.clone());
        }
        let config = Arc::new(client_config(
            Some(&set.svid),
            &set.bundle,
            ExpectedServer::Exact(identity.clone()),
            &[alpn.id()],
        )?);
        map.insert((identity.clone(), alpn), config.clone());
        Ok(config)
    }
}
