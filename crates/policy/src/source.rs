//! Reading YAML files into resources, with `file:line:column` on every error.
//!
//! A file holds documents separated by `---` lines. Each document is read twice: once for
//! its `kind`, then as that kind with unknown fields refused, so every error points into
//! the operator's text.

use crate::error::{PolicyError, SourceLocation};
use crate::located::Located;
use crate::model::{Document, KINDS, Resource};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Where each parsed resource came from: the file and the line its document starts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    /// 0-based line offset of the document within the file.
    pub line_offset: u32,
}

impl Origin {
    /// The file position of a (line, column) inside this document.
    pub fn at(&self, pos: Option<(u32, u32)>) -> SourceLocation {
        let (line, column) = pos.unwrap_or((1, 1));
        SourceLocation {
            file: self.file.clone(),
            line: line + self.line_offset,
            column,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<Located<String>>,
    kind: Option<Located<String>>,
}

/// Parses every document in `text` (named `file` in errors). Returns the resources with
/// their origins, or the first error; nothing partial.
pub fn parse_file(file: &str, text: &str) -> Result<Vec<(Resource, Origin)>, PolicyError> {
    let mut out = Vec::new();
    for (line_offset, doc) in split_documents(text) {
        let origin = Origin {
            file: file.to_string(),
            line_offset,
        };
        if doc.lines().all(|l| {
            let t = l.trim();
            t.is_empty() || t.starts_with('#')
        }) {
            continue;
        }
        out.push((parse_document(&origin, doc)?, origin));
    }
    Ok(out)
}

/// The text of a file read as bytes. A file that is not UTF-8 is an error for that file
/// only, at the line and column (counted in characters) of its first invalid byte.
pub fn text_of<'a>(file: &str, bytes: &'a [u8]) -> Result<&'a str, PolicyError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = String::from_utf8_lossy(&bytes[..e.valid_up_to()]);
        let line = valid.matches('\n').count() + 1;
        let column = valid.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        let byte = bytes.get(e.valid_up_to()).copied().unwrap_or_default();
        PolicyError::Parse {
            location: SourceLocation {
                file: file.to_string(),
                line: u32::try_from(line).unwrap_or(u32::MAX),
                column: u32::try_from(column).unwrap_or(u32::MAX),
            },
            message: format!(
                "the file is not UTF-8 text (byte 0x{byte:02X} here is not part of a UTF-8 character); policy files must be UTF-8"
            ),
        }
    })
}

/// Parses every document and returns only the resources (see [`parse_file`]).
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Resource>, PolicyError> {
    Ok(parse_file(file, text)?
        .into_iter()
        .map(|(r, _)| r)
        .collect())
}

fn parse_document(origin: &Origin, doc: &str) -> Result<Resource, PolicyError> {
    let header: Header = serde_saphyr::from_str(doc).map_err(|e| parse_error(origin, &e))?;
    let invalid = |pos, message: String| PolicyError::Invalid {
        location: origin.at(pos),
        message,
    };
    let Some(api) = header.api_version else {
        return Err(invalid(
            None,
            format!("missing apiVersion; use apiVersion: {}", crate::API_VERSION),
        ));
    };
    if api.value != crate::API_VERSION {
        return Err(invalid(
            api.position(),
            format!(
                "apiVersion {:?} is not supported; use {:?}",
                api.value,
                crate::API_VERSION
            ),
        ));
    }
    let Some(kind) = header.kind else {
        return Err(invalid(
            None,
            format!("missing kind; one of: {}", KINDS.join(", ")),
        ));
    };
    fn read<S: DeserializeOwned>(origin: &Origin, doc: &str) -> Result<Document<S>, PolicyError> {
        serde_saphyr::from_str(doc).map_err(|e| parse_error(origin, &e))
    }
    Ok(match kind.value.as_str() {
        "AuthorizationPolicy" => Resource::AuthorizationPolicy(read(origin, doc)?),
        "Workload" => Resource::Workload(read(origin, doc)?),
        "Service" => Resource::Service(read(origin, doc)?),
        "DefaultPosture" => Resource::DefaultPosture(read(origin, doc)?),
        other => {
            return Err(invalid(
                kind.position(),
                format!(
                    "unknown kind {other:?}; this version knows: {}",
                    KINDS.join(", ")
                ),
            ));
        }
    })
}

