use std::fmt;

/// Where in a file a problem was found (1-based line and column).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceLocation {
    pub file: String,
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Why a set of policy documents was refused. Every variant names where the problem is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// The YAML itself could not be read into a resource (syntax, unknown field, wrong type).
    #[error("{location}: {message}")]
    Parse {
        location: SourceLocation,
        message: String,
    },
    /// The YAML was well formed but a value is not allowed.
    #[error("{location}: {message}")]
    Invalid {
        location: SourceLocation,
        message: String,
    },
    /// A checked model (from the wire) holds a value this build refuses.
    #[error("resource {resource}: {message}")]
    Model { resource: String, message: String },
}
