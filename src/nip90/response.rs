//! Building kind 7000 feedback and kind 6xxx result events.

use nostr_sdk::{Event, Kind, Tag, TagKind};

use crate::signatures::Draft;

use super::{result_kind, JobStatus, FEEDBACK_KIND};
use crate::pricing::{Estimate, Receipt};

/// An `["amount", msat, bolt11?]` tag: what the job costs and how to pay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentAmount {
    /// Amount in msat.
    pub msat: u64,
    /// The invoice to pay, if any.
    pub bolt11: Option<String>,
}

impl PaymentAmount {
    fn tag(&self) -> Tag {
        let mut values = vec![self.msat.to_string()];
        values.extend(self.bolt11.clone());
        Tag::custom(TagKind::custom("amount"), values)
    }
}

/// A kind 7000 feedback event answering `request`, with `["status", status, info]`, `e`, `p`
/// and an optional `amount`.
pub fn feedback(
    request: &Event,
    status: JobStatus,
    info: &str,
    amount: Option<&PaymentAmount>,
) -> Draft {
    let mut tags = vec![
        Tag::custom(TagKind::custom("status"), [status.as_str(), info]),
        Tag::event(request.id),
        Tag::public_key(request.pubkey),
    ];
    tags.extend(amount.map(PaymentAmount::tag));
    Draft::new(Kind::from(FEEDBACK_KIND), "").tags(tags)
}

/// A `partial` feedback answering `request`: the text generated so far as its content, and
/// `info` in its status tag.
pub fn partial(request: &Event, text: &str, info: &str) -> Draft {
    let tags = [
        Tag::custom(
            TagKind::custom("status"),
            [JobStatus::Partial.as_str(), info],
        ),
        Tag::event(request.id),
        Tag::public_key(request.pubkey),
    ];
    Draft::new(Kind::from(FEEDBACK_KIND), text).tags(tags)
}

/// `["estimate", p50_msat, p90_msat, confidence, cap_msat]`: what a job is expected to cost,
/// on the `payment-required` feedback (documented in `nips/dvmd-5050.md`).
pub fn estimate_tag(estimate: &Estimate) -> Tag {
    Tag::custom(
        TagKind::custom("estimate"),
        [
            estimate.p50_msat.to_string(),
            estimate.p90_msat.to_string(),
            estimate.confidence.to_string(),
            estimate.cap_msat.to_string(),
        ],
    )
}

/// The usage receipt as result tags (documented in `nips/dvmd-5050.md`): `["usage", prompt,
/// completion]`, `["rates", base_fee_msat, prompt_msat_per_1k, completion_msat_per_1k]`,
/// `["paid", msat]`, `["charged", msat]`, `["returned", msat]`, `["finish", why]`.
///
/// The charge is `charged`, not NIP-90's `amount`: on a result, `amount` is what the service
/// asks to be paid, and a client that pays it would pay a prepaid job twice.
pub fn receipt_tags(receipt: &Receipt) -> Vec<Tag> {
    let tag = |name: &str, values: Vec<String>| Tag::custom(TagKind::custom(name), values);
    let rates = &receipt.rates;
    vec![
        tag(
            "usage",
            vec![
                receipt.prompt_tokens.to_string(),
                receipt.completion_tokens.to_string(),
            ],
        ),
        tag(
            "rates",
            vec![
                rates.base_fee_msat.to_string(),
                rates.prompt_msat_per_1k_tokens.to_string(),
                rates.completion_msat_per_1k_tokens.to_string(),
            ],
        ),
        tag("paid", vec![receipt.paid_msat.to_string()]),
        tag("charged", vec![receipt.charged_msat.to_string()]),
        tag("returned", vec![receipt.returned_msat.to_string()]),
        tag("finish", vec![receipt.finish.as_str().to_owned()]),
    ]
}

