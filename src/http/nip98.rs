//! NIP-98 HTTP auth (`Authorization: Nostr <base64 event>`): who signed a request, checked
//! against this exact request, and never accepted twice.
//!
//! The event must be kind 27235 with a `u` tag equal to the public URL of the request (query
//! included), a `method` tag equal to its method (compared case-insensitively: npm nostr-tools
//! sends what the caller wrote), and a `created_at` within the configured window of now. A
//! non-empty body needs a `payload` tag: the sha256 of the raw body, or of the body with JSON's
//! insignificant whitespace removed (what `JSON.stringify` gives for a parsed body, so the hash
//! npm nostr-tools' `getToken` puts in is accepted for a pretty-printed body too). An empty body
//! may carry a `payload` of the empty string's hash, or none. The id and signature are verified
//! last, and the event id is then remembered for the window: a replay is refused. The replay
//! cache never forgets an id still inside the window; when it is full, requests are refused
//! (retry later) rather than let a replay through. Two identical requests within one second
//! need two distinct events: add any tag (a `nonce`) to the second.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;

use base64::Engine;
use bitcoin::hashes::{sha256, Hash};
use nostr_sdk::{Event, EventId, JsonUtil, Kind, PublicKey, Timestamp};

/// NIP-98's event kind.
pub const HTTP_AUTH_KIND: u16 = 27235;
/// The largest `Authorization` value read, bytes (an auth event is a few hundred).
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Why a NIP-98 header was refused. The text is the reason the caller is given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing Authorization header (NIP-98: `Nostr <base64 event>`)")]
    Missing,
    /// Not `Nostr <base64>`, not base64, not an event, or too large.
    #[error("malformed NIP-98 header: {0}")]
    Malformed(String),
    /// Not kind 27235.
    #[error("the auth event is kind {0}, not 27235")]
    WrongKind(u16),
    /// `u` is not this request's URL.
    #[error("the auth event is for {signed}, not {request}")]
    WrongUrl {
        /// What was signed.
        signed: String,
        /// This request.
        request: String,
    },
    /// `method` is not this request's method.
    #[error("the auth event is for method {signed}, not {request}")]
    WrongMethod {
        /// What was signed.
        signed: String,
        /// This request.
        request: String,
    },
    /// `created_at` outside the window.
    #[error(
        "the auth event was signed {delta_secs} s from now; at most {window_secs} s is accepted"
    )]
    Stale {
        /// Signed minus now, seconds.
        delta_secs: i64,
        /// The window.
        window_secs: u64,
    },
    /// A body without a `payload` tag.
    #[error(
        "the request has a body, so the auth event needs a `payload` tag (sha256 of the body)"
    )]
    PayloadMissing,
    /// The `payload` tag is not the body's hash.
    #[error("the auth event's `payload` is not the sha256 of this body")]
    PayloadMismatch,
    /// Bad id or signature.
    #[error("the auth event's id or signature does not verify")]
    BadSignature,
    /// Seen before.
    #[error("this auth event was already used; sign a new one for each request")]
    Replayed,
    /// The replay cache is full of live ids.
    #[error("too many signed requests right now; retry in a minute")]
    Busy,
}

/// A request NIP-98 authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authorized {
    /// Who signed it: the account it is billed to.
    pub pubkey: PublicKey,
    /// The auth event.
    pub event_id: EventId,
}

/// Checks NIP-98 headers and remembers the events it accepted.
pub struct Verifier {
    window_secs: u64,
    capacity: usize,
    /// Accepted event ids, and the same in the order they may be forgotten.
    seen: Mutex<Seen>,
}

/// The replay cache: a set for lookups and a queue by expiry, so forgetting what left the
/// window costs O(1) per id rather than a scan of the whole set.
#[derive(Default)]
struct Seen {
    ids: HashSet<EventId>,
    /// Live ids by the client address that presented them (see [`Verifier::client_share`]).
    per_client: HashMap<IpAddr, usize>,
    /// (forget at, unix seconds; id), in the order they were accepted. Expiry is the accept
    /// time plus a constant, so the queue is in expiry order (a clock stepping back only keeps
    /// an id longer).
    by_expiry: VecDeque<(u64, EventId, Option<IpAddr>)>,
}

