//! Live tap (`bulkhead tap`): routes the requests a workload's proxies decide to the
//! operators tapping it. Nothing is stored.

use bulkhead_api::v1 as pb;
use futures_util::Stream;
use std::pin::Pin;
use tonic::Status;

pub(crate) type TapStream = Pin<Box<dyn Stream<Item = Result<pb::TapResponse, Status>> + Send>>;
pub(crate) type FiltersStream =
    Pin<Box<dyn Stream<Item = Result<pb::TapFilters, Status>> + Send>>;
