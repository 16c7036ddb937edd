//! NIP-98 headers made by an independent client (npm nostr-tools `nip98.getToken`, with its own
//! payload hashing) pass dvmd's verifier, for a compact body and for the same JSON written with
//! spaces (as Python's `json.dumps` writes it); a changed body, URL or method does not.

use dvmd::http::nip98::{AuthError, Verifier};
use nostr_sdk::{Keys, PublicKey, Timestamp};

use crate::harness;

/// (header, signer): a fresh key's header made by nostr-tools.
fn nostr_tools_header(url: &str, method: &str, payload: Option<&str>) -> (String, PublicKey) {
    let keys = Keys::generate();
    (
        harness::nostr_tools_nip98(&keys, url, method, payload),
        keys.public_key(),
    )
}

/// This host: the replay cache's share per address does not apply.
const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

#[test]
fn nostr_tools_headers_are_accepted_and_bound_to_their_request() {
    let url = "http://127.0.0.1:8080/v1/chat/completions?stream=false";
    let payload = r#"{"model":"m","messages":[{"role":"user","content":"hi there"}]}"#;
    let spaced = r#"{"model": "m", "messages": [{"role": "user", "content": "hi there"}]}"#;
    let verifier = Verifier::new(60, 1024);
    for body in [payload, spaced] {
        let (header, signer) = nostr_tools_header(url, "post", Some(payload));
        let ok = verifier
            .verify(
                LOCAL,
                Some(&header),
                url,
                "POST",
                body.as_bytes(),
                Timestamp::now(),
            )
            .unwrap_or_else(|e| panic!("{body}: {e}"));
        assert_eq!(ok.pubkey, signer);
        // The same header once more: a replay.
        assert_eq!(
            verifier.verify(
                LOCAL,
                Some(&header),
                url,
                "POST",
                body.as_bytes(),
                Timestamp::now()
            ),
            Err(AuthError::Replayed)
        );
    }
    let (header, _) = nostr_tools_header(url, "post", Some(payload));
    let other_body = payload.replace("hi there", "hi their");
    assert_eq!(
        verifier.verify(
            LOCAL,
            Some(&header),
            url,
            "POST",
            other_body.as_bytes(),
            Timestamp::now()
        ),
        Err(AuthError::PayloadMismatch)
    );
    assert!(matches!(
        verifier.verify(
            LOCAL,
            Some(&header),
            "http://127.0.0.1:8080/v1/chat/completions",
            "POST",
            payload.as_bytes(),
            Timestamp::now()
        ),
        Err(AuthError::WrongUrl { .. })
    ));
    // A GET without a body needs no payload.
    let (header, _) = nostr_tools_header("http://127.0.0.1:8080/v1/models", "GET", None);
    verifier
        .verify(
            LOCAL,
            Some(&header),
            "http://127.0.0.1:8080/v1/models",
            "GET",
            b"",
            Timestamp::now(),
        )
        .expect("a bodiless GET");
}
