//! Event ids and signatures, checked once per process.
//!
//! A Schnorr check is a pure function of the pubkey, the id and the signature, and the id is the
//! SHA-256 of everything else in the event. So once a signature is known good for an id, because
//! this process made it or verified it in full, an event that carries the same id and signature,
//! and whose id is the hash of its content, is that same valid event: checking it again costs a
//! hash, not a Schnorr verification.
//!
//! Under load one process checks the same event several times: a job request in the embedded
//! relay, in the relay pool that receives it, and in intake; a result in the embedded relay
//! right after we signed it. Each Schnorr verification was 1.5-2% of the daemon's CPU under load.
//! One bounded memo serves every check in the process: dvmd's own ([`verify`], which
//! [`crate::nip90::Verified::check`] and the embedded relay call) and the relay pool's, which
//! [`install`] routes here (`vendor/nostr-relay-pool/DVMD-PATCH.md` §3).
//!
//! The memo is a cache of facts that hold everywhere, so sharing it between the daemon, the
//! customer library and tests in one process is sound; what it forgets is verified in full.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::{LazyLock, Mutex};

use nostr_sdk::secp256k1::Message;
use nostr_sdk::{
    Event, EventBuilder, EventId, Keys, Kind, PublicKey, Tag, TagKind, Tags, Timestamp,
    UnsignedEvent,
};
use sha2::{Digest, Sha256};

/// Pairs remembered; the oldest go first. An event is checked again within moments of its first
/// check (sent and relayed, or received and admitted), so this only has to cover those moments.
const CAPACITY: usize = 4096;

static PROCESS: LazyLock<Memo> = LazyLock::new(Memo::default);

/// Whether `event` is valid: its id is the hash of its content and its signature verifies for
/// that id (in full, or remembered from a check made before).
pub fn verify(event: &Event) -> bool {
    check(event).is_ok()
}

/// [`verify`], saying which part is wrong.
pub fn check(event: &Event) -> Result<(), nostr_sdk::event::Error> {
    PROCESS.check(event)
}

/// Remember `event`, which this process signed, as valid.
pub fn remember_signed(event: &Event) {
    PROCESS.remember(event);
}

/// What [`sign`] signs: nostr's `EventBuilder`, or a [`Draft`].
pub trait Unsigned {
    /// The event to sign by `author`, its id computed.
    fn prepare(self, author: PublicKey) -> UnsignedEvent;
}

/// nostr's `sign_with_keys` computes the id twice (once to build, once more to check the id it
/// just computed); this signs the built id. Builders that mine proof of work are signed the same
/// way: the id built is the one mined.
impl Unsigned for EventBuilder {
    fn prepare(self, author: PublicKey) -> UnsignedEvent {
        self.build(author)
    }
}

/// An event as dvmd builds the ones it signs for every job (feedback, results, job labels):
/// a kind, tags and content, dated when signed unless given a date. Signed, it is the event
/// nostr's `EventBuilder` with the same parts builds (tests hold the two to the same id), but
/// its id is hashed straight from the parts ([`expected_id`]'s way), not through nostr's
/// `EventId::new`, which copies every tag into a `serde_json::Value` first: 1.9% of the
/// daemon's CPU under `dvmd bench load`.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    kind: Kind,
    tags: Vec<Tag>,
    content: String,
    created_at: Option<Timestamp>,
}

impl Draft {
    /// A draft of `kind` with `content` and no tags.
    pub fn new(kind: Kind, content: impl Into<String>) -> Self {
        Self {
            kind,
            tags: Vec::new(),
            content: content.into(),
            created_at: None,
        }
    }

    /// Add `tags`.
    pub fn tags(mut self, tags: impl IntoIterator<Item = Tag>) -> Self {
        self.tags.extend(tags);
        self
    }

    /// Add `tag` if there is one.
    pub fn tag_maybe(mut self, tag: Option<Tag>) -> Self {
        self.tags.extend(tag);
        self
    }

    /// Date it `created_at` rather than when it is signed.
    pub fn custom_created_at(mut self, created_at: Timestamp) -> Self {
        self.created_at = Some(created_at);
        self
    }
}

impl From<Draft> for EventBuilder {
    fn from(draft: Draft) -> Self {
        let builder = EventBuilder::new(draft.kind, draft.content).tags(draft.tags);
        match draft.created_at {
            Some(at) => builder.custom_created_at(at),
            None => builder,
        }
    }
}

impl Unsigned for Draft {
    fn prepare(self, author: PublicKey) -> UnsignedEvent {
        let mut tags = self.tags;
        // As nostr's builder does by default: no `p` tag naming the author.
        let author_hex = author.to_hex();
        tags.retain(|tag| !(tag.kind() == TagKind::p() && tag.content() == Some(&author_hex)));
        let tags = Tags::from_list(tags);
        let created_at = self.created_at.unwrap_or_else(Timestamp::now);
        let id = event_id(&author, &created_at, &self.kind, &tags, &self.content);
        UnsignedEvent {
            id: Some(id),
            pubkey: author,
            created_at,
            kind: self.kind,
            tags,
            content: self.content,
        }
    }
}

