//! Joining without a join token: a platform vouches for the workload (on Kubernetes, the API
//! server, asked with a TokenReview about the pod's projected service-account token), and the
//! control plane issues the SVID for exactly the identity it vouched for.
//!
//! This crate knows no platform: an [`Attestor`] is handed in by the binary
//! (`bulkhead control --kubernetes-attest` gives `bulkhead_kubernetes::attest`'s). It never
//! logs a token, and what an attestor did not affirm is refused (default deny).

use bulkhead_identity::SpiffeId;
use std::future::Future;
use std::pin::Pin;

/// What a platform vouched for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attested {
    /// The one identity the platform vouches for.
    pub id: SpiffeId,
    /// Who it is on the platform, for the log and the proxy instance's record (e.g.
    /// `pod shop/orders-7c9d8f6b5-x2x9k`). Never secret.
    pub subject: String,
}

/// Why an attestation gives no identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    /// The platform answered, and did not vouch for the credential.
    #[error("{reason}")]
    Refused { reason: String },
    /// The platform could not be asked (unreachable, our own credentials refused, a bad
    /// answer): nothing is known about the credential.
    #[error("{reason}")]
    Unreachable { reason: String },
}

/// The boxed future an [`Attestor`] answers with.
pub type Attestation<'a> =
    Pin<Box<dyn Future<Output = Result<Attested, AttestationError>> + Send + 'a>>;

/// Checks a credential a proxy presents instead of a join token.
pub trait Attestor: Send + Sync + std::fmt::Debug {
    /// What it checks, for messages: "a Kubernetes service-account token (TokenReview)".
    fn describe(&self) -> &str;

    /// What the platform says of `credential`, mapped to an identity in `trust_domain`.
    fn attest<'a>(&'a self, trust_domain: &'a str, credential: &'a str) -> Attestation<'a>;
}
