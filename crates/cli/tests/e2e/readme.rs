//! The README's "Using it by hand" block, run as a script exactly as written, on one host:
//! only the build step is replaced by the binaries cargo built, and the fixed loopback ports
//! by free ones (so that the test cannot collide with anything else on the machine).

use bulkhead_testkit::{Bins, free_port};
use std::path::Path;
use std::process::Command;

#[test]
fn the_readme_by_hand_steps_run_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme
        .split_once("## Using it by hand")
        .expect("the README has its by-hand section")
        .1;
    let script = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .expect("the section starts with a sh block")
        .0;
    let bins = Bins::next_to(env!("CARGO_BIN_EXE_bulkhead"));
    let bin_dir = bins.bulkhead.parent().unwrap().display().to_string();
    let build = "cargo build --release\nB=target/release\n";
    assert!(script.starts_with(build), "{script}");
    let mut script = format!("set -e\nB={bin_dir}\n{}", &script[build.len()..]);
    for port in ["7443", "8080", "9001", "15000", "15001", "15006"] {
        let mine = free_port().to_string();
        script = script.replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{mine}"));
    }
    let dir = bulkhead_testkit::TempDir::new().unwrap();
    // The examples are read from the repository, as a reader's checkout has them.
    std::os::unix::fs::symlink(root.join("examples"), dir.path().join("examples")).unwrap();
    let out = Command::new("timeout")
        .args(["120", "bash", "-c", &script])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "exit {}\n{stdout}\n{stderr}",
        out.status
    );
    // The allowed call reached payments as orders; the admin path was denied by its rule.
    let charge = stdout
        .split("HTTP/1.1 ")
        .find(|r| r.contains("POST /charge"))
        .unwrap_or_else(|| panic!("no answer to POST /charge in:\n{stdout}"));
    assert!(charge.starts_with("200"), "{charge}");
    assert!(
        charge.contains("from spiffe://bulkhead.local/ns/shop/sa/orders"),
        "{charge}"
    );
    assert!(
        stdout.contains("HTTP/1.1 403")
            && stdout.contains("x-bulkhead-decision: deny; policy=shop/payments-deny-admin"),
        "{stdout}"
    );
}
