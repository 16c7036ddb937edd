//! The scheme against the draft's and aperture's vectors, and each credential shape.

use super::*;

/// lightninglabs/aperture `mpp/testdata/vectors.json`: its HMAC binding vectors.
#[test]
fn binding_matches_aperture_vectors() {
    let key = b"mpp-test-vector-secret";
    assert_eq!(
        bind(
            key,
            "api.example.com",
            "lightning",
            "charge",
            "eyJhbW91bnQiOiIxMDAifQ",
            ""
        ),
        "_9D0WlPoPRltxAd6AdpQd6auVOOeQGJ_J8BkGeBE_bU"
    );
}

#[test]
fn request_is_canonical_json() {
    // The draft's canonical example, member order and all.
    let value = json!({
        "methodDetails": {"paymentHash": "bc230847", "network": "mainnet", "invoice": "lnbc1u1pexample"},
        "description": "Weather report",
        "currency": "sat",
        "amount": "100",
    });
    assert_eq!(
        jcs(&value),
        r#"{"amount":"100","currency":"sat","description":"Weather report","methodDetails":{"invoice":"lnbc1u1pexample","network":"mainnet","paymentHash":"bc230847"}}"#
    );
    assert_eq!(
        URL_SAFE_NO_PAD.encode(jcs(&value)),
        "eyJhbW91bnQiOiIxMDAiLCJjdXJyZW5jeSI6InNhdCIsImRlc2NyaXB0aW9uIjoiV2VhdGhlciByZXBvcnQiLCJtZXRob2REZXRhaWxzIjp7Imludm9pY2UiOiJsbmJjMXUxcGV4YW1wbGUiLCJuZXR3b3JrIjoibWFpbm5ldCIsInBheW1lbnRIYXNoIjoiYmMyMzA4NDcifX0"
    );
    // UTF-16 order: U+FB01 sorts before U+1F600 (a surrogate pair), unlike by code point.
    let value = json!({"\u{1F600}": 1, "\u{FB01}": 2});
    assert_eq!(jcs(&value), "{\"\u{1F600}\":1,\"\u{FB01}\":2}");
}

#[test]
fn a_challenge_round_trips_through_a_credential() {
    let hash = PaymentHash([7; 32]);
    let charge = Charge {
        amount_sats: 21,
        description: "dvmd L402 token",
        invoice: "lnbcrt210n1example",
        payment_hash: &hash,
        network: "regtest",
    };
    let challenge = Challenge::charge(b"key", "dvmd", &charge, 1_773_576_300);
    assert_eq!(challenge.expires, "2026-03-15T12:05:00Z");
    assert!(challenge.header().starts_with("Payment id=\""));
    let request: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(&challenge.request)
            .expect("base64url"),
    )
    .expect("json");
    assert_eq!(request["amount"], "21");
    assert_eq!(request["methodDetails"]["paymentHash"], hash.to_string());
    let preimage = [0xab_u8; 32];
    let wire = json!({
        "challenge": challenge,
        "payload": {"preimage": hex::encode(preimage)},
    });
    let header = format!("Payment {}", URL_SAFE_NO_PAD.encode(wire.to_string()));
    let credential = parse_authorization(&header)
        .expect("payment")
        .expect("parses");
    assert_eq!(credential.challenge, challenge);
    assert_eq!(credential.preimage, preimage);
    assert!(parse_authorization("L402 abc:def").is_none());
    // Upper-case hex, or a missing preimage, is malformed; another intent is unsupported.
    let upper = json!({"challenge": challenge, "payload": {"preimage": hex::encode(preimage).to_uppercase()}});
    let upper = format!("Payment {}", URL_SAFE_NO_PAD.encode(upper.to_string()));
    assert!(matches!(
        parse_authorization(&upper),
        Some(Err(Refusal::Malformed(_)))
    ));
    let mut other = challenge.clone();
    other.intent = "subscription".into();
    let other = json!({"challenge": other, "payload": {"preimage": hex::encode(preimage)}});
    let other = format!("Payment {}", URL_SAFE_NO_PAD.encode(other.to_string()));
    assert!(matches!(
        parse_authorization(&other),
        Some(Err(Refusal::Unsupported(_)))
    ));
}

fn session_header(challenge: &Challenge, payload: Value) -> String {
    let wire = json!({"challenge": challenge, "payload": payload});
    format!("Payment {}", URL_SAFE_NO_PAD.encode(wire.to_string()))
}

