//! NIP-57 zaps: validating zap requests (appendix D), building zap receipts (appendix E) and
//! validating receipts from an external provider (appendix F). Pure.
//!
//! Spec text followed: `nips/57.md` (<https://github.com/nostr-protocol/nips/blob/master/57.md>).
//! A receipt is never proof of payment by itself: receipts we issue follow our own wallet's
//! confirmation, and receipts from a provider are accepted only from its `nostrPubkey` after
//! every check below, and each pays one thing once (the caller records its payment hash).

use bitcoin::hashes::{sha256, Hash};
use nostr_sdk::{Event, EventBuilder, EventId, JsonUtil, Kind, PublicKey, Tag, TagKind, Timestamp};

use crate::wallet::bolt11::{self, Bolt11Info};

/// Zap request kind.
pub const ZAP_REQUEST_KIND: u16 = 9734;
/// Zap receipt kind.
pub const ZAP_RECEIPT_KIND: u16 = 9735;
/// At most this many receipt relays are taken from a zap request.
pub const MAX_RECEIPT_RELAYS: usize = 8;

/// Why a zap request or receipt is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZapError {
    /// Not JSON, or not an event.
    #[error("zap request is not a nostr event: {0}")]
    NotAnEvent(String),
    /// Bad id or signature.
    #[error("{0} has a bad id or signature")]
    BadSignature(&'static str),
    /// Wrong kind.
    #[error("expected kind {expected}, got {got}")]
    WrongKind {
        /// Expected kind.
        expected: u16,
        /// Actual kind.
        got: u16,
    },
    /// A rule of the appendix is broken.
    #[error("{0}")]
    Invalid(String),
}

/// A validated zap request.
#[derive(Debug, Clone, PartialEq)]
pub struct ZapRequest {
    /// The request event.
    pub event: Event,
    /// The exact string received; the invoice's description hash commits to these bytes.
    pub json: String,
    /// The zapped pubkey (`p`).
    pub recipient: PublicKey,
    /// The zapped event (`e`), if any.
    pub target: Option<EventId>,
    /// The `amount` tag, msat, if any.
    pub amount_msat: Option<u64>,
    /// Where the receipt should go.
    pub relays: Vec<String>,
}

fn invalid(why: impl Into<String>) -> ZapError {
    ZapError::Invalid(why.into())
}

fn values<'a>(event: &'a Event, name: &str) -> Vec<&'a [String]> {
    event
        .tags
        .iter()
        .map(|t| t.as_slice())
        .filter(|t| t.first().is_some_and(|n| n == name))
        .map(|t| &t[1..])
        .collect()
}

/// Validate a zap request received by the LNURL callback with `amount_msat`, for recipient
/// `us` (NIP-57 appendix D).
pub fn parse_zap_request(
    json: &str,
    amount_msat: u64,
    us: &PublicKey,
) -> Result<ZapRequest, ZapError> {
    let event = Event::from_json(json).map_err(|e| ZapError::NotAnEvent(e.to_string()))?;
    let request = parse_zap_request_event(event, json)?;
    if request.recipient != *us {
        return Err(invalid("the zap request's `p` is not this service"));
    }
    if let Some(tagged) = request.amount_msat {
        if tagged != amount_msat {
            return Err(invalid(format!(
                "the zap request's amount {tagged} msat differs from the amount asked, {amount_msat} msat"
            )));
        }
    }
    Ok(request)
}

/// Re-read a zap request we validated and stored earlier (its amount was checked then).
pub fn parse_zap_request_unchecked_amount(json: &str) -> Result<ZapRequest, ZapError> {
    let event = Event::from_json(json).map_err(|e| ZapError::NotAnEvent(e.to_string()))?;
    parse_zap_request_event(event, json)
}

