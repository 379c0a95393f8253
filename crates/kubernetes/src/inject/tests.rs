use super::*;

fn review(name: &str) -> Pod {
    let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let review: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_json::from_value(review["request"]["object"].clone()).unwrap()
}

fn config() -> InjectConfig {
    InjectConfig::new(
        "ghcr.io/bulkhead/bulkhead:0.1.0",
        "10.96.0.20:7443".parse().unwrap(),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
}

/// The patch applied (by the json-patch crate, as the API server would) to the pod.
fn patched(pod: &Pod, verdict: &Verdict) -> Pod {
    let Verdict::Patch(patch) = verdict else {
        panic!("expected a patch, got {verdict:?}");
    };
    let mut doc = serde_json::to_value(pod).unwrap();
    json_patch::patch(&mut doc, patch).unwrap();
    serde_json::from_value(doc).unwrap()
}

#[test]
fn an_opted_in_namespace_gets_init_sidecar_and_token_volume_and_injecting_twice_changes_nothing() {
    let pod = review("admission-orders");
    let out = patched(&pod, &inject(&pod, Some(Some("enabled")), &config()));
    let spec = out.spec.as_ref().unwrap();
    let inits = spec.init_containers.as_ref().unwrap();
    assert_eq!(inits[0].name, INIT_CONTAINER);
    assert_eq!(inits[1].name, PROXY_CONTAINER);
    assert_eq!(inits[1].restart_policy.as_deref(), Some("Always"));
    assert!(inits[1].resources.as_ref().unwrap().requests.is_some());
    let volume = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == IDENTITY_VOLUME)
        .unwrap();
    let text = serde_json::to_string(volume).unwrap();
    assert!(
        text.contains(&format!("\"audience\":\"{TOKEN_AUDIENCE}\"")),
        "{text}"
    );
    // The app's containers are all still there.
    assert_eq!(
        spec.containers.len(),
        pod.spec.as_ref().unwrap().containers.len()
    );
    assert!(is_injected(&out));
    assert_eq!(
        inject(&out, Some(Some("enabled")), &config()),
        Verdict::Unchanged("the pod already has the sidecar")
    );
}

#[test]
fn opt_in_by_pod_label_opt_out_and_not_opted_in() {
    let pod = review("admission-labelled-pod");
    assert!(is_injected(&patched(
        &pod,
        &inject(&pod, Some(None), &config())
    )));

    let pod = review("admission-opted-out");
    assert_eq!(
        inject(&pod, Some(Some("enabled")), &config()),
        Verdict::Unchanged("the pod opted out (bulkhead.dev/inject: disabled)")
    );

    let pod = review("admission-orders");
    assert!(matches!(
        inject(&pod, Some(None), &config()),
        Verdict::Unchanged(_)
    ));
    // A namespace the controller has not seen: refused, never admitted unmeshed.
    assert!(matches!(inject(&pod, None, &config()), Verdict::Refuse(_)));
}

#[test]
fn host_network_pods_are_refused_with_the_reason() {
    let pod = review("admission-host-network");
    let Verdict::Refuse(message) = inject(&pod, Some(Some("enabled")), &config()) else {
        panic!("a hostNetwork pod must be refused");
    };
    assert!(message.contains("hostNetwork"), "{message}");
    assert!(
        message.contains("bulkhead.dev/inject: disabled"),
        "{message}"
    );
}

#[test]
fn probes_are_passed_through_the_sidecar() {
    let pod = review("admission-orders");
    let out = patched(&pod, &inject(&pod, Some(Some("enabled")), &config()));
    let app = &out.spec.as_ref().unwrap().containers[0];
    // The kubelet now probes the sidecar's admin port, which runs the declared probe.
    for probe in [&app.readiness_probe, &app.liveness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.port, IntOrString::Int(15000));
        assert!(get.path.as_deref().unwrap().starts_with("/app-health/"));
    }
    let proxy = &out.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[1];
    let env = proxy.env.as_ref().unwrap();
    let probes = env.iter().find(|e| e.name == APP_PROBES_ENV).unwrap();
    let probes: Vec<AppProbe> = serde_json::from_str(probes.value.as_deref().unwrap()).unwrap();
    assert!(
        probes
            .iter()
            .any(|p| p.port == 9090 && p.http_path.is_none()),
        "{probes:?}"
    );
    assert!(
        probes
            .iter()
            .any(|p| p.http_path.as_deref() == Some("/ready")),
        "{probes:?}"
    );

    // A gRPC probe cannot pass through: refused with what to do, never admitted unmeshed.
    let pod = review("admission-grpc-probe");
    let Verdict::Refuse(message) = inject(&pod, Some(Some("enabled")), &config()) else {
        panic!("a gRPC probe must be refused");
    };
    assert!(message.contains("gRPC probe"), "{message}");
}

#[test]
fn bad_exclusion_annotations_refuse_the_pod() {
    let mut pod = review("admission-orders");
    pod.metadata
        .annotations
        .get_or_insert_default()
        .insert(EXCLUDE_OUTBOUND_CIDRS.into(), "not-a-cidr".into());
    let Verdict::Refuse(message) = inject(&pod, Some(Some("enabled")), &config()) else {
        panic!("a bad annotation must refuse the pod");
    };
    assert!(message.contains(EXCLUDE_OUTBOUND_CIDRS), "{message}");
}
