//! Every verb as a shell pipeline meets it: a closed pipe (`| head -1`) is no error. (What
//! the offline policy tools print is tested in-process, in the CLI's `policy_cmd::tests`.)

use bulkhead_testkit::mesh::Mesh;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `bulkhead ARGS` with its standard output a pipe whose reader is already gone.
fn closed_stdout(bin: &Path, args: &[&str]) -> (i32, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `bulkhead … | head -1`: every verb that prints exits 0, quietly, when the reader of its
/// output has gone.
#[test]
fn a_closed_pipe_is_no_error_for_any_verb() {
    let mesh = Mesh::start();
    mesh.apply(
        "shop.yaml",
        &std::fs::read_to_string(root().join("examples/shop.yaml")).unwrap(),
    );
    let shop = root().join("examples/shop.yaml");
    let cases = root().join("examples/shop-cases.yaml");
    let (shop, cases) = (shop.to_str().unwrap(), cases.to_str().unwrap());
    let context = mesh.data().join("admin.yaml");
    let context = context.to_str().unwrap();
    let verbs: Vec<Vec<&str>> = vec![
        vec!["--help"],
        vec!["--version"],
        vec!["completion", "bash"],
        vec!["policy", "lint", shop],
        vec!["policy", "test", shop, "--cases", cases],
        vec!["policy", "diff", shop, shop, "--cases", cases],
        vec![
            "policy",
            "explain",
            shop,
            "--from",
            "spiffe://bulkhead.local/ns/shop/sa/orders",
            "--to",
            "shop/payments:8080",
        ],
        vec!["reach", "shop/payments", "-f", shop],
        vec![
            "reach",
            "shop/frontend",
            "--blast-radius",
            "-f",
            shop,
            "-o",
            "json",
        ],
        vec!["--context", context, "get", "all"],
        vec!["--context", context, "get", "all", "-o", "yaml"],
        vec!["--context", context, "get", "policies", "-o", "json"],
        vec!["--context", context, "history"],
        vec!["--context", context, "graph"],
        vec!["--context", context, "recommend"],
        vec!["--context", context, "events"],
        vec!["--context", context, "impact", "-f", shop],
        vec!["--context", context, "ca", "status"],
    ];
    for args in verbs {
        let (code, err) = closed_stdout(&mesh.bins.bulkhead, &args);
        let quiet = !["panicked", "Broken pipe", "error"]
            .iter()
            .any(|w| err.contains(w));
        assert!(
            code == 0 && quiet,
            "bulkhead {}: exit {code}\n{err}",
            args.join(" ")
        );
    }
}

/// `source <(bulkhead completion bash)` completes verbs and their flags in a real bash.
#[test]
fn bash_completes_verbs_and_flags() {
    let bins = bulkhead_testkit::Bins::next_to(env!("CARGO_BIN_EXE_bulkhead"));
    let complete = |words: &str| {
        let script = format!(
            "source <({bin} completion bash)\nCOMP_WORDS=({words})\nCOMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))\nCOMP_LINE=\"${{COMP_WORDS[*]}}\"\nCOMP_POINT=${{#COMP_LINE}}\n_bulkhead bulkhead \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
            bin = bins.bulkhead.display()
        );
        let out = bulkhead_testkit::stdout_of(Command::new("bash").args(["-c", &script]), "bash");
        String::from_utf8(out).unwrap()
    };
    assert_eq!(complete("bulkhead pol"), "policy\n");
    let flags = complete("bulkhead impact --fail");
    assert_eq!(flags, "--fail-on-new-deny\n");
    let verbs = complete("bulkhead policy ''");
    for verb in ["lint", "test", "diff", "explain"] {
        assert!(verbs.lines().any(|l| l == verb), "{verbs}");
    }
}