/// The result event answering `request`: kind + 1000, with `request` (the request JSON), `e`,
/// `p`, the request's `i` tags and, when given, the usage receipt.
///
/// `ask` is NIP-90's `["amount", msat, bolt11]`, which asks the customer to pay: only a
/// pay-after job, which ran before it was paid for, asks anything. A job paid before it ran
/// carries what it was charged in the receipt alone.
pub fn result(
    request: &Event,
    content: &str,
    receipt: Option<&Receipt>,
    ask: Option<&PaymentAmount>,
) -> Draft {
    let mut tags = vec![
        Tag::custom(
            TagKind::custom("request"),
            [crate::event_json::to_json(request)],
        ),
        Tag::event(request.id),
        Tag::public_key(request.pubkey),
    ];
    tags.extend(
        request
            .tags
            .iter()
            .filter(|tag| tag.as_slice().first().is_some_and(|name| name == "i"))
            .cloned(),
    );
    tags.extend(ask.map(PaymentAmount::tag));
    tags.extend(receipt.map(receipt_tags).into_iter().flatten());
    Draft::new(Kind::from(result_kind(request.kind.as_u16())), content).tags(tags)
}

/// Bytes of a result event beyond its content and its `request` and `i` tags: id, pubkey,
/// sig, kind, created_at, `e`, `p`, `amount` (a pay-after job's, with a BOLT11 invoice: up
/// to about 450), the receipt's tags, field names and punctuation (about 1,100), with room.
const RESULT_OVERHEAD_BYTES: usize = 1_400;

/// Bytes per completion token the bound assumes (UTF-8 text, JSON-escaped).
pub const RESULT_BYTES_PER_TOKEN: usize = 4;

/// The most bytes of JSON the result answering `request` (stored as `request_json`) can take
/// with a completion of `max_tokens` tokens: the request embedded as an escaped string, its
/// `i` tags echoed, the completion at [`RESULT_BYTES_PER_TOKEN`], and the fixed fields.
pub fn result_size_bound(request: &Event, request_json: &str, max_tokens: u32) -> usize {
    let inputs: usize = request
        .tags
        .iter()
        .filter(|tag| tag.as_slice().first().is_some_and(|name| name == "i"))
        .map(|tag| {
            tag.as_slice()
                .iter()
                .map(|v| escaped_len(v) + 3)
                .sum::<usize>()
                + 2
        })
        .sum();
    escaped_len(request_json)
        + inputs
        + (max_tokens as usize).saturating_mul(RESULT_BYTES_PER_TOKEN)
        + RESULT_OVERHEAD_BYTES
}

