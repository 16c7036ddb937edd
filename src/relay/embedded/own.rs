//! Events this daemon signed and sent to its own embedded relay, so the relay checks their
//! signatures once rather than again.
//!
//! The relay must verify every `EVENT` (id and signature): anyone can connect to it. But most
//! of what it receives under load is ours (a job's `processing` feedback, result and label,
//! against one request), and a Schnorr verification is the largest single cost of a job. The
//! pool records the `(id, sig)` of each event it sends ([`crate::relay::Relays::send`]); the
//! relay then recomputes the id of an event that arrives with a recorded pair (a hash, which
//! binds the content, kind, tags, time and pubkey) and skips only the signature check, which we
//! made ourselves for exactly that id. Any other event, or one whose id or signature differs from
//! what we recorded, is verified in full.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use nostr_sdk::{Event, EventId};

/// Pairs remembered; the oldest go first. An event is sent to the relay right after it is
/// signed, so this only has to cover the events in flight.
const CAPACITY: usize = 4096;

/// The `(id, sig)` of events we sent, shared by the pool (which records) and the embedded relay
/// (which checks). Cloning shares it.
#[derive(Clone, Default)]
pub struct OwnEvents(Arc<Mutex<Recorded>>);

#[derive(Default)]
struct Recorded {
    sigs: HashMap<EventId, [u8; 64]>,
    order: VecDeque<EventId>,
}

impl OwnEvents {
    /// Remember `event` (one we signed) as ours.
    pub fn record(&self, event: &Event) {
        let mut recorded = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if recorded
            .sigs
            .insert(event.id, event.sig.serialize())
            .is_none()
        {
            recorded.order.push_back(event.id);
        }
        while recorded.order.len() > CAPACITY {
            if let Some(oldest) = recorded.order.pop_front() {
                recorded.sigs.remove(&oldest);
            }
        }
    }

    /// Whether `event` is valid: its id is the hash of its content, and its signature is either
    /// the one we made for that id or verifies.
    pub fn verify(&self, event: &Event) -> bool {
        let ours = {
            let recorded = self.0.lock().unwrap_or_else(|e| e.into_inner());
            recorded
                .sigs
                .get(&event.id)
                .is_some_and(|sig| *sig == event.sig.serialize())
        };
        if ours {
            event.verify_id()
        } else {
            event.verify().is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{EventBuilder, JsonUtil, Keys, Kind, Tag};

    use super::*;

    fn signed(keys: &Keys, content: &str) -> Event {
        EventBuilder::new(Kind::from(6050), content)
            .tags([Tag::hashtag("dvmd")])
            .sign_with_keys(keys)
            .expect("signs")
    }

    /// The same event as JSON, with `field` set to `value`.
    fn altered(event: &Event, field: &str, value: serde_json::Value) -> Event {
        let mut json: serde_json::Value = serde_json::from_str(&event.as_json()).expect("json");
        json[field] = value;
        Event::from_json(json.to_string()).expect("still parses")
    }

    #[test]
    fn ours_skip_only_the_signature_and_anything_altered_is_refused() {
        let (us, them) = (Keys::generate(), Keys::generate());
        let own = OwnEvents::default();
        let result = signed(&us, "the answer");
        own.record(&result);
        assert!(own.verify(&result), "our own event, as sent");

        // Our id and signature on other content: the id no longer matches.
        let content = altered(&result, "content", "another answer".into());
        assert!(!own.verify(&content));
        // Our id and signature under another pubkey.
        let pubkey = altered(&result, "pubkey", them.public_key().to_hex().into());
        assert!(!own.verify(&pubkey));

        // Our id with a signature we did not make: verified in full, and refused.
        let other = signed(&us, "something else");
        let sig = altered(&result, "sig", other.sig.to_string().into());
        assert!(!own.verify(&sig));

        // Someone else's event is verified in full: a valid one passes, a forged one does not.
        let theirs = signed(&them, "a request");
        assert!(own.verify(&theirs));
        let forged = altered(&theirs, "sig", other.sig.to_string().into());
        assert!(!own.verify(&forged));

        // What is recorded is trusted for its id without the Schnorr check (which is the
        // point): were the wrong signature above ours, it would pass.
        own.record(&sig);
        assert!(own.verify(&sig));
    }

    #[test]
    fn it_remembers_a_bounded_number_and_forgotten_ones_are_verified_in_full() {
        let keys = Keys::generate();
        let own = OwnEvents::default();
        let first = signed(&keys, "first");
        own.record(&first);
        own.record(&first);
        for i in 0..CAPACITY {
            own.record(&signed(&keys, &i.to_string()));
        }
        {
            let recorded = own.0.lock().expect("lock");
            assert_eq!(recorded.sigs.len(), CAPACITY);
            assert_eq!(recorded.order.len(), CAPACITY);
            assert!(
                !recorded.sigs.contains_key(&first.id),
                "the oldest went first"
            );
        }
        assert!(
            own.verify(&first),
            "a forgotten event of ours still verifies"
        );
    }
}
