//! Parsing a NIP-90 job request event into [`JobRequest`], tolerant of what clients send.
//!
//! Parsing never fails on a request of the right kind: a defect is recorded in
//! [`JobRequest::defect`] so the caller can first decide whether the request is for us at all
//! (ignore) before answering a defect with an `error` feedback.

use nostr_sdk::{Event, EventId, PublicKey, Timestamp};

use super::REQUEST_KINDS;

/// At most this many reply relays are taken from a `relays` tag, so a request cannot make us
/// connect to an unbounded list of hosts.
pub const MAX_REPLY_RELAYS: usize = 8;

/// The type of an `i` input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputType {
    /// Literal text.
    Text,
    /// Literal prompt text (used by kind 5050 examples).
    Prompt,
    /// A URL to fetch.
    Url,
    /// A Nostr event id.
    Event,
    /// The output of another job.
    Job,
    /// Anything else the customer wrote.
    Other(String),
}

impl InputType {
    /// The type an `i` tag (or a `/v1/jobs` input) names.
    pub fn parse(s: &str) -> Self {
        match s {
            "text" => Self::Text,
            "prompt" => Self::Prompt,
            "url" => Self::Url,
            "event" => Self::Event,
            "job" => Self::Job,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The tag spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Text => "text",
            Self::Prompt => "prompt",
            Self::Url => "url",
            Self::Event => "event",
            Self::Job => "job",
            Self::Other(s) => s,
        }
    }
}

/// One `["i", value, type, relay?, marker?]` tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInput {
    /// The data (text, URL, id).
    pub value: String,
    /// Its type.
    pub input_type: InputType,
    /// Relay hint for `event` and `job` inputs.
    pub relay: Option<String>,
    /// Free-form marker.
    pub marker: Option<String>,
}

/// The `param` that lets an untargeted request spend the customer's credit (or, set to
/// `false`, keeps a targeted one from spending it).
pub const PAY_FROM_CREDIT: &str = "pay_from_credit";

/// Whether a request is addressed to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targeting {
    /// One of its `p` tags names us.
    Us,
    /// No `p` tags: open to every service.
    Open,
    /// It names only other services: not ours to answer.
    Others,
}