/// The length of `s` as a JSON string body: quotes and backslashes double, control
/// characters take up to six bytes.
fn escaped_len(s: &str) -> usize {
    s.len()
        + s.bytes()
            .map(|b| match b {
                b'"' | b'\\' => 1,
                0..=0x1f => 5,
                _ => 0,
            })
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{EventBuilder, JsonUtil, Keys};

    use super::*;
    use crate::signatures::sign;

    fn request() -> Event {
        EventBuilder::new(Kind::from(5050), "")
            .tags([Tag::parse(["i", "hello", "text"]).expect("tag")])
            .sign_with_keys(&Keys::generate())
            .expect("sign")
    }

    fn values(event: &Event, name: &str) -> Vec<Vec<String>> {
        event
            .tags
            .iter()
            .filter(|t| t.as_slice()[0] == name)
            .map(|t| t.as_slice()[1..].to_vec())
            .collect()
    }

    #[test]
    fn payment_required_feedback() {
        let req = request();
        let amount = PaymentAmount {
            msat: 21_000,
            bolt11: Some("lnbcrt210n1...".to_owned()),
        };
        let fb = sign(
            feedback(&req, JobStatus::PaymentRequired, "pay", Some(&amount)),
            &Keys::generate(),
        );
        assert_eq!(fb.kind.as_u16(), 7000);
        assert_eq!(values(&fb, "status"), vec![vec!["payment-required", "pay"]]);
        assert_eq!(values(&fb, "amount"), vec![vec!["21000", "lnbcrt210n1..."]]);
        assert_eq!(values(&fb, "e"), vec![vec![req.id.to_hex()]]);
        assert_eq!(values(&fb, "p"), vec![vec![req.pubkey.to_hex()]]);
    }

    #[test]
    fn the_result_size_bound_holds_for_a_full_completion() {
        let req = EventBuilder::new(Kind::from(5050), "")
            .tags([
                Tag::parse(["i", "say \"hi\"\n\\ twice", "text"]).expect("tag"),
                Tag::parse(["param", "max_tokens", "50"]).expect("tag"),
            ])
            .sign_with_keys(&Keys::generate())
            .expect("sign");
        let json = req.as_json();
        // The worst completion the bound allows: 50 tokens of 4 bytes that each escape.
        let content = "\"\\".repeat(50);
        // The longest receipt: every figure at its widest.
        let receipt = Receipt {
            prompt_tokens: u32::MAX,
            completion_tokens: u32::MAX,
            rates: crate::pricing::RateCard {
                base_fee_msat: u64::MAX,
                prompt_msat_per_1k_tokens: u64::MAX,
                completion_msat_per_1k_tokens: u64::MAX,
            },
            paid_msat: u64::MAX,
            charged_msat: u64::MAX,
            returned_msat: u64::MAX,
            finish: crate::pricing::Finish::Budget,
        };
        let ask = PaymentAmount {
            msat: u64::MAX,
            bolt11: Some(format!("lnbcrt{}", "q".repeat(400))),
        };
        let res = sign(
            result(&req, &content, Some(&receipt), Some(&ask)),
            &Keys::generate(),
        );
        let bound = result_size_bound(&req, &json, 50);
        assert!(
            res.as_json().len() <= bound,
            "{} > {bound}",
            res.as_json().len()
        );
        assert!(
            bound < res.as_json().len() + RESULT_OVERHEAD_BYTES,
            "not wildly high"
        );
    }

    #[test]
    fn result_carries_request_and_inputs() {
        let req = request();
        let usage = crate::infer::Usage {
            prompt_tokens: 20,
            completion_tokens: 46,
        };
        let rates = crate::pricing::RateCard::default();
        let receipt = Receipt::new(rates, usage, 2_000, crate::pricing::Finish::Stop);
        let res = sign(
            result(&req, "hi there", Some(&receipt), None),
            &Keys::generate(),
        );
        assert_eq!(res.kind.as_u16(), 6050);
        assert_eq!(res.content, "hi there");
        let embedded = &values(&res, "request")[0][0];
        assert_eq!(Event::from_json(embedded).expect("request json"), req);
        assert_eq!(values(&res, "i"), vec![vec!["hello", "text"]]);
        // 1000 base + 40 for 20 prompt tokens + 460 for 46 completion tokens, charged; and
        // nothing asked, since it was paid for.
        assert_eq!(values(&res, "charged"), vec![vec!["1500"]]);
        assert!(values(&res, "amount").is_empty());
        assert_eq!(values(&res, "usage"), vec![vec!["20", "46"]]);
        assert_eq!(values(&res, "rates"), vec![vec!["1000", "2000", "10000"]]);
        assert_eq!(values(&res, "paid"), vec![vec!["2000"]]);
        assert_eq!(values(&res, "returned"), vec![vec!["500"]]);
        assert_eq!(values(&res, "finish"), vec![vec!["stop"]]);
        assert_eq!(values(&res, "e"), vec![vec![req.id.to_hex()]]);
    }

    #[test]
    fn a_pay_after_result_asks_for_its_invoice() {
        let req = request();
        let usage = crate::infer::Usage {
            prompt_tokens: 20,
            completion_tokens: 46,
        };
        let receipt = Receipt::owed(
            crate::pricing::RateCard::default(),
            usage,
            10_000,
            crate::pricing::Finish::Stop,
        );
        let ask = PaymentAmount {
            msat: 2_000,
            bolt11: Some("lnbcrt20n1...".to_owned()),
        };
        let res = sign(
            result(&req, "hi there", Some(&receipt), Some(&ask)),
            &Keys::generate(),
        );
        assert_eq!(values(&res, "amount"), vec![vec!["2000", "lnbcrt20n1..."]]);
        assert_eq!(values(&res, "charged"), vec![vec!["1500"]]);
        assert_eq!(values(&res, "paid"), vec![vec!["0"]]);
    }
}
