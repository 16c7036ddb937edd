//! `dvmd bench http`: what authentication and the ledger cost a `/v1` call.
//!
//! 1. A dev daemon in this process (dev wallet, instant backend) answers `GET /healthz` (the
//!    HTTP round trip alone) and `GET /v1/account` signed with NIP-98 (header checks, id and
//!    signature, the replay cache, and an account read from the store). The verifier alone is
//!    timed too.
//! 2. A dev daemon whose backend is the OpenAI-compatible stub server: the stub called
//!    directly, then the same `POST /v1/chat/completions` through dvmd billed to an npub
//!    (NIP-98), paid by a confirmed L402 token, and paid from an HTTP `Payment` session (a
//!    `bearer` credential: the session looked up, its preimage checked, the call opened on what
//!    it has). The difference is what dvmd adds: auth, pricing, the reservation, the run
//!    queue, the result and charge committed (one fsync group), settlement. Then calls per
//!    second with 16 callers at once.
//!
//! Calls go over one keep-alive loopback connection each; headers are signed before the clock
//! starts, as a client would sign them.

use std::time::{Duration, Instant};

use base64::Engine;
use nostr_sdk::{EventBuilder, JsonUtil, Keys, Kind, Tag, TagKind, Timestamp};

use super::{bench_daemon, report, tempdir, BenchError};
use crate::http::nip98::Verifier;

/// Run `calls` of each and print p50/p90/p99.
pub async fn run(calls: usize) -> Result<(), BenchError> {
    let daemon = bench_daemon(tempdir()?.join("http"), |_| {}).await?;
    let http = daemon.ready().http_url.clone();
    let client = reqwest::Client::new();
    let keys = Keys::generate();
    let url = format!("{http}/v1/account?limit=10");
    let warmup = (calls / 20).max(10);
    let headers = (0..calls + warmup)
        .map(|i| header(&keys, &url, i))
        .collect::<Result<Vec<_>, _>>()?;

    let mut health = Vec::with_capacity(calls);
    let mut account = Vec::with_capacity(calls);
    for (i, auth) in headers.iter().enumerate() {
        let t0 = Instant::now();
        let status = client.get(format!("{http}/healthz")).send().await?.status();
        let healthz = t0.elapsed();
        if !status.is_success() {
            return Err(format!("/healthz answered {status}").into());
        }
        let t0 = Instant::now();
        let response = client
            .get(&url)
            .header("Authorization", auth)
            .send()
            .await?;
        let status = response.status();
        response.bytes().await?;
        let signed = t0.elapsed();
        if !status.is_success() {
            return Err(format!("/v1/account answered {status}").into());
        }
        if i >= warmup {
            health.push(healthz);
            account.push(signed);
        }
    }

    let verifier = Verifier::new(60, calls + warmup);
    let mut verify = Vec::with_capacity(calls);
    for auth in headers.iter().skip(warmup) {
        let t0 = Instant::now();
        verifier
            .verify(
                std::net::Ipv4Addr::LOCALHOST.into(),
                Some(auth),
                &url,
                "GET",
                &[],
                Timestamp::now(),
            )
            .map_err(|e| format!("verify: {e}"))?;
        verify.push(t0.elapsed());
    }
    daemon.stop().await;

    println!("bench http: {calls} calls of each, one keep-alive loopback connection, dev daemon");
    report("GET /healthz", &mut health);
    report("GET /v1/account (NIP-98)", &mut account);
    report("NIP-98 verify alone", &mut verify);
    let overhead = median(&account).saturating_sub(median(&health));
    println!(
        "  {:<29}: p50 {:.3} ms",
        "NIP-98 + account read, over",
        overhead.as_secs_f64() * 1e3
    );
    chat(calls).await
}

