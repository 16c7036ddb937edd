//! The HTTP `Payment` scheme's `session` intent (draft-lightning-session-00) on loopback with
//! the dev wallet, read with this file's own parser: a session opened on a paid deposit, spent
//! by a stream until it runs dry (`payment-need-topup`), topped up from another 402 while the
//! stream waits, resumed on the same connection to the end, then closed with its rest paid to
//! an amountless return invoice (our wallet's own record of that invoice shows the amount). A
//! stream nobody tops up ends with `session-timeout`; an idle session is closed and refunded by
//! the service; every refusal names its problem; on LNbits (which cannot pay an amountless
//! invoice) no session is offered and a session credential is refused with the reason. The
//! ledger invariant is checked after each.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use dvmd::daemon::Daemon;
use dvmd::infer::instant::InstantBackend;
use dvmd::ledger::Account;
use dvmd::wallet::{PaymentHash, PaymentStatus, Wallet};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::harness;
use crate::harness::payment_auth_params as auth_params;

/// 60 words: one "token" each on the instant backend.
fn reply() -> String {
    (1..=60)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// No base fee or prompt price, 100 msat per completion token: 10 tokens a sat, so the sums
/// below are exact; refunds pay no routing fee on the dev wallet, and none is set aside.
async fn start(edit: impl FnOnce(&mut dvmd::config::FileConfig)) -> (tempfile::TempDir, Daemon) {
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new(reply()));
    let config = harness::dev_config(data.path(), |file| {
        file.pricing.base_fee_msat = 0;
        file.pricing.prompt_msat_per_1k_tokens = 0;
        file.pricing.completion_msat_per_1k_tokens = 100_000;
        file.wallet.payout_max_fee_base_msat = 0;
        file.wallet.payout_max_fee_ppm = 0;
        edit(file);
    });
    let daemon = harness::start(config, Some(backend)).await;
    (data, daemon)
}

/// One `Payment` challenge of a 402, as a client reads it.
#[derive(Clone)]
struct Offer {
    params: HashMap<String, String>,
    request: Value,
}

impl Offer {
    fn echo(&self) -> Value {
        let mut echo = serde_json::Map::new();
        for name in ["id", "realm", "method", "intent", "request", "expires"] {
            echo.insert(name.into(), json!(self.params[name]));
        }
        Value::Object(echo)
    }

    fn credential(&self, payload: Value) -> String {
        let wire = json!({ "challenge": self.echo(), "payload": payload });
        format!("Payment {}", URL_SAFE_NO_PAD.encode(wire.to_string()))
    }

    /// The deposit the challenge asks, msat.
    fn deposit_msat(&self) -> u64 {
        let sats: u64 = self.request["depositAmount"]
            .as_str()
            .expect("depositAmount")
            .parse()
            .expect("whole sats");
        sats * 1000
    }

    fn invoice(&self) -> &str {
        self.request["depositInvoice"]
            .as_str()
            .expect("depositInvoice")
    }

    fn hash(&self) -> String {
        self.request["paymentHash"]
            .as_str()
            .expect("paymentHash")
            .to_owned()
    }
}

/// The 402's challenges by intent, and its L402 macaroon.
async fn challenges(response: reqwest::Response) -> (HashMap<String, Offer>, String) {
    assert_eq!(response.status(), 402);
    let mut offers = HashMap::new();
    for value in response.headers().get_all("www-authenticate") {
        let value = value.to_str().expect("text");
        if !value.starts_with("Payment ") {
            continue;
        }
        let params = auth_params(value);
        let raw = URL_SAFE_NO_PAD
            .decode(&params["request"])
            .expect("base64url");
        let request: Value = serde_json::from_slice(&raw).expect("json");
        offers.insert(params["intent"].clone(), Offer { params, request });
    }
    let body: Value = response.json().await.expect("json");
    let macaroon = body["l402"]["macaroon"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (offers, macaroon)
}

fn chat(model: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{ "role": "user", "content": "Count." }],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

async fn post(http: &str, body: &Value, auth: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{http}/v1/chat/completions"))
        .json(body);
    if let Some(auth) = auth {
        request = request.header("Authorization", auth);
    }
    request.send().await.expect("send")
}

/// A fresh session challenge (and the L402 macaroon of its 402) for a call of `max_tokens`.
async fn session_offer(http: &str, model: &str, max_tokens: u32) -> (Offer, String) {
    let (offers, macaroon) =
        challenges(post(http, &chat(model, max_tokens, false), None).await).await;
    let offer = offers.get("session").expect("a session challenge").clone();
    assert!(offers.contains_key("charge"), "beside the charge");
    (offer, macaroon)
}

/// The draft's server-sent events of a stream, as (event name, data) pairs, read to the end.
/// `on_event` sees each as it comes (and may act before the stream goes on).
async fn read_events<F, Fut>(response: reqwest::Response, mut on_event: F) -> Vec<(String, String)>
where
    F: FnMut(&str, &str) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), body.next())
        .await
        .expect("the stream goes on")
    {
        buffer.push_str(std::str::from_utf8(&chunk.expect("chunk")).expect("utf-8"));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut name = "message".to_owned();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = value.to_owned();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data.push_str(value);
                }
            }
            on_event(&name, &data).await;
            events.push((name, data));
        }
    }
    events
}

/// The answer's text, from its chunks.
fn text_of(events: &[(String, String)]) -> String {
    events
        .iter()
        .filter(|(name, data)| name == "message" && data.as_str() != "[DONE]")
        .filter_map(|(_, data)| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

fn data_of(events: &[(String, String)], name: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, data)| serde_json::from_str(data).expect("json data"))
        .collect()
}

async fn return_invoice(http: &str) -> (String, PaymentHash) {
    return_invoice_expiring(http, None).await
}