impl Verifier {
    /// A verifier accepting events signed within `window_secs` of now, remembering at most
    /// `capacity` of them.
    pub fn new(window_secs: u64, capacity: usize) -> Self {
        Self {
            window_secs,
            capacity: capacity.max(1),
            seen: Mutex::default(),
        }
    }

    /// The most live ids one client address may hold: an eighth of the cache. Keys cost
    /// nothing, so without a share one address signing hundreds of requests a second with
    /// fresh keys filled the cache, and every NIP-98 caller got 429 until it drained. This
    /// host ([`crate::limits::is_this_host`]) has no share of its own.
    fn client_share(&self) -> usize {
        (self.capacity / 8).max(1)
    }

    /// Check `header` against the request (`url` as the public sees it, query included;
    /// `method`; the raw `body`) at `now`, from `client` (the caller's address, as
    /// `trusted_proxies` let it be read).
    pub fn verify(
        &self,
        client: IpAddr,
        header: Option<&str>,
        url: &str,
        method: &str,
        body: &[u8],
        now: Timestamp,
    ) -> Result<Authorized, AuthError> {
        let event = decode(header.ok_or(AuthError::Missing)?)?;
        if event.kind != Kind::from(HTTP_AUTH_KIND) {
            return Err(AuthError::WrongKind(event.kind.as_u16()));
        }
        let signed_url = tag(&event, "u").unwrap_or_default();
        if signed_url != url {
            return Err(AuthError::WrongUrl {
                signed: signed_url.to_owned(),
                request: url.to_owned(),
            });
        }
        let signed_method = tag(&event, "method").unwrap_or_default();
        if !signed_method.eq_ignore_ascii_case(method) {
            return Err(AuthError::WrongMethod {
                signed: signed_method.to_owned(),
                request: method.to_owned(),
            });
        }
        let delta_secs = event.created_at.as_secs() as i64 - now.as_secs() as i64;
        if delta_secs.unsigned_abs() > self.window_secs {
            return Err(AuthError::Stale {
                delta_secs,
                window_secs: self.window_secs,
            });
        }
        match tag(&event, "payload") {
            None if body.is_empty() => {}
            None => return Err(AuthError::PayloadMissing),
            Some(payload) => {
                if !payload_matches(payload, body) {
                    return Err(AuthError::PayloadMismatch);
                }
            }
        }
        event.verify().map_err(|_| AuthError::BadSignature)?;
        self.remember(event.id, now, client)?;
        Ok(Authorized {
            pubkey: event.pubkey,
            event_id: event.id,
        })
    }

    /// Record `id`, presented by `client`, as used until it can no longer be inside the
    /// window.
    fn remember(&self, id: EventId, now: Timestamp, client: IpAddr) -> Result<(), AuthError> {
        let now = now.as_secs();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let Seen {
            ids,
            per_client,
            by_expiry,
        } = &mut *seen;
        while let Some(&(forget_at, old, by)) = by_expiry.front() {
            if forget_at > now {
                break;
            }
            by_expiry.pop_front();
            ids.remove(&old);
            if let Some(by) = by {
                if let Some(count) = per_client.get_mut(&by) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        per_client.remove(&by);
                    }
                }
            }
        }
        if ids.contains(&id) {
            return Err(AuthError::Replayed);
        }
        if ids.len() >= self.capacity {
            // Every id held could still be replayed: refuse rather than forget one.
            return Err(AuthError::Busy);
        }
        // The address whose share this counts against; this host has none.
        let by = (!crate::limits::is_this_host(client)).then(|| crate::limits::address_key(client));
        if let Some(by) = by {
            let count = per_client.entry(by).or_default();
            if *count >= self.client_share() {
                return Err(AuthError::Busy);
            }
            *count += 1;
        }
        // An event signed up to `window` in the future stays valid until `now + 2 window`.
        ids.insert(id);
        by_expiry.push_back((now + 2 * self.window_secs + 1, id, by));
        Ok(())
    }
}

fn decode(header: &str) -> Result<Event, AuthError> {
    let malformed = |why: &str| AuthError::Malformed(why.to_owned());
    if header.len() > MAX_HEADER_BYTES {
        return Err(malformed("the header is too large"));
    }
    let encoded = header
        .strip_prefix("Nostr ")
        .ok_or_else(|| malformed("the scheme is not `Nostr`"))?
        .trim();
    let json = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| malformed("not base64"))?;
    Event::from_json(json).map_err(|e| AuthError::Malformed(format!("not a Nostr event: {e}")))
}

