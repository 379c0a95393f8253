#![allow(clippy::unwrap_used)]
use super::*;

fn config() -> InjectConfig {
    InjectConfig::new(
        "ghcr.io/bulkhead/bulkhead:0.1.0",
        "10.96.0.20:7443".parse().unwrap(),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

#[test]
fn a_review_is_answered_with_its_uid_and_a_base64_json_patch() {
    let review = fixture("admission-orders");
    let (out, what) = answer(&bytes(&review), &config()).unwrap();
    assert!(matches!(what, Answer::Injected(_)));
    assert_eq!(out["apiVersion"], ADMISSION_API_VERSION);
    assert_eq!(out["kind"], "AdmissionReview");
    assert_eq!(out["response"]["uid"], review["request"]["uid"]);
    assert_eq!(out["response"]["allowed"], true);
    assert_eq!(out["response"]["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(out["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    let pod: Pod = serde_json::from_value(pod).unwrap();
    assert!(crate::inject::is_injected(&pod));
}

#[test]
fn refusals_and_unchanged_pods_are_answers_not_errors() {
    let (out, what) = answer(&bytes(&fixture("admission-host-network")), &config()).unwrap();
    assert!(matches!(what, Answer::Refused(_)));
    assert_eq!(out["response"]["allowed"], false);
    assert_eq!(out["response"]["status"]["code"], 403);
    assert!(
        out["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("hostNetwork"),
        "{out}"
    );

    let (out, what) = answer(&bytes(&fixture("admission-opted-out")), &config()).unwrap();
    assert!(matches!(what, Answer::Unchanged(_)));
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none());

    let mut update = fixture("admission-orders");
    update["request"]["operation"] = json!("UPDATE");
    let (out, _) = answer(&bytes(&update), &config()).unwrap();
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none());

    let mut deployment = fixture("admission-orders");
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let (out, _) = answer(&bytes(&deployment), &config()).unwrap();
    assert_eq!(out["response"]["allowed"], false);

    let mut broken = fixture("admission-orders");
    broken["request"]["object"]["spec"]["containers"] = json!("not a list");
    let (out, _) = answer(&bytes(&broken), &config()).unwrap();
    assert_eq!(out["response"]["allowed"], false);
    assert!(
        out["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("the pod cannot be read"),
        "{out}"
    );
}

#[test]
fn what_is_not_an_admission_review_v1_is_an_http_error() {
    let status = |body: &[u8]| answer(body, &config()).unwrap_err();
    assert_eq!(status(b"not json").status, 400);
    assert_eq!(status(b"[1,2]").status, 400);
    let mut v1beta1 = fixture("admission-orders");
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let e = status(&bytes(&v1beta1));
    assert_eq!(e.status, 400);
    assert!(e.message.contains("admissionReviewVersions: [v1]"), "{e}");
    let e = status(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#);
    assert!(e.message.contains("no request"), "{e}");
    assert_eq!(status(&vec![b' '; MAX_REVIEW_BYTES + 1]).status, 413);

    assert!(check_content_type(Some("application/json")).is_ok());
    assert!(check_content_type(Some("application/json; charset=utf-8")).is_ok());
    assert_eq!(
        check_content_type(Some("text/plain")).unwrap_err().status,
        415
    );
    assert_eq!(check_content_type(None).unwrap_err().status, 415);
}