/// Part 2: chat completions through dvmd over the stub called directly.
async fn chat(calls: usize) -> Result<(), BenchError> {
    let stub = super::stub::StubServer::start().await?;
    let base_url = stub.base_url();
    let daemon = bench_daemon(tempdir()?.join("http-chat"), |file| {
        file.infer.backend = "openai".into();
        file.infer.openai.base_url = base_url.clone();
        file.infer.openai.model = "stub".into();
        file.service.workers = 4;
    })
    .await?;
    let http = daemon.ready().http_url.clone();
    let client = reqwest::Client::new();
    let body = serde_json::json!({
        "model": "stub",
        "messages": [{ "role": "user", "content": "Say hello." }],
        "max_tokens": 8,
    })
    .to_string();
    let warmup = (calls / 20).max(10);

    let mut direct = Vec::with_capacity(calls);
    for i in 0..calls + warmup {
        let t0 = Instant::now();
        let response = client
            .post(format!("{base_url}/chat/completions"))
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        let ok = response.status().is_success();
        response.bytes().await?;
        if !ok {
            return Err("the stub refused a call".into());
        }
        if i >= warmup {
            direct.push(t0.elapsed());
        }
    }

    // An npub with credit, and a paid L402 token, for every call below.
    let keys = Keys::generate();
    let url = format!("{http}/v1/chat/completions");
    let quote = quote_of(&client, &url, &body).await?;
    let total = quote * (2 * calls as u64 + 2 * warmup as u64 + 64);
    top_up(&client, &daemon, &keys, total.div_ceil(1000) * 1000).await?;
    let token = buy_token(&client, &daemon, total.div_ceil(1000) * 1000).await?;
    let session = open_session(&client, &daemon, total.div_ceil(1000) * 1000, &url, &body).await?;

    let signed = (0..calls + warmup)
        .map(|i| post_header(&keys, &url, &body, i))
        .collect::<Result<Vec<_>, _>>()?;
    let mut nip98 = Vec::with_capacity(calls);
    let mut l402 = Vec::with_capacity(calls);
    let mut sessions = Vec::with_capacity(calls);
    for (i, auth) in signed.iter().enumerate() {
        let a = timed_call(&client, &url, auth, &body).await?;
        let b = timed_call(&client, &url, &token, &body).await?;
        let c = timed_call(&client, &url, &session, &body).await?;
        if i >= warmup {
            nip98.push(a);
            l402.push(b);
            sessions.push(c);
        }
    }

    // dvmd's own backend client to the stub (a streamed call, as the workers make it), alone.
    let backend = crate::infer::openai::OpenAiBackend::new(crate::infer::openai::OpenAiConfig {
        base_url: base_url.clone(),
        model: "stub".into(),
        api_key: None,
        timeout: Duration::from_secs(30),
    })
    .map_err(|e| e.to_string())?;
    let mut client_alone = Vec::with_capacity(calls);
    for i in 0..calls + warmup {
        let request = crate::infer::GenerateRequest {
            continue_from: None,
            model: None,
            messages: vec![crate::infer::ChatMessage::user("Say hello.")],
            sampling: crate::infer::Sampling::default(),
        };
        let t0 = Instant::now();
        let stream = crate::infer::Backend::generate(&backend, request, 8)
            .await
            .map_err(|e| e.to_string())?;
        crate::infer::collect(stream)
            .await
            .map_err(|e| e.to_string())?;
        if i >= warmup {
            client_alone.push(t0.elapsed());
        }
    }

    // The one durable commit a call waits for (its result and charge), alone.
    let store = daemon.pipeline().book().store().clone();
    let mut commits = Vec::with_capacity(calls);
    for i in 0..calls {
        let t0 = Instant::now();
        store
            .commit(move |tx| {
                tx.put_raw(crate::store::Tree::Meta, b"bench_commit", &i.to_be_bytes())?;
                Ok::<_, crate::store::TxError<crate::store::StoreError>>(())
            })
            .await?;
        commits.push(t0.elapsed());
    }

    // Throughput: 16 callers at once, each on its own connection.
    let callers = 16;
    let per = (calls / callers).max(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (url, body, token) = (url.clone(), body.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for _ in 0..per {
                timed_call(&client, &url, &token, &body).await?;
            }
            Ok::<_, BenchError>(())
        }));
    }
    for task in tasks {
        task.await.map_err(|e| format!("caller: {e}"))??;
    }
    let rate = (callers * per) as f64 / started.elapsed().as_secs_f64();
    daemon.stop().await;
    stub.stop().await;

    println!("bench http chat: {calls} calls of each, POST /v1/chat/completions, max_tokens 8");
    report("stub server directly", &mut direct);
    report("dvmd, NIP-98 (npub balance)", &mut nip98);
    report("dvmd, L402 (confirmed token)", &mut l402);
    report("dvmd, Payment session bearer", &mut sessions);
    report("dvmd's backend client alone", &mut client_alone);
    report("store commit alone (fsync)", &mut commits);
    for (label, samples) in [("NIP-98", &nip98), ("L402", &l402)] {
        let pick = |sorted: &[Duration], q: f64| {
            sorted
                .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        println!(
            "  {:<29}: p50 +{:.3} ms  p99 +{:.3} ms",
            format!("{label} + ledger, over direct"),
            pick(samples, 0.5)
                .saturating_sub(pick(&direct, 0.5))
                .as_secs_f64()
                * 1e3,
            pick(samples, 0.99)
                .saturating_sub(pick(&direct, 0.99))
                .as_secs_f64()
                * 1e3,
        );
    }
    println!(
        "  {:<29}: p50 {:+.3} ms",
        "session debit, over L402",
        (median(&sessions).as_secs_f64() - median(&l402).as_secs_f64()) * 1e3
    );
    println!(
        "  {:<29}: {rate:.0} calls/s ({callers} callers, L402, {} calls)",
        "throughput",
        callers * per
    );
    Ok(())
}

