//! The Bulkhead policy language: parse → check → compile → evaluate → explain.
//!
//! This crate is pure: no tokio, no sockets, no files. The control plane parses and checks the
//! YAML an operator applies; the wire carries the same resources as JSON; every proxy compiles
//! them into a [`PolicySet`] and asks it for a [`Decision`] per request.
//!
//! It must never widen what is allowed on bad input: a set with any error is refused whole.

pub mod canonical;
pub mod cases;
mod compile;
mod decision;
mod endpoints;
mod error;
mod eval;
mod lint;
mod located;
pub mod model;
mod pattern;
mod reach;
#[cfg(feature = "schema")]
mod schema;
mod source;

pub use canonical::{CanonicalRequest, RawRequest, Refusal};
pub use compile::{Distribution, relevant_to};
pub use decision::{AuditOutcome, Decision, NearMiss, PostureSource, Reason, Verdict};
pub use endpoints::{Endpoint, Endpoints};
pub use error::{PolicyError, SourceLocation};
pub use eval::{Headers, Http, Peer, PolicySet, PolicyView, Request};
pub use lint::{Warning, lint, lint_parsed};
pub use located::Located;
pub use pattern::{
    Glob, GrpcName, HeaderName, HostPattern, IdentityPattern, KNOWN_METHODS, Method, PathPattern,
    PortRange, Protocol,
};
pub use reach::{
    BlastRadius, EdgeView, Grant, GrantView, PostureScope, ReachEdge, ReachError, ReachOptions,
    Reached, SourceEgress, blast_radius, can_reach, reachable_from, who_can_reach,
};
pub use source::{Origin, is_valid_name, parse_documents, parse_file, read_yaml, text_of};

/// The only `apiVersion` this build understands.
pub const API_VERSION: &str = "bulkhead.dev/v1alpha1";

/// Parses and compiles files in one step, as `bulkhead policy lint` does. Returns the first
/// parse error of each file; if every file parses, every compile error of the set. Each
/// error carries its location.
pub fn load(
    files: &[(String, String)],
    revision: u64,
) -> Result<(Vec<model::Resource>, PolicySet), Vec<PolicyError>> {
    let texts = files.iter().map(|(n, t)| (n.as_str(), Ok(t.as_str())));
    let (parsed, set) = load_texts(texts, revision)?;
    Ok((parsed.into_iter().map(|(r, _)| r).collect(), set))
}

/// Parsed resources, each with where it came from, and the set they compile to.
pub type Loaded = (Vec<(model::Resource, Origin)>, PolicySet);

/// [`load`] for files read as bytes, keeping each resource's origin (for [`lint_parsed`]).
/// A file that is not UTF-8 is an error for that file only ([`text_of`]); the others are
/// still parsed and their errors reported.
pub fn load_bytes(files: &[(String, Vec<u8>)], revision: u64) -> Result<Loaded, Vec<PolicyError>> {
    let texts = files.iter().map(|(n, b)| (n.as_str(), text_of(n, b)));
    load_texts(texts, revision)
}

fn load_texts<'a>(
    files: impl Iterator<Item = (&'a str, Result<&'a str, PolicyError>)>,
    revision: u64,
) -> Result<Loaded, Vec<PolicyError>> {
    let mut parsed = Vec::new();
    let mut errors = Vec::new();
    for (name, text) in files {
        match text.and_then(|t| parse_file(name, t)) {
            Ok(mut p) => parsed.append(&mut p),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let set = PolicySet::compile_parsed(&parsed, revision)?;
    Ok((parsed, set))
}