/// An amountless invoice of the dev wallet's, expiring in `expiry_secs` (or its default).
async fn return_invoice_expiring(http: &str, expiry_secs: Option<u64>) -> (String, PaymentHash) {
    let mut body = json!({ "memo": "session refund" });
    if let Some(secs) = expiry_secs {
        body["expiry_secs"] = json!(secs);
    }
    let response = reqwest::Client::new()
        .post(format!("{http}/dev/invoice"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    let hash = PaymentHash::from_hex(body["payment_hash"].as_str().expect("hash")).expect("hex");
    (body["bolt11"].as_str().expect("bolt11").to_owned(), hash)
}

/// What the refund paid to the dev wallet's invoice `hash`, once it has (up to `tries` looks,
/// 100 ms apart).
async fn refunded(daemon: &Daemon, hash: &PaymentHash, tries: usize) -> Option<u64> {
    let wallet = daemon.dev_wallet().expect("dev wallet");
    for _ in 0..tries {
        if let PaymentStatus::Paid { amount_msat } = wallet.lookup(hash).await.expect("lookup") {
            return Some(amount_msat);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// How session `hash` closed, once its refund's outcome is recorded (the wallet can show the
/// refund paid a moment before the session's record says so).
async fn closed_session(daemon: &Daemon, hash: &str) -> dvmd::job::sessions::Closed {
    let hash = PaymentHash::from_hex(hash).expect("hex");
    for _ in 0..100 {
        let record = daemon.pipeline().session(&hash).await.expect("read");
        if let Some(closed) = record.and_then(|r| r.closed) {
            if closed.refund_status != "pending" {
                return closed;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("session {hash} not closed with its refund recorded");
}

/// The problem type a refusal names, after the draft's base URL.
async fn problem(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 402);
    let body: Value = response.json().await.expect("json");
    body["type"]
        .as_str()
        .and_then(|t| t.strip_prefix("https://paymentauth.org/problems/"))
        .unwrap_or_else(|| panic!("a problem type: {body}"))
        .to_owned()
}

fn receipt(response: &reqwest::Response) -> Value {
    let value = response
        .headers()
        .get("payment-receipt")
        .expect("a Payment-Receipt")
        .to_str()
        .expect("text");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(value).expect("base64url")).expect("json")
}

fn session_balance(daemon: &Daemon, session: &str) -> u64 {
    let hash = PaymentHash::from_hex(session).expect("hex");
    harness::account_balance(daemon.pipeline().book().store(), &Account::Token(hash))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_runs_dry_is_topped_up_mid_stream_and_refunds_its_rest_on_close() {
    let (data, daemon) = start(|_| {}).await;
    let http = daemon.ready().http_url.clone();
    let model = harness::served_model(&http).await;

    // The 402 of a 60-token call: a deposit of its quote, 60 tokens at 10 a sat.
    let (deposit, macaroon) = session_offer(&http, &model, 60).await;
    let request = &deposit.request;
    assert_eq!(
        (request["amount"].as_str(), request["currency"].as_str()),
        (Some("1"), Some("sat"))
    );
    assert_eq!(request["idleTimeout"], "300");
    assert!(
        request.get("methodDetails").is_none(),
        "a session's request is flat"
    );
    let deposit_sats: u64 = request["depositAmount"]
        .as_str()
        .expect("depositAmount")
        .parse()
        .expect("sats");
    assert!(deposit_sats >= 6, "the call's quote: {deposit_sats} sats");
    let session = deposit.hash();
    let preimage = harness::dev_pay(&http, deposit.invoice()).await;
    let (refund_to, refund_hash) = return_invoice(&http).await;

    // open, on a 20-token call: 2 sats spent.
    let open = deposit.credential(json!({
        "action": "open", "preimage": preimage, "returnInvoice": refund_to,
    }));
    let answer = post(&http, &chat(&model, 20, false), Some(&open)).await;
    assert_eq!(answer.status(), 200);
    let opened = receipt(&answer);
    assert_eq!(opened["reference"], session.as_str(), "the session id");
    assert_eq!(opened["method"], "lightning");
    let body: Value = answer.json().await.expect("json");
    assert_eq!(body["dvmd"]["charge_msat"], 2_000);
    harness::settled_jobs(daemon.pipeline().book().store()).await;
    assert_eq!(
        session_balance(&daemon, &session),
        deposit_sats * 1000 - 2_000
    );
    // The same open again (a client that lost the answer retries): nothing opens or is
    // credited twice; its call runs on the session, as a bearer call would.
    let again = post(&http, &chat(&model, 5, false), Some(&open)).await;
    assert_eq!(again.status(), 200);
    assert_eq!(receipt(&again)["reference"], session.as_str());
    let body: Value = again.json().await.expect("json");
    assert_eq!(body["dvmd"]["charge_msat"], 500);
    harness::settled_jobs(daemon.pipeline().book().store()).await;
    let left = session_balance(&daemon, &session);
    assert_eq!(
        left,
        deposit_sats * 1000 - 2_500,
        "the deposit counted once"
    );
    // That challenge with another return invoice is not the same open: refused.
    let (elsewhere, _) = return_invoice(&http).await;
    let other_open = deposit.credential(json!({
        "action": "open", "preimage": preimage, "returnInvoice": elsewhere,
    }));
    let refused = post(&http, &chat(&model, 5, false), Some(&other_open)).await;
    assert_eq!(refused.status(), 402);
    assert_eq!(problem(refused).await, "lightning/unknown-challenge");

    // bearer, streaming 60 tokens with what is left: it runs dry, waits, is topped up, goes on.
    let bearer = deposit.credential(json!({
        "action": "bearer", "sessionId": session, "preimage": preimage,
    }));
    let stream = post(&http, &chat(&model, 60, true), Some(&bearer)).await;
    assert_eq!(stream.status(), 200);
    assert_eq!(receipt(&stream)["reference"], session.as_str());
    let topped = std::sync::Mutex::new(None);
    let events = read_events(stream, |name, data| {
        let (http, model, session, topped) = (&http, &model, &session, &topped);
        let (name, data) = (name.to_owned(), data.to_owned());
        async move {
            if name != "payment-need-topup" {
                return;
            }
            let need: Value = serde_json::from_str(&data).expect("json");
            assert_eq!(need["sessionId"], session.as_str());
            // Another 402, paid; its preimage tops the session up. The stream waits meanwhile.
            let (top_up, _) = session_offer(http, model, 60).await;
            let paid = harness::dev_pay(http, top_up.invoice()).await;
            let credential = top_up.credential(json!({
                "action": "topUp", "sessionId": session, "topUpPreimage": paid,
            }));
            let answer = post(http, &chat(model, 30, false), Some(&credential)).await;
            assert_eq!(answer.status(), 200);
            assert_eq!(receipt(&answer)["reference"], session.as_str());
            let body: Value = answer.json().await.expect("json");
            assert_eq!(body["status"], "ok");
            // The same credential again: the same answer, nothing moved twice.
            let again = post(http, &chat(model, 30, false), Some(&credential)).await;
            assert_eq!(again.status(), 200);
            let body_again: Value = again.json().await.expect("json");
            assert_eq!(body_again["depositedMsat"], body["depositedMsat"]);
            *topped.lock().expect("lock") = Some(top_up.request["depositAmount"].clone());
        }
    })
    .await;
    let needs = data_of(&events, "payment-need-topup");
    assert_eq!(needs.len(), 1, "ran dry once: {events:?}");
    let tokens_first = left / 100;
    assert_eq!(
        needs[0]["balanceSpent"], deposit_sats,
        "all of the deposit, this stream's tokens included"
    );
    assert_eq!(
        needs[0]["balanceRequired"],
        (60 - tokens_first).div_ceil(10),
        "the rest of the call, in whole sats (rounded up: 5 tokens still need a sat)"
    );
    assert!(data_of(&events, "session-timeout").is_empty());
    assert_eq!(
        text_of(&events),
        reply(),
        "resumed where it stopped: the whole answer once"
    );
    let receipts = data_of(&events, "payment-receipt");
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0]["reference"], session.as_str());
    assert_eq!(receipts[0]["spent"], 6, "60 tokens, 6 sats");
    assert_eq!(receipts[0]["units"], 60);
    let last = &events[events.len() - 1];
    assert_eq!(last.1, "[DONE]", "the receipt event comes before [DONE]");
    let top_up_sats: u64 = topped
        .lock()
        .expect("lock")
        .take()
        .expect("topped up")
        .as_str()
        .expect("depositAmount")
        .parse()
        .expect("sats");

    harness::settled_jobs(daemon.pipeline().book().store()).await;
    let before_close = session_balance(&daemon, &session);
    assert_eq!(
        before_close,
        (deposit_sats + top_up_sats) * 1000 - 2_500 - 6_000,
        "two calls charged exactly their tokens"
    );
    // The L402 credential of the deposit's 402 sees the same account.
    let l402 = reqwest::Client::new()
        .get(format!("{http}/v1/l402/balance"))
        .header("Authorization", format!("L402 {macaroon}:{preimage}"))
        .send()
        .await
        .expect("send");
    let l402: Value = l402.json().await.expect("json");
    assert_eq!(l402["balance_msat"], before_close);
    // But a token narrowed from it (a budget a call, say) does not pay for calls: its
    // preimage is the session's bearer secret, which no caveat binds.
    let narrowed = {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&macaroon)
            .expect("base64");
        let mut narrowed = dvmd::l402::Macaroon::from_bytes(&raw).expect("macaroon");
        narrowed.add_caveat("dvmd_budget_msat=2000".to_owned());
        base64::engine::general_purpose::STANDARD.encode(narrowed.to_bytes())
    };
    let refused = reqwest::Client::new()
        .post(format!("{http}/v1/chat/completions"))
        .header("Authorization", format!("L402 {narrowed}:{preimage}"))
        .json(&chat(&model, 5, false))
        .send()
        .await
        .expect("send");
    assert_eq!(refused.status(), 403);
    let said: Value = refused.json().await.expect("json");
    assert_eq!(said["error"]["code"], "narrowed_session_token", "{said}");
    assert_eq!(session_balance(&daemon, &session), before_close);

    // close: the rest goes to the return invoice; our wallet says it arrived, that amount.
    let close = deposit.credential(json!({
        "action": "close", "sessionId": session, "preimage": preimage,
    }));
    let closed = post(&http, &chat(&model, 5, false), Some(&close)).await;
    assert_eq!(closed.status(), 200);
    let closed_receipt = receipt(&closed);
    let body: Value = closed.json().await.expect("json");
    assert_eq!(body["status"], "closed");
    assert_eq!(body["refundStatus"], "succeeded");
    assert_eq!(body["refundMsat"], before_close);
    assert_eq!(body["refundSats"], before_close / 1000);
    assert_eq!(closed_receipt["refundSats"], before_close / 1000);
    assert_eq!(closed_receipt["refundStatus"], "succeeded");
    let wallet = daemon.dev_wallet().expect("dev wallet");
    assert_eq!(
        wallet.lookup(&refund_hash).await.expect("lookup"),
        PaymentStatus::Paid {
            amount_msat: before_close
        },
        "the return invoice was paid the rest, to the msat"
    );
    assert_eq!(session_balance(&daemon, &session), 0);
    // A closed session takes nothing more.
    let after = post(&http, &chat(&model, 5, false), Some(&bearer)).await;
    assert_eq!(after.status(), 402);
    assert_eq!(problem(after).await, "lightning/session-closed");
    // The same close again: the same answer, and nothing paid twice.
    let closing_again = post(&http, &chat(&model, 5, false), Some(&close)).await;
    assert_eq!(closing_again.status(), 200);
    let body_again: Value = closing_again.json().await.expect("json");
    assert_eq!(body_again, body);
    assert_eq!(session_balance(&daemon, &session), 0);
    // A close on another challenge is an action on a closed session: refused.
    let (other, _) = session_offer(&http, &model, 5).await;
    let other_close = other.credential(json!({
        "action": "close", "sessionId": session, "preimage": preimage,
    }));
    let refused = post(&http, &chat(&model, 5, false), Some(&other_close)).await;
    assert_eq!(refused.status(), 402);
    assert_eq!(problem(refused).await, "lightning/session-closed");

    let metrics = harness::metrics(&http).await;
    assert!(
        metrics.contains("dvmd_sessions_closed_total{refund=\"succeeded\"} 1"),
        "{metrics}"
    );
    daemon
        .pipeline()
        .book()
        .store()
        .read(dvmd::job::audit)
        .await
        .expect("ledger invariant holds while running");
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_stream_nobody_tops_up_times_out_and_an_idle_session_is_refunded() {
    let (data, daemon) = start(|file| {
        file.http.session_topup_wait_secs = 1;
        file.http.session_idle_secs = 2;
    })
    .await;
    let http = daemon.ready().http_url.clone();
    let model = harness::served_model(&http).await;
    let (deposit, _) = session_offer(&http, &model, 20).await;
    let session = deposit.hash();
    let preimage = harness::dev_pay(&http, deposit.invoice()).await;
    let (refund_to, refund_hash) = return_invoice(&http).await;
    let deposit_msat = deposit.deposit_msat();

    // Refusals first: a return invoice with an amount, a preimage for another hash.
    let with_amount = daemon
        .dev_wallet()
        .expect("dev")
        .create_invoice(dvmd::wallet::InvoiceRequest {
            amount_msat: 1_000,
            description: dvmd::wallet::InvoiceDescription::Memo("no".into()),
            expiry_secs: 600,
        })
        .await
        .expect("invoice");
    let bad = deposit.credential(json!({
        "action": "open", "preimage": preimage, "returnInvoice": with_amount.bolt11,
    }));
    let refused = post(&http, &chat(&model, 60, true), Some(&bad)).await;
    assert_eq!(refused.status(), 402);
    assert_eq!(problem(refused).await, "lightning/invalid-return-invoice");
    // One whose route hint asks more fee than a refund may cost: its refund would be refused.
    let greedy = {
        use bitcoin::hashes::{sha256, Hash};
        use bitcoin::secp256k1::{PublicKey, Secp256k1, SecretKey};
        use lightning_invoice::{
            Currency, InvoiceBuilder, PaymentSecret, RouteHint, RouteHintHop, RoutingFees,
        };
        let secp = Secp256k1::new();
        let hop = RouteHintHop {
            src_node_id: PublicKey::from_secret_key(
                &secp,
                &SecretKey::from_slice(&[8; 32]).expect("key"),
            ),
            short_channel_id: 42,
            fees: RoutingFees {
                base_msat: 1_000_000,
                proportional_millionths: 0,
            },
            cltv_expiry_delta: 40,
            htlc_minimum_msat: None,
            htlc_maximum_msat: None,
        };
        let key = SecretKey::from_slice(&[7; 32]).expect("key");
        InvoiceBuilder::new(Currency::Regtest)
            .description("home".to_owned())
            .payment_hash(sha256::Hash::hash(b"greedy"))
            .payment_secret(PaymentSecret([1; 32]))
            .current_timestamp()
            .expiry_time(Duration::from_secs(86_400))
            .min_final_cltv_expiry_delta(144)
            .private_route(RouteHint(vec![hop]))
            .build_signed(|msg| secp.sign_ecdsa_recoverable(msg, &key))
            .expect("invoice")
            .to_string()
    };
    let greedy = deposit.credential(json!({
        "action": "open", "preimage": preimage, "returnInvoice": greedy,
    }));
    let refused = post(&http, &chat(&model, 60, true), Some(&greedy)).await;
    assert_eq!(problem(refused).await, "lightning/invalid-return-invoice");
    let wrong = deposit.credential(json!({
        "action": "open", "preimage": "00".repeat(32), "returnInvoice": refund_to,
    }));
    let refused = post(&http, &chat(&model, 60, true), Some(&wrong)).await;
    assert_eq!(problem(refused).await, "lightning/invalid-preimage");
    let unknown = deposit.credential(json!({
        "action": "bearer", "sessionId": "ab".repeat(32), "preimage": preimage,
    }));
    let refused = post(&http, &chat(&model, 60, true), Some(&unknown)).await;
    assert_eq!(problem(refused).await, "lightning/session-not-found");

    // Open on a 60-token stream with a 20-token deposit: it runs dry, nobody tops it up.
    let open = deposit.credential(json!({
        "action": "open", "preimage": preimage, "returnInvoice": refund_to,
    }));
    let stream = post(&http, &chat(&model, 60, true), Some(&open)).await;
    assert_eq!(stream.status(), 200);
    let events = read_events(stream, |_, _| async {}).await;
    assert_eq!(data_of(&events, "payment-need-topup").len(), 1);
    let timeouts = data_of(&events, "session-timeout");
    assert_eq!(timeouts.len(), 1, "{events:?}");
    assert_eq!(timeouts[0]["sessionId"], session.as_str());
    let said = text_of(&events);
    let tokens = said.split_whitespace().count() as u64;
    assert_eq!(
        tokens * 100,
        deposit_msat,
        "what the deposit paid for, not a token more"
    );
    assert!(reply().starts_with(&said));
    let finish = events
        .iter()
        .filter_map(|(_, data)| serde_json::from_str::<Value>(data).ok())
        .find_map(|chunk| {
            chunk["choices"][0]["finish_reason"]
                .as_str()
                .map(str::to_owned)
        });
    assert_eq!(finish.as_deref(), Some("length"));
    harness::settled_jobs(daemon.pipeline().book().store()).await;
    assert_eq!(
        session_balance(&daemon, &session),
        0,
        "all spent on what was said"
    );

    // A second session, left idle with money on it: the service closes it and refunds.
    let (second, _) = session_offer(&http, &model, 20).await;
    let paid = harness::dev_pay(&http, second.invoice()).await;
    let (refund_to, refund_hash_2) = return_invoice(&http).await;
    let open = second.credential(json!({
        "action": "open", "preimage": paid, "returnInvoice": refund_to,
    }));
    let answer = post(&http, &chat(&model, 5, false), Some(&open)).await;
    assert_eq!(answer.status(), 200);
    harness::settled_jobs(daemon.pipeline().book().store()).await;
    let rest = session_balance(&daemon, &second.hash());
    assert!(rest > 0);
    assert_eq!(
        refunded(&daemon, &refund_hash_2, 100).await,
        Some(rest),
        "idle: closed, and the rest refunded"
    );
    let wallet = daemon.dev_wallet().expect("dev wallet");
    let closed = closed_session(&daemon, &second.hash()).await;
    assert_eq!(
        (closed.by.as_str(), closed.refund_status.as_str()),
        ("idle", "succeeded")
    );
    // The first, spent to zero, was closed idle too, with nothing to refund.
    assert_eq!(
        wallet.lookup(&refund_hash).await.expect("lookup"),
        PaymentStatus::Pending,
        "nothing left, nothing paid"
    );

    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

/// A session's refund is paid while its return invoice can still take it: a session in use is
/// closed (between calls) once its return invoice is about to expire, and refunded; a session
/// cannot open on a return invoice that expires sooner than that. Before, a session outliving
/// its return invoice was refunded only on an idle close, to an invoice that had expired: the
/// refund failed for good, and the rest stayed where an MPP client would not look for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_closed_and_refunded_before_its_return_invoice_expires() {
    // Idle closes are far off; with reconcile passes every second, a session is closed 32 s
    // before its return invoice expires.
    let (data, daemon) = start(|_| {}).await;
    let http = daemon.ready().http_url.clone();
    let model = harness::served_model(&http).await;
    let (deposit, _) = session_offer(&http, &model, 20).await;
    let preimage = harness::dev_pay(&http, deposit.invoice()).await;

    let (too_soon, _) = return_invoice_expiring(&http, Some(20)).await;
    let open = deposit.credential(json!({
        "action": "open", "preimage": preimage, "returnInvoice": too_soon,
    }));
    let refused = post(&http, &chat(&model, 5, false), Some(&open)).await;
    assert_eq!(problem(refused).await, "lightning/invalid-return-invoice");

    let (refund_to, refund_hash) = return_invoice_expiring(&http, Some(45)).await;
    let open = deposit.credential(json!({
        "action": "open", "preimage": preimage, "returnInvoice": refund_to,
    }));
    let answer = post(&http, &chat(&model, 5, false), Some(&open)).await;
    assert_eq!(answer.status(), 200);
    harness::settled_jobs(daemon.pipeline().book().store()).await;
    let rest = session_balance(&daemon, &deposit.hash());
    assert!(rest > 0);

    assert_eq!(
        refunded(&daemon, &refund_hash, 300).await,
        Some(rest),
        "the rest, refunded before the invoice expired"
    );
    let closed = closed_session(&daemon, &deposit.hash()).await;
    assert_eq!(
        (closed.by.as_str(), closed.refund_status.as_str()),
        ("return_invoice_expiring", "succeeded")
    );
    assert_eq!(session_balance(&daemon, &deposit.hash()), 0);
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

/// An invoice that names no amount on mainnet (LNbits' FakeWallet issues `lnbc`), signed by a
/// node nobody runs: what a client of an LNbits-backed service might hand in.
fn amountless_mainnet_invoice() -> String {
    use bitcoin::hashes::{sha256, Hash};
    use bitcoin::secp256k1::{Secp256k1, SecretKey};
    use lightning_invoice::{Currency, InvoiceBuilder, PaymentSecret};
    let key = SecretKey::from_slice(&[0x42; 32]).expect("key");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    InvoiceBuilder::new(Currency::Bitcoin)
        .description("refund".into())
        .payment_hash(sha256::Hash::hash(&rand::random::<[u8; 32]>()))
        .payment_secret(PaymentSecret([7; 32]))
        .duration_since_epoch(now)
        .expiry_time(Duration::from_secs(30 * 24 * 3600))
        .min_final_cltv_expiry_delta(144)
        .build_signed(|message| Secp256k1::new().sign_ecdsa_recoverable(message, &key))
        .expect("invoice")
        .to_string()
}

/// NWC (npm @getalby/sdk's wallet service on the test LNbits): sessions are offered, since
/// NIP-47's `pay_invoice` takes an `amount` for an invoice that names none. LNbits itself pays
/// no such invoice, and the service says so (`NOT_IMPLEMENTED`): the refund is declined, the
/// close says `failed`, and the rest is back on the session's account at once, where the L402
/// credential of the deposit's 402 withdraws it to the customer's LNbits wallet through NWC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nwc_a_declined_refund_stays_on_the_account_and_is_withdrawn() {
    use crate::lnbits::Lnbits;
    use crate::nwc::{relay, NwcService};

    let lnbits = Lnbits::start().await;
    let service = lnbits.create_wallet("dvmd").await;
    let customer = lnbits.create_wallet("customer").await;
    lnbits.fund(&customer, 10_000).await;
    let (relay_url, stop_relay) = relay().await;
    let nwc = NwcService::start(&relay_url, &lnbits, &service);
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        harness::use_nwc(file, data.path(), &nwc.uri);
        // A few sats of rest: no flat part of the routing fee reserve, or none would be left.
        file.wallet.payout_max_fee_base_msat = 0;
        file.pricing.base_fee_msat = 0;
        file.pricing.prompt_msat_per_1k_tokens = 0;
        file.pricing.completion_msat_per_1k_tokens = 100_000;
    });
    let daemon = harness::start(config, Some(Arc::new(InstantBackend::new(reply())))).await;
    let http = daemon.ready().http_url.clone();
    let model = harness::served_model(&http).await;

    let (deposit, macaroon) = session_offer(&http, &model, 60).await;
    assert!(deposit.invoice().starts_with("lnbc"), "LNbits' invoice");
    lnbits.pay(&customer, deposit.invoice()).await;
    let (_, paid) = lnbits.payment(Some(&customer.inkey), &deposit.hash()).await;
    let preimage = paid["preimage"].as_str().expect("preimage").to_owned();
    let open = deposit.credential(json!({
        "action": "open", "preimage": preimage, "returnInvoice": amountless_mainnet_invoice(),
    }));
    let answer = post(&http, &chat(&model, 10, false), Some(&open)).await;
    assert_eq!(answer.status(), 200, "{:?}", answer.text().await);
    harness::settled_jobs(daemon.pipeline().book().store()).await;
    let session = deposit.hash();
    let rest = session_balance(&daemon, &session);
    assert!(rest > 0);

    let close = deposit.credential(json!({
        "action": "close", "sessionId": session, "preimage": preimage,
    }));
    let closed = post(&http, &chat(&model, 5, false), Some(&close)).await;
    assert_eq!(closed.status(), 200);
    assert_eq!(receipt(&closed)["refundStatus"], "failed");
    let body: Value = closed.json().await.expect("json");
    assert_eq!(body["refundStatus"], "failed", "{body}");
    assert!(body["refundMsat"].as_u64().expect("refundMsat") > 0);
    assert_eq!(
        session_balance(&daemon, &session),
        rest,
        "declined: all of it back on the account, nothing in flight"
    );
    let (bolt11, note) = close_payout(&daemon).await;
    let refund = dvmd::wallet::bolt11::decode(&bolt11).expect("the refund's invoice");
    assert!(refund.amount_msat.is_none());
    // The service was asked to pay the amount (NIP-47 `pay_invoice` `amount`), and said no.
    assert!(
        note.contains(&format!("asked to pay {} msat", body["refundMsat"])),
        "{note}"
    );

    // The rest goes home through the L402 credential of the deposit's 402.
    let fee = rest * 5_000 / 1_000_000;
    let home_sats = (rest - fee) / 1000;
    let (home, home_hash) = lnbits.create_invoice(&customer, home_sats, "home").await;
    let withdrawn = reqwest::Client::new()
        .post(format!("{http}/v1/account/withdraw"))
        .header("Authorization", format!("L402 {macaroon}:{preimage}"))
        .json(&json!({ "bolt11": home }))
        .send()
        .await
        .expect("send");
    let status = withdrawn.status();
    let payout: Value = withdrawn.json().await.expect("json");
    assert_eq!(status, 200, "{payout}");
    assert_eq!(payout["state"], "paid", "{payout}");
    assert!(lnbits.is_paid(&customer, &home_hash).await);

    daemon.stop().await;
    stop_relay.cancel();
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    let refund_msat = body["refundMsat"].as_u64().expect("refundMsat");
    assert_eq!(
        totals.payout_failed_msat,
        refund_msat + refund_msat * 5_000 / 1_000_000,
        "the declined refund and its fee reserve came back"
    );
    assert_eq!(totals.payout_msat, home_sats * 1000);
}

/// The one payout booked against the session's account, the refund: its invoice and note.
async fn close_payout(daemon: &Daemon) -> (String, String) {
    let payouts = daemon
        .pipeline()
        .book()
        .store()
        .read(|r| {
            let mut all = Vec::new();
            for item in r.scan::<dvmd::job::payouts::Payout>(dvmd::store::Tree::Payouts) {
                all.push(item?.1);
            }
            Ok::<_, dvmd::store::StoreError>(all)
        })
        .await
        .expect("payouts");
    assert_eq!(payouts.len(), 1, "{payouts:?}");
    assert_eq!(payouts[0].state, dvmd::job::payouts::PayoutState::Failed);
    (
        payouts[0].bolt11.clone(),
        payouts[0].note.clone().unwrap_or_default(),
    )
}

/// LNbits pays no invoice that names no amount: no session is offered beside the charge, and a
/// session credential is refused with that reason (and a fresh charge challenge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_lnbits_no_session_is_offered_and_one_is_refused_with_the_reason() {
    use crate::lnbits::Lnbits;

    let lnbits = Lnbits::start().await;
    let operator = lnbits.create_wallet("dvmd").await;
    let customer = lnbits.create_wallet("customer").await;
    lnbits.fund(&customer, 10_000).await;
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        harness::use_lnbits(file, data.path(), &lnbits.url, &operator.inkey);
    });
    let daemon = harness::start(config, Some(Arc::new(InstantBackend::new(reply())))).await;
    let http = daemon.ready().http_url.clone();
    let model = harness::served_model(&http).await;
    let (offers, _) = challenges(post(&http, &chat(&model, 10, false), None).await).await;
    assert!(offers.contains_key("charge"));
    assert!(!offers.contains_key("session"), "no session on LNbits");

    // A client that tries anyway: the charge's challenge, paid, presented as a session open.
    let charge = &offers["charge"];
    let invoice = charge.request["methodDetails"]["invoice"]
        .as_str()
        .expect("invoice");
    lnbits.pay(&customer, invoice).await;
    let hash = charge.request["methodDetails"]["paymentHash"]
        .as_str()
        .expect("hash");
    let (_, paid) = lnbits.payment(Some(&customer.inkey), hash).await;
    let preimage = paid["preimage"].as_str().expect("preimage");
    let mut echo = charge.clone();
    echo.params.insert("intent".into(), "session".into());
    let open = echo.credential(json!({
        "action": "open", "preimage": preimage, "returnInvoice": amountless_mainnet_invoice(),
    }));
    let refused = post(&http, &chat(&model, 10, false), Some(&open)).await;
    assert_eq!(refused.status(), 402);
    let fresh: Vec<String> = refused
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().expect("text").to_owned())
        .collect();
    assert!(
        fresh.iter().any(|v| v.contains("intent=\"charge\"")),
        "{fresh:?}"
    );
    assert!(!fresh.iter().any(|v| v.contains("intent=\"session\"")));
    let problem: Value = refused.json().await.expect("json");
    assert_eq!(
        problem["type"],
        "https://paymentauth.org/problems/method-unsupported"
    );
    let detail = problem["detail"].as_str().expect("detail");
    assert!(
        detail.contains("offers no sessions") && detail.contains("lnbits"),
        "the reason: {detail}"
    );
    // The payment is not lost: the charge credential of the same 402 still pays a call.
    let charged = post(
        &http,
        &chat(&model, 10, false),
        Some(&charge.credential(json!({ "preimage": preimage }))),
    )
    .await;
    assert_eq!(charged.status(), 200);
    harness::settled_jobs(daemon.pipeline().book().store()).await;
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

