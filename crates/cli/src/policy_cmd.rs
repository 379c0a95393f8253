//! `bulkhead policy …`: offline commands for CI pipelines. They read files only and talk to
//! no control plane: lint a policy set, run tables of expected verdicts against it, show which
//! requests change verdict between two versions, and explain one request.
//!
//! The cases format and how a case is judged (as a sidecar judges it, through the canonical
//! request; a misspelt name is an error, never a silent default deny) live in the policy
//! crate (`bulkhead_policy::cases`); this module reads files and writes reports. Every
//! command writes to the writers it is given, so its tests run in-process (`tests.rs`).

use anyhow::{Context, Result, bail};
use bulkhead_policy::cases::{Case, Outcome, read_cases};
use std::io::Write;
use std::path::{Path, PathBuf};

pub use bulkhead_policy::cases::{Caller, HeaderValues};

#[cfg(test)]
mod tests;

/// The files to read: each path, or each `.yaml`/`.yml` in a directory, as bytes (a file
/// that is not UTF-8 is reported as a located error of its own).
pub(crate) fn read_bytes(files: &[PathBuf]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for f in files {
        let paths: Vec<PathBuf> = if f.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(f)
                .with_context(|| format!("cannot read directory {}", f.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            v.sort();
            v
        } else {
            vec![f.clone()]
        };
        for p in paths {
            let bytes =
                std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
            out.push((p.display().to_string(), bytes));
        }
    }
    Ok(out)
}

/// The files' texts; a non-UTF-8 file is a located error.
pub(crate) fn read_files(files: &[PathBuf]) -> Result<Vec<(String, String)>> {
    read_bytes(files)?
        .into_iter()
        .map(|(name, bytes)| {
            let text = bulkhead_policy::text_of(&name, &bytes)?.to_string();
            Ok((name, text))
        })
        .collect()
}

/// Parses and compiles; writes every error to `err` and fails if there is any.
fn compile(files: &[PathBuf], err: &mut dyn Write) -> Result<bulkhead_policy::Loaded> {
    let texts = read_bytes(files)?;
    match bulkhead_policy::load_bytes(&texts, 0) {
        Ok(loaded) => Ok(loaded),
        Err(errors) => {
            for e in &errors {
                writeln!(err, "{e}")?;
            }
            bail!("{} error(s); the policy set is refused whole", errors.len())
        }
    }
}

fn cases_in(path: &Path) -> Result<Vec<Case>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(read_cases(&path.display().to_string(), &bytes)?)
}

/// `policy lint`: the report goes to `out`, warnings to `err`.
pub fn lint(
    files: &[PathBuf],
    strict: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<()> {
    let (parsed, set) = compile(files, err)?;
    let warnings = bulkhead_policy::lint_parsed(&parsed);
    for w in &warnings {
        writeln!(err, "{w}")?;
    }
    if strict && !warnings.is_empty() {
        bail!("{} warning(s), which --strict makes errors", warnings.len());
    }
    let noted = match warnings.len() {
        0 => String::new(),
        n => format!("; {n} warning(s) above"),
    };
    writeln!(
        out,
        "ok: {} resources, {} rules; every rule is enforceable as written{noted}",
        parsed.len(),
        set.compiled_rule_count(),
    )?;
    Ok(())
}

/// `policy test`: a line per case, then the count; fails if any case failed.
pub fn test(
    files: &[PathBuf],
    cases: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<()> {
    let (_, set) = compile(files, err)?;
    let cases = cases_in(cases)?;
    let (mut passed, mut failed) = (0, 0);
    for case in &cases {
        let verdict = case.run(&set)?;
        if verdict.passed() {
            passed += 1;
            match &verdict.outcome {
                Outcome::Refused(why) => writeln!(out, "ok      {} (refused: {why})", case.name)?,
                Outcome::Decided(_) => writeln!(out, "ok      {}", case.name)?,
            }
        } else {
            failed += 1;
            writeln!(
                out,
                "FAILED  {}: {}\n        {}",
                case.name,
                verdict.problems.join("; "),
                verdict.outcome
            )?;
        }
    }
    writeln!(out, "\n{passed} passed, {failed} failed")?;
    if failed > 0 {
        bail!("{failed} case(s) did not get the expected verdict");
    }
    Ok(())
}

/// `policy diff`: each case whose verdict changes between the two sets, then the count.
pub fn diff(
    old: &[PathBuf],
    new: &[PathBuf],
    cases: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<()> {
    let (_, old_set) = compile(old, err)?;
    let (_, new_set) = compile(new, err)?;
    let cases = cases_in(cases)?;
    let mut changed = 0;
    for case in &cases {
        let (a, b) = (case.decide(&old_set, false)?, case.decide(&new_set, false)?);
        if a.word() != b.word() {
            changed += 1;
            writeln!(
                out,
                "{}: {} -> {}\n  old: {a}\n  new: {b}",
                case.name,
                a.word(),
                b.word()
            )?;
        }
    }
    writeln!(
        out,
        "{changed} of {} request(s) change verdict",
        cases.len()
    )?;
    Ok(())
}

/// `policy explain`: the verdict, the decision in words, and the header a sidecar would set.
pub fn explain(
    files: &[PathBuf],
    case: &Case,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<()> {
    let (_, set) = compile(files, err)?;
    match case.decide(&set, true)? {
        Outcome::Refused(why) => {
            writeln!(out, "REFUSED (400, before any policy)")?;
            writeln!(out, "bulkhead: {why}")?;
        }
        Outcome::Decided(d) => {
            writeln!(out, "{}", if d.is_allow() { "ALLOW" } else { "DENY" })?;
            writeln!(out, "{d}")?;
            writeln!(out, "x-bulkhead-decision: {}", d.header_value())?;
        }
    }
    Ok(())
}