/// Why a request cannot run. Each is answered with an `error` feedback carrying this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A tag dvmd understands has the wrong shape.
    #[error("malformed `{tag}` tag: {reason}")]
    MalformedTag {
        /// The tag name.
        tag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The request has no `i` input.
    #[error("the request has no `i` input")]
    NoInput,
    /// An input type this service does not take (yet).
    #[error("input type `{0}` is not supported by this service yet")]
    UnsupportedInput(String),
    /// A `param` value is out of range or unparsable.
    #[error("param `{name}`: {reason}")]
    BadParam {
        /// The param name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The request (or its inputs) exceeds the configured size cap.
    #[error("request is {size} bytes; this service accepts at most {limit}")]
    TooLarge {
        /// Its size in bytes.
        size: usize,
        /// The cap.
        limit: usize,
    },
    /// The prompt and the completion budget do not fit the model's context window.
    #[error("the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceed the model's context window of {context_tokens} tokens; shorten the prompt or lower max_tokens")]
    ContextOverflow {
        /// Prompt tokens (counted, or estimated high).
        prompt_tokens: u32,
        /// The completion budget.
        max_tokens: u32,
        /// The window.
        context_tokens: u32,
    },
    /// The result could be larger than relays accept.
    #[error("the result could reach {bound} bytes, above the {limit} bytes relays accept; lower max_tokens or shorten the request")]
    ResultTooLarge {
        /// The estimated largest result event, bytes of JSON.
        bound: usize,
        /// The limit.
        limit: usize,
    },
    /// A `model` param naming a model this service does not run.
    #[error("model `{asked}` is not served here; this service runs `{served}` (omit the `model` param or name it)")]
    UnknownModel {
        /// The model asked for.
        asked: String,
        /// The model served.
        served: String,
    },
    /// This service cannot take the job right now (the details are in its log under the
    /// reference given).
    #[error("this service cannot take the job right now ({0}); nothing was charged")]
    Unavailable(String),
    /// Encrypted params are not supported yet.
    #[error("encrypted requests are not supported by this service yet")]
    Encrypted,
}

/// A parsed job request.
#[derive(Debug, Clone)]
pub struct JobRequest {
    /// The request event id (the job id).
    pub id: EventId,
    /// The customer.
    pub customer: PublicKey,
    /// Request kind (5000-5999).
    pub kind: u16,
    /// When the customer signed it.
    pub created_at: Timestamp,
    /// `i` tags in order.
    pub inputs: Vec<JobInput>,
    /// `param` tags in order: (name, value).
    pub params: Vec<(String, String)>,
    /// `output` MIME type, if asked.
    pub output: Option<String>,
    /// Most the customer will pay, in msat.
    pub bid_msat: Option<u64>,
    /// Where the customer wants the answers (ws/wss URLs, at most [`MAX_REPLY_RELAYS`]).
    pub relays: Vec<String>,
    /// Services named by `p` tags.
    pub targets: Vec<PublicKey>,
    /// NIP-40 expiration.
    pub expiration: Option<Timestamp>,
    /// Whether params are encrypted in the content.
    pub encrypted: bool,
    /// The first defect found; the request must be answered with an error, not run.
    pub defect: Option<RequestError>,
}

impl JobRequest {
    /// Parse a request event. Returns `None` for kinds outside 5000-5999. The event signature
    /// must have been verified by the caller.
    pub fn parse(event: &Event) -> Option<Self> {
        let kind = event.kind.as_u16();
        if !REQUEST_KINDS.contains(&kind) {
            return None;
        }
        let mut request = Self {
            id: event.id,
            customer: event.pubkey,
            kind,
            created_at: event.created_at,
            inputs: Vec::new(),
            params: Vec::new(),
            output: None,
            bid_msat: None,
            relays: Vec::new(),
            targets: Vec::new(),
            expiration: None,
            encrypted: false,
            defect: None,
        };
        for tag in event.tags.iter() {
            if let Err(defect) = request.take_tag(tag.as_slice()) {
                request.defect.get_or_insert(defect);
            }
        }
        if request.encrypted {
            request.defect.get_or_insert(RequestError::Encrypted);
        }
        Some(request)
    }

    fn take_tag(&mut self, tag: &[String]) -> Result<(), RequestError> {
        let Some((name, values)) = tag.split_first() else {
            return Ok(());
        };
        match name.as_str() {
            "i" => {
                let value = values.first().ok_or_else(|| malformed("i", "no value"))?;
                let input_type = values
                    .get(1)
                    .ok_or_else(|| malformed("i", "no input type"))?;
                self.inputs.push(JobInput {
                    value: value.clone(),
                    input_type: InputType::parse(input_type),
                    relay: values.get(2).filter(|s| !s.is_empty()).cloned(),
                    marker: values.get(3).filter(|s| !s.is_empty()).cloned(),
                });
            }
            "param" => {
                let (Some(key), Some(value)) = (values.first(), values.get(1)) else {
                    return Err(malformed("param", "expected [\"param\", name, value]"));
                };
                self.params.push((key.clone(), value.clone()));
            }
            "output" => self.output = values.first().cloned(),
            "bid" => {
                let raw = values
                    .first()
                    .ok_or_else(|| malformed("bid", "no amount"))?;
                let msat = raw
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| malformed("bid", format!("`{raw}` is not an amount in msat")))?;
                self.bid_msat = Some(msat);
            }
            "relays" => {
                for url in values {
                    let url = url.trim();
                    if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                        return Err(malformed("relays", format!("`{url}` is not a ws(s) URL")));
                    }
                    if self.relays.len() < MAX_REPLY_RELAYS && !self.relays.iter().any(|r| r == url)
                    {
                        self.relays.push(url.to_owned());
                    }
                }
            }
            "p" => {
                // An unparsable `p` names nobody we can be, so it neither targets us nor others.
                if let Some(pubkey) = values.first().and_then(|hex| PublicKey::from_hex(hex).ok()) {
                    self.targets.push(pubkey);
                }
            }
            "expiration" => {
                let raw = values
                    .first()
                    .ok_or_else(|| malformed("expiration", "no timestamp"))?;
                let secs = raw
                    .parse::<u64>()
                    .map_err(|_| malformed("expiration", format!("`{raw}` is not a unix time")))?;
                self.expiration = Some(Timestamp::from_secs(secs));
            }
            "encrypted" => self.encrypted = true,
            _ => {}
        }
        Ok(())
    }

    /// Whether this request is addressed to `us`.
    pub fn targeting(&self, us: &PublicKey) -> Targeting {
        if self.targets.is_empty() {
            Targeting::Open
        } else if self.targets.contains(us) {
            Targeting::Us
        } else {
            Targeting::Others
        }
    }

    /// Whether the request is stale at `now`: past its NIP-40 expiration, or dated more than
    /// `max_age_secs` away from now, before or after (a request dated far ahead would stay
    /// admissible, and its record could never be pruned, until then).
    pub fn is_stale(&self, now: Timestamp, max_age_secs: u64) -> bool {
        if self.expiration.is_some_and(|exp| exp <= now) {
            return true;
        }
        now.as_secs().abs_diff(self.created_at.as_secs()) > max_age_secs
    }

    /// Whether the customer's credit may pay for this request: always when it names `us` (a
    /// `p` tag), and for an untargeted request only when it carries
    /// `["param", "pay_from_credit", "true"]`, since every service sees those.
    pub fn may_pay_from_credit(&self, us: &PublicKey) -> Result<bool, RequestError> {
        let asked = match self.param(PAY_FROM_CREDIT) {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(other) => {
                return Err(RequestError::BadParam {
                    name: PAY_FROM_CREDIT.to_owned(),
                    reason: format!("`{other}` is neither `true` nor `false`"),
                })
            }
        };
        Ok(asked.unwrap_or(self.targeting(us) == Targeting::Us))
    }

    /// The value of the first `param` named `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