/// npm `mppx`, the draft's reference client, reads our 402 (three challenges: L402 beside two
/// `Payment` ones) with its own parser, picks the Lightning `session` challenge for the method
/// it was given, opens the session with a credential it serialized (echo and all), reads the
/// receipt, and closes the session: the rest reaches its return invoice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mppx_opens_and_closes_a_session_through_its_own_client() {
    let (data, daemon) = start(|_| {}).await;
    let http = daemon.ready().http_url.clone();
    let model = harness::served_model(&http).await;
    let url = format!("{http}/v1/chat/completions");
    // 100 tokens asked, 60 said: the deposit (the quote) leaves a rest to refund.
    let body = chat(&model, 100, false).to_string();
    let lines = {
        let (url, body, http) = (url.clone(), body.clone(), http.clone());
        tokio::task::spawn_blocking(move || {
            harness::node_peer(
                "mpp_session.mjs",
                &["--url", &url, "--body", &body, "--pay", &http],
            )
        })
        .await
        .expect("node")
    };
    let out = &lines[0];
    let offered = out["offered"].as_array().expect("challenges");
    let intents: Vec<&str> = offered
        .iter()
        .filter(|c| c["method"] == "lightning")
        .filter_map(|c| c["intent"].as_str())
        .collect();
    assert_eq!(intents, ["charge", "session"], "{out}");
    let session = offered
        .iter()
        .find(|c| c["intent"] == "session")
        .expect("session");
    assert_eq!(session["request"]["amount"], "1");
    assert_eq!(session["request"]["idleTimeout"], "300");

    assert_eq!(out["status"], 200, "{out}");
    let id = out["session"].as_str().expect("session id");
    assert_eq!(out["receipt"]["reference"], id, "{out}");
    assert_eq!(out["receipt"]["status"], "success");
    assert_eq!(out["body"]["dvmd"]["charge_msat"], 6_000, "60 tokens");

    let closed = &out["closed"];
    assert_eq!(closed["status"], 200, "{closed}");
    assert_eq!(closed["body"]["status"], "closed");
    assert_eq!(closed["body"]["refundStatus"], "succeeded");
    assert_eq!(closed["receipt"]["reference"], id);
    let deposit_msat = session["request"]["depositAmount"]
        .as_str()
        .expect("depositAmount")
        .parse::<u64>()
        .expect("sats")
        * 1000;
    assert_eq!(
        closed["body"]["refundMsat"],
        deposit_msat - 6_000,
        "{closed}"
    );
    harness::settled_jobs(daemon.pipeline().book().store()).await;
    daemon.stop().await;
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    assert_eq!(totals.payout_msat, deposit_msat - 6_000);
}