fn tag<'a>(event: &'a Event, name: &str) -> Option<&'a str> {
    event.tags.iter().find_map(|tag| match tag.as_slice() {
        [key, value, ..] if key == name => Some(value.as_str()),
        _ => None,
    })
}

fn payload_matches(payload: &str, body: &[u8]) -> bool {
    let hex = |bytes: &[u8]| hex::encode(sha256::Hash::hash(bytes).to_byte_array());
    let payload = payload.to_ascii_lowercase();
    payload == hex(body) || compact_json(body).is_some_and(|compact| payload == hex(&compact))
}

/// `body` without JSON's insignificant whitespace (outside strings), if it has any.
fn compact_json(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in body {
        if in_string {
            out.push(b);
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            continue;
        } else {
            if b == b'"' {
                in_string = true;
            }
            out.push(b);
        }
    }
    (out.len() != body.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{EventBuilder, Keys, Tag};

    use super::*;

    const URL: &str = "https://dvmd.example/v1/chat/completions?x=1";
    /// This host: no share of the replay cache of its own.
    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn header(keys: &Keys, kind: u16, tags: &[(&str, &str)], at: Timestamp) -> String {
        let tags = tags.iter().map(|(k, v)| Tag::parse([*k, *v]).expect("tag"));
        let event = EventBuilder::new(Kind::from(kind), "")
            .tags(tags)
            .custom_created_at(at)
            .sign_with_keys(keys)
            .expect("sign");
        let json = event.as_json();
        format!(
            "Nostr {}",
            base64::engine::general_purpose::STANDARD.encode(json)
        )
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(sha256::Hash::hash(bytes).to_byte_array())
    }

    #[test]
    fn a_good_header_passes_once() {
        let (keys, now) = (Keys::generate(), Timestamp::now());
        let body = br#"{"model": "m", "messages": []}"#;
        let h = header(
            &keys,
            HTTP_AUTH_KIND,
            &[("u", URL), ("method", "post"), ("payload", &sha(body))],
            now,
        );
        let verifier = Verifier::new(60, 100);
        let ok = verifier
            .verify(CLIENT, Some(&h), URL, "POST", body, now)
            .expect("valid");
        assert_eq!(ok.pubkey, keys.public_key());
        assert_eq!(
            verifier.verify(CLIENT, Some(&h), URL, "POST", body, now),
            Err(AuthError::Replayed)
        );
    }

    #[test]
    fn the_json_stringify_hash_of_a_pretty_body_is_accepted() {
        let (keys, now) = (Keys::generate(), Timestamp::now());
        let pretty = b"{\n  \"model\": \"m\",\n  \"text\": \"a \\\" b  c\"\n}";
        let compact = br#"{"model":"m","text":"a \" b  c"}"#;
        let h = header(
            &keys,
            HTTP_AUTH_KIND,
            &[("u", URL), ("method", "POST"), ("payload", &sha(compact))],
            now,
        );
        let verifier = Verifier::new(60, 100);
        verifier
            .verify(CLIENT, Some(&h), URL, "POST", pretty, now)
            .expect("the compact form's hash");
    }

    #[test]
    fn every_mismatch_is_refused_with_its_reason() {
        let (keys, now) = (Keys::generate(), Timestamp::now());
        let body = b"{}";
        let good = [
            ("u", URL),
            ("method", "POST"),
            ("payload", &sha(body) as &str),
        ];
        let v = Verifier::new(60, 100);
        let check = |h: &str, url: &str, method: &str, body: &[u8]| {
            v.verify(CLIENT, Some(h), url, method, body, now)
                .expect_err("refused")
        };
        let h = header(&keys, HTTP_AUTH_KIND, &good, now);
        assert!(matches!(
            check(&h, "https://dvmd.example/v1/chat/completions", "POST", body),
            AuthError::WrongUrl { .. }
        ));
        assert!(matches!(
            check(&h, URL, "GET", body),
            AuthError::WrongMethod { .. }
        ));
        assert_eq!(check(&h, URL, "POST", b"{ }x"), AuthError::PayloadMismatch);
        let no_payload = header(&keys, HTTP_AUTH_KIND, &good[..2], now);
        assert_eq!(
            check(&no_payload, URL, "POST", body),
            AuthError::PayloadMissing
        );
        let wrong_kind = header(&keys, 1, &good, now);
        assert_eq!(
            check(&wrong_kind, URL, "POST", body),
            AuthError::WrongKind(1)
        );
        for at in [now.as_secs() - 61, now.as_secs() + 61] {
            let h = header(&keys, HTTP_AUTH_KIND, &good, Timestamp::from_secs(at));
            assert!(matches!(
                check(&h, URL, "POST", body),
                AuthError::Stale { .. }
            ));
        }
        // A valid event with its content changed: the id no longer matches.
        let json = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(h.strip_prefix("Nostr ").expect("scheme"))
                .expect("b64"),
        )
        .expect("utf-8")
        .replace("\"content\":\"\"", "\"content\":\"x\"");
        let forged = format!(
            "Nostr {}",
            base64::engine::general_purpose::STANDARD.encode(json)
        );
        assert_eq!(check(&forged, URL, "POST", body), AuthError::BadSignature);
        assert!(matches!(
            check("Bearer abc", URL, "POST", body),
            AuthError::Malformed(_)
        ));
        assert!(matches!(
            check("Nostr !!!", URL, "POST", body),
            AuthError::Malformed(_)
        ));
        assert_eq!(
            v.verify(CLIENT, None, URL, "POST", body, now),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn one_address_holds_at_most_an_eighth_of_the_replay_cache() {
        let now = Timestamp::now();
        let v = Verifier::new(60, 16);
        let mut nonce = 0;
        let mut call = |client: &str| {
            nonce += 1;
            let h = header(
                &Keys::generate(),
                HTTP_AUTH_KIND,
                &[("u", URL), ("method", "GET"), ("nonce", &nonce.to_string())],
                now,
            );
            v.verify(client.parse().expect("ip"), Some(&h), URL, "GET", b"", now)
        };
        // Fresh keys each time, as a flood would sign: the address is what counts.
        assert!(call("203.0.113.7").is_ok());
        assert!(call("203.0.113.7").is_ok());
        assert_eq!(call("203.0.113.7"), Err(AuthError::Busy));
        assert_eq!(call("::ffff:203.0.113.7"), Err(AuthError::Busy));
        assert!(call("203.0.113.8").is_ok());
        // IPv6 by its /64.
        assert!(call("2001:db8::1").is_ok());
        assert!(call("2001:db8::2").is_ok());
        assert_eq!(call("2001:db8::3"), Err(AuthError::Busy));
        assert!(call("2001:db8:0:1::1").is_ok());
        // This host has no share of its own.
        for _ in 0..5 {
            assert!(call("127.0.0.1").is_ok());
        }
    }

    #[test]
    fn a_full_replay_cache_refuses_rather_than_forgets() {
        let (keys, now) = (Keys::generate(), Timestamp::now());
        let v = Verifier::new(60, 2);
        let sign = |nonce: &str| {
            header(
                &keys,
                HTTP_AUTH_KIND,
                &[("u", URL), ("method", "GET"), ("nonce", nonce)],
                now,
            )
        };
        let first = sign("1");
        v.verify(CLIENT, Some(&first), URL, "GET", b"", now)
            .expect("1");
        v.verify(CLIENT, Some(&sign("2")), URL, "GET", b"", now)
            .expect("2");
        assert_eq!(
            v.verify(CLIENT, Some(&sign("3")), URL, "GET", b"", now),
            Err(AuthError::Busy)
        );
        // Once the window has passed, old ids make room; a replay of a forgotten id is stale.
        let later = Timestamp::from_secs(now.as_secs() + 200);
        let fresh = header(
            &keys,
            HTTP_AUTH_KIND,
            &[("u", URL), ("method", "GET"), ("nonce", "4")],
            later,
        );
        v.verify(CLIENT, Some(&fresh), URL, "GET", b"", later)
            .expect("room again");
        assert!(matches!(
            v.verify(CLIENT, Some(&first), URL, "GET", b"", later),
            Err(AuthError::Stale { .. })
        ));
    }
}
