//! NIP-89 handler announcement (kind 31990) and the kind 0 profile: tell clients which job
//! kinds dvmd serves and where to zap it.
//! Pure. Spec text followed: `nips/89.md`. rust-nostr has no builder for it, so it is built here.

use nostr_sdk::{EventBuilder, Kind, Tag, TagKind};
use serde_json::json;

use crate::pricing::RateCard;

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

/// What the announcement says about the service besides its name.
#[derive(Debug, Clone, Copy)]
pub struct Offer<'a> {
    /// Job kinds served.
    pub kinds: &'a [u16],
    /// The model served.
    pub model: &'a str,
    /// Its prices.
    pub rates: &'a RateCard,
    /// NIP-13 difficulty asked of requests from keys that have not paid us (0: none).
    pub new_min_pow: u8,
}

/// A kind 31990 announcement of `offer`, with a kind-0-style profile in the content. Besides
/// NIP-89's `d` and `k` tags it carries `["model", name]` and the rate card as
/// `["rates", base_fee_msat, prompt_msat_per_1k_tokens, completion_msat_per_1k_tokens]`, the
/// form of the usage receipt's `rates` tag (`nips/dvmd-5050.md`), and, when requests from keys
/// that have not paid us must carry NIP-13 proof of work, `["pow", difficulty]`
/// (`nips/dvmd-trust.md`).
pub fn announcement(
    offer: Offer<'_>,
    name: &str,
    about: &str,
    lud16: Option<&str>,
) -> EventBuilder {
    let mut tags = vec![Tag::identifier(IDENTIFIER)];
    tags.extend(
        offer
            .kinds
            .iter()
            .map(|k| Tag::custom(TagKind::custom("k"), [k.to_string()])),
    );
    tags.push(Tag::custom(TagKind::custom("model"), [offer.model]));
    let rates = offer.rates;
    tags.push(Tag::custom(
        TagKind::custom("rates"),
        [
            rates.base_fee_msat.to_string(),
            rates.prompt_msat_per_1k_tokens.to_string(),
            rates.completion_msat_per_1k_tokens.to_string(),
        ],
    ));
    if offer.new_min_pow > 0 {
        tags.push(Tag::custom(
            TagKind::custom("pow"),
            [offer.new_min_pow.to_string()],
        ));
    }
    EventBuilder::new(Kind::from(HANDLER_KIND), profile_json(name, about, lud16)).tags(tags)
}

#[cfg(test)]
mod tests {
    use nostr_sdk::Keys;

    use super::*;

    #[test]
    fn announces_each_kind() {
        let offer = Offer {
            kinds: &[5050],
            model: "smol",
            rates: &RateCard::default(),
            new_min_pow: 0,
        };
        let event = announcement(offer, "dvmd", "text generation", Some("dvmd@example.com"))
            .sign_with_keys(&Keys::generate())
            .expect("sign");
        assert_eq!(event.kind.as_u16(), 31990);
        let tags: Vec<Vec<String>> = event.tags.iter().map(|t| t.as_slice().to_vec()).collect();
        assert!(tags.contains(&vec!["d".to_owned(), "dvmd".to_owned()]));
        assert!(tags.contains(&vec!["k".to_owned(), "5050".to_owned()]));
        assert!(tags.contains(&vec!["model".to_owned(), "smol".to_owned()]));
        let rates = ["rates", "1000", "2000", "10000"]
            .map(str::to_owned)
            .to_vec();
        assert!(tags.contains(&rates), "{tags:?}");
        assert!(!tags.iter().any(|t| t[0] == "pow"), "no work asked: no tag");
        let profile: serde_json::Value = serde_json::from_str(&event.content).expect("json");
        assert_eq!(profile["name"], "dvmd");
        assert_eq!(profile["lud16"], "dvmd@example.com");
    }

    #[test]
    fn announces_the_proof_of_work_asked_of_new_keys() {
        let offer = Offer {
            kinds: &[5050],
            model: "smol",
            rates: &RateCard::default(),
            new_min_pow: 12,
        };
        let event = announcement(offer, "dvmd", "", None)
            .sign_with_keys(&Keys::generate())
            .expect("sign");
        let tags: Vec<Vec<String>> = event.tags.iter().map(|t| t.as_slice().to_vec()).collect();
        assert!(
            tags.contains(&vec!["pow".to_owned(), "12".to_owned()]),
            "{tags:?}"
        );
    }
}
