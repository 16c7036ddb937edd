//! NIP-32 labels of an npub's tier, and the NIP-09 deletion of the label a change supersedes.
//! Pure: events to sign, built from what changed.
//!
//! A tier label is a kind 1985 event by the service key:
//! ```text
//! ["L", "dvmd.trust"]
//! ["l", "<tier>", "dvmd.trust"]
//! ["p", "<npub hex>"]
//! ```
//! with a sentence in `content`. Only categorical values, our own namespace; an npub has at most
//! one live tier label from us (the one before is deleted with a kind 5 naming it and `k`
//! 1985), so `{"kinds": [1985], "authors": [us], "#L": ["dvmd.trust"], "#p": [npub]}` answers
//! with its current tier.

use nostr_sdk::{EventBuilder, EventId, Kind, PublicKey, Tag, TagKind, Timestamp};

use super::Tier;
use crate::signatures::Draft;

/// The label namespace (the `L` tag, and the `l` tag's mark).
pub const NAMESPACE: &str = "dvmd.trust";

/// The label stating that `npub` is in `tier`, dated `created_at` (unix seconds).
pub fn tier_label(npub: &PublicKey, tier: Tier, created_at: u64) -> EventBuilder {
    let content = match tier {
        Tier::Blocked => "This service refuses jobs from this key.",
        Tier::New => "This service has not been paid by this key (enough) yet.",
        Tier::Known => "This key has paid this service for several jobs.",
        Tier::Trusted => "This key has paid this service for many jobs over time.",
        Tier::Allowlisted => "This service's operator vouches for this key.",
    };
    EventBuilder::new(Kind::Label, content)
        .custom_created_at(Timestamp::from_secs(created_at))
        .tags([
            Tag::custom(TagKind::custom("L"), [NAMESPACE]),
            Tag::custom(TagKind::custom("l"), [tier.as_str(), NAMESPACE]),
            Tag::public_key(*npub),
        ])
}

/// The namespace of job outcome labels.
pub const JOB_NAMESPACE: &str = "dvmd.job";

/// How a relay job ended, as its label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered and charged.
    Paid,
    /// An invoice was asked for and never paid; nothing ran.
    Unpaid,
    /// Delivered at no charge (a free job).
    Delivered,
    /// Failed after it was paid: what was paid went back to the payer's balance.
    Refunded,
    /// Failed with nothing paid.
    Failed,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Paid => "paid",
            Self::Unpaid => "unpaid",
            Self::Delivered => "delivered",
            Self::Refunded => "refunded",
            Self::Failed => "failed",
        }
    }
}

/// The label of a job's outcome: targets `target` (the result event, or the request when there
/// is no result) and the customer, with the payment hash as evidence when a Lightning payment
/// was asked for:
/// ```text
/// ["L", "dvmd.job"]
/// ["l", "<outcome>", "dvmd.job"]
/// ["e", "<result or request id>"]
/// ["p", "<customer hex>"]
/// ["payment_hash", "<hex>"]      (when there was an invoice)
/// ```
pub fn job_label(
    outcome: Outcome,
    target: &EventId,
    customer: &PublicKey,
    payment_hash: Option<&str>,
) -> Draft {
    let mut tags = vec![
        Tag::custom(TagKind::custom("L"), [JOB_NAMESPACE]),
        Tag::custom(TagKind::custom("l"), [outcome.as_str(), JOB_NAMESPACE]),
        Tag::event(*target),
        Tag::public_key(*customer),
    ];
    if let Some(hash) = payment_hash {
        tags.push(Tag::custom(TagKind::custom("payment_hash"), [hash]));
    }
    Draft::new(Kind::Label, "").tags(tags)
}

/// The deletion (NIP-09) of a superseded label, dated `created_at` (no earlier than the label:
/// relays delete only what is not newer than the deletion).
pub fn deletion(label: &EventId, created_at: u64) -> EventBuilder {
    EventBuilder::new(Kind::EventDeletion, "superseded by a newer trust label")
        .custom_created_at(Timestamp::from_secs(created_at))
        .tags([
            Tag::event(*label),
            Tag::custom(TagKind::custom("k"), ["1985"]),
        ])
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{Keys, TagStandard};

    use super::*;

    #[test]
    fn a_label_names_the_tier_in_our_namespace_and_targets_the_npub() {
        let (us, alice) = (Keys::generate(), Keys::generate().public_key());
        let event = tier_label(&alice, Tier::Known, 1_700_000_000)
            .sign_with_keys(&us)
            .expect("sign");
        assert_eq!(event.kind.as_u16(), 1985);
        assert_eq!(event.created_at.as_secs(), 1_700_000_000);
        let tags: Vec<Vec<String>> = event.tags.iter().map(|t| t.as_slice().to_vec()).collect();
        assert!(
            tags.contains(&vec!["L".into(), NAMESPACE.into()]),
            "{tags:?}"
        );
        assert!(
            tags.contains(&vec!["l".into(), "known".into(), NAMESPACE.into()]),
            "{tags:?}"
        );
        assert!(tags.contains(&vec!["p".into(), alice.to_hex()]), "{tags:?}");
        let gone = deletion(&event.id, 1_700_000_001)
            .sign_with_keys(&us)
            .expect("sign");
        assert_eq!(gone.kind, Kind::EventDeletion);
        assert!(gone
            .tags
            .iter()
            .any(|t| matches!(t.as_standardized(), Some(TagStandard::Event { event_id, .. }) if *event_id == event.id)));
    }
}
