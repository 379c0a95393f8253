//! The SPIFFE surfaces as the SPIFFE project's own Python client (py-spiffe) sees them: the
//! Workload API a sidecar serves on a Unix socket (the app's own key and SVID, the bundle,
//! rotation pushed on the open stream, the security header required, JWT-SVIDs signed by the
//! control plane for the sidecar's identity, the JWT bundle, validation and a wrong audience),
//! and the trust bundle as a SPIFFE bundle, printed and served at the bundle endpoint.
//! `crates/cli/tests/spiffe/check.py` does the checking; skipped without python3 and the
//! `spiffe` package unless BULKHEAD_STRICT=1.

use bulkhead_testkit::mesh::{Mesh, TD, id};
use bulkhead_testkit::{free_port, run};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn check_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/spiffe/check.py")
}

#[test]
fn py_spiffe_fetches_the_apps_own_svid_and_bundle_from_a_sidecar_and_sees_rotation() {
    let Some(python) = bulkhead_testkit::python_with(
        "py_spiffe_fetches_the_apps_own_svid_and_bundle_from_a_sidecar_and_sees_rotation",
        "spiffe",
    ) else {
        return;
    };
    // 4-second certificates: the app's SVID is renewed about every 2 s.
    let mesh = Mesh::start_with(&["--svid-lifetime", "4s"]);
    let socket = mesh.dir.path().join("run/workload.sock");
    std::fs::create_dir(mesh.dir.path().join("run")).unwrap();
    let token = mesh.token(&id("billing"));
    let (_proxy, ready) = mesh.proxy(
        "billing",
        &token,
        &["--workload-api", socket.to_str().unwrap()],
    );
    assert_eq!(ready["workload_api"].as_str(), socket.to_str(), "{ready}");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is the proxy user's alone");

    let credential = format!("{}.credential", token.display());
    let ca = mesh.data().join("ca.pem");
    let (code, out, err) = run(
        &python,
        &[
            check_script().to_str().unwrap(),
            "workload-api",
            socket.to_str().unwrap(),
            "--id",
            &id("billing"),
            "--ca-pem",
            ca.to_str().unwrap(),
            "--sidecar-credential",
            &credential,
            "--rotations",
            "2",
        ],
        &[],
    );
    assert_eq!(code, 0, "check.py workload-api failed:\n{out}\n{err}");
    let seen: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(seen["spiffe_id"], id("billing").as_str());
    assert!(
        seen["stream_serials"].as_array().unwrap().len() >= 3,
        "{seen}"
    );
    assert!(
        seen["refused_without_header"]
            .as_str()
            .unwrap()
            .contains("workload.spiffe.io"),
        "{seen}"
    );
    // JWT-SVIDs: a wrong audience is refused by ValidateJWTSVID, with the reason; the
    // signing key stays in the control plane's data directory, its user's alone.
    assert!(
        seen["jwt_wrong_audience"]
            .as_str()
            .unwrap()
            .contains("audience"),
        "{seen}"
    );
    let key = mesh.data().join("jwt-svid.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the JWT key is the control plane user's alone");

    // A CA added while a stream is open reaches the app on that stream.
    let mut watcher = std::process::Command::new(&python)
        .args([
            check_script().to_str().unwrap(),
            "watch-bundle",
            socket.to_str().unwrap(),
            "--trust-domain",
            TD,
            "--roots",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(watcher.stdout.take().unwrap());
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut ready).unwrap();
    assert_eq!(ready.trim(), "ready 1");
    let (code, _, err) = mesh.cli(&["ca", "add-root"]);
    assert_eq!(code, 0, "{err}");
    let out = watcher.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(
        out.status.success(),
        "check.py watch-bundle failed:\n{rest}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The app's key never reaches a log.
    let log = std::fs::read_to_string(mesh.dir.path().join("billing-proxy.log")).unwrap();
    assert!(log.contains("issued the app's X.509-SVID"), "{log}");
    assert!(!log.contains("PRIVATE KEY"), "{log}");
}

#[test]
fn the_spiffe_bundle_parses_with_py_spiffe_and_the_endpoint_serves_the_same_document() {
    let Some(python) = bulkhead_testkit::python_with(
        "the_spiffe_bundle_parses_with_py_spiffe_and_the_endpoint_serves_the_same_document",
        "spiffe",
    ) else {
        return;
    };
    let endpoint = format!("127.0.0.1:{}", free_port());
    let mesh = Mesh::start_with(&["--bundle-endpoint", &endpoint]);
    let (code, pem, err) = mesh.cli(&["ca", "bundle"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        pem,
        std::fs::read_to_string(mesh.data().join("ca.pem")).unwrap()
    );

    // Two roots: the bundle during a CA rotation, with a higher sequence number.
    let check = |expected_roots: u64, expected_sequence: u64| {
        let (code, doc, err) = mesh.cli(&["ca", "bundle", "-o", "spiffe"]);
        assert_eq!(code, 0, "{err}");
        let file = mesh.dir.path().join("bundle.json");
        std::fs::write(&file, &doc).unwrap();
        let ca = mesh.data().join("ca.pem");
        let url = format!("https://{endpoint}/");
        let (code, out, err) = run(
            &python,
            &[
                check_script().to_str().unwrap(),
                "bundle",
                file.to_str().unwrap(),
                "--trust-domain",
                TD,
                "--ca-pem",
                ca.to_str().unwrap(),
                "--endpoint",
                &url,
            ],
            &[],
        );
        assert_eq!(code, 0, "check.py bundle failed:\n{out}\n{err}\n{doc}");
        let seen: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(seen["roots"], expected_roots, "{seen}");
        assert_eq!(seen["jwt_keys"], 1, "{seen}");
        assert_eq!(seen["sequence"], expected_sequence, "{seen}");
        assert_eq!(seen["kty"], serde_json::json!(["EC"]), "{seen}");
        assert_eq!(seen["served_same"], true, "{seen}");
    };
    check(1, 1);
    let (code, _, err) = mesh.cli(&["ca", "add-root"]);
    assert_eq!(code, 0, "{err}");
    check(2, 2);
}