/// Sign `unsigned` with `keys`.
///
/// The signature's auxiliary randomness (BIP-340) comes from the thread's CSPRNG (ChaCha,
/// seeded and reseeded from the OS), not from a `getrandom` system call per signature as
/// nostr's `Keys::sign_schnorr` draws it.
pub fn sign(unsigned: impl Unsigned, keys: &Keys) -> Event {
    let mut event = unsigned.prepare(keys.public_key());
    // Computed by `prepare`: read, not computed again.
    let id = event.id();
    let sig = keys.sign_schnorr_with_ctx(
        nostr_sdk::SECP256K1,
        &Message::from_digest(id.to_bytes()),
        &mut rand::thread_rng(),
    );
    Event::new(
        id,
        event.pubkey,
        event.created_at,
        event.kind,
        event.tags,
        event.content,
        sig,
    )
}

/// Route the relay pool's verification of what relays send through [`verify`], and its writing
/// of events through [`crate::event_json::to_json`] (the same bytes as nostr's), in every pool
/// of this process. Idempotent.
pub fn install() {
    nostr_sdk::pool::install_event_check(verify);
    nostr_sdk::pool::install_event_json(crate::event_json::to_json);
}

/// The id `event` must have: the SHA-256 of `[0, pubkey, created_at, kind, tags, content]`,
/// serialized straight into the hash. nostr's `EventId::new` builds a `serde_json::Value` of
/// the same array first (a copy of every tag and of the content), then a string; the bytes
/// hashed are the same.
pub fn expected_id(event: &Event) -> EventId {
    event_id(
        &event.pubkey,
        &event.created_at,
        &event.kind,
        &event.tags,
        &event.content,
    )
}

fn event_id(
    pubkey: &PublicKey,
    created_at: &Timestamp,
    kind: &Kind,
    tags: &Tags,
    content: &str,
) -> EventId {
    let mut hash = HashWriter(Sha256::new());
    let array = (0u8, pubkey, created_at, kind, tags, content);
    // Writing into a hash cannot fail, and these types serialize infallibly.
    let _ = serde_json::to_writer(&mut hash, &array);
    EventId::from_byte_array(hash.0.finalize().into())
}

struct HashWriter(Sha256);

impl Write for HashWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Signatures known good, by id, oldest first out.
#[derive(Default)]
struct Memo(Mutex<Remembered>);

#[derive(Default)]
struct Remembered {
    sigs: HashMap<EventId, [u8; 64]>,
    order: VecDeque<EventId>,
}

impl Memo {
    fn remember(&self, event: &Event) {
        let mut memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if memo.sigs.insert(event.id, event.sig.serialize()).is_none() {
            memo.order.push_back(event.id);
        }
        while memo.order.len() > CAPACITY {
            if let Some(oldest) = memo.order.pop_front() {
                memo.sigs.remove(&oldest);
            }
        }
    }

    fn knows(&self, event: &Event) -> bool {
        let memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        memo.sigs
            .get(&event.id)
            .is_some_and(|sig| *sig == event.sig.serialize())
    }

    fn check(&self, event: &Event) -> Result<(), nostr_sdk::event::Error> {
        if expected_id(event) != event.id {
            return Err(nostr_sdk::event::Error::InvalidId);
        }
        if self.knows(event) {
            return Ok(());
        }
        if !event.verify_signature() {
            return Err(nostr_sdk::event::Error::InvalidSignature);
        }
        self.remember(event);
        Ok(())
    }

