//! Internal failures told to customers without their details. Backend URLs, upstream response
//! bodies, file paths and wallet errors go to the log at `warn` under a short reference; the
//! customer (an `error` feedback, an HTTP error) sees the reference and what they can do.

use std::fmt;

/// A logged internal failure: `Display` shows only its reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incident(String);

impl Incident {
    /// Log `detail` at `warn` under a fresh reference, saying `what` failed.
    pub fn log(what: &str, detail: &dyn fmt::Display) -> Self {
        let reference = format!("{:08x}", rand::random::<u32>());
        tracing::warn!(incident = %reference, what, detail = %detail, "internal failure (the customer sees only the reference)");
        Self(reference)
    }

    /// The reference alone.
    pub fn reference(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Incident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ref {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_the_reference_not_the_detail() {
        let incident = Incident::log(
            "inference",
            &"POST http://10.0.0.7:8000/v1/chat/completions: {\"secret\": 1}",
        );
        let shown = incident.to_string();
        assert_eq!(shown, format!("ref {}", incident.reference()));
        assert_eq!(incident.reference().len(), 8);
        assert!(!shown.contains("10.0.0.7"));
    }
}
