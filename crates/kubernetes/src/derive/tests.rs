use super::*;
use serde_json::Value;

const TD: &str = "cluster.local";

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Arc<T> {
    Arc::new(serde_json::from_value(v).unwrap())
}

/// The derived resource `key` (`Kind/namespace/name`); panics if none was derived.
fn resource<'a>(d: &'a Derived, key: &str) -> &'a Resource {
    d.resources
        .iter()
        .find(|r| r.key() == key)
        .unwrap_or_else(|| panic!("{key} was not derived"))
}

/// [`resource`] as YAML.
fn yaml_of(d: &Derived, key: &str) -> String {
    resource(d, key).to_yaml().unwrap()
}

struct Cluster {
    pods: Vec<Value>,
    services: Vec<Value>,
    accounts: Vec<Value>,
}

impl Cluster {
    fn shop() -> Cluster {
        Cluster {
            pods: [
                "pod-orders-a.json",
                "pod-orders-b.json",
                "pod-frontend.json",
                "pod-legacy-unmeshed.json",
            ]
            .map(fixture)
            .to_vec(),
            services: vec![fixture("service-orders.json")],
            accounts: ["serviceaccount-orders.json", "serviceaccount-frontend.json"]
                .map(fixture)
                .to_vec(),
        }
    }

    fn derive(&self) -> Derived {
        let pods: Vec<Arc<Pod>> = self.pods.iter().cloned().map(typed).collect();
        let services: Vec<Arc<Service>> = self.services.iter().cloned().map(typed).collect();
        let accounts: Vec<Arc<ServiceAccount>> = self.accounts.iter().cloned().map(typed).collect();
        derive(
            TD,
            ClusterObjects {
                pods: &pods,
                services: &services,
                service_accounts: &accounts,
            },
        )
    }

    fn yaml(&self) -> String {
        let d = self.derive();
        d.resources
            .iter()
            .map(|r| r.to_yaml().unwrap())
            .collect::<Vec<_>>()
            .join("---\n")
    }
}

#[test]
fn a_deployment_its_service_and_a_second_deployment() {
    let cluster = Cluster::shop();
    let d = cluster.derive();
    assert!(d.skipped.is_empty(), "{:?}", d.skipped);
    let expected = r#"apiVersion: bulkhead.dev/v1alpha1
kind: Service
metadata:
  name: orders
  namespace: shop
  labels:
    app.kubernetes.io/name: orders
    app.kubernetes.io/part-of: shop
    bulkhead.dev/managed-by: kubernetes
spec:
  selector:
    matchLabels:
      app.kubernetes.io/name: orders
  ports:
  - port: 8080
    protocol: http
  - port: 9090
    protocol: grpc
---
apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata:
  name: frontend
  namespace: shop
  labels:
    app.kubernetes.io/name: frontend
    app.kubernetes.io/part-of: shop
    bulkhead.dev/managed-by: kubernetes
spec:
  identity: spiffe://cluster.local/ns/shop/sa/frontend
  ports:
  - port: 3000
    protocol: http
  addresses:
  - "10.244.2.30"
---
apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata:
  name: orders
  namespace: shop
  labels:
    app.kubernetes.io/name: orders
    app.kubernetes.io/part-of: shop
    bulkhead.dev/managed-by: kubernetes
    tier: backend
spec:
  identity: spiffe://cluster.local/ns/shop/sa/orders
  ports:
  - port: 8080
    protocol: http
  - port: 9090
    protocol: grpc
  addresses:
  - "10.244.1.23"
  - "10.244.2.17"
  - "10.96.41.17"
"#;
    assert_eq!(cluster.yaml(), expected);
    // What is derived compiles as a set.
    bulkhead_policy::PolicySet::compile(&d.resources, 1).unwrap();
}

#[test]
fn a_pod_deleted_or_relabelled_changes_its_workload() {
    let mut cluster = Cluster::shop();
    cluster.pods.remove(1);
    let yaml = cluster.yaml();
    assert!(!yaml.contains("10.244.1.23"), "{yaml}");
    assert!(yaml.contains("10.244.2.17"), "{yaml}");

    let mut cluster = Cluster::shop();
    cluster.pods[1]["metadata"]["labels"]["tier"] = "canary".into();
    let d = cluster.derive();
    let orders = resource(&d, "Workload/shop/orders");
    assert!(
        !orders.metadata().labels.contains_key("tier"),
        "labels all pods share, only"
    );
    assert_eq!(orders.metadata().labels["app.kubernetes.io/name"], "orders");
}

#[test]
fn only_pods_with_the_sidecar_that_still_run_and_whose_account_exists() {
    let mut cluster = Cluster::shop();
    cluster.pods[2]["status"]["phase"] = "Succeeded".into();
    let yaml = cluster.yaml();
    assert!(!yaml.contains("name: frontend"), "{yaml}");
    assert!(
        !yaml.contains("legacy"),
        "an unmeshed pod is never declared: {yaml}"
    );

    let mut cluster = Cluster::shop();
    cluster.accounts.remove(1);
    let d = cluster.derive();
    assert!(d.resources.iter().all(|r| r.name().name != "frontend"));
    assert_eq!(
        d.skipped,
        vec![Skipped {
            object: "Pod/shop/frontend-5f6b8d9c4-q7m2z".into(),
            reason: "its service account shop/frontend does not exist".into(),
        }]
    );
}

