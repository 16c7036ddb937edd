//! Events written as JSON: byte for byte what nostr's `as_json` writes, in a fraction of its
//! time.
//!
//! Every event dvmd handles is written out several times: each one it signs for the store and
//! for every relay it publishes to, and each one its embedded relay accepts for the store and
//! its subscribers. nostr writes the signature (64 bytes) through `Display`, a `write!` per
//! byte, and the id and the pubkey through a hex string allocated on the way; under
//! `dvmd bench load` the writing was about 6% of the daemon's CPU, half of it formatting hex.
//! Here the three are written from a table straight into the output, which is sized before it
//! is filled; numbers and strings still go through `serde_json`, so their escaping is the same
//! code as nostr's.
//!
//! The keys come in nostr's order (`id`, `pubkey`, `created_at`, `kind`, `tags`, `content`,
//! `sig`) and the output is compact: [`to_json`] equals `event.as_json()`, which the tests check
//! on events with every kind of content.

use nostr_sdk::{Event, Tags};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `event` as JSON, equal to `event.as_json()`.
pub fn to_json(event: &Event) -> String {
    let mut out = Vec::with_capacity(json_len_bound(event));
    write_event(&mut out, event);
    // Only ASCII (hex, digits, punctuation) and whole `str`s are written, so this cannot fail;
    // nostr's writer is the fallback rather than a panic.
    String::from_utf8(out).unwrap_or_else(|_| nostr_sdk::JsonUtil::as_json(event))
}

/// Append `event` as JSON to `out`.
fn write_event(out: &mut Vec<u8>, event: &Event) {
    out.extend_from_slice(b"{\"id\":\"");
    write_hex(out, event.id.as_bytes());
    out.extend_from_slice(b"\",\"pubkey\":\"");
    write_hex(out, event.pubkey.as_bytes());
    out.extend_from_slice(b"\",\"created_at\":");
    write_value(out, &event.created_at.as_secs());
    out.extend_from_slice(b",\"kind\":");
    write_value(out, &event.kind.as_u16());
    out.extend_from_slice(b",\"tags\":");
    write_tags(out, &event.tags);
    out.extend_from_slice(b",\"content\":");
    write_value(out, event.content.as_str());
    out.extend_from_slice(b",\"sig\":\"");
    write_hex(out, event.sig.as_ref());
    out.extend_from_slice(b"\"}");
}

/// Append `tags` as a JSON array of arrays of strings.
fn write_tags(out: &mut Vec<u8>, tags: &Tags) {
    out.push(b'[');
    for (i, tag) in tags.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'[');
        for (j, value) in tag.as_slice().iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            write_value(out, value.as_str());
        }
        out.push(b']');
    }
    out.push(b']');
}

/// Append a number or a string as `serde_json` writes it.
fn write_value<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing into a `Vec` cannot fail, and numbers and strings serialize infallibly.
    let _ = serde_json::to_writer(&mut *out, value);
}

fn write_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    out.reserve(2 * bytes.len());
    for byte in bytes {
        out.push(HEX[usize::from(byte >> 4)]);
        out.push(HEX[usize::from(byte & 0xf)]);
    }
}

/// Enough room for `event`'s JSON unless its strings need many escapes: the fixed part (keys,
/// hex, numbers), each tag's brackets and comma, each value's quotes and comma, and the strings
/// with 1/8 to spare.
fn json_len_bound(event: &Event) -> usize {
    let strings: usize = event.content.len()
        + event
            .tags
            .iter()
            .map(|tag| 3 + tag.as_slice().iter().map(|v| v.len() + 3).sum::<usize>())
            .sum::<usize>();
    // id 64, pubkey 64, sig 128, keys, quotes and numbers about 80.
    340 + strings + strings / 8
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{EventBuilder, JsonUtil, Keys, Kind, Tag, TagKind, Timestamp};

    use super::*;

    fn signed(kind: u16, content: &str, tags: Vec<Tag>) -> Event {
        EventBuilder::new(Kind::Custom(kind), content)
            .tags(tags)
            .custom_created_at(Timestamp::from(1_700_000_000))
            .sign_with_keys(&Keys::generate())
            .expect("sign")
    }

    #[test]
    fn it_writes_what_nostr_writes() {
        let request = signed(5050, "a \"quoted\" prompt", vec![]);
        let awkward = [
            "",
            "plain",
            "quotes \" and backslashes \\ and a slash /",
            "controls \u{0} \u{1} \u{8} \t \n \r \u{c} \u{1f} \u{7f}",
            "line separators \u{2028} \u{2029}",
            "unicode: zaps ⚡ 日本語 🤖 é",
            "json inside {\"a\":[1,2]}",
        ];
        let mut events = vec![request.clone()];
        for (i, content) in awkward.iter().enumerate() {
            let tags = vec![
                Tag::custom(TagKind::custom("request"), [request.as_json()]),
                Tag::event(request.id),
                Tag::public_key(request.pubkey),
                Tag::custom(TagKind::custom("i"), [*content, "text"]),
                Tag::custom(TagKind::custom("empty"), Vec::<String>::new()),
                Tag::custom(TagKind::custom(*content), [*content]),
            ];
            events.push(signed(6050 + i as u16, content, tags));
        }
        events.push(signed(7000, "no tags", vec![]));
        events.push(signed(u16::MAX, &"long ".repeat(10_000), vec![]));
        for event in &events {
            assert_eq!(to_json(event), event.as_json());
            let read = Event::from_json(to_json(event)).expect("nostr reads it");
            assert_eq!(&read, event);
        }
    }

    #[test]
    fn the_room_reserved_is_enough_for_plain_strings() {
        let event = signed(
            6050,
            &"x".repeat(5_000),
            vec![Tag::custom(TagKind::custom("i"), ["y".repeat(3_000)])],
        );
        assert!(to_json(&event).len() <= json_len_bound(&event));
    }
}
