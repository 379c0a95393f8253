//! The Bulkhead policy language: parse → check → compile → evaluate → explain.
//!
//! This crate is pure: no tokio, no sockets, no files. The control plane parses and checks the
//! YAML an operator applies; the wire carries the checked [`model`]; every proxy compiles the
//! same model into a [`PolicySet`] and asks it for a [`Decision`] per request.
//!
//! It must never widen what is allowed on bad input: a set with any error is refused whole.

mod compile;
mod decision;
mod error;
pub mod model;
mod pattern;
mod source;

pub use compile::{PolicySet, Request};
pub use decision::{Decision, Denial, NearMiss, Permit};
pub use error::{PolicyError, SourceLocation};
pub use pattern::{IdentityPattern, Method, PathPattern};
pub use source::{is_valid_name, parse_documents};

/// The only `apiVersion` this build understands.
pub const API_VERSION: &str = "bulkhead.dev/v1alpha1";
