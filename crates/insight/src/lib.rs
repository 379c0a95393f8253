//! See and adapt: what the mesh's traffic says about its policy.
//!
//! Each sidecar aggregates the requests it decides into [`Edge`]s (who called what, how,
//! what was decided, how often) and reports them; the control plane stores them. This crate
//! is the logic over stored edges:
//!
//! - [`graph_lines`] groups edges into the service graph, one line per caller, destination
//!   and port, as `bulkhead graph` prints it and the web console draws it;
//! - [`template()`] turns concrete paths into templates (`/orders/123` → `/orders/*`) and
//!   [`generalise`] folds sets of them into path patterns of the policy language; an edge
//!   keeps at most [`DEFAULT_MAX_PATHS_PER_EDGE`] templates, then counts new paths into
//!   [`FOLDED_PATH`];
//! - [`recommend`] writes least-privilege ingress policy from what was observed, in audit
//!   mode, with the evidence in comments, and [`diff`] compares it with an earlier one;
//! - [`impact`] replays the observed flows against the current policy and a candidate and
//!   lists the flows whose verdict changes (with [`enforce_all`]: "what if I enforce this");
//!   [`Flow::replay`] replays one flow, which is how a stored denial gets its nearest miss;
//! - [`observed_reach`] and [`who_reached`] give the blast radius that traffic actually had;
//! - [`events::Detector`] turns flow reports into anomalies: a new edge, a new identity, a
//!   spike of denials.
//!
//! Pure, like `bulkhead-policy`: no tokio, no sockets, no files, no clock (times are unix
//! seconds in the edges).
//!
//! A recommendation never allows a caller that was not seen getting through, and names for
//! each only the ports, methods and paths it was seen using. It cannot be tighter than the
//! language: one rule lists them side by side, so it also admits their combinations (GET
//! seen on `/a` and POST on `/b` admit POST `/a`), and a trailing `*` is a prefix of any
//! depth. Where the declarations cannot carry methods and paths, the rule names ports only
//! and says why beside it.

mod edge;
pub mod events;
mod graph;
mod impact;
mod observed;
mod recommend;
pub mod tap;
pub mod template;

pub use edge::{Edge, EdgeKey, EdgeStats, EdgeVerdict, civil_from_days, merge_edges, rfc3339};
pub use graph::{
    GraphLine, caller_name, declared_identities, graph_lines, identities, with_declared_callers,
};
pub use impact::{
    Flow, FlowChange, Impact, VerdictChange, apply, concrete_path, enforce_all, impact,
};
pub use observed::{Party, Reach, Window, observed_reach, who_reached};
pub use recommend::{
    Change, DiffLine, LeftOut, LeftOutReason, Observed, POLICY_SUFFIX, POSTURE_NAME,
    RecommendOptions, Recommendation, RecommendationDiff, RecommendedPolicy, RecommendedPosture,
    RecommendedRule, ResourceDiff, RuleDiff, diff, recommend,
};
pub use template::{DEFAULT_MAX_PATHS_PER_EDGE, FOLDED_PATH, generalise, template};
