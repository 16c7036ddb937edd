//! The `/v1` account door, over HTTP on loopback: an npub tops up with an invoice and reads its
//! balance with NIP-98 headers made by npm nostr-tools; the credit it bought pays a relay job
//! (one account, whichever door); forged, stale, replayed or misdirected headers are refused
//! with 401 and a reason, and nothing is recorded; bad amounts, bodies and floods get 4xx.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use dvmd::customer::{self, Customer};
use dvmd::daemon::Daemon;
use dvmd::infer::instant::InstantBackend;
use dvmd::job::JobState;
use dvmd::store::Tree;
use nostr_sdk::{EventBuilder, JsonUtil, Keys, Kind, Tag, TagKind, Timestamp};
use serde_json::Value;

use crate::harness;

/// A NIP-98 header built field by field, to forge what nostr-tools never would.
struct Auth<'a> {
    keys: &'a Keys,
    kind: u16,
    url: String,
    method: &'a str,
    payload: Option<String>,
    created_at: Timestamp,
    /// Makes two otherwise identical requests in one second two events (NIP-98 replay).
    nonce: String,
}

impl<'a> Auth<'a> {
    fn new(keys: &'a Keys, url: String, method: &'a str, body: &[u8]) -> Self {
        Self {
            keys,
            kind: 27235,
            url,
            method,
            payload: (!body.is_empty()).then(|| sha256_hex(body)),
            created_at: Timestamp::now(),
            nonce: Keys::generate().public_key().to_hex(),
        }
    }

    fn event(&self) -> nostr_sdk::Event {
        let mut tags = vec![
            Tag::custom(TagKind::custom("u"), [self.url.clone()]),
            Tag::custom(TagKind::custom("method"), [self.method.to_owned()]),
            Tag::custom(TagKind::custom("nonce"), [self.nonce.clone()]),
        ];
        if let Some(payload) = &self.payload {
            tags.push(Tag::custom(TagKind::custom("payload"), [payload.clone()]));
        }
        EventBuilder::new(Kind::from(self.kind), "")
            .tags(tags)
            .custom_created_at(self.created_at)
            .sign_with_keys(self.keys)
            .expect("sign")
    }

    fn header(&self) -> String {
        encode(&self.event().as_json())
    }
}

fn encode(json: &str) -> String {
    format!(
        "Nostr {}",
        base64::engine::general_purpose::STANDARD.encode(json)
    )
}

fn sha256_hex(body: &[u8]) -> String {
    use bitcoin::hashes::{sha256, Hash};
    sha256::Hash::hash(body).to_string()
}