/// One call; its latency, or an error if it was not served.
async fn timed_call(
    client: &reqwest::Client,
    url: &str,
    auth: &str,
    body: &str,
) -> Result<Duration, BenchError> {
    let t0 = Instant::now();
    let response = client
        .post(url)
        .header("Authorization", auth)
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await?;
    let status = response.status();
    response.bytes().await?;
    if !status.is_success() {
        return Err(format!("/v1/chat/completions answered {status}").into());
    }
    Ok(t0.elapsed())
}

/// What one call is quoted: the L402 challenge of an unauthenticated call says.
async fn quote_of(client: &reqwest::Client, url: &str, body: &str) -> Result<u64, BenchError> {
    let response = client
        .post(url)
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await?;
    let answer: serde_json::Value = response.json().await?;
    answer["l402"]["budget_msat"]
        .as_u64()
        .ok_or_else(|| format!("no challenge: {answer}").into())
}

/// Credit `keys`' npub with `msat` (a top-up paid through `/dev/pay`, booked).
async fn top_up(
    client: &reqwest::Client,
    daemon: &crate::daemon::Daemon,
    keys: &Keys,
    msat: u64,
) -> Result<(), BenchError> {
    let http = &daemon.ready().http_url;
    let url = format!("{http}/v1/account/topup");
    let body = format!(r#"{{"amount_msat":{msat}}}"#);
    let answer: serde_json::Value = client
        .post(&url)
        .header("Authorization", post_header(keys, &url, &body, 0)?)
        .body(body)
        .send()
        .await?
        .json()
        .await?;
    let bolt11 = answer["bolt11"].as_str().ok_or("no top-up invoice")?;
    let hash = crate::wallet::PaymentHash::from_hex(answer["payment_hash"].as_str().unwrap_or(""))
        .map_err(|e| e.to_string())?;
    dev_pay(client, http, bolt11).await?;
    for _ in 0..500 {
        let booked = daemon.pipeline().book().payment(&hash).await;
        if booked.ok().flatten().is_some_and(|r| r.consumed) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("the top-up was never booked".into())
}

/// A paid, confirmed L402 token worth `msat`: its `Authorization` value.
async fn buy_token(
    client: &reqwest::Client,
    daemon: &crate::daemon::Daemon,
    msat: u64,
) -> Result<String, BenchError> {
    let http = &daemon.ready().http_url;
    let answer: serde_json::Value = client
        .post(format!("{http}/v1/l402/token"))
        .json(&serde_json::json!({ "amount_msat": msat }))
        .send()
        .await?
        .json()
        .await?;
    let macaroon = answer["l402"]["macaroon"].as_str().ok_or("no challenge")?;
    let invoice = answer["l402"]["invoice"].as_str().ok_or("no invoice")?;
    let preimage = dev_pay(client, http, invoice).await?;
    let auth = format!("L402 {macaroon}:{preimage}");
    // The first use books and confirms it; every later call finds it booked.
    let response = client
        .get(format!("{http}/v1/l402/balance"))
        .header("Authorization", &auth)
        .send()
        .await?;
    if !response.status().is_success() {
        return Err(format!("the token was refused: {}", response.status()).into());
    }
    Ok(auth)
}

/// An HTTP `Payment` session with a deposit of `msat`, opened by one call: the `bearer`
/// credential every later call presents.
async fn open_session(
    client: &reqwest::Client,
    daemon: &crate::daemon::Daemon,
    msat: u64,
    url: &str,
    body: &str,
) -> Result<String, BenchError> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let http = &daemon.ready().http_url;
    let response = client
        .post(format!("{http}/v1/l402/token"))
        .json(&serde_json::json!({ "amount_msat": msat }))
        .send()
        .await?;
    let offer = response
        .headers()
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.contains("intent=\"session\""))
        .map(auth_params)
        .ok_or("no session challenge (sessions need a wallet that pays amountless invoices)")?;
    let request: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(&offer["request"])
            .map_err(|e| e.to_string())?,
    )?;
    let invoice = request["depositInvoice"]
        .as_str()
        .ok_or("no deposit invoice")?;
    let session = request["paymentHash"].as_str().ok_or("no payment hash")?;
    let preimage = dev_pay(client, http, invoice).await?;
    let refund: serde_json::Value = client
        .post(format!("{http}/dev/invoice"))
        .json(&serde_json::json!({ "memo": "bench refund" }))
        .send()
        .await?
        .json()
        .await?;
    let credential = |payload: serde_json::Value| {
        let echo: serde_json::Map<String, serde_json::Value> = offer
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect();
        let wire = serde_json::json!({ "challenge": echo, "payload": payload });
        format!("Payment {}", URL_SAFE_NO_PAD.encode(wire.to_string()))
    };
    let open = credential(serde_json::json!({
        "action": "open", "preimage": preimage, "returnInvoice": refund["bolt11"],
    }));
    timed_call(client, url, &open, body).await?;
    Ok(credential(serde_json::json!({
        "action": "bearer", "sessionId": session, "preimage": preimage,
    })))
}