/// Splits on lines that are exactly `---` (optionally followed by spaces or a comment).
/// Yields each document with the 0-based line it starts after.
fn split_documents(text: &str) -> Vec<(u32, &str)> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 0u32;
    let mut offset = 0usize;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        let is_separator = bare == "---" || bare.starts_with("--- #") || bare == "...";
        if is_separator {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = i as u32 + 1;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs
}

/// Reads one YAML document of any shape (a `policy test` cases file, say) with the same
/// error reporting as policy files: `file:line:column`, in our words.
pub fn read_yaml<T: DeserializeOwned>(file: &str, text: &str) -> Result<T, PolicyError> {
    let origin = Origin {
        file: file.to_string(),
        line_offset: 0,
    };
    serde_saphyr::from_str(text).map_err(|e| parse_error(&origin, &e))
}

/// Resource, namespace and workload names follow Kubernetes: lowercase letters, digits and
/// '-', at most 63, not starting or ending with '-'.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn parse_error(origin: &Origin, e: &serde_saphyr::Error) -> PolicyError {
    let pos = e.location().map(|l| (l.line() as u32, l.column() as u32));
    PolicyError::Parse {
        location: origin.at(pos),
        message: in_our_words(e).unwrap_or_else(|| first_line(&e.to_string())),
    }
}

/// The reader's errors that would otherwise name its internals (options, budget variants),
/// said in terms of the file.
fn in_our_words(e: &serde_saphyr::Error) -> Option<String> {
    use serde_saphyr::Error as E;
    use serde_saphyr::budget::BudgetBreach as B;
    let mut e = e.without_snippet();
    while let E::AliasError { error, .. } = e {
        e = error.without_snippet();
    }
    let too_big = |what: String| {
        format!(
            "the document is too large for a policy file: {what}; split it into smaller documents"
        )
    };
    Some(match e {
        E::DuplicateMappingKey { key, .. } => match key {
            Some(k) => format!(
                "the key {k:?} is given twice in one mapping; keys must be unique (a second value would silently replace the first), so remove one"
            ),
            None => "a key is given twice in one mapping; keys must be unique (a second value would silently replace the first), so remove one".into(),
        },
        E::Budget { breach, .. } => match breach {
            B::Nodes { nodes } => too_big(format!(
                "it holds more than {} values, counting what aliases (*name) expand to",
                nodes.saturating_sub(1)
            )),
            B::Depth { depth } => too_big(format!("it nests more than {} levels deep", depth.saturating_sub(1))),
            B::Aliases { aliases } => too_big(format!("it uses more than {} aliases", aliases.saturating_sub(1))),
            B::Anchors { anchors } => too_big(format!("it defines more than {} anchors", anchors.saturating_sub(1))),
            B::ScalarBytes { total_scalar_bytes } => too_big(format!(
                "its values hold more than {} bytes",
                total_scalar_bytes.saturating_sub(1)
            )),
            _ => too_big("it exceeds a limit on size, nesting or aliases".into()),
        },
        other => {
            let text = first_line(&other.to_string());
            match text.as_str() {
                "recursion limit exceeded" => too_big("it nests too deeply".into()),
                _ => return None,
            }
        }
    })
}

/// serde-saphyr renders a source snippet after the message; a CLI error wants the message.
fn first_line(s: &str) -> String {
    let mut line = s.lines().next().unwrap_or("invalid YAML").trim();
    // The location is already in front: drop serde-saphyr's own "error: line N column M: ".
    line = line.strip_prefix("error: ").unwrap_or(line);
    if let Some((_, msg)) = line.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        line = msg;
    }
    match line.find(" at line ") {
        Some(i) => line[..i].to_string(),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::split_documents;

    #[test]
    fn non_utf8_is_located() {
        let e = super::text_of("f.yaml", b"a: 1\nb: x\xffy\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "f.yaml:2:5: the file is not UTF-8 text (byte 0xFF here is not part of a UTF-8 character); policy files must be UTF-8"
        );
        assert_eq!(super::text_of("f.yaml", b"ok\n"), Ok("ok\n"));
    }

    #[test]
    fn documents_split_on_separator_lines_only() {
        let text = "a: 1\n---\nb: 2\n--- # next\nc: |\n  ---x\n";
        let docs = split_documents(text);
        assert_eq!(
            docs,
            vec![(0, "a: 1\n"), (2, "b: 2\n"), (4, "c: |\n  ---x\n")]
        );
    }
}
