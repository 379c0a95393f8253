//! Running `check.py` (the SPIFFE project's Python client against our sidecars), shared by
//! the test binaries that use it.

use std::path::Path;

/// `check.py jwt-federated`: a JWT-SVID for `id` (audience `orders`) fetched from the sidecar
/// at `fetch` validates at the sidecar at `validate` (of another trust domain, or on another
/// replica); `extra` adds flags such as `--kids`.
pub fn jwt_federated(
    python: &Path,
    fetch: &Path,
    validate: &Path,
    id: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/spiffe/check.py");
    let mut args = vec![
        script.to_str().unwrap(),
        "jwt-federated",
        "--fetch-socket",
        fetch.to_str().unwrap(),
        "--validate-socket",
        validate.to_str().unwrap(),
        "--id",
        id,
        "--audience",
        "orders",
    ];
    args.extend_from_slice(extra);
    bulkhead_testkit::run(python, &args, &[])
}
