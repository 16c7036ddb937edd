//! NIP-89 handler announcement (kind 31990) and the kind 0 profile: tell clients which job
//! kinds dvmd serves and where to zap it.
//! Pure. Spec text followed: `nips/89.md`. rust-nostr has no builder for it, so it is built here.

use nostr_sdk::{EventBuilder, Kind, Tag, TagKind};
use serde_json::json;

/// The announcement kind.
pub const HANDLER_KIND: u16 = 31990;
/// The `d` tag value: one announcement per service key, replaced on every start.
pub const IDENTIFIER: &str = "dvmd";

fn profile_json(name: &str, about: &str, lud16: Option<&str>) -> String {
    let mut profile = json!({ "name": name, "about": about });
    if let Some(lud16) = lud16 {
        profile["lud16"] = json!(lud16);
    }
    profile.to_string()
}

/// The service's kind 0 profile (NIP-01), with its Lightning address for zaps.
pub fn profile(name: &str, about: &str, lud16: Option<&str>) -> EventBuilder {
    EventBuilder::new(Kind::Metadata, profile_json(name, about, lud16))
}

/// A kind 31990 announcement for `kinds`, with a kind-0-style profile in the content.
pub fn announcement(kinds: &[u16], name: &str, about: &str, lud16: Option<&str>) -> EventBuilder {
    let mut tags = vec![Tag::identifier(IDENTIFIER)];
    tags.extend(
        kinds
            .iter()
            .map(|k| Tag::custom(TagKind::custom("k"), [k.to_string()])),
    );
    EventBuilder::new(Kind::from(HANDLER_KIND), profile_json(name, about, lud16)).tags(tags)
}

#[cfg(test)]
mod tests {
    use nostr_sdk::Keys;

    use super::*;

    #[test]
    fn announces_each_kind() {
        let event = announcement(&[5050], "dvmd", "text generation", Some("dvmd@example.com"))
            .sign_with_keys(&Keys::generate())
            .expect("sign");
        assert_eq!(event.kind.as_u16(), 31990);
        let tags: Vec<Vec<String>> = event.tags.iter().map(|t| t.as_slice().to_vec()).collect();
        assert!(tags.contains(&vec!["d".to_owned(), "dvmd".to_owned()]));
        assert!(tags.contains(&vec!["k".to_owned(), "5050".to_owned()]));
        let profile: serde_json::Value = serde_json::from_str(&event.content).expect("json");
        assert_eq!(profile["name"], "dvmd");
        assert_eq!(profile["lud16"], "dvmd@example.com");
    }
}
