//! The resource set as callers outside this crate change it (the Kubernetes controller):
//! one checked revision through [`State::change`], exactly as an apply, with the author
//! the caller names.
//!
//! It hands out nothing that writes the set any other way, and a refused change commits
//! nothing.

use crate::change::Proposal;
use crate::service::State;
use bulkhead_policy::Origin;
use bulkhead_policy::model::Resource;
use std::sync::Arc;

/// A handle on the running control plane's resource set.
#[derive(Clone)]
pub struct Resources {
    state: Arc<State>,
}

/// What a committed change did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The revision now in force: a new one, or the current one if nothing changed.
    pub revision: u64,
    /// Whether a new revision was committed.
    pub changed: bool,
    /// `Kind/namespace/name created|configured|deleted`, for what changed.
    pub lines: Vec<String>,
}

/// Why a change was refused; nothing was committed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl Resources {
    pub(crate) fn new(state: Arc<State>) -> Resources {
        Resources { state }
    }

    /// The trust domain of the mesh.
    pub fn trust_domain(&self) -> &str {
        self.state.trust_domain()
    }

    /// The revision in force and its set, in key order.
    pub fn current(&self) -> (u64, Vec<Resource>) {
        let s = self.state.snapshot.borrow().clone();
        (s.revision, s.resources.clone())
    }

    /// Changes the set as one revision by `author`: under the write lock, `build` gets the
    /// current set and proposes the whole new one with each resource's origin (or refuses,
    /// in words; with replicas on etcd it is called again on the newer set when another
    /// replica committed first); the proposal is checked whole and against the per-proxy bounds, committed
    /// with `action` in the change log and pushed to every proxy. A proposal equal to the
    /// current set commits no revision.
    pub async fn change(
        &self,
        author: &str,
        action: &str,
        mut build: impl FnMut(&[Resource]) -> Result<(Vec<Resource>, Vec<Option<Origin>>), String>,
    ) -> Result<Committed, Refused> {
        let (changed, ()) = self
            .state
            .change(author, action, None, |current| {
                let (set, origins) =
                    build(current.resources).map_err(tonic::Status::failed_precondition)?;
                Ok((Proposal { set, origins }, ()))
            })
            .await
            .map_err(|s| Refused(s.message().to_string()))?;
        let lines = changed.lines(|_| true);
        let lines: Vec<String> = lines
            .into_iter()
            .filter(|l| !l.ends_with(" unchanged"))
            .collect();
        Ok(Committed {
            revision: changed.revision,
            changed: !lines.is_empty(),
            lines,
        })
    }
}
