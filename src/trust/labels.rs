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
