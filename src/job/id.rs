//! The job id: 32 bytes that name a job in the book, whichever door it came in by.
//!
//! A relay job's id is its request event id, so a duplicate of the request finds the job and a
//! zap of the request names it. An HTTP job has no event: its id is 32 random bytes. Both are
//! stored and shown as 64 lowercase hex digits, exactly as an `EventId` is, so records written
//! before HTTP jobs existed read back unchanged.

use std::fmt;

use nostr_sdk::EventId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A job's id (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId([u8; 32]);

impl JobId {
    /// The id of the job a relay request event asks for.
    pub fn of_request(request: &EventId) -> Self {
        Self(request.to_bytes())
    }

    /// A fresh id for a job that has no request event (an HTTP job).
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// The id of the HTTP job an account opens with `Idempotency-Key: key`: the same account
    /// and key name the same job, and no other account can name it.
    pub fn idempotent(account_key: &[u8], key: &str) -> Self {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(b"dvmd idempotency key\0");
        hash.update((account_key.len() as u64).to_be_bytes());
        hash.update(account_key);
        hash.update(key.as_bytes());
        Self(hash.finalize().into())
    }

    /// The id from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The id from a slice of exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// The id from 64 hex digits.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// The 32 bytes (the book's key).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The request event id, for a relay job (the same bytes).
    pub fn as_event_id(&self) -> EventId {
        EventId::from_byte_array(self.0)
    }
}

impl From<EventId> for JobId {
    fn from(id: EventId) -> Self {
        Self::of_request(&id)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let hex = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::from_hex(&hex).ok_or_else(|| serde::de::Error::custom("a job id is 64 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_jobs_id_is_stored_exactly_as_its_event_id_was() {
        let event = EventId::from_byte_array([0xab; 32]);
        let id = JobId::from(event);
        assert_eq!(
            serde_json::to_string(&id).ok(),
            serde_json::to_string(&event).ok()
        );
        let back: JobId = serde_json::from_str(&format!("\"{}\"", event.to_hex()))
            .expect("an event id's hex reads as a job id");
        assert_eq!(back, id);
        assert_eq!(back.as_event_id(), event);
        assert_eq!(id.to_string(), event.to_hex());
    }

    #[test]
    fn random_ids_differ_and_bad_hex_is_refused() {
        assert_ne!(JobId::random(), JobId::random());
        assert!(serde_json::from_str::<JobId>("\"abc\"").is_err());
        assert!(JobId::from_hex(&"zz".repeat(32)).is_none());
        assert!(JobId::from_slice(&[0; 31]).is_none());
    }
}
