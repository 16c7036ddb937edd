//! Secrets (wallet keys, connection strings): read from the environment or a file, never
//! printed. `Debug` and `Display` show only where the secret came from.

use std::fmt;
use std::path::PathBuf;

/// A secret string.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    source: String,
}

impl Secret {
    /// Wrap a value, naming where it came from (for messages).
    pub fn new(value: impl Into<String>, source: impl Into<String>) -> Self {
        Self {
            value: value.into(),
            source: source.into(),
        }
    }

    /// From the environment variable `var`.
    pub fn from_env(var: &str) -> Result<Self, String> {
        match std::env::var(var) {
            Ok(value) if !value.trim().is_empty() => Ok(Self::new(value.trim(), format!("${var}"))),
            _ => Err(format!("${var} is not set")),
        }
    }

    /// From the first line of `path`.
    pub fn from_file(path: &PathBuf) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let value = text.lines().next().unwrap_or("").trim().to_owned();
        if value.is_empty() {
            return Err(format!("{} is empty", path.display()));
        }
        Ok(Self::new(value, path.display().to_string()))
    }

    /// The secret itself: pass it to the backend, never to a log or an error.
    pub fn expose(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(from {})", self.source)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<secret from {}>", self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_value() {
        let secret = Secret::new("s3cr3t-admin-key", "$LNBITS_ADMIN_KEY");
        assert!(!format!("{secret:?}").contains("s3cr3t"));
        assert!(!format!("{secret}").contains("s3cr3t"));
        assert_eq!(secret.expose(), "s3cr3t-admin-key");
    }
}