/// One session under load: eight streams at once on a balance that covers three, two top-ups
/// landing while some wait (one of them sent twice at once), then a close racing a third top-up.
/// Every msat deposited is charged for a token said, refunded, or still on an account; no
/// top-up moves twice; every stream ends once with `[DONE]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_streams_top_ups_and_a_close_on_one_session_lose_nothing() {
    let (data, daemon) = start(|file| {
        file.service.workers = 8;
        file.http.session_topup_wait_secs = 10;
    })
    .await;
    let http = daemon.ready().http_url.clone();
    let model = harness::served_model(&http).await;
    let (deposit, _) = session_offer(&http, &model, 60).await;
    let session = deposit.hash();
    let preimage = harness::dev_pay(&http, deposit.invoice()).await;
    let (refund_to, refund_hash) = return_invoice(&http).await;
    let open = deposit.credential(json!({
        "action": "open", "preimage": preimage, "returnInvoice": refund_to,
    }));
    assert_eq!(
        post(&http, &chat(&model, 1, false), Some(&open))
            .await
            .status(),
        200
    );
    let bearer = deposit.credential(json!({
        "action": "bearer", "sessionId": session, "preimage": preimage,
    }));

    let dry = Arc::new(tokio::sync::Notify::new());
    let mut streams = Vec::new();
    for _ in 0..8 {
        let (http, model, bearer, dry) = (http.clone(), model.clone(), bearer.clone(), dry.clone());
        streams.push(tokio::spawn(async move {
            let response = post(&http, &chat(&model, 20, true), Some(&bearer)).await;
            if response.status() != 200 {
                let problem: Value = response.json().await.expect("json");
                return Err(problem["type"].as_str().unwrap_or_default().to_owned());
            }
            let events = read_events(response, |name, _| {
                if name == "payment-need-topup" {
                    dry.notify_one();
                }
                async {}
            })
            .await;
            Ok(events)
        }));
    }
    // Once a stream waits: one top-up sent twice at once, then another.
    let top_ups = {
        let (http, model, session) = (http.clone(), model.clone(), session.clone());
        tokio::spawn(async move {
            dry.notified().await;
            let mut moved = Vec::new();
            for twice in [true, false] {
                let (offer, _) = session_offer(&http, &model, 20).await;
                let paid = harness::dev_pay(&http, offer.invoice()).await;
                let credential = offer.credential(json!({
                    "action": "topUp", "sessionId": session, "topUpPreimage": paid,
                }));
                let body = chat(&model, 1, false);
                let (a, b) = tokio::join!(post(&http, &body, Some(&credential)), async {
                    if twice {
                        Some(post(&http, &body, Some(&credential)).await)
                    } else {
                        None
                    }
                });
                assert_eq!(a.status(), 200);
                if let Some(b) = b {
                    assert_eq!(b.status(), 200, "the same top-up again answers the same");
                }
                moved.push(offer.deposit_msat());
            }
            moved
        })
    };
    let mut said_tokens = 0u64;
    let (mut refused, mut resumed) = (0, 0);
    for stream in streams {
        match stream.await.expect("stream task") {
            Ok(events) => {
                assert_eq!(
                    events.last().map(|(_, d)| d.as_str()),
                    Some("[DONE]"),
                    "{events:?}"
                );
                let text = text_of(&events);
                assert!(
                    reply().starts_with(&text),
                    "in order, nothing twice: {text}"
                );
                let tokens = text.split_whitespace().count() as u64;
                if !data_of(&events, "payment-need-topup").is_empty()
                    && data_of(&events, "session-timeout").is_empty()
                {
                    resumed += 1;
                }
                let receipt = &data_of(&events, "payment-receipt")[0];
                assert_eq!(receipt["units"], tokens);
                assert_eq!(receipt["spentMsat"], tokens * 100, "exactly its tokens");
                said_tokens += tokens;
            }
            Err(problem) => {
                assert_eq!(
                    problem,
                    "https://paymentauth.org/problems/lightning/insufficient-balance"
                );
                refused += 1;
            }
        }
    }
    let topped: u64 = top_ups.await.expect("top-ups").iter().sum();
    assert!(resumed >= 1, "a stream ran dry and went on after a top-up");
    assert!(
        refused >= 1,
        "the balance was reserved, never more: later calls were refused"
    );
    harness::settled_jobs(daemon.pipeline().book().store()).await;
    let hash = PaymentHash::from_hex(&session).expect("hex");
    let record = daemon
        .pipeline()
        .session(&hash)
        .await
        .expect("read")
        .expect("session");
    let deposit_msat = deposit.deposit_msat();
    assert_eq!(
        record.deposited_msat,
        deposit_msat + topped,
        "each top-up moved once"
    );
    let left = session_balance(&daemon, &session);
    assert_eq!(
        left + 100 + said_tokens * 100,
        record.deposited_msat,
        "charged for every token said ({said_tokens}, {refused} calls refused), the rest on the session"
    );

    // A close racing a third top-up: either the top-up lands first and is refunded with the
    // rest, or the session is closed first and the top-up's payment stays on its own account.
    let (third, _) = session_offer(&http, &model, 20).await;
    let paid = harness::dev_pay(&http, third.invoice()).await;
    let top_up = third.credential(json!({
        "action": "topUp", "sessionId": session, "topUpPreimage": paid,
    }));
    let close = deposit.credential(json!({
        "action": "close", "sessionId": session, "preimage": preimage,
    }));
    // The close is sent twice at once (a client retrying): one refund, both answered.
    let body = chat(&model, 1, false);
    let (topped_up, closed, closed_twice) = tokio::join!(
        post(&http, &body, Some(&top_up)),
        post(&http, &body, Some(&close)),
        post(&http, &body, Some(&close))
    );
    assert_eq!(closed.status(), 200);
    assert_eq!(
        closed_twice.status(),
        200,
        "the same close again is answered"
    );
    let closed: Value = closed.json().await.expect("json");
    let closed_twice: Value = closed_twice.json().await.expect("json");
    assert_eq!(closed["refundMsat"], closed_twice["refundMsat"]);
    let third_msat = third.deposit_msat();
    let third_account = Account::Token(PaymentHash::from_hex(&third.hash()).expect("hex"));
    let third_left = harness::account_balance(daemon.pipeline().book().store(), &third_account);
    let refunded = closed["refundMsat"].as_u64().expect("refundMsat");
    if topped_up.status() == 200 {
        assert_eq!((refunded, third_left), (left + third_msat, 0), "{closed}");
    } else {
        assert_eq!(problem(topped_up).await, "lightning/session-closed");
        assert_eq!((refunded, third_left), (left, third_msat), "{closed}");
    }
    if refunded > 0 {
        assert_eq!(
            daemon
                .dev_wallet()
                .expect("dev")
                .lookup(&refund_hash)
                .await
                .expect("lookup"),
            PaymentStatus::Paid {
                amount_msat: refunded
            }
        );
    }
    assert_eq!(session_balance(&daemon, &session), 0);
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