#[test]
fn session_challenges_and_each_action_parse() {
    let hash = PaymentHash([9; 32]);
    let offer = SessionOffer {
        deposit_sats: 300,
        invoice: "lnbcrt3u1example",
        payment_hash: &hash,
        description: "dvmd session deposit",
        idle_timeout_secs: 300,
        unit_type: "sat of tokens",
    };
    let challenge = Challenge::session(b"key", "dvmd", &offer, 1_773_576_300);
    assert_eq!(challenge.intent, INTENT_SESSION);
    assert!(challenge.is_bound_by(b"key"));
    assert!(!challenge.is_bound_by(b"another key"));
    let mut altered = challenge.clone();
    altered.request.push('A');
    assert!(!altered.is_bound_by(b"key"), "the id binds the request");
    let raw = URL_SAFE_NO_PAD
        .decode(&challenge.request)
        .expect("base64url");
    assert_eq!(
        String::from_utf8(raw).expect("utf-8"),
        format!(
            r#"{{"amount":"1","currency":"sat","depositAmount":"300","depositInvoice":"lnbcrt3u1example","description":"dvmd session deposit","idleTimeout":"300","paymentHash":"{hash}","unitType":"sat of tokens"}}"#
        ),
        "JCS, members in order, every value a string"
    );
    let (preimage, session) = (hex::encode([1u8; 32]), hash.to_string());
    let parse = |payload: Value| {
        parse_authorization(&session_header(&challenge, payload)).expect("payment")
    };
    let open = parse(json!({"action": "open", "preimage": preimage, "returnInvoice": "lnbcrt1x"}))
        .expect("open");
    assert_eq!(
        open.action,
        Action::Open {
            return_invoice: "lnbcrt1x".into()
        }
    );
    assert_eq!(open.preimage, [1u8; 32]);
    let bearer = parse(json!({"action": "bearer", "sessionId": session, "preimage": preimage}))
        .expect("bearer");
    assert_eq!(bearer.action, Action::Bearer { session: hash });
    let top_up = parse(
        json!({"action": "topUp", "sessionId": session, "topUpPreimage": hex::encode([2u8; 32])}),
    )
    .expect("topUp");
    assert_eq!(
        (top_up.action, top_up.preimage),
        (Action::TopUp { session: hash }, [2u8; 32])
    );
    let close =
        parse(json!({"action": "close", "sessionId": session, "preimage": preimage, "unknown": 1}))
            .expect("close, unknown fields ignored");
    assert_eq!(close.action, Action::Close { session: hash });
    for (payload, why) in [
        (json!({"preimage": preimage}), "payload.action is missing"),
        (
            json!({"action": "open", "preimage": preimage}),
            "payload.returnInvoice is missing",
        ),
        (
            json!({"action": "bearer", "preimage": preimage}),
            "payload.sessionId is missing",
        ),
        (
            json!({"action": "topUp", "sessionId": session, "preimage": preimage}),
            "payload.topUpPreimage is missing",
        ),
        (
            json!({"action": "close", "sessionId": "XY", "preimage": preimage}),
            "payload.sessionId is not 64 lowercase hex digits",
        ),
        (
            json!({"action": "pause", "preimage": preimage}),
            "payload.action `pause` is not open, bearer, topUp or close",
        ),
    ] {
        assert_eq!(parse(payload), Err(Refusal::Malformed(why.to_owned())));
    }
}

#[test]
fn a_close_receipt_says_what_was_refunded() {
    let hash = PaymentHash([3; 32]);
    let raw = URL_SAFE_NO_PAD
        .decode(session_receipt(&hash, 0, Some((140, "succeeded"))))
        .expect("base64url");
    assert_eq!(
        String::from_utf8(raw).expect("utf-8"),
        format!(
            r#"{{"method":"lightning","reference":"{hash}","refundSats":140,"refundStatus":"succeeded","status":"success","timestamp":"1970-01-01T00:00:00Z"}}"#
        )
    );
    assert_eq!(
        spent_sats(1_999),
        1,
        "rounded down, in the customer's favour"
    );
}

#[test]
fn networks_and_dates() {
    assert_eq!(network_of("lnbcrt1..."), Some("regtest"));
    assert_eq!(network_of("LNBC1..."), Some("mainnet"));
    assert_eq!(network_of("lntbs1..."), Some("signet"));
    assert_eq!(network_of("lntb1..."), None);
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
}
