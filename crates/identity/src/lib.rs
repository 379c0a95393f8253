//! Workload identity: SPIFFE IDs, the certificate authority, CSRs, X.509-SVID checks and the
//! rustls configurations that enforce them.
//!
//! Sans-I/O: nothing here opens a file or a socket; callers pass bytes and the current time.
//! A private key made here stays in the [`Svid`] that holds it; only the CA's own key can be
//! written out (by the control plane, into its data directory).

mod ca;
mod error;
pub mod jwk;
pub mod jwt;
mod svid;
pub mod tls;

/// The one SPIFFE ID grammar, re-exported so that `bulkhead_identity::SpiffeId` is the same
/// type as `bulkhead_spiffe::SpiffeId`.
pub use bulkhead_spiffe::{
    RESERVED_SEGMENT, ReservedId, Rule as SpiffeIdRule, SpiffeId, SpiffeIdError, SpiffePath,
    TrustDomain, parse_parts,
};
pub use ca::{Ca, DEFAULT_SVID_LIFETIME};
pub use error::{CaImportError, IdentityError, SvidError};
pub use svid::{
    LocalKey, RevocationCheck, RevokedSet, Svid, TrustBundle, fingerprint, not_after_of,
    not_before_of, serial_of, spiffe_id_of, subject_of,
};