/// (status, headers, JSON body) of one call.
async fn call(
    method: reqwest::Method,
    url: &str,
    auth: Option<&str>,
    body: Option<&[u8]>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(auth) = auth {
        request = request.header("Authorization", auth);
    }
    if let Some(body) = body {
        request = request
            .header("Content-Type", "application/json")
            .body(body.to_vec());
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

/// Invoices issued and ledger entries written so far.
async fn recorded(daemon: &Daemon) -> (usize, usize) {
    daemon
        .pipeline()
        .book()
        .store()
        .read(|r| {
            Ok::<_, dvmd::store::StoreError>((
                r.keys(Tree::Payments).count(),
                r.keys(Tree::Entries).count(),
            ))
        })
        .await
        .expect("read")
}

async fn start(edit: impl FnOnce(&mut dvmd::config::FileConfig)) -> (tempfile::TempDir, Daemon) {
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("paid by an HTTP top-up"));
    let daemon = harness::start(harness::dev_config(data.path(), edit), Some(backend)).await;
    (data, daemon)
}

/// `GET /v1/account` as nostr-tools signs it: the account JSON. nostr-tools signs the same
/// request in the same second as the same event (its `created_at` is the time rounded to the
/// nearest second), which NIP-98 refuses as a replay, so calls are spaced more than a second.
async fn account(http: &str, keys: &Keys) -> Value {
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let url = format!("{http}/v1/account?limit=10");
    let header = harness::nostr_tools_nip98(keys, &url, "get", None);
    let (status, _, body) = call(reqwest::Method::GET, &url, Some(&header), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_npub_tops_up_over_http_and_spends_it_on_a_relay_job() {
    let (_data, daemon) = start(|_| {}).await;
    let ready = daemon.ready().clone();
    let http = &ready.http_url;
    let keys = Keys::generate();

    let (status, _, models) = call(
        reqwest::Method::GET,
        &format!("{http}/v1/models"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["pricing"]["currency"], "msat", "{models}");

    let fresh = account(http, &keys).await;
    assert_eq!(fresh["balance_msat"], 0);
    assert_eq!(fresh["pubkey"], keys.public_key().to_hex());

    // A top-up, signed by nostr-tools (it hashes the body itself).
    let url = format!("{http}/v1/account/topup");
    let body = r#"{"amount_msat":50000}"#;
    let header = harness::nostr_tools_nip98(&keys, &url, "post", Some(body));
    let (status, _, topup) = call(
        reqwest::Method::POST,
        &url,
        Some(&header),
        Some(body.as_bytes()),
    )
    .await;
    assert_eq!(status, 200, "{topup}");
    assert_eq!(topup["amount_msat"], 50_000);
    let hash = dvmd::wallet::PaymentHash::try_from(
        topup["payment_hash"].as_str().expect("hash").to_owned(),
    )
    .expect("payment hash");
    harness::dev_pay(http, topup["bolt11"].as_str().expect("bolt11")).await;
    harness::wait_for_booking(daemon.pipeline().book(), &hash).await;
    let topped = account(http, &keys).await;
    assert_eq!(topped["balance_msat"], 50_000, "{topped}");
    assert_eq!(topped["entries"][0]["kind"], "payment_in");
    assert_eq!(topped["entries"][0]["payment_hash"], hash.to_string());

    // The same npub on a relay: its request is paid from what it bought over HTTP.
    let mut customer = Customer::connect_with(&ready.relay_url, keys.clone())
        .await
        .expect("connect");
    let job = customer
        .post(customer::text_request(
            "Say hi.",
            &[("max_tokens", "8")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    harness::result(&mut customer, &job.id).await;
    let job = harness::wait_for_state(daemon.pipeline().book(), &job.id, JobState::Settled).await;
    let charge = job.charge_msat.expect("charged");
    assert_eq!(job.paid_msat, 0, "no invoice: credit paid");
    assert!(charge > 0);
    let after = account(http, &keys).await;
    assert_eq!(after["balance_msat"], 50_000 - charge, "{after}");
    let kinds: Vec<&str> = after["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"charge") && kinds.contains(&"reserve"),
        "{kinds:?}"
    );
    // The job those entries name, as the account's history shows it.
    assert_eq!(after["jobs"][0]["id"], job.id.to_hex(), "{after}");
    assert_eq!(after["jobs"][0]["door"], "relay");
    assert_eq!(after["jobs"][0]["state"], "settled");
    assert_eq!(after["jobs"][0]["charge_msat"], charge);
    harness::ledger_ok(daemon.pipeline().book().store());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_replayed_and_misdirected_headers_are_refused_and_record_nothing() {
    let (_data, daemon) = start(|_| {}).await;
    let http = daemon.ready().http_url.clone();
    let keys = Keys::generate();
    let url = format!("{http}/v1/account/topup");
    let body = br#"{"amount_msat":1000}"#.as_slice();
    let good = || Auth::new(&keys, url.clone(), "POST", body);
    let before = recorded(&daemon).await;

    let mut wrong_url = good();
    wrong_url.url = format!("{http}/v1/account/topup?x=1");
    let mut wrong_method = good();
    wrong_method.method = "GET";
    let mut no_payload = good();
    no_payload.payload = None;
    let mut wrong_payload = good();
    wrong_payload.payload = Some(sha256_hex(br#"{"amount_msat":2000}"#));
    let mut stale = good();
    stale.created_at = Timestamp::from(Timestamp::now().as_secs() - 120);
    let mut future = good();
    future.created_at = Timestamp::from(Timestamp::now().as_secs() + 120);
    let mut wrong_kind = good();
    wrong_kind.kind = 1;
    let original = good();
    let tampered = {
        let mut json: Value = serde_json::from_str(&original.event().as_json()).expect("json");
        json["content"] = "tampered".into();
        encode(&json.to_string())
    };
    let replayed = original.header();
    let (status, _, _) = call(reqwest::Method::POST, &url, Some(&replayed), Some(body)).await;
    assert_eq!(status, 200, "the original is accepted");
    let after_original = recorded(&daemon).await;
    assert_eq!(
        after_original.0,
        before.0 + 1,
        "one invoice for the original"
    );

    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no header", None, "missing Authorization"),
        ("not base64", Some("Nostr %%%".to_owned()), "not base64"),
        ("wrong scheme", Some("Bearer abc".to_owned()), "scheme"),
        ("wrong url", Some(wrong_url.header()), "is for http"),
        ("wrong method", Some(wrong_method.header()), "method GET"),
        ("no payload", Some(no_payload.header()), "payload"),
        ("wrong payload", Some(wrong_payload.header()), "payload"),
        ("stale", Some(stale.header()), "signed -1"),
        ("future", Some(future.header()), "signed 1"),
        ("wrong kind", Some(wrong_kind.header()), "kind 1"),
        ("bad signature", Some(tampered), "signature"),
        ("replay", Some(replayed), "already used"),
    ];
    for (name, header, reason) in cases {
        let (status, headers, answer) =
            call(reqwest::Method::POST, &url, header.as_deref(), Some(body)).await;
        assert_eq!(status, 401, "{name}: {answer}");
        assert_eq!(answer["error"]["type"], "authentication_error", "{name}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(reason), "{name}: {message:?}");
        assert_eq!(
            headers
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Nostr"),
            "{name}"
        );
    }
    assert_eq!(recorded(&daemon).await, after_original, "nothing recorded");
    // Reading an account needs a signature too.
    let (status, _, _) = call(
        reqwest::Method::GET,
        &format!("{http}/v1/account"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 401);
    harness::ledger_ok(daemon.pipeline().book().store());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_amounts_bodies_and_floods_get_clear_4xx() {
    let (_data, daemon) = start(|file| {
        file.http.max_body_bytes = 2048;
        file.http.max_topups_per_minute = 2;
        file.http.max_topup_msat = 10_000;
    })
    .await;
    let http = daemon.ready().http_url.clone();
    let keys = Keys::generate();
    let url = format!("{http}/v1/account/topup");
    let post = |body: Vec<u8>| {
        let header = Auth::new(&keys, url.clone(), "POST", &body).header();
        let url = url.clone();
        async move { call(reqwest::Method::POST, &url, Some(&header), Some(&body)).await }
    };
    for (body, status, reason) in [
        (
            r#"{"amount_msat":1500}"#.to_owned(),
            400,
            "whole number of sats",
        ),
        (
            r#"{"amount_msat":20000}"#.to_owned(),
            400,
            "from 1000 to 10000",
        ),
        (
            r#"{"amount_msat":"lots"}"#.to_owned(),
            400,
            "expected {\"amount_msat\"",
        ),
        ("not json".to_owned(), 400, "expected {\"amount_msat\""),
        (
            format!(r#"{{"amount_msat":1000,"pad":"{}"}}"#, "x".repeat(4096)),
            413,
            "",
        ),
    ] {
        let (got, _, answer) = post(body.into_bytes()).await;
        assert_eq!(got, status, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(reason), "{message:?}");
    }
    assert_eq!(
        recorded(&daemon).await.0,
        0,
        "no invoice for a refused call"
    );
    // Two a minute: the third is told to wait.
    for _ in 0..2 {
        let (got, _, answer) = post(br#"{"amount_msat":1000}"#.to_vec()).await;
        assert_eq!(got, 200, "{answer}");
    }
    let (got, headers, answer) = post(br#"{"amount_msat":1000}"#.to_vec()).await;
    assert_eq!(got, 429, "{answer}");
    assert_eq!(answer["error"]["type"], "rate_limit_error");
    assert!(headers.get("retry-after").is_some());
    assert_eq!(recorded(&daemon).await.0, 2);
    harness::ledger_ok(daemon.pipeline().book().store());
    daemon.stop().await;
}

/// One client address cannot spend everyone's top-up invoices: over its own limit, it takes
/// nothing from the others (clients told apart through a trusted proxy's `X-Forwarded-For`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_spend_everyones_top_ups() {
    let (_data, daemon) = start(|file| {
        file.http.max_topups_per_minute = 4;
        file.http.max_topups_per_ip_per_minute = 2;
        file.http.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let http = daemon.ready().http_url.clone();
    let keys = Keys::generate();
    let url = format!("{http}/v1/account/topup");
    let top_up = |client: &'static str| {
        let body = br#"{"amount_msat":1000}"#.to_vec();
        let header = Auth::new(&keys, url.clone(), "POST", &body).header();
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .post(&url)
                .header("Authorization", header)
                .header("X-Forwarded-For", client)
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await
                .expect("send")
                .status()
                .as_u16()
        }
    };
    assert_eq!(top_up("203.0.113.1").await, 200);
    assert_eq!(top_up("203.0.113.1").await, 200);
    assert_eq!(top_up("203.0.113.1").await, 429, "its own limit");
    assert_eq!(top_up("203.0.113.1").await, 429);
    assert_eq!(
        top_up("203.0.113.2").await,
        200,
        "the others' share is whole"
    );
    assert_eq!(top_up("203.0.113.2").await, 200);
    assert_eq!(top_up("203.0.113.3").await, 429, "everyone's limit");
    assert_eq!(recorded(&daemon).await.0, 4);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_of_configured_origins_may_call_and_others_get_no_cors() {
    let (_data, daemon) = start(|file| {
        file.http.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let http = daemon.ready().http_url.clone();
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(
                reqwest::Method::OPTIONS,
                format!("{http}/v1/chat/completions"),
            )
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization, content-type",
            )
            .send()
    };
    let allowed = preflight("https://app.example").await.expect("send");
    assert_eq!(allowed.status(), 204);
    let headers = allowed.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(headers["access-control-allow-headers"]
        .to_str()
        .expect("text")
        .contains("authorization"));
    let other = preflight("https://evil.example").await.expect("send");
    assert!(!other.headers().contains_key("access-control-allow-origin"));
    assert_ne!(other.status(), 204);

    // A real answer (an L402 challenge) readable by the page, challenge headers included.
    let challenge = client
        .post(format!("{http}/v1/l402/token"))
        .header("Origin", "https://app.example")
        .json(&serde_json::json!({ "amount_msat": 1000 }))
        .send()
        .await
        .expect("send");
    assert_eq!(challenge.status(), 402);
    let headers = challenge.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(headers["access-control-expose-headers"]
        .to_str()
        .expect("text")
        .contains("www-authenticate"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_data, daemon) = start(|file| file.http.body_timeout_secs = 1).await;
    let addr = daemon
        .ready()
        .http_url
        .trim_start_matches("http://")
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    // Headers promise 100 bytes; 10 come, then nothing.
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: dvmd\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"messages";
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "the daemon answered and closed in time");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_from_an_untrusted_peer_change_nothing() {
    let (_data, daemon) = start(|_| {}).await;
    let http = daemon.ready().http_url.clone();
    let keys = Keys::generate();
    // Signed for the URL a forged X-Forwarded-Host names: refused, the header is not believed.
    let header = harness::nip98_with_nonce(&keys, "https://evil.example/v1/account", "get", None);
    let response = reqwest::Client::new()
        .get(format!("{http}/v1/account"))
        .header("Authorization", header)
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-Host", "evil.example")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 401);
    daemon.stop().await;
}