#[test]
fn the_newest_pod_names_the_identity_during_a_rollout_that_changes_the_account() {
    let mut cluster = Cluster::shop();
    cluster.pods[1]["spec"]["serviceAccountName"] = "frontend".into();
    let d = cluster.derive();
    let yaml = yaml_of(&d, "Workload/shop/orders");
    assert!(
        yaml.contains("identity: spiffe://cluster.local/ns/shop/sa/frontend"),
        "{yaml}"
    );
}

#[test]
fn a_service_fronting_two_workloads_or_remapping_ports_adds_no_cluster_ip() {
    let mut cluster = Cluster::shop();
    cluster.services[0]["spec"]["selector"] =
        serde_json::json!({"app.kubernetes.io/part-of": "shop"});
    assert!(!cluster.yaml().contains("10.96.41.17"));

    let mut cluster = Cluster::shop();
    cluster.services[0]["spec"]["ports"][1]["port"] = 80.into();
    let yaml = cluster.yaml();
    assert!(!yaml.contains("10.96.41.17"), "{yaml}");
    // The Service still lists the target ports, which policy judges.
    assert!(yaml.contains("port: 9090"), "{yaml}");
}

#[test]
fn a_service_without_a_selector_is_not_derived() {
    let mut cluster = Cluster::shop();
    cluster.services[0]["spec"]
        .as_object_mut()
        .unwrap()
        .remove("selector");
    assert!(!cluster.yaml().contains("kind: Service"));
}

#[test]
fn owners() {
    let pod = |owner: Value, labels: Value| -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p-0", "labels": labels, "ownerReferences": owner}
        }))
        .unwrap()
    };
    let rs = serde_json::json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-6d5f", "uid": "u", "controller": true}]);
    let cases = [
        (
            rs.clone(),
            serde_json::json!({"pod-template-hash": "6d5f"}),
            ("Deployment", "web"),
        ),
        (rs, serde_json::json!({}), ("ReplicaSet", "web-6d5f")),
        (
            serde_json::json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "u", "controller": true}]),
            serde_json::json!({"controller-revision-hash": "db-5c"}),
            ("StatefulSet", "db"),
        ),
        (
            serde_json::json!([{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "u", "controller": false}]),
            serde_json::json!({}),
            ("Pod", "p-0"),
        ),
        (Value::Null, serde_json::json!({}), ("Pod", "p-0")),
    ];
    for (owners, labels, (kind, name)) in cases {
        let o = owner_of(&pod(owners.clone(), labels));
        assert_eq!((o.kind.as_str(), o.name.as_str()), (kind, name), "{owners}");
    }
}

#[test]
fn protocols_from_app_protocol_then_port_names() {
    let cases = [
        (Some("http"), Some("tcp-x"), "http"),
        (Some("kubernetes.io/h2c"), None, "http2"),
        (Some("kubernetes.io/ws"), None, "http"),
        (Some("GRPC"), None, "grpc"),
        (Some("https"), Some("http"), "tcp"),
        (Some("mysql"), None, "tcp"),
        (None, Some("http"), "http"),
        (None, Some("http-admin"), "http"),
        (None, Some("http2"), "http2"),
        (None, Some("h2c-api"), "http2"),
        (None, Some("grpc-web"), "grpc"),
        (None, Some("https"), "tcp"),
        (None, Some("metrics"), "tcp"),
        (None, None, "tcp"),
    ];
    for (app, name, expected) in cases {
        assert_eq!(protocol_for(app, name), expected, "{app:?} {name:?}");
    }
}

#[test]
fn names_bulkhead_cannot_hold_are_skipped_with_a_reason() {
    let mut cluster = Cluster::shop();
    let rs = "orders.v2-7c9d8f6b5";
    cluster.pods[0]["metadata"]["ownerReferences"][0]["name"] = rs.into();
    cluster.pods[1]["metadata"]["ownerReferences"][0]["name"] = rs.into();
    let d = cluster.derive();
    assert!(
        d.resources
            .iter()
            .all(|r| r.key() != "Workload/shop/orders")
    );
    assert_eq!(d.skipped.len(), 1, "{:?}", d.skipped);
    assert_eq!(d.skipped[0].object, "Deployment/shop/orders.v2");
}

#[test]
fn a_reused_address_belongs_to_the_newest_pod() {
    let mut cluster = Cluster::shop();
    // The frontend pod got the IP of an orders pod that is still terminating.
    cluster.pods[2]["status"]["podIPs"] = serde_json::json!([{"ip": "10.244.1.23"}]);
    cluster.pods[2]["metadata"]["creationTimestamp"] = "2026-11-30T10:00:00Z".into();
    let d = cluster.derive();
    bulkhead_policy::PolicySet::compile(&d.resources, 1).unwrap();
    let frontend = yaml_of(&d, "Workload/shop/frontend");
    assert!(frontend.contains("10.244.1.23"), "{frontend}");
    let orders = yaml_of(&d, "Workload/shop/orders");
    assert!(!orders.contains("10.244.1.23"), "{orders}");
}