/// The auth-params of a `Payment` challenge (dvmd's values hold no quotes or backslashes).
fn auth_params(value: &str) -> std::collections::HashMap<String, String> {
    value
        .trim_start_matches("Payment ")
        .split("\", ")
        .filter_map(|pair| pair.split_once("=\""))
        .map(|(name, value)| (name.to_owned(), value.trim_end_matches('"').to_owned()))
        .collect()
}

async fn dev_pay(client: &reqwest::Client, http: &str, bolt11: &str) -> Result<String, BenchError> {
    let paid: serde_json::Value = client
        .post(format!("{http}/dev/pay"))
        .json(&serde_json::json!({ "bolt11": bolt11 }))
        .send()
        .await?
        .json()
        .await?;
    Ok(paid["preimage"]
        .as_str()
        .ok_or("dev pay failed")?
        .to_owned())
}

/// A NIP-98 header for `POST url` with `body`, distinct per `n`.
fn post_header(keys: &Keys, url: &str, body: &str, n: usize) -> Result<String, BenchError> {
    use bitcoin::hashes::{sha256, Hash};
    let payload = sha256::Hash::hash(body.as_bytes()).to_string();
    let event = EventBuilder::new(Kind::from(27235), "")
        .tags([
            Tag::custom(TagKind::custom("u"), [url.to_owned()]),
            Tag::custom(TagKind::custom("method"), ["POST"]),
            Tag::custom(TagKind::custom("payload"), [payload]),
            Tag::custom(TagKind::custom("nonce"), [n.to_string()]),
        ])
        .sign_with_keys(keys)?;
    Ok(format!(
        "Nostr {}",
        base64::engine::general_purpose::STANDARD.encode(event.as_json())
    ))
}

fn median(sorted: &[Duration]) -> Duration {
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// A NIP-98 header for `GET url`, distinct per `n`.
fn header(keys: &Keys, url: &str, n: usize) -> Result<String, BenchError> {
    let event = EventBuilder::new(Kind::from(27235), "")
        .tags([
            Tag::custom(TagKind::custom("u"), [url.to_owned()]),
            Tag::custom(TagKind::custom("method"), ["GET"]),
            Tag::custom(TagKind::custom("nonce"), [n.to_string()]),
        ])
        .sign_with_keys(keys)?;
    Ok(format!(
        "Nostr {}",
        base64::engine::general_purpose::STANDARD.encode(event.as_json())
    ))
}