fn parse_zap_request_event(event: Event, json: &str) -> Result<ZapRequest, ZapError> {
    if event.verify().is_err() {
        return Err(ZapError::BadSignature("zap request"));
    }
    if event.kind.as_u16() != ZAP_REQUEST_KIND {
        return Err(ZapError::WrongKind {
            expected: ZAP_REQUEST_KIND,
            got: event.kind.as_u16(),
        });
    }
    if event.tags.is_empty() {
        return Err(invalid("the zap request has no tags"));
    }
    let p = values(&event, "p");
    let [p] = p.as_slice() else {
        return Err(invalid("a zap request needs exactly one `p` tag"));
    };
    let recipient = p
        .first()
        .and_then(|hex| PublicKey::from_hex(hex).ok())
        .ok_or_else(|| invalid("the zap request's `p` is not a pubkey"))?;
    let e = values(&event, "e");
    if e.len() > 1 {
        return Err(invalid("a zap request has at most one `e` tag"));
    }
    let target = match e.first() {
        Some(e) => Some(
            e.first()
                .and_then(|hex| EventId::from_hex(hex).ok())
                .ok_or_else(|| invalid("the zap request's `e` is not an event id"))?,
        ),
        None => None,
    };
    if values(&event, "P").len() > 1 {
        return Err(invalid("a zap request has at most one `P` tag"));
    }
    let amount_msat = match values(&event, "amount").first() {
        Some(a) => Some(
            a.first()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| invalid("the zap request's `amount` is not msat"))?,
        ),
        None => None,
    };
    let relays = values(&event, "relays")
        .first()
        .map(|r| {
            r.iter()
                .filter(|u| u.starts_with("ws://") || u.starts_with("wss://"))
                .take(MAX_RECEIPT_RELAYS)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    Ok(ZapRequest {
        json: json.to_owned(),
        event,
        recipient,
        target,
        amount_msat,
        relays,
    })
}

/// The kind 9735 receipt for a paid zap (appendix E), signed by the caller with the key
/// published as `nostrPubkey`.
///
/// The receipt is signed by the key it is addressed to (`p` is us), and nostr's `EventBuilder`
/// drops every `p` equal to the signing key unless told otherwise: without
/// `allow_self_tagging` no client filtering by `#p` would ever see it.
pub fn receipt(
    request: &ZapRequest,
    bolt11: &str,
    preimage: Option<[u8; 32]>,
    paid_at: Timestamp,
) -> EventBuilder {
    let mut tags = vec![Tag::public_key(request.recipient)];
    tags.push(Tag::custom(
        TagKind::custom("P"),
        [request.event.pubkey.to_hex()],
    ));
    if let Some(target) = request.target {
        tags.push(Tag::event(target));
    }
    tags.push(Tag::custom(TagKind::custom("bolt11"), [bolt11]));
    tags.push(Tag::custom(
        TagKind::custom("description"),
        [request.json.as_str()],
    ));
    if let Some(preimage) = preimage {
        tags.push(Tag::custom(
            TagKind::custom("preimage"),
            [hex::encode(preimage)],
        ));
    }
    EventBuilder::new(Kind::from(ZAP_RECEIPT_KIND), "")
        .tags(tags)
        .custom_created_at(paid_at)
        .allow_self_tagging()
}

/// A receipt that passed appendix F.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidReceipt {
    /// The zap request inside it.
    pub request: ZapRequest,
    /// The invoice it claims was paid.
    pub invoice: Bolt11Info,
    /// What the invoice paid, msat.
    pub amount_msat: u64,
}

