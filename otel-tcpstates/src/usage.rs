//! The error of a bad setting found after flag parsing (an environment variable, a
//! file a flag names): below every stage that reads settings, so each can raise it.
use std::fmt;

/// Reported like a bad flag: one line, exit status 2.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}