/// A stream waiting for a top-up when its session is closed ends at once (no top-up can come):
/// `session-timeout`, charged what it said; the close refunded what the stream did not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_session_ends_the_stream_that_waits_on_it() {
    // A wait far longer than the read deadline below: only the close can end it in time.
    let (data, daemon) = start(|file| file.http.session_topup_wait_secs = 600).await;
    let http = daemon.ready().http_url.clone();
    let model = harness::served_model(&http).await;
    let (deposit, _) = session_offer(&http, &model, 20).await;
    let session = deposit.hash();
    let preimage = harness::dev_pay(&http, deposit.invoice()).await;
    let (refund_to, _) = return_invoice(&http).await;
    let open = deposit.credential(json!({
        "action": "open", "preimage": preimage, "returnInvoice": refund_to,
    }));
    let stream = post(&http, &chat(&model, 60, true), Some(&open)).await;
    assert_eq!(stream.status(), 200);
    let close = deposit.credential(json!({
        "action": "close", "sessionId": session, "preimage": preimage,
    }));
    let closed = std::sync::Mutex::new(None);
    let events = read_events(stream, |name, _| {
        let (http, model, close, closed) = (&http, &model, &close, &closed);
        let name = name.to_owned();
        async move {
            if name == "payment-need-topup" {
                let answer = post(http, &chat(model, 1, false), Some(close)).await;
                assert_eq!(answer.status(), 200);
                let body: Value = answer.json().await.expect("json");
                *closed.lock().expect("lock") = Some(body);
            }
        }
    })
    .await;
    assert_eq!(data_of(&events, "session-timeout").len(), 1, "{events:?}");
    assert_eq!(events.last().map(|(_, d)| d.as_str()), Some("[DONE]"));
    let body = closed.lock().expect("lock").take().expect("closed");
    assert_eq!(
        body["refundStatus"], "skipped",
        "the stream held all of it: {body}"
    );
    harness::settled_jobs(daemon.pipeline().book().store()).await;
    let said = text_of(&events).split_whitespace().count() as u64;
    let deposit_msat = deposit.deposit_msat();
    assert_eq!(
        said * 100,
        deposit_msat,
        "charged what it said, all of the deposit"
    );
    assert_eq!(session_balance(&daemon, &session), 0);
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}