/// Validate a receipt from an external Lightning address provider (appendix F): signed by
/// `provider` (its `nostrPubkey`), a BOLT11 with an amount equal to the zap request's `amount`,
/// a description hash equal to sha256 of the embedded zap request, a validly signed zap request
/// whose `p` is `us`.
pub fn validate_receipt(
    receipt: &Event,
    provider: &PublicKey,
    us: &PublicKey,
) -> Result<ValidReceipt, ZapError> {
    if receipt.verify().is_err() {
        return Err(ZapError::BadSignature("zap receipt"));
    }
    if receipt.kind.as_u16() != ZAP_RECEIPT_KIND {
        return Err(ZapError::WrongKind {
            expected: ZAP_RECEIPT_KIND,
            got: receipt.kind.as_u16(),
        });
    }
    if receipt.pubkey != *provider {
        return Err(invalid("the receipt is not signed by the trusted provider"));
    }
    let bolt11 = values(receipt, "bolt11")
        .first()
        .and_then(|v| v.first())
        .ok_or_else(|| invalid("the receipt has no `bolt11`"))?
        .clone();
    let description = values(receipt, "description")
        .first()
        .and_then(|v| v.first())
        .ok_or_else(|| invalid("the receipt has no `description`"))?
        .clone();
    let invoice = bolt11::decode(&bolt11).map_err(|e| invalid(format!("receipt bolt11: {e}")))?;
    let expected_hash = sha256::Hash::hash(description.as_bytes()).to_byte_array();
    if invoice.description_hash != Some(expected_hash) {
        return Err(invalid(
            "the invoice's description hash does not commit to the zap request",
        ));
    }
    let amount_msat = invoice
        .amount_msat
        .ok_or_else(|| invalid("the receipt's invoice has no amount"))?;
    let event = Event::from_json(&description).map_err(|e| ZapError::NotAnEvent(e.to_string()))?;
    let request = parse_zap_request_event(event, &description)?;
    if request.recipient != *us {
        return Err(invalid("the zap was not for this service"));
    }
    if request.amount_msat.is_some_and(|a| a != amount_msat) {
        return Err(invalid(
            "the invoice amount differs from the zap request's amount",
        ));
    }
    if let Some(receipt_p) = values(receipt, "p").first().and_then(|v| v.first()) {
        if *receipt_p != us.to_hex() {
            return Err(invalid("the receipt's `p` is not this service"));
        }
    }
    Ok(ValidReceipt {
        request,
        invoice,
        amount_msat,
    })
}

#[cfg(test)]
mod tests {
    use nostr_sdk::Keys;

    use super::*;
    use crate::store::Store;
    use crate::wallet::dev::DevWallet;
    use crate::wallet::{InvoiceDescription, InvoiceRequest, Wallet};

    fn zap_request(
        sender: &Keys,
        to: &PublicKey,
        target: Option<EventId>,
        amount: Option<u64>,
    ) -> String {
        let mut tags = vec![
            Tag::public_key(*to),
            Tag::custom(
                TagKind::custom("relays"),
                ["ws://127.0.0.1:1", "https://no"],
            ),
        ];
        if let Some(target) = target {
            tags.push(Tag::event(target));
        }
        if let Some(amount) = amount {
            tags.push(Tag::custom(TagKind::custom("amount"), [amount.to_string()]));
        }
        EventBuilder::new(Kind::from(ZAP_REQUEST_KIND), "for the job")
            .tags(tags)
            .sign_with_keys(sender)
            .expect("sign")
            .as_json()
    }

    #[test]
    fn accepts_a_valid_zap_request() {
        let (alice, us) = (Keys::generate(), Keys::generate().public_key());
        let target = EventId::all_zeros();
        let json = zap_request(&alice, &us, Some(target), Some(21_000));
        let request = parse_zap_request(&json, 21_000, &us).expect("valid");
        assert_eq!(request.recipient, us);
        assert_eq!(request.target, Some(target));
        assert_eq!(request.relays, vec!["ws://127.0.0.1:1"]);
        assert_eq!(
            request.json, json,
            "the exact string is kept for the description hash"
        );
    }