    #[cfg(test)]
    fn verify(&self, event: &Event) -> bool {
        self.check(event).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{EventBuilder, JsonUtil, Keys, Kind, Tag, TagKind};

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
    fn the_id_is_nostrs_for_any_content_and_tags() {
        let keys = Keys::generate();
        let awkward = [
            "",
            "plain",
            "quotes \" and \\ backslashes / slashes",
            "controls \u{0}\u{1}\u{8}\u{9}\n\r\u{c}\u{1f}\u{7f}",
            "unicode é 中文 🦀 \u{2028}\u{2029}",
            r#"{"kind":5050,"content":"a request, quoted in a result"}"#,
        ];
        for (n, text) in awkward.iter().enumerate() {
            let event = EventBuilder::new(Kind::from(5050 + n as u16), *text)
                .tags([
                    Tag::custom(TagKind::custom("i"), [*text, "text"]),
                    Tag::custom(TagKind::custom("param"), ["max_tokens", "16"]),
                    Tag::custom(TagKind::custom("empty"), Vec::<String>::new()),
                    Tag::public_key(keys.public_key()),
                ])
                .sign_with_keys(&keys)
                .expect("signs");
            assert_eq!(expected_id(&event), event.id, "content {text:?}");
            assert!(event.verify_id());
        }
    }

    #[test]
    fn a_draft_signs_to_the_event_nostrs_builder_makes() {
        let keys = Keys::generate();
        let customer = Keys::generate().public_key();
        let at = Timestamp::from_secs(1_700_000_000);
        let awkward = "a \"quoted\" answer \\ with controls \u{0}\u{1f} and 🦀 \u{2028}";
        let drafts = [
            Draft::new(Kind::from(7000), "")
                .tags([
                    Tag::custom(TagKind::custom("status"), ["processing", awkward]),
                    Tag::public_key(customer),
                ])
                .tag_maybe(Some(Tag::custom(TagKind::custom("amount"), ["21000"]))),
            // A `p` tag naming the author is dropped, as nostr's builder drops it.
            Draft::new(Kind::from(6050), awkward).tags([
                Tag::custom(TagKind::custom("request"), [r#"{"content":"\"hi\""}"#]),
                Tag::public_key(keys.public_key()),
                Tag::public_key(customer),
            ]),
            Draft::new(Kind::Label, "").tag_maybe(None),
        ];
        for draft in drafts {
            let draft = draft.custom_created_at(at);
            let ours = sign(draft.clone(), &keys);
            let theirs = EventBuilder::from(draft)
                .sign_with_keys(&keys)
                .expect("signs");
            assert_eq!(ours.id, theirs.id, "the same event");
            assert_eq!(
                (ours.created_at, ours.kind, &ours.tags, &ours.content),
                (
                    theirs.created_at,
                    theirs.kind,
                    &theirs.tags,
                    &theirs.content
                )
            );
            assert!(ours.verify().is_ok(), "nostr verifies it in full");
        }
        let undated = sign(Draft::new(Kind::from(7000), ""), &keys);
        assert!(
            undated
                .created_at
                .as_secs()
                .abs_diff(Timestamp::now().as_secs())
                < 60
        );
    }

    #[test]
    fn what_sign_signs_verifies_as_nostr_signs_it() {
        let keys = Keys::generate();
        let builder = EventBuilder::new(Kind::from(7000), "processing \"quoted\" 🦀")
            .tags([Tag::custom(TagKind::custom("status"), ["processing"])]);
        let ours = sign(builder.clone(), &keys);
        assert!(ours.verify().is_ok(), "nostr verifies it in full");
        assert_eq!(ours.pubkey, keys.public_key());
        let theirs = builder.sign_with_keys(&keys).expect("signs");
        assert_eq!(
            (ours.kind, &ours.tags, &ours.content),
            (theirs.kind, &theirs.tags, &theirs.content)
        );
    }

    #[test]
    fn a_remembered_signature_vouches_only_for_the_same_event() {
        let (us, them) = (Keys::generate(), Keys::generate());
        let memo = Memo::default();
        let result = signed(&us, "the answer");
        memo.remember(&result);
        assert!(memo.verify(&result), "ours, as signed");

        // Our id and signature on other content, or under another pubkey: the id no longer
        // matches.
        let content = altered(&result, "content", "another answer".into());
        assert!(!memo.verify(&content));
        let pubkey = altered(&result, "pubkey", them.public_key().to_hex().into());
        assert!(!memo.verify(&pubkey));

        // Our id with a signature we did not make: verified in full, and refused.
        let other = signed(&us, "something else");
        let sig = altered(&result, "sig", other.sig.to_string().into());
        assert!(!memo.verify(&sig));
        assert!(!memo.knows(&sig), "a refused event is not remembered");

        // Someone else's event is verified in full, then remembered; a forgery under its id
        // is not.
        let theirs = signed(&them, "a request");
        assert!(!memo.knows(&theirs));
        assert!(memo.verify(&theirs));
        assert!(memo.knows(&theirs), "verified once, remembered");
        let forged = altered(&theirs, "sig", other.sig.to_string().into());
        assert!(!memo.verify(&forged));

        // What is remembered is trusted for its id without the Schnorr check (which is the
        // point): were the wrong signature above remembered, it would pass.
        memo.remember(&sig);
        assert!(memo.verify(&sig));
    }

    #[test]
    fn it_remembers_a_bounded_number_and_forgotten_ones_are_verified_in_full() {
        let keys = Keys::generate();
        let memo = Memo::default();
        let first = signed(&keys, "first");
        memo.remember(&first);
        memo.remember(&first);
        for i in 0..CAPACITY {
            memo.remember(&signed(&keys, &i.to_string()));
        }
        {
            let remembered = memo.0.lock().expect("lock");
            assert_eq!(remembered.sigs.len(), CAPACITY);
            assert_eq!(remembered.order.len(), CAPACITY);
        }
        assert!(!memo.knows(&first), "the oldest went first");
        assert!(
            memo.verify(&first),
            "a forgotten valid event still verifies"
        );
    }
}
