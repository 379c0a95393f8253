//! One AdmissionReview (`admission.k8s.io/v1`) in, one out: the injection webhook's answer,
//! without the listener (`webhook` serves it).
//!
//! What the API server sends is read as little as needed (the uid, the resource's kind, the
//! operation, the pod) and never trusted to be well formed: a body that is not an
//! AdmissionReview v1 gets an [`AdmissionError`] (an HTTP status and words), and a review
//! whose pod cannot be meshed gets `allowed: false` with the reason. It must never panic on
//! what it is sent, and never admit a pod that asked to be meshed without its sidecar.
//!
//! The namespace's labels are not part of an AdmissionReview. The API server sends only the
//! pods the webhook configuration's selectors pick (a namespace labelled
//! `bulkhead.dev/inject=enabled`, or a pod labelled so; see `webhook::configuration`), so a
//! pod that reaches here is treated as opted in: opting out by annotation and the
//! already-injected check still apply.

use crate::inject::{InjectConfig, Verdict, inject};
use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Value, json};

/// The API group and version of the only AdmissionReview this webhook speaks.
pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";
/// The largest request body read. The API server's own limit on an object is about 3 MiB.
pub const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

/// A request that is not an AdmissionReview this webhook can answer, as an HTTP status and
/// a message for the API server's log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AdmissionError {
    pub status: u16,
    pub message: String,
}

impl AdmissionError {
    fn bad(message: impl Into<String>) -> AdmissionError {
        AdmissionError {
            status: 400,
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<Request>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    uid: String,
    kind: Option<Gvk>,
    operation: Option<String>,
    namespace: Option<String>,
    object: Option<Value>,
}

#[derive(Deserialize)]
struct Gvk {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

/// What the webhook did with one review, for its log and the response.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// Admitted with the sidecar (the patch, as sent).
    Injected(json_patch::Patch),
    /// Admitted as it is, and why.
    Unchanged(String),
    /// Refused, and why.
    Refused(String),
}

/// Checks the request's content type: JSON only.
pub fn check_content_type(content_type: Option<&str>) -> Result<(), AdmissionError> {
    let essence = content_type
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some("application/json") => Ok(()),
        other => Err(AdmissionError {
            status: 415,
            message: format!(
                "an AdmissionReview is sent as application/json, not {}",
                other.unwrap_or("a body without a content type")
            ),
        }),
    }
}

/// The AdmissionReview answering `body`, and what was decided; `config` holds the current
/// trust bundle.
pub fn answer(body: &[u8], config: &InjectConfig) -> Result<(Value, Answer), AdmissionError> {
    if body.len() > MAX_REVIEW_BYTES {
        return Err(too_large());
    }
    let review: Review = serde_json::from_slice(body)
        .map_err(|e| AdmissionError::bad(format!("the body is not an AdmissionReview: {e}")))?;
    if review.api_version.as_deref() != Some(ADMISSION_API_VERSION)
        || review.kind.as_deref() != Some("AdmissionReview")
    {
        return Err(AdmissionError::bad(format!(
            "expected kind AdmissionReview of apiVersion {ADMISSION_API_VERSION}, got kind {:?} of apiVersion {:?}; set admissionReviewVersions: [v1] in the MutatingWebhookConfiguration",
            review.kind.unwrap_or_default(),
            review.api_version.unwrap_or_default()
        )));
    }
    let request = review
        .request
        .ok_or_else(|| AdmissionError::bad("the AdmissionReview has no request"))?;
    let answer = decide(&request, config);
    let mut response = json!({"uid": request.uid});
    match &answer {
        Answer::Injected(patch) => {
            let bytes = serde_json::to_vec(patch).map_err(|e| AdmissionError {
                status: 500,
                message: format!("cannot encode the patch: {e}"),
            })?;
            response["allowed"] = json!(true);
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        Answer::Unchanged(_) => response["allowed"] = json!(true),
        Answer::Refused(message) => {
            response["allowed"] = json!(false);
            response["status"] = json!({"code": 403, "reason": "Forbidden", "message": message});
        }
    }
    let review = json!({
        "apiVersion": ADMISSION_API_VERSION,
        "kind": "AdmissionReview",
        "response": response,
    });
    Ok((review, answer))
}

/// The error for a body over [`MAX_REVIEW_BYTES`].
pub fn too_large() -> AdmissionError {
    AdmissionError {
        status: 413,
        message: format!(
            "the AdmissionReview is larger than {MAX_REVIEW_BYTES} bytes, which this webhook reads"
        ),
    }
}

fn decide(request: &Request, config: &InjectConfig) -> Answer {
    let is_pod = request
        .kind
        .as_ref()
        .is_some_and(|k| k.group.is_empty() && k.kind == "Pod");
    if !is_pod {
        let kind = request.kind.as_ref().map_or("nothing", |k| k.kind.as_str());
        return Answer::Refused(format!(
            "the Bulkhead injection webhook injects pods only and was sent {kind}: its MutatingWebhookConfiguration's rules must name pods only"
        ));
    }
    if request.operation.as_deref() != Some("CREATE") {
        return Answer::Unchanged("only a pod's creation is injected".into());
    }
    let Some(object) = &request.object else {
        return Answer::Refused("the AdmissionReview carries no pod".into());
    };
    let mut pod: Pod = match serde_json::from_value(object.clone()) {
        Ok(pod) => pod,
        Err(e) => return Answer::Refused(format!("the pod cannot be read: {e}")),
    };
    // A pod created by a controller may come without its namespace; the request names it.
    if pod.metadata.namespace.is_none() {
        pod.metadata.namespace = request.namespace.clone();
    }
    match inject(&pod, Some(Some("enabled")), config) {
        Verdict::Patch(patch) => Answer::Injected(patch),
        Verdict::Unchanged(why) => Answer::Unchanged(why.into()),
        Verdict::Refuse(why) => Answer::Refused(why),
    }
}

#[cfg(test)]
mod tests;