    #[test]
    fn refuses_what_appendix_d_refuses() {
        let (alice, us) = (Keys::generate(), Keys::generate().public_key());
        let other = Keys::generate().public_key();
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), "not a nostr event"),
            (zap_request(&alice, &other, None, None), "not this service"),
            (
                zap_request(&alice, &us, None, Some(5)),
                "differs from the amount",
            ),
            (
                EventBuilder::new(Kind::from(1), "")
                    .tags([Tag::public_key(us)])
                    .sign_with_keys(&alice)
                    .expect("sign")
                    .as_json(),
                "expected kind 9734",
            ),
            (
                EventBuilder::new(Kind::from(ZAP_REQUEST_KIND), "")
                    .tags([Tag::public_key(us), Tag::public_key(other)])
                    .sign_with_keys(&alice)
                    .expect("sign")
                    .as_json(),
                "exactly one `p`",
            ),
            (
                EventBuilder::new(Kind::from(ZAP_REQUEST_KIND), "")
                    .tags([
                        Tag::public_key(us),
                        Tag::event(EventId::all_zeros()),
                        Tag::event(EventId::all_zeros()),
                    ])
                    .sign_with_keys(&alice)
                    .expect("sign")
                    .as_json(),
                "at most one `e`",
            ),
            (
                zap_request(&alice, &us, None, None).replace("for the job", "for the jab"),
                "bad id or signature",
            ),
        ];
        for (json, why) in cases {
            let err = parse_zap_request(&json, 21_000, &us)
                .expect_err(why)
                .to_string();
            assert!(err.contains(why), "expected `{why}` in `{err}`");
        }
    }

    async fn provider_receipt(
        provider: &Keys,
        zap_json: &str,
        amount: u64,
        description: &str,
    ) -> Event {
        let wallet = DevWallet::open(Store::temporary().expect("store"))
            .await
            .expect("wallet");
        let invoice = wallet
            .create_invoice(InvoiceRequest {
                amount_msat: amount,
                description: InvoiceDescription::Hashed(description.to_owned()),
                expiry_secs: 600,
            })
            .await
            .expect("invoice");
        let event = Event::from_json(zap_json).expect("event");
        let request = parse_zap_request_event(event, zap_json).expect("request");
        receipt(&request, &invoice.bolt11, None, Timestamp::now())
            .sign_with_keys(provider)
            .expect("sign")
    }

    #[tokio::test]
    async fn our_receipt_tags_us_although_we_sign_it() {
        let (alice, us) = (Keys::generate(), Keys::generate());
        let zap = zap_request(&alice, &us.public_key(), None, Some(21_000));
        let receipt = provider_receipt(&us, &zap, 21_000, &zap).await;
        assert_eq!(
            receipt.tags.public_keys().collect::<Vec<_>>(),
            [&us.public_key()],
            "the lowercase `p` is the recipient, which is the signer"
        );
        validate_receipt(&receipt, &us.public_key(), &us.public_key()).expect("valid");
    }

    #[tokio::test]
    async fn appendix_f_receipt_checks() {
        let (alice, provider, us) = (
            Keys::generate(),
            Keys::generate(),
            Keys::generate().public_key(),
        );
        let zap = zap_request(&alice, &us, Some(EventId::all_zeros()), Some(21_000));

        let good = provider_receipt(&provider, &zap, 21_000, &zap).await;
        let valid = validate_receipt(&good, &provider.public_key(), &us).expect("valid");
        assert_eq!(valid.amount_msat, 21_000);
        assert_eq!(valid.request.target, Some(EventId::all_zeros()));

        // Signed by someone other than the trusted provider.
        let forged = provider_receipt(&Keys::generate(), &zap, 21_000, &zap).await;
        assert!(validate_receipt(&forged, &provider.public_key(), &us).is_err());
        // Invoice amount below the zap request's amount.
        let short = provider_receipt(&provider, &zap, 1_000, &zap).await;
        assert!(validate_receipt(&short, &provider.public_key(), &us).is_err());
        // Description hash of something else.
        let other = provider_receipt(&provider, &zap, 21_000, "other text").await;
        assert!(validate_receipt(&other, &provider.public_key(), &us).is_err());
        // A zap for someone else.
        let elsewhere = zap_request(&alice, &Keys::generate().public_key(), None, Some(21_000));
        let theirs = provider_receipt(&provider, &elsewhere, 21_000, &elsewhere).await;
        assert!(validate_receipt(&theirs, &provider.public_key(), &us).is_err());
    }
}