fn malformed(tag: &'static str, reason: impl Into<String>) -> RequestError {
    RequestError::MalformedTag {
        tag,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{EventBuilder, Keys, Kind, Tag};

    use super::*;

    fn event(kind: u16, tags: Vec<Vec<&str>>) -> Event {
        let keys = Keys::generate();
        let tags = tags
            .into_iter()
            .map(|t| Tag::parse(t).expect("tag"))
            .collect::<Vec<_>>();
        EventBuilder::new(Kind::from(kind), "")
            .tags(tags)
            .sign_with_keys(&keys)
            .expect("sign")
    }

    #[test]
    fn credit_is_spent_on_targeted_requests_or_when_asked() {
        let us = Keys::generate().public_key();
        let hex = us.to_hex();
        let may = |tags: Vec<Vec<&str>>| {
            JobRequest::parse(&event(5050, tags))
                .expect("request")
                .may_pay_from_credit(&us)
        };
        assert_eq!(may(vec![vec!["p", &hex]]), Ok(true));
        assert_eq!(may(vec![]), Ok(false), "untargeted: every DVM sees it");
        assert_eq!(
            may(vec![vec!["param", "pay_from_credit", "true"]]),
            Ok(true)
        );
        assert_eq!(
            may(vec![
                vec!["p", &hex],
                vec!["param", "pay_from_credit", "false"]
            ]),
            Ok(false)
        );
        assert!(matches!(
            may(vec![vec!["param", "pay_from_credit", "yes"]]),
            Err(RequestError::BadParam { .. })
        ));
    }

    #[test]
    fn parses_a_full_request() {
        let service = Keys::generate().public_key();
        let ev = event(
            5050,
            vec![
                vec!["i", "What is Nostr?", "text"],
                vec!["i", "nevent1", "event", "wss://r.example", "ctx"],
                vec!["param", "max_tokens", "64"],
                vec!["param", "temperature", "0.2"],
                vec!["bid", "5000"],
                vec![
                    "relays",
                    "wss://a.example",
                    "ws://b.example",
                    "wss://a.example",
                ],
                vec!["output", "text/plain"],
                vec!["p", &service.to_hex()],
                vec!["expiration", "4000000000"],
            ],
        );
        let req = JobRequest::parse(&ev).expect("request kind");
        assert_eq!(req.defect, None);
        assert_eq!(req.kind, 5050);
        assert_eq!(req.inputs.len(), 2);
        assert_eq!(req.inputs[0].input_type, InputType::Text);
        assert_eq!(req.inputs[1].input_type, InputType::Event);
        assert_eq!(req.inputs[1].relay.as_deref(), Some("wss://r.example"));
        assert_eq!(req.inputs[1].marker.as_deref(), Some("ctx"));
        assert_eq!(req.param("max_tokens"), Some("64"));
        assert_eq!(req.bid_msat, Some(5000));
        assert_eq!(req.relays, vec!["wss://a.example", "ws://b.example"]);
        assert_eq!(req.output.as_deref(), Some("text/plain"));
        assert_eq!(req.targeting(&service), Targeting::Us);
        assert_eq!(
            req.targeting(&Keys::generate().public_key()),
            Targeting::Others
        );
        assert_eq!(req.expiration, Some(Timestamp::from_secs(4_000_000_000)));
    }

    #[test]
    fn other_kinds_are_not_requests() {
        assert!(JobRequest::parse(&event(1, vec![])).is_none());
        assert!(JobRequest::parse(&event(7000, vec![])).is_none());
        assert!(JobRequest::parse(&event(6050, vec![])).is_none());
        assert!(JobRequest::parse(&event(4999, vec![])).is_none());
    }

    #[test]
    fn untargeted_requests_are_open() {
        let req = JobRequest::parse(&event(5050, vec![vec!["i", "x", "text"]])).expect("req");
        assert_eq!(
            req.targeting(&Keys::generate().public_key()),
            Targeting::Open
        );
    }

    #[test]
    fn malformed_tags_are_defects_not_failures() {
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["i", "only value"], "no input type"),
            (vec!["i"], "no value"),
            (vec!["bid", "lots"], "not an amount"),
            (vec!["bid", "-5"], "not an amount"),
            (vec!["bid"], "no amount"),
            (vec!["param", "max_tokens"], "expected"),
            (vec!["relays", "https://not-a-relay"], "not a ws(s) URL"),
            (vec!["expiration", "soon"], "not a unix time"),
        ];
        for (tag, why) in cases {
            let req = JobRequest::parse(&event(5050, vec![tag.clone()])).expect("request");
            let defect = req.defect.expect("a defect").to_string();
            assert!(defect.contains(why), "{tag:?}: {defect}");
        }
    }

    #[test]
    fn encrypted_requests_are_refused_for_now() {
        let req = JobRequest::parse(&event(5050, vec![vec!["encrypted"]])).expect("request");
        assert_eq!(req.defect, Some(RequestError::Encrypted));
    }

    #[test]
    fn bad_p_tags_target_nobody() {
        let req = JobRequest::parse(&event(5050, vec![vec!["p", "zz"]])).expect("request");
        assert!(req.targets.is_empty());
        assert_eq!(req.defect, None);
    }

    #[test]
    fn reply_relays_are_capped() {
        let urls: Vec<String> = (0..20).map(|i| format!("wss://r{i}.example")).collect();
        let mut tag = vec!["relays"];
        tag.extend(urls.iter().map(String::as_str));
        let req = JobRequest::parse(&event(5050, vec![tag])).expect("request");
        assert_eq!(req.relays.len(), MAX_REPLY_RELAYS);
    }

    #[test]
    fn staleness() {
        let req = JobRequest::parse(&event(5050, vec![vec!["expiration", "100"]])).expect("req");
        assert!(req.is_stale(Timestamp::now(), u64::MAX));
        let fresh = JobRequest::parse(&event(5050, vec![])).expect("req");
        assert!(!fresh.is_stale(Timestamp::now(), 60));
        let later = Timestamp::from_secs(fresh.created_at.as_secs() + 61);
        assert!(fresh.is_stale(later, 60));
        // Dated ahead: fine within the age, stale beyond it.
        let earlier = Timestamp::from_secs(fresh.created_at.as_secs() - 60);
        assert!(!fresh.is_stale(earlier, 60));
        let much_earlier = Timestamp::from_secs(fresh.created_at.as_secs() - 61);
        assert!(fresh.is_stale(much_earlier, 60));
    }
}
