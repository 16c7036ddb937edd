//! NIP-90 data vending machines: the tag model dvmd owns (requests, feedback, results). Pure.
//!
//! Spec text followed: `nips/90.md` (<https://github.com/nostr-protocol/nips/blob/master/90.md>).
//! NIP-90 is marked unrecommended upstream and rust-nostr dropped its module, but clients still
//! speak it, so the tag model lives here rather than in a library.

pub mod request;
pub mod response;
pub mod text_generation;

pub use request::{InputType, JobInput, JobRequest, RequestError, Targeting, PAY_FROM_CREDIT};
pub use response::{
    estimate_tag, feedback, partial, receipt_tags, result, result_size_bound, PaymentAmount,
    RESULT_BYTES_PER_TOKEN,
};
pub use text_generation::{TextGeneration, TextGenerationLimits};

use nostr_sdk::Event;

/// An event whose id and signature dvmd checked itself ([`crate::signatures`]); nothing acts
/// on an event that is not `Verified`.
#[derive(Debug, Clone)]
pub struct Verified(Event);

impl Verified {
    /// Check the id and the signature.
    pub fn check(event: Event) -> Result<Self, nostr_sdk::event::Error> {
        crate::signatures::check(&event)?;
        Ok(Self(event))
    }

    /// The verified event.
    pub fn event(&self) -> &Event {
        &self.0
    }

    /// Take the event out.
    pub fn into_event(self) -> Event {
        self.0
    }
}

/// Job request kinds.
pub const REQUEST_KINDS: std::ops::RangeInclusive<u16> = 5000..=5999;
/// Job feedback kind.
pub const FEEDBACK_KIND: u16 = 7000;
/// Text generation requests.
pub const KIND_TEXT_GENERATION: u16 = 5050;

/// The result kind answering a request kind (request + 1000).
pub fn result_kind(request_kind: u16) -> u16 {
    request_kind.saturating_add(1000)
}

/// The `status` of a kind 7000 feedback event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// The customer must pay before work starts (`amount` tag carries the invoice).
    PaymentRequired,
    /// Work started.
    Processing,
    /// Partial output in the content.
    Partial,
    /// The result was published.
    Success,
    /// The job failed; the info says why.
    Error,
}

impl JobStatus {
    /// The spelling dvmd emits (hyphenated, as the spec writes it).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PaymentRequired => "payment-required",
            Self::Processing => "processing",
            Self::Partial => "partial",
            Self::Success => "success",
            Self::Error => "error",
        }
    }

    /// Parse a status, accepting NDK's `payment_required` spelling too.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "payment-required" | "payment_required" => Some(Self::PaymentRequired),
            "processing" => Some(Self::Processing),
            "partial" => Some(Self::Partial),
            "success" => Some(Self::Success),
            "error" => Some(Self::Error),
            _ => None,
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_spellings() {
        assert_eq!(
            JobStatus::parse("payment_required"),
            Some(JobStatus::PaymentRequired)
        );
        assert_eq!(
            JobStatus::parse("payment-required"),
            Some(JobStatus::PaymentRequired)
        );
        assert_eq!(JobStatus::PaymentRequired.as_str(), "payment-required");
        assert_eq!(JobStatus::parse("paid"), None);
        for s in [
            JobStatus::PaymentRequired,
            JobStatus::Processing,
            JobStatus::Partial,
            JobStatus::Success,
            JobStatus::Error,
        ] {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn forged_events_do_not_verify() {
        use nostr_sdk::{EventBuilder, JsonUtil, Keys, Kind};
        let event = EventBuilder::new(Kind::from(5050), "hi")
            .sign_with_keys(&Keys::generate())
            .expect("sign");
        assert!(Verified::check(event.clone()).is_ok());
        // Same id and signature, other content: the id no longer matches.
        let forged = event.as_json().replace("\"hi\"", "\"ho\"");
        let forged = Event::from_json(forged).expect("parses");
        assert!(Verified::check(forged).is_err());
        // Valid id, signature by another key.
        let other = EventBuilder::new(Kind::from(5050), "hi")
            .sign_with_keys(&Keys::generate())
            .expect("sign");
        let mut json: serde_json::Value = serde_json::from_str(&event.as_json()).expect("json");
        json["sig"] = serde_json::Value::String(other.sig.to_string());
        let forged = Event::from_json(json.to_string()).expect("parses");
        assert!(Verified::check(forged).is_err());
    }

    #[test]
    fn result_kind_is_request_plus_1000() {
        assert_eq!(result_kind(5050), 6050);
        assert_eq!(result_kind(5999), 6999);
    }
}
