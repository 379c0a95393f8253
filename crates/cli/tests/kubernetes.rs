//! Bulkhead on Kubernetes with the real binary: `bulkhead k8s crds` prints the CRDs the
//! install manifests hold, the injection webhook answers recorded AdmissionReviews over
//! HTTPS (`webhook`), and proxies join by their service-account token, checked with a
//! TokenReview by a test API server (`attest`).
#![allow(clippy::unwrap_used)]

use std::path::Path;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

mod webhook {
    //! The injection webhook served for real: a control plane with `--webhook-listen`, the
    //! recorded AdmissionReviews posted over HTTPS, the server's certificate verified against
    //! the caBundle `bulkhead k8s webhook-config` prints, and each returned patch applied with
    //! json-patch to the recorded pod.

    use super::repo;
    use base64::Engine;
    use bulkhead_testkit::mesh::{Mesh, eventually};
    use bulkhead_testkit::{HttpResponse, parse_response};
    use rustls::pki_types::{CertificateDer, ServerName};
    use serde_json::{Value, json};
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::sync::Arc;
    use std::time::Duration;

    const HOST: &str = "bulkhead-webhook.bulkhead-system.svc";

    fn fixture(name: &str) -> Value {
        let path = repo().join(format!("crates/kubernetes/tests/fixtures/{name}.json"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// A client trusting exactly the PEM bundle, as the API server trusts caBundle.
    fn client(bundle_pem: &str) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        let mut rest = bundle_pem;
        while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
            let end = rest[start..].find("-----END CERTIFICATE-----").unwrap() + start;
            let body: String = rest[start + 27..end]
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            let der = base64::engine::general_purpose::STANDARD
                .decode(body)
                .unwrap();
            roots.add(CertificateDer::from(der)).unwrap();
            rest = &rest[end + 25..];
        }
        assert!(!roots.is_empty(), "no certificate in {bundle_pem}");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// One HTTPS exchange: `head` (without the final blank line) and `body`.
    fn exchange(
        addr: SocketAddr,
        tls: &Arc<rustls::ClientConfig>,
        name: &str,
        head: &str,
        body: &[u8],
    ) -> Result<(HttpResponse, Vec<u8>), String> {
        let name = ServerName::try_from(name.to_string()).unwrap();
        let conn = rustls::ClientConnection::new(tls.clone(), name).unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        // One write, so that a server answering before it reads the body has it all.
        let mut request =
            format!("{head}\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").into_bytes();
        request.extend_from_slice(body);
        stream.write_all(&request).map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        let leaf = stream
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .ok_or("no server certificate")?;
        let res = parse_response(&raw)
            .ok_or_else(|| format!("not an HTTP response: {}", String::from_utf8_lossy(&raw)))?;
        Ok((res, leaf))
    }

    fn post(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>, review: &Value) -> Value {
        let body = serde_json::to_vec(review).unwrap();
        let head = format!(
            "POST /inject HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}",
            body.len()
        );
        let (res, _) = exchange(addr, tls, HOST, &head, &body).unwrap();
        assert_eq!(res.status, 200, "{}", res.body);
        serde_json::from_str(&res.body).unwrap()
    }

    /// The review's pod with the answer's patch applied, as the API server would.
    fn patched(review: &Value, answer: &Value) -> Value {
        let response = &answer["response"];
        assert_eq!(response["uid"], review["request"]["uid"]);
        assert_eq!(response["allowed"], true, "{answer}");
        assert_eq!(response["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        let mut pod = review["request"]["object"].clone();
        json_patch::patch(&mut pod, &patch).unwrap();
        pod
    }

    fn inits(pod: &Value) -> Vec<&str> {
        pod["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn the_webhook_injects_over_https_under_the_printed_ca_bundle() {
        let mesh = Mesh::start_with(&[
            "--svid-lifetime",
            "4s",
            "--webhook-listen",
            "127.0.0.1:0",
            "--inject-control",
            "10.96.0.20:7443",
            "--inject-image",
            "registry.example/bulkhead:test",
        ]);
        let mut addr = None;
        eventually(Duration::from_secs(30), "the webhook's address", || {
            addr = mesh
                .control
                .log_text()
                .lines()
                .find_map(|l| l.strip_prefix("injection webhook: https://"))
                .and_then(|l| l.strip_suffix("/inject"))
                .and_then(|a| a.parse::<SocketAddr>().ok());
            addr.is_some()
        });
        let addr = addr.unwrap();

        // The configuration, its caBundle the mesh's bundle.
        let (code, yaml, err) = mesh.cli(&["k8s", "webhook-config"]);
        assert_eq!(code, 0, "{err}");
        let config: Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(config["kind"], "MutatingWebhookConfiguration");
        let hooks = config["webhooks"].as_array().unwrap();
        assert_eq!(hooks.len(), 2);
        for h in hooks {
            assert_eq!(h["sideEffects"], "None");
            assert_eq!(h["admissionReviewVersions"], json!(["v1"]));
            assert_eq!(h["failurePolicy"], "Fail");
            assert_eq!(h["timeoutSeconds"], 10);
            assert_eq!(h["clientConfig"]["service"]["name"], "bulkhead-webhook");
            assert_eq!(h["clientConfig"]["service"]["namespace"], "bulkhead-system");
        }
        let ca_bundle = base64::engine::general_purpose::STANDARD
            .decode(hooks[0]["clientConfig"]["caBundle"].as_str().unwrap())
            .unwrap();
        let ca_bundle = String::from_utf8(ca_bundle).unwrap();
        assert_eq!(
            ca_bundle,
            std::fs::read_to_string(mesh.data().join("ca.pem")).unwrap()
        );
        let tls = client(&ca_bundle);

        // A pod of an opted-in namespace: init container, native sidecar, token volume.
        let review = fixture("admission-orders");
        let answer = post(addr, &tls, &review);
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        let pod = patched(&review, &answer);
        assert_eq!(inits(&pod)[..2], ["bulkhead-init", "bulkhead-proxy"]);
        let sidecar = &pod["spec"]["initContainers"][1];
        assert_eq!(sidecar["restartPolicy"], "Always");
        assert_eq!(sidecar["image"], "registry.example/bulkhead:test");
        assert!(
            sidecar["args"]
                .as_array()
                .unwrap()
                .contains(&json!("10.96.0.20:7443"))
        );
        let volumes = pod["spec"]["volumes"].to_string();
        assert!(volumes.contains(r#""audience":"bulkhead""#), "{volumes}");
        // The trust bundle the sidecar starts with is the mesh's current one.
        assert_eq!(
            pod["metadata"]["annotations"]["bulkhead.dev/trust-bundle"],
            json!(ca_bundle)
        );
        // A valid Pod.
        let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(pod.clone()).unwrap();
        assert_eq!(typed.spec.unwrap().containers.len(), 1);

        // Injecting twice changes nothing.
        let mut again = review.clone();
        again["request"]["object"] = pod;
        again["request"]["uid"] = json!("0f6d4b0e-9d43-4c1b-8f3e-2a4c5d6e7f80");
        let answer = post(addr, &tls, &again);
        assert_eq!(answer["response"]["uid"], again["request"]["uid"]);
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none(), "{answer}");

        // A pod opted in by its own label.
        let review = fixture("admission-labelled-pod");
        let pod = patched(&review, &post(addr, &tls, &review));
        assert!(inits(&pod).contains(&"bulkhead-proxy"));

        // Opted out: admitted as it is.
        let review = fixture("admission-opted-out");
        let answer = post(addr, &tls, &review);
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none(), "{answer}");

        // What cannot be meshed is refused, in words.
        for (name, words) in [
            ("admission-host-network", "hostNetwork"),
            ("admission-grpc-probe", "gRPC probe"),
        ] {
            let review = fixture(name);
            let answer = post(addr, &tls, &review);
            assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
            assert_eq!(answer["response"]["allowed"], false, "{answer}");
            let message = answer["response"]["status"]["message"].as_str().unwrap();
            assert!(message.contains(words), "{name}: {message}");
        }

        // Bad input: an HTTP error in words, and the webhook carries on.
        let send = |head: &str, body: &[u8]| exchange(addr, &tls, HOST, head, body).unwrap().0;
        let res = send(
            "POST /inject HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 2",
            b"{}",
        );
        assert_eq!(res.status, 415, "{}", res.body);
        assert!(res.body.contains("application/json"), "{}", res.body);
        let res = send(
            "POST /inject HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 8",
            b"not json",
        );
        assert_eq!(res.status, 400);
        assert!(res.body.contains("not an AdmissionReview"), "{}", res.body);
        let mut old = fixture("admission-orders");
        old["apiVersion"] = json!("admission.k8s.io/v1beta1");
        let old = serde_json::to_vec(&old).unwrap();
        let res = send(
            &format!(
                "POST /inject HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}",
                old.len()
            ),
            &old,
        );
        assert_eq!(res.status, 400);
        assert!(res.body.contains("admission.k8s.io/v1"), "{}", res.body);
        let res = send(
            "POST /inject HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 67108864",
            b"{",
        );
        assert_eq!(res.status, 413, "{}", res.body);
        assert_eq!(send("GET /inject HTTP/1.1", b"").status, 405);
        assert_eq!(send("GET /metrics HTTP/1.1", b"").status, 404);
        let review = fixture("admission-orders");
        patched(&review, &post(addr, &tls, &review));

        // The certificate names the Service, not just any host.
        assert!(
            exchange(addr, &tls, "evil.example", "GET / HTTP/1.1", b"").is_err(),
            "a name outside the certificate was accepted"
        );
        // A bundle other than the mesh's does not verify it.
        let foreign = bulkhead_testkit::foreign_identity("other.local", "spiffe://other.local/x");
        let foreign_root =
            foreign.chain_pem[foreign.chain_pem.rfind("-----BEGIN").unwrap()..].to_string();
        assert!(exchange(addr, &client(&foreign_root), HOST, "GET / HTTP/1.1", b"").is_err());

        // Re-issued before expiry (SVIDs live 4 s here: at half-life).
        let serial = |leaf: &[u8]| bulkhead_identity::serial_of(leaf).unwrap();
        let (_, first) = exchange(addr, &tls, HOST, "GET / HTTP/1.1", b"").unwrap();
        eventually(Duration::from_secs(10), "a re-issued certificate", || {
            let (_, leaf) = exchange(addr, &tls, HOST, "GET / HTTP/1.1", b"").unwrap();
            serial(&leaf) != serial(&first)
        });
    }

    #[test]
    fn the_install_manifest_holds_the_webhook_config_without_its_ca_bundle() {
        let bins = bulkhead_testkit::Bins::next_to(env!("CARGO_BIN_EXE_bulkhead"));
        let (code, out, err) = bulkhead_testkit::run(
            &bins.bulkhead,
            &["k8s", "webhook-config", "--no-ca-bundle"],
            &[],
        );
        assert_eq!(code, 0, "{err}");
        let committed =
            std::fs::read_to_string(repo().join("deploy/kubernetes/base/webhook.yaml")).unwrap();
        assert_eq!(out, committed);
        assert!(!out.contains("caBundle:"));
    }
}

mod install {
    //! The install manifests: `kubectl kustomize deploy/kubernetes/base` renders them, every
    //! object validates against the Kubernetes 1.32 schemas (`kubernetes-validate --strict`),
    //! the control plane runs locked down, and the ClusterRole grants exactly the calls
    //! `bulkhead_kubernetes::access` lists.

    use super::repo;
    use bulkhead_kubernetes::access::API_ACCESS;
    use serde_json::Value;
    use std::collections::BTreeSet;
    use std::process::Command;

    /// The version the objects are validated against.
    const KUBERNETES: &str = "1.32.0";

    fn documents(yaml: &str) -> Vec<Value> {
        yaml.split("\n---\n")
            .map(|d| d.trim_start_matches("---\n"))
            .filter(|d| {
                d.lines()
                    .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
            })
            .map(|d| serde_saphyr::from_str::<Value>(d).unwrap())
            .collect()
    }

    fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in the install"))
    }

    #[test]
    fn the_install_renders_validates_and_runs_locked_down() {
        let test = "the_install_renders_validates_and_runs_locked_down";
        let Some(kubectl) = bulkhead_testkit::tool(test, "kubectl") else {
            return;
        };
        let out = Command::new(kubectl)
            .args(["kustomize", "deploy/kubernetes/base"])
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = String::from_utf8(out.stdout).unwrap();
        let objects = documents(&rendered);
        let kinds: Vec<String> = objects
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        for want in [
            "Namespace/bulkhead-system",
            "ServiceAccount/bulkhead-control",
            "ClusterRole/bulkhead-control",
            "ClusterRoleBinding/bulkhead-control",
            "PersistentVolumeClaim/bulkhead-data",
            "Service/bulkhead-control",
            "Service/bulkhead-webhook",
            "Deployment/bulkhead-control",
            "MutatingWebhookConfiguration/bulkhead-injector",
            "CustomResourceDefinition/authorizationpolicies.bulkhead.dev",
            "CustomResourceDefinition/workloads.bulkhead.dev",
            "CustomResourceDefinition/services.bulkhead.dev",
            "CustomResourceDefinition/defaultpostures.bulkhead.dev",
        ] {
            assert!(
                kinds.contains(&want.to_string()),
                "{want} missing: {kinds:?}"
            );
        }
        assert_eq!(kinds.len(), 13, "{kinds:?}");

        // The control plane: not root, nothing writable but its data, no capability.
        let deployment = find(&objects, "Deployment", "bulkhead-control");
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "bulkhead-control");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        let control = &pod["containers"][0];
        let security = &control["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert!(control["readinessProbe"].is_object() && control["livenessProbe"].is_object());
        assert!(control["resources"]["requests"].is_object());
        assert!(control["resources"]["limits"]["memory"].is_string());
        let mounts = control["volumeMounts"].to_string();
        assert!(mounts.contains("/var/lib/bulkhead"), "{mounts}");
        let args: Vec<&str> = control["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(args.contains(&"--webhook-listen=0.0.0.0:8443"), "{args:?}");
        assert!(args.contains(&"--data-dir=/var/lib/bulkhead"), "{args:?}");
        // Injected sidecars join by service-account token.
        assert!(args.contains(&"--kubernetes-attest"), "{args:?}");
        assert!(args.contains(&"--kubernetes"), "{args:?}");

        // The webhook configuration calls the webhook Service, which reaches the container.
        let hooks = find(
            &objects,
            "MutatingWebhookConfiguration",
            "bulkhead-injector",
        );
        let service = find(&objects, "Service", "bulkhead-webhook");
        for h in hooks["webhooks"].as_array().unwrap() {
            let to = &h["clientConfig"]["service"];
            assert_eq!(to["name"], "bulkhead-webhook");
            assert_eq!(to["namespace"], service["metadata"]["namespace"]);
            assert_eq!(to["port"], service["spec"]["ports"][0]["port"]);
        }
        let target = service["spec"]["ports"][0]["targetPort"].as_str().unwrap();
        let port = control["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == target)
            .unwrap_or_else(|| panic!("no container port {target}"));
        assert_eq!(port["containerPort"], 8443);

        // Every object against the Kubernetes schemas. The install holds no object of our own
        // kinds (those are CRD-typed, which kubernetes-validate has no schema for and would
        // only warn about); the CRDs themselves are validated as CustomResourceDefinitions.
        let Some(validate) = bulkhead_testkit::tool(test, "kubernetes-validate") else {
            return;
        };
        let dir = bulkhead_testkit::TempDir::new().unwrap();
        let file = dir.path().join("install.yaml");
        std::fs::write(&file, &rendered).unwrap();
        let out = Command::new(validate)
            .args(["--kubernetes-version", KUBERNETES, "--strict"])
            .arg(&file)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        let passed = text
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert_eq!(passed, objects.len(), "every object validated:\n{text}");
        assert!(!text.contains("WARN") && !text.contains("ERROR"), "{text}");
    }

    /// `(group, resource, verb, resourceName or "")`.
    type Grant = (String, String, String, String);

    #[test]
    fn the_cluster_role_grants_exactly_what_the_code_calls() {
        let text =
            std::fs::read_to_string(repo().join("deploy/kubernetes/base/rbac.yaml")).unwrap();
        let objects = documents(&text);
        let role = find(&objects, "ClusterRole", "bulkhead-control");
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        let mut granted: BTreeSet<Grant> = BTreeSet::new();
        for rule in role["rules"].as_array().unwrap() {
            let mut names = strings(&rule["resourceNames"]);
            if names.is_empty() {
                names.push(String::new());
            }
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    for v in strings(&rule["verbs"]) {
                        assert!(v != "*" && r != "*" && g != "*", "a wildcard in {rule}");
                        for n in &names {
                            granted.insert((g.clone(), r.clone(), v.clone(), n.clone()));
                        }
                    }
                }
            }
        }
        let mut called: BTreeSet<Grant> = BTreeSet::new();
        for a in API_ACCESS {
            let names: Vec<&str> = if a.names.is_empty() {
                vec![""]
            } else {
                a.names.to_vec()
            };
            for v in a.verbs {
                for n in &names {
                    called.insert((
                        a.group.into(),
                        a.resource.into(),
                        v.to_string(),
                        n.to_string(),
                    ));
                }
            }
        }
        let extra: Vec<_> = granted.difference(&called).collect();
        let missing: Vec<_> = called.difference(&granted).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "granted but not called (remove from rbac.yaml): {extra:?}\ncalled but not granted (add to rbac.yaml): {missing:?}"
        );
        // Bound to the control plane's account only.
        let binding = find(&objects, "ClusterRoleBinding", "bulkhead-control");
        assert_eq!(binding["subjects"].as_array().unwrap().len(), 1);
        assert_eq!(binding["subjects"][0]["name"], "bulkhead-control");
        assert_eq!(binding["subjects"][0]["namespace"], "bulkhead-system");
    }
}

mod attest {
    //! Joins by service-account token: a real control plane with `--kubernetes-attest`
    //! pointed at the testkit's TokenReview server (HTTPS, its own CA, our bearer token
    //! checked), real sidecars with `--service-account-token-file`. The server's answers are
    //! written to the API's documented shape; no real API server is involved.

    use bulkhead_testkit::http;
    use bulkhead_testkit::mesh::{Mesh, addr, id, orders_policy, orders_upstream};
    use bulkhead_testkit::tokenreview::{self, TokenReviewServer};
    use serde_json::json;
    use std::path::PathBuf;

    fn token_file(mesh: &Mesh, name: &str, token: &str) -> PathBuf {
        let file = mesh.dir.path().join(format!("{name}.satoken"));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        file
    }

    fn attesting_mesh(api: &TokenReviewServer) -> Mesh {
        attesting_mesh_at(api, &api.url())
    }

    /// A control plane attesting with `api`'s CA and token, sending TokenReviews to `url`.
    fn attesting_mesh_at(api: &TokenReviewServer, url: &str) -> Mesh {
        let (ca, token) = (api.ca_file(), api.token_file());
        Mesh::start_with(&[
            "--kubernetes-attest",
            "--kubernetes-api",
            url,
            "--kubernetes-ca",
            ca.to_str().unwrap(),
            "--kubernetes-token-file",
            token.to_str().unwrap(),
        ])
    }

    const FRONTEND: &str = r#"apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: frontend, namespace: shop}
spec:
  identity: spiffe://test.local/ns/shop/sa/frontend
"#;

    #[test]
    fn a_proxy_joins_by_its_service_account_token_and_serves() {
        let api = TokenReviewServer::start();
        api.answer(
            "orders-sa-token",
            tokenreview::bound_token("shop", "orders", "orders-7c9d8f6b5-x2x9k", &["bulkhead"]),
        );
        api.answer(
            "frontend-sa-token",
            tokenreview::bound_token("shop", "frontend", "frontend-5d8f-abcde", &["bulkhead"]),
        );
        let mesh = attesting_mesh(&api);
        mesh.apply("orders.yaml", &orders_policy("/orders/*"));
        mesh.apply("frontend.yaml", FRONTEND);

        let (_orders_app, app) = mesh.app("orders");
        let app = app.to_string();
        let orders_token = token_file(&mesh, "orders", "orders-sa-token");
        let (_orders, ready) = mesh.proxy_joining(
            "orders",
            mesh.attested_proxy_args(&orders_token),
            &["--inbound", "127.0.0.1:0", "--app", &app, "--port", "8080"],
        );
        assert_eq!(ready["spiffe_id"], id("orders"), "{ready}");
        assert_eq!(ready["workload"], "shop/orders", "{ready}");
        let orders_in = addr(&ready["inbound"]);
        let upstream = orders_upstream(orders_in);
        let frontend_token = token_file(&mesh, "frontend", "frontend-sa-token");
        let (_frontend, ready) = mesh.proxy_joining(
            "frontend",
            mesh.attested_proxy_args(&frontend_token),
            &["--upstream", &upstream],
        );
        let to_orders = addr(&ready["upstreams"]["orders"]);

        // What the operator sees: each proxy with exactly its attested identity and the
        // Workload that declares it.
        let (code, json, err) = mesh.cli(&["get", "proxies", "-o", "json"]);
        assert_eq!(code, 0, "{err}");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
        for sa in ["orders", "frontend"] {
            assert!(
                rows.iter().any(|p| p["spiffeId"] == id(sa)
                    && p["namespace"] == "shop"
                    && p["workload"] == sa),
                "{sa}: {json}"
            );
        }
        // A request through the sidecar pair, allowed by policy.
        let res = http(to_orders, "GET", "/orders/1");
        assert_eq!(res.status, 200, "{}", res.body);

        // The API server was asked, with our bearer token (else it answers 401) and the
        // audience bulkhead, about exactly the tokens presented.
        let reviews = api.reviews();
        let asked: Vec<&str> = reviews
            .iter()
            .map(|r| r["spec"]["token"].as_str().unwrap())
            .collect();
        assert!(asked.contains(&"orders-sa-token") && asked.contains(&"frontend-sa-token"));
        assert!(
            reviews
                .iter()
                .all(|r| r["spec"]["audiences"] == json!(["bulkhead"]))
        );

        // Refusals, in words the proxy prints before it exits non-zero.
        api.answer(
            "expired-sa-token",
            tokenreview::unauthenticated(
                "[invalid bearer token, service account token has expired]",
            ),
        );
        api.answer(
            "other-audience-sa-token",
            tokenreview::bound_token(
                "shop",
                "orders",
                "orders-1",
                &["https://kubernetes.default.svc"],
            ),
        );
        api.answer(
            "lonely-sa-token",
            tokenreview::bound_token("shop", "lonely", "lonely-1", &["bulkhead"]),
        );
        for (name, token, words) in [
            (
                "expired",
                "expired-sa-token",
                "service account token has expired",
            ),
            ("unknown", "unknown-sa-token", "token lookup failed"),
            (
                "audience",
                "other-audience-sa-token",
                "is not for audience \"bulkhead\"",
            ),
            (
                "lonely",
                "lonely-sa-token",
                "no Workload declares spiffe://test.local/ns/shop/sa/lonely",
            ),
        ] {
            let file = token_file(&mesh, name, token);
            let err = mesh.failing_proxy_joining(mesh.attested_proxy_args(&file), &[]);
            assert!(err.contains(words), "{name}: {err}");
        }
        // The token never reaches a log.
        for log in ["control", "orders-proxy", "frontend-proxy"] {
            let text = std::fs::read_to_string(mesh.dir.path().join(format!("{log}.log"))).unwrap();
            assert!(!text.contains("-sa-token"), "{log}.log holds a token");
        }

        // An API server that refuses the control plane (no RBAC grant): said so.
        api.forbid(true);
        let err = mesh.failing_proxy_joining(mesh.attested_proxy_args(&orders_token), &[]);
        assert!(
            err.contains("could not check the service-account token")
                && err.contains("cannot create resource \"tokenreviews\""),
            "{err}"
        );
        api.forbid(false);

        // A restarted proxy rejoins with its kept credential, without asking the API
        // server again (here its token is no longer one the API server knows).
        let credential = mesh.dir.path().join("frontend.credential");
        let kept = [
            "--upstream",
            &upstream,
            "--credential-file",
            credential.to_str().unwrap(),
        ];
        let (mut first, _) = mesh.proxy_joining(
            "frontend-2",
            mesh.attested_proxy_args(&frontend_token),
            &kept,
        );
        first.kill();
        let asked = api.reviews().len();
        std::fs::write(&frontend_token, "unknown-sa-token\n").unwrap();
        let (_again, ready) = mesh.proxy_joining(
            "frontend-2",
            mesh.attested_proxy_args(&frontend_token),
            &kept,
        );
        assert_eq!(ready["spiffe_id"], id("frontend"), "{ready}");
        assert_eq!(api.reviews().len(), asked, "the API server was asked again");
        // … and without it, the rotated token is read at the join (and refused here).
        let err = mesh.failing_proxy_joining(mesh.attested_proxy_args(&frontend_token), &[]);
        assert!(err.contains("token lookup failed"), "{err}");

        // A revoked identity gets no SVID by its service-account token either.
        let (code, _, err) = mesh.cli(&["revoke", "identity", &id("orders"), "--reason", "test"]);
        assert_eq!(code, 0, "{err}");
        let err = mesh.failing_proxy_joining(mesh.attested_proxy_args(&orders_token), &[]);
        assert!(err.contains("revoked"), "{err}");
    }

    #[test]
    fn an_api_server_that_cannot_be_reached_is_named() {
        let api = TokenReviewServer::start();
        // A port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mesh = attesting_mesh_at(&api, &format!("https://{closed}"));
        mesh.apply("orders.yaml", &orders_policy("/orders/*"));
        let file = token_file(&mesh, "orders", "orders-sa-token");
        let err = mesh.failing_proxy_joining(mesh.attested_proxy_args(&file), &[]);
        assert!(
            err.contains("could not check the service-account token")
                && err.contains(&format!("TokenReview to {closed}")),
            "{err}"
        );
    }

    #[test]
    fn a_control_plane_without_attestation_refuses_service_account_tokens() {
        let mesh = Mesh::start();
        mesh.apply("orders.yaml", &orders_policy("/orders/*"));
        let file = token_file(&mesh, "orders", "orders-sa-token");
        let err = mesh.failing_proxy_joining(mesh.attested_proxy_args(&file), &[]);
        assert!(
            err.contains("does not accept service-account tokens")
                && err.contains("--kubernetes-attest"),
            "{err}"
        );
    }
}

mod controller {
    //! `bulkhead control --kubernetes` against the testkit's API server (list and watch with
    //! resourceVersion, status PATCH, get and replace; HTTPS with its own CA; a kubeconfig).
    //! The objects are the recorded ones of `crates/kubernetes/tests/fixtures`; the server is
    //! written to the API's documented behaviour, not a real API server.

    use super::repo;
    use base64::Engine;
    use bulkhead_testkit::kubeapi::KubeApiServer;
    use bulkhead_testkit::mesh::{Mesh, eventually};
    use serde_json::{Value, json};
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(60);

    fn fixture(name: &str) -> Value {
        let path = repo().join(format!("crates/kubernetes/tests/fixtures/{name}.json"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn policy(name: &str, methods: Value) -> Value {
        json!({
            "apiVersion": "bulkhead.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {
                "selector": {"workload": "orders"},
                "action": "allow",
                "rules": [{"from": {"identities": ["spiffe://test.local/ns/shop/sa/frontend"]},
                           "to": {"methods": methods, "paths": ["/orders/*"]}}],
            },
        })
    }

    /// `bulkhead get -o yaml`, one document per resource.
    fn set(mesh: &Mesh) -> Vec<Value> {
        let (code, out, err) = mesh.cli(&["get", "-o", "yaml"]);
        assert_eq!(code, 0, "{err}");
        out.split("\n---\n")
            .map(|d| d.trim_start_matches("---\n"))
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_saphyr::from_str(d).unwrap())
            .collect()
    }

    fn find<'a>(set: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
        set.iter()
            .find(|r| r["kind"] == kind && r["metadata"]["name"] == name)
    }

    /// The revisions of `bulkhead history -o json`: (revision, author).
    fn revisions(mesh: &Mesh) -> Vec<(u64, String)> {
        let v = mesh.cli_json(&["history", "-o", "json", "--limit", "100"]);
        let entries = v
            .get("revisions")
            .and_then(Value::as_array)
            .or_else(|| v.as_array())
            .unwrap_or_else(|| panic!("history: {v}"));
        entries
            .iter()
            .map(|e| {
                (
                    e["revision"].as_u64().unwrap(),
                    e["actor"]
                        .as_str()
                        .or_else(|| e["author"].as_str())
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    }

    fn accepted(api: &KubeApiServer, kind: &str, name: &str) -> Option<Value> {
        let o = api.get("bulkhead.dev/v1alpha1", kind, "shop", name)?;
        o["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Accepted")
            .cloned()
    }

    const BILLING: &str = r#"apiVersion: bulkhead.dev/v1alpha1
kind: Workload
metadata: {name: billing, namespace: vms}
spec:
  identity: spiffe://test.local/ns/vms/sa/billing
"#;

    #[test]
    fn the_cluster_becomes_revisions_and_crs_get_their_status() {
        let api = KubeApiServer::start();
        let bins = bulkhead_testkit::Bins::of_test();
        // The webhook configuration as installed, with a caBundle that is not the mesh's.
        let (code, yaml, err) = bulkhead_testkit::run(
            &bins.bulkhead,
            &["k8s", "webhook-config", "--no-ca-bundle"],
            &[],
        );
        assert_eq!(code, 0, "{err}");
        let mut hooks: Value = serde_saphyr::from_str(&yaml).unwrap();
        for h in hooks["webhooks"].as_array_mut().unwrap() {
            h["clientConfig"]["caBundle"] = json!("c3RhbGU=");
        }
        api.apply(hooks);
        for name in [
            "namespace-shop",
            "serviceaccount-orders",
            "serviceaccount-frontend",
            "pod-orders-a",
            "pod-orders-b",
            "pod-frontend",
            "pod-legacy-unmeshed",
            "service-orders",
        ] {
            api.apply(fixture(name));
        }
        api.apply(policy("orders-from-frontend", json!(["GET"])));
        api.apply(json!({
            "apiVersion": "bulkhead.dev/v1alpha1",
            "kind": "Workload",
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"identity": "spiffe://test.local/ns/shop/sa/db",
                     "ports": [{"port": 5432, "protocol": "tcp"}]},
        }));

        let kubeconfig = api.kubeconfig();
        let mesh = Mesh::start_with(&[
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--kubernetes-debounce-ms",
            "200",
        ]);

        // The derived Workloads and Services and both CRs, in one revision by kubernetes.
        let mut resources = Vec::new();
        eventually(WAIT, "the cluster's resources committed", || {
            resources = set(&mesh);
            find(&resources, "Workload", "db").is_some()
                && find(&resources, "Workload", "orders").is_some()
        });
        let orders = find(&resources, "Workload", "orders").unwrap();
        assert_eq!(
            orders["spec"]["identity"],
            "spiffe://test.local/ns/shop/sa/orders"
        );
        assert_eq!(
            orders["spec"]["addresses"],
            json!(["10.244.1.23", "10.244.2.17", "10.96.41.17"]),
            "{orders}"
        );
        assert_eq!(orders["metadata"]["labels"]["tier"], "backend");
        assert_eq!(
            orders["metadata"]["labels"]["bulkhead.dev/managed-by"],
            "kubernetes"
        );
        let frontend = find(&resources, "Workload", "frontend").unwrap();
        assert_eq!(frontend["spec"]["addresses"], json!(["10.244.2.30"]));
        let service = find(&resources, "Service", "orders").unwrap();
        assert_eq!(
            service["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
            "orders"
        );
        let policy_doc = find(&resources, "AuthorizationPolicy", "orders-from-frontend").unwrap();
        assert_eq!(
            policy_doc["metadata"]["labels"]["bulkhead.dev/managed-by"],
            "kubernetes"
        );
        assert!(find(&resources, "Workload", "legacy").is_none());
        assert!(
            !resources
                .iter()
                .any(|r| r.to_string().contains("10.244.1.99")),
            "the unmeshed pod is not declared"
        );
        let history = revisions(&mesh);
        let (first, author) = history.iter().max().cloned().unwrap();
        assert_eq!(author, "kubernetes", "{history:?}");

        // Both CRs report Accepted at that revision.
        for (kind, name) in [
            ("AuthorizationPolicy", "orders-from-frontend"),
            ("Workload", "db"),
        ] {
            eventually(WAIT, "the CR's Accepted condition", || {
                accepted(&api, kind, name).is_some_and(|c| c["status"] == "True")
            });
            let o = api
                .get("bulkhead.dev/v1alpha1", kind, "shop", name)
                .unwrap();
            assert_eq!(o["status"]["revision"], json!(first), "{o}");
            assert_eq!(o["status"]["observedGeneration"], json!(1), "{o}");
        }

        // The webhook's caBundle becomes the mesh's bundle.
        let bundle = std::fs::read_to_string(mesh.data().join("ca.pem")).unwrap();
        let want = base64::engine::general_purpose::STANDARD.encode(&bundle);
        eventually(WAIT, "the caBundle updated", || {
            let hooks = api
                .get(
                    "admissionregistration.k8s.io/v1",
                    "MutatingWebhookConfiguration",
                    "",
                    "bulkhead-injector",
                )
                .unwrap();
            hooks["webhooks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|h| h["clientConfig"]["caBundle"] == json!(want))
        });

        // A resource applied by hand is kept by the controller's revisions.
        mesh.apply("billing.yaml", BILLING);
        let (applied, author) = revisions(&mesh).iter().max().cloned().unwrap();
        assert_eq!(applied, first + 1);
        assert_ne!(author, "kubernetes");

        // Quiet: no new revision and no status write for events that change nothing (the
        // controller's own status patches, bookmarks).
        let patches = api.status_patches().len();
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(revisions(&mesh).iter().max().unwrap().0, applied);
        assert_eq!(api.status_patches().len(), patches);

        // A pod deleted: its address goes, in the next revision.
        assert!(api.delete("v1", "Pod", "shop", "orders-7c9d8f6b5-w8r4t"));
        eventually(WAIT, "the deleted pod's address gone", || {
            let s = set(&mesh);
            find(&s, "Workload", "orders")
                .is_some_and(|o| o["spec"]["addresses"] == json!(["10.244.2.17", "10.96.41.17"]))
        });
        let (second, author) = revisions(&mesh).iter().max().cloned().unwrap();
        assert_eq!((second, author.as_str()), (applied + 1, "kubernetes"));

        // A pod's labels changed: the Workload's labels follow.
        let mut pod = api
            .get("v1", "Pod", "shop", "orders-7c9d8f6b5-k2x9p")
            .unwrap();
        pod["metadata"]["labels"]["tier"] = json!("canary");
        api.apply(pod);
        eventually(WAIT, "the relabelled pod's labels", || {
            let s = set(&mesh);
            find(&s, "Workload", "orders")
                .is_some_and(|o| o["metadata"]["labels"]["tier"] == "canary")
        });
        let (third, _) = revisions(&mesh).iter().max().cloned().unwrap();
        assert_eq!(third, second + 1);

        // A broken CR: refused with its field, nothing committed.
        api.apply(policy("orders-broken", json!(["GET", "FETCH"])));
        let mut condition = None;
        eventually(WAIT, "the broken CR's condition", || {
            condition = accepted(&api, "AuthorizationPolicy", "orders-broken");
            condition.is_some()
        });
        let condition = condition.unwrap();
        assert_eq!(condition["status"], "False", "{condition}");
        assert_eq!(condition["reason"], "Refused", "{condition}");
        let message = condition["message"].as_str().unwrap();
        assert!(
            message.starts_with("spec.rules[0].to.methods[1]: ") && message.contains("FETCH"),
            "{message}"
        );
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(revisions(&mesh).iter().max().unwrap().0, third);
        assert!(find(&set(&mesh), "AuthorizationPolicy", "orders-broken").is_none());
        // The good CR is untouched by its neighbour's refusal.
        assert!(
            accepted(&api, "AuthorizationPolicy", "orders-from-frontend")
                .is_some_and(|c| c["status"] == "True")
        );

        // A CR accepted before, now broken: refused, and its previous version stays in force.
        let before_cr = find(&set(&mesh), "AuthorizationPolicy", "orders-from-frontend")
            .unwrap()
            .clone();
        let mut good = api
            .get(
                "bulkhead.dev/v1alpha1",
                "AuthorizationPolicy",
                "shop",
                "orders-from-frontend",
            )
            .unwrap();
        good["spec"]["action"] = json!("maybe");
        api.apply(good);
        eventually(WAIT, "the broken update refused", || {
            accepted(&api, "AuthorizationPolicy", "orders-from-frontend").is_some_and(|c| {
                c["status"] == "False"
                    && c["observedGeneration"] == 2
                    && c["message"].as_str().unwrap().starts_with("spec.action: ")
            })
        });
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(revisions(&mesh).iter().max().unwrap().0, third);
        assert_eq!(
            find(&set(&mesh), "AuthorizationPolicy", "orders-from-frontend"),
            Some(&before_cr)
        );

        // A CA change: the webhook's caBundle follows the new bundle.
        let (code, _, err) = mesh.cli(&["ca", "add-root"]);
        assert_eq!(code, 0, "{err}");
        let bundle = std::fs::read_to_string(mesh.data().join("ca.pem")).unwrap();
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
        let want = base64::engine::general_purpose::STANDARD.encode(&bundle);
        eventually(WAIT, "the caBundle holding both roots", || {
            api.get(
                "admissionregistration.k8s.io/v1",
                "MutatingWebhookConfiguration",
                "",
                "bulkhead-injector",
            )
            .unwrap()["webhooks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|h| h["clientConfig"]["caBundle"] == json!(want))
        });

        // The API server drops every watch and compacts: the controller is told 410 when it
        // comes back, lists again, and sees what changed meanwhile.
        let before = api.requests().len();
        api.expire_watches();
        assert!(api.delete("v1", "Pod", "shop", "frontend-5f6b8d9c4-q7m2z"));
        eventually(WAIT, "the frontend Workload gone after the relist", || {
            find(&set(&mesh), "Workload", "frontend").is_none()
        });
        let after: Vec<String> = api.requests()[before..].to_vec();
        assert!(
            after
                .iter()
                .any(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=")),
            "no relist of pods after the watches expired: {after:#?}"
        );
        assert!(api.expired_watches() > 0, "{after:#?}");
        let (fourth, author) = revisions(&mesh).iter().max().cloned().unwrap();
        assert_eq!((fourth, author.as_str()), (third + 1, "kubernetes"));

        // A CR deleted: its resource goes.
        assert!(api.delete("bulkhead.dev/v1alpha1", "Workload", "shop", "db"));
        eventually(WAIT, "the deleted CR's Workload gone", || {
            find(&set(&mesh), "Workload", "db").is_none()
        });
        assert_eq!(revisions(&mesh).iter().max().unwrap().0, fourth + 1);

        // The namespace deleted: everything the controller declared in it goes; what was
        // applied by hand stays.
        assert!(api.delete("v1", "Namespace", "", "shop"));
        let mut left = Vec::new();
        eventually(WAIT, "nothing left of namespace shop", || {
            left = set(&mesh);
            !left.iter().any(|r| r["metadata"]["namespace"] == "shop")
        });
        assert_eq!(revisions(&mesh).iter().max().unwrap().0, fourth + 2);
        let billing = find(&left, "Workload", "billing").unwrap();
        assert!(billing["metadata"]["labels"]["bulkhead.dev/managed-by"].is_null());
    }
}
