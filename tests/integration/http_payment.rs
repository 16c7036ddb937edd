//! The HTTP `Payment` scheme (draft-httpauth-payment, Lightning method, `charge` intent) on
//! loopback with the dev wallet: the challenge read with this file's own parser (not dvmd's),
//! checked against the L402 challenge of the same 402; a charge round trip with its
//! `Payment-Receipt`; every refusal (a used challenge, a preimage for another challenge, an
//! altered echo, an expired challenge) answered 402 with the draft's problem type and a fresh
//! challenge; two concurrent calls with one credential, of which one runs; and what a call
//! leaves on the payment hash's account, spent by the L402 credential of the same 402.

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use dvmd::daemon::Daemon;
use dvmd::infer::instant::InstantBackend;
use dvmd::wallet::Wallet;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::harness;
use crate::harness::payment_auth_params as auth_params;

/// One `Payment` challenge, as a client reads it.
struct Offer {
    params: HashMap<String, String>,
    request: Value,
    /// The macaroon of the L402 challenge in the same 402.
    macaroon: String,
}

impl Offer {
    fn invoice(&self) -> &str {
        self.request["methodDetails"]["invoice"]
            .as_str()
            .expect("invoice")
    }

    /// `Authorization: Payment …` echoing this challenge, with `preimage`.
    fn credential(&self, preimage: &str) -> String {
        let mut echo = serde_json::Map::new();
        for name in ["id", "realm", "method", "intent", "request", "expires"] {
            echo.insert(name.into(), json!(self.params[name]));
        }
        let wire = json!({ "challenge": echo, "payload": { "preimage": preimage } });
        format!("Payment {}", URL_SAFE_NO_PAD.encode(wire.to_string()))
    }
}

/// Read a 402: its `Payment` challenge, and the L402 challenge beside it.
async fn offer(response: reqwest::Response) -> Offer {
    assert_eq!(response.status(), 402);
    assert_eq!(
        response
            .headers()
            .get("cache-control")
            .map(|v| v.to_str().expect("text")),
        Some("no-store"),
        "a 402 is never cached"
    );
    let values: Vec<String> = response
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().expect("text").to_owned())
        .collect();
    let payment = values
        .iter()
        .find(|v| v.starts_with("Payment "))
        .unwrap_or_else(|| panic!("a Payment challenge: {values:?}"));
    let params = auth_params(payment);
    for name in ["id", "realm", "method", "intent", "request", "expires"] {
        assert!(!params[name].is_empty(), "{name} in {payment}");
    }
    assert_eq!(
        (params["method"].as_str(), params["intent"].as_str()),
        ("lightning", "charge")
    );
    let raw = URL_SAFE_NO_PAD
        .decode(&params["request"])
        .expect("base64url, no padding");
    let text = String::from_utf8(raw).expect("utf-8");
    let request: Value = serde_json::from_str(&text).expect("json");
    // JCS: the members sorted, no whitespace; here every value is a string.
    let canonical = {
        let details = &request["methodDetails"];
        format!(
            r#"{{"amount":{},"currency":{},"description":{},"methodDetails":{{"invoice":{},"network":{},"paymentHash":{}}}}}"#,
            request["amount"],
            request["currency"],
            request["description"],
            details["invoice"],
            details["network"],
            details["paymentHash"]
        )
    };
    assert_eq!(text, canonical, "the request is JCS");
    let body: Value = response.json().await.expect("json");
    let l402 = &body["l402"];
    assert_eq!(
        request["methodDetails"]["invoice"], l402["invoice"],
        "one invoice for both"
    );
    assert_eq!(
        request["methodDetails"]["paymentHash"],
        l402["payment_hash"]
    );
    assert_eq!(
        request["methodDetails"]["network"], "regtest",
        "the dev wallet's invoices"
    );
    assert_eq!(request["currency"], "sat");
    let sats: u64 = request["amount"]
        .as_str()
        .expect("a string")
        .parse()
        .expect("whole sats");
    assert_eq!(sats * 1000, l402["amount_msat"].as_u64().expect("amount"));
    Offer {
        params,
        request,
        macaroon: l402["macaroon"].as_str().expect("macaroon").to_owned(),
    }
}

fn chat(model: &str, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{ "role": "user", "content": "Say something." }],
        "max_tokens": max_tokens,
    })
}

async fn call(http: &str, auth: Option<&str>) -> reqwest::Response {
    let model = harness::served_model(http).await;
    let mut request = reqwest::Client::new()
        .post(format!("{http}/v1/chat/completions"))
        .json(&chat(&model, 8));
    if let Some(auth) = auth {
        request = request.header("Authorization", auth);
    }
    request.send().await.expect("send")
}

/// A refusal: 402, the problem type named, a fresh challenge (another id) beside it.
async fn refused(response: reqwest::Response, problem: &str, used_id: &str) {
    assert_eq!(response.status(), 402);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().expect("text")),
        Some("application/problem+json")
    );
    assert!(
        response.headers().get("payment-receipt").is_none(),
        "no receipt on an error"
    );
    let fresh = response
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().expect("text").to_owned())
        .find(|v| v.starts_with("Payment "))
        .expect("a fresh challenge");
    assert_ne!(
        auth_params(&fresh)["id"],
        used_id,
        "never the same challenge again"
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body["type"],
        format!("https://paymentauth.org/problems/{problem}"),
        "{body}"
    );
    assert_eq!(body["status"], 402);
    assert!(
        body["detail"].is_string() && body["error"]["message"].is_string(),
        "{body}"
    );
}

async fn start(edit: impl FnOnce(&mut dvmd::config::FileConfig)) -> (tempfile::TempDir, Daemon) {
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("paid by the Payment scheme"));
    let daemon = harness::start(harness::dev_config(data.path(), edit), Some(backend)).await;
    (data, daemon)
}

async fn l402_balance(http: &str, macaroon: &str, preimage: &str) -> u64 {
    let response = reqwest::Client::new()
        .get(format!("{http}/v1/l402/balance"))
        .header("Authorization", format!("L402 {macaroon}:{preimage}"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    body["balance_msat"].as_u64().expect("balance")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_pays_one_call_once_and_every_refusal_names_its_problem() {
    let (data, daemon) = start(|_| {}).await;
    let http = daemon.ready().http_url.clone();

    let first = offer(call(&http, None).await).await;
    let id = first.params["id"].clone();
    let preimage = harness::dev_pay(&http, first.invoice()).await;
    let paid = Sha256::digest(hex::decode(&preimage).expect("hex"));
    assert_eq!(
        first.request["methodDetails"]["paymentHash"],
        hex::encode(paid)
    );

    // An altered echo (a later expiry) does not match what was issued.
    let mut altered = Offer {
        params: first.params.clone(),
        request: first.request.clone(),
        macaroon: String::new(),
    };
    altered
        .params
        .insert("expires".into(), "2099-01-01T00:00:00Z".into());
    refused(
        call(&http, Some(&altered.credential(&preimage))).await,
        "lightning/unknown-challenge",
        &id,
    )
    .await;

    // The credential: 200, with a receipt naming the challenge and the payment hash.
    let response = call(&http, Some(&first.credential(&preimage))).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("cache-control")
            .map(|v| v.to_str().expect("text")),
        Some("private")
    );
    let receipt = response
        .headers()
        .get("payment-receipt")
        .expect("receipt")
        .to_str()
        .expect("text");
    let receipt: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(receipt).expect("base64url")).expect("json");
    assert_eq!(receipt["challengeId"], id.as_str());
    assert_eq!(
        receipt["reference"],
        hex::encode(paid),
        "the payment hash, never the preimage"
    );
    assert_eq!(
        (receipt["method"].as_str(), receipt["status"].as_str()),
        (Some("lightning"), Some("success"))
    );
    assert!(receipt["timestamp"]
        .as_str()
        .expect("timestamp")
        .ends_with('Z'));
    let answer: Value = response.json().await.expect("json");
    let charged = answer["dvmd"]["charge_msat"].as_u64().expect("charge");

    // The same credential again: the challenge is used.
    refused(
        call(&http, Some(&first.credential(&preimage))).await,
        "lightning/unknown-challenge",
        &id,
    )
    .await;

    // A preimage that paid one challenge, presented for another.
    let other = offer(call(&http, None).await).await;
    refused(
        call(&http, Some(&other.credential(&preimage))).await,
        "lightning/invalid-preimage",
        &other.params["id"],
    )
    .await;
    // A preimage nobody paid.
    refused(
        call(&http, Some(&other.credential(&"ab".repeat(32)))).await,
        "lightning/invalid-preimage",
        &other.params["id"],
    )
    .await;
    // Malformed: not base64url JSON.
    refused(
        call(&http, Some("Payment not-json")).await,
        "lightning/malformed-credential",
        "",
    )
    .await;

    // What the call left stays on the payment hash's account: the L402 credential of the same
    // 402 reads (and spends) it.
    harness::settled_jobs(daemon.pipeline().book().store()).await;
    let amount = first.request["amount"]
        .as_str()
        .expect("amount")
        .parse::<u64>()
        .expect("sats")
        * 1000;
    assert_eq!(
        l402_balance(&http, &first.macaroon, &preimage).await,
        amount - charged
    );

    // Two calls at once with one fresh credential: one runs, the other is refused.
    let third = offer(call(&http, None).await).await;
    let preimage = harness::dev_pay(&http, third.invoice()).await;
    let auth = third.credential(&preimage);
    let (a, b) = tokio::join!(call(&http, Some(&auth)), call(&http, Some(&auth)));
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 402], "one payment, one call");

    harness::settled_jobs(daemon.pipeline().book().store()).await;
    let store = daemon.pipeline().book().store();
    assert_eq!(
        harness::jobs(store).len(),
        2,
        "two calls ran, one per challenge"
    );
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

/// A `charge` credential is used by the write that opens its call, never before. So a call it
/// does not open (here one quoted above what was paid) leaves it for the call it paid for, and
/// that call made again with its `Idempotency-Key` (its answer lost, say) finds the job it
/// opened: 409 naming it, not a fresh invoice to pay a second time. On the code before, the
/// credential was used up by the call it could not open, and the retry got a new 402.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_credential_is_used_only_by_the_call_it_opens() {
    let (data, daemon) = start(|_| {}).await;
    let http = daemon.ready().http_url.clone();
    let model = harness::served_model(&http).await;
    let send = |body: Value, auth: String, key: Option<&'static str>| {
        let url = format!("{http}/v1/chat/completions");
        async move {
            let mut request = reqwest::Client::new()
                .post(url)
                .header("Authorization", auth)
                .json(&body);
            if let Some(key) = key {
                request = request.header("Idempotency-Key", key);
            }
            request.send().await.expect("send")
        }
    };

    let first = offer(call(&http, None).await).await;
    let id = first.params["id"].clone();
    let preimage = harness::dev_pay(&http, first.invoice()).await;
    let auth = first.credential(&preimage);

    let bigger = send(chat(&model, 1024), auth.clone(), None).await;
    assert_eq!(bigger.status(), 402, "quoted above what was paid");
    assert!(harness::jobs(daemon.pipeline().book().store()).is_empty());

    let paid_for = send(chat(&model, 8), auth.clone(), Some("call-1")).await;
    assert_eq!(
        paid_for.status(),
        200,
        "the credential pays the call it was bought for"
    );
    let answer: Value = paid_for.json().await.expect("json");
    let job = answer["dvmd"]["job"].as_str().expect("job id").to_owned();

    let again = send(chat(&model, 8), auth.clone(), Some("call-1")).await;
    assert_eq!(again.status(), 409);
    let said: Value = again.json().await.expect("json");
    assert_eq!(said["error"]["code"], "already_ran", "{said}");
    assert!(
        said["error"]["message"]
            .as_str()
            .expect("message")
            .contains(&job),
        "names the job: {said}"
    );
    refused(
        send(chat(&model, 8), auth, Some("call-2")).await,
        "lightning/unknown-challenge",
        &id,
    )
    .await;

    let store = daemon.pipeline().book().store();
    harness::settled_jobs(store).await;
    assert_eq!(harness::jobs(store).len(), 1, "one call ran");
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

/// The estimator moves between a 402 and its paid retry, so the same call can be quoted a
/// little more than its challenge sold. Within a quarter more, the credential pays for it,
/// stopping at what was paid; further above (a bigger call) it gets a 402.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_pays_for_a_call_quoted_a_little_above_what_it_sold() {
    let (data, daemon) = start(|_| {}).await;
    let http = daemon.ready().http_url.clone();
    let model = harness::served_model(&http).await;
    let send = |max_tokens: u32, auth: Option<String>| {
        let (url, body) = (
            format!("{http}/v1/chat/completions"),
            chat(&model, max_tokens),
        );
        async move {
            let mut request = reqwest::Client::new().post(url).json(&body);
            if let Some(auth) = auth {
                request = request.header("Authorization", auth);
            }
            request.send().await.expect("send")
        }
    };
    // What a call of `max_tokens` is quoted, read from its 402.
    let quote = |max_tokens: u32| {
        let sent = send(max_tokens, None);
        async move {
            let body: Value = sent.await.json().await.expect("json");
            let message = body["error"]["message"].as_str().expect("message");
            let quoted = message
                .split("quoted ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok());
            quoted.unwrap_or_else(|| panic!("no quote in {body}"))
        }
    };

    let first = offer(send(8, None).await).await;
    let sold: u64 = first.request["amount"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("sats");
    let sold = sold * 1000;
    let mut quotes = Vec::new();
    let mut moved = None;
    for max_tokens in [16, 32, 64, 96, 104, 112, 128, 144, 160, 192, 256, 384, 512] {
        let quoted = quote(max_tokens).await;
        quotes.push((max_tokens, quoted));
        if quoted > sold && quoted <= sold + sold / 4 {
            moved = moved.or(Some(max_tokens));
        }
        if quoted > sold + sold / 4 {
            break;
        }
    }
    let moved = moved.unwrap_or_else(|| panic!("sold {sold} msat; quotes {quotes:?}"));
    let bigger = quotes
        .iter()
        .find(|(_, quoted)| *quoted > sold + sold / 4)
        .map(|(n, _)| *n)
        .unwrap_or(1024);
    let preimage = harness::dev_pay(&http, first.invoice()).await;
    let auth = first.credential(&preimage);

    let refused = send(bigger, Some(auth.clone())).await;
    assert_eq!(refused.status(), 402, "a bigger call than the one sold");
    let ran = send(moved, Some(auth)).await;
    assert_eq!(
        ran.status(),
        200,
        "quoted within a quarter of what was sold"
    );
    let answer: Value = ran.json().await.expect("json");
    let charged = answer["dvmd"]["charge_msat"].as_u64().expect("charge");
    assert!(
        charged <= sold,
        "charged {charged} of {sold} paid: {answer}"
    );

    let store = daemon.pipeline().book().store();
    harness::settled_jobs(store).await;
    assert_eq!(harness::jobs(store).len(), 1, "one call ran");
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_challenge_is_refused_and_its_payment_stays_withdrawable() {
    let (data, daemon) = start(|file| {
        file.pricing.invoice_expiry_secs = 60;
        // The dev wallet charges no routing fee; reserve none, so all of 2 sats can leave.
        file.wallet.payout_max_fee_base_msat = 0;
        file.wallet.payout_max_fee_ppm = 0;
    })
    .await;
    let http = daemon.ready().http_url.clone();
    let offered = offer(call(&http, None).await).await;
    let preimage = harness::dev_pay(&http, offered.invoice()).await;
    // Wait out the challenge (it expires with its invoice).
    tokio::time::sleep(std::time::Duration::from_secs(61)).await;
    refused(
        call(&http, Some(&offered.credential(&preimage))).await,
        "lightning/expired-invoice",
        &offered.params["id"],
    )
    .await;
    // Nothing ran and nothing was charged: the payment is on its account, whole.
    let amount = offered.request["amount"]
        .as_str()
        .expect("amount")
        .parse::<u64>()
        .expect("sats")
        * 1000;
    assert_eq!(
        l402_balance(&http, &offered.macaroon, &preimage).await,
        amount
    );
    assert!(harness::jobs(daemon.pipeline().book().store()).is_empty());
    // The Payment credential still proves whose it is: it can take the money home.
    let dev = daemon.dev_wallet().expect("dev wallet");
    let home = dev
        .create_invoice(dvmd::wallet::InvoiceRequest {
            amount_msat: amount,
            description: dvmd::wallet::InvoiceDescription::Memo("home".into()),
            expiry_secs: 600,
        })
        .await
        .expect("invoice");
    let response = reqwest::Client::new()
        .post(format!("{http}/v1/account/withdraw"))
        .header("Authorization", offered.credential(&preimage))
        .json(&json!({ "bolt11": home.bolt11 }))
        .send()
        .await
        .expect("send");
    let status = response.status();
    let payout: Value = response.json().await.expect("json");
    assert_eq!(status, 200, "{payout}");
    assert_eq!(payout["state"], "paid", "{payout}");
    daemon.stop().await;
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    assert_eq!(totals.payout_msat, amount);
}

/// npm `mppx`, the draft's reference client, reads our challenges with its own parser, pays
/// through its own credential path (echoing the challenge as it re-encodes it: a request that
/// is not canonical JSON would not match what we issued), and reads our receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mppx_pays_a_call_through_its_own_client() {
    let (data, daemon) = start(|_| {}).await;
    let http = daemon.ready().http_url.clone();
    let model = harness::served_model(&http).await;
    let url = format!("{http}/v1/chat/completions");
    let body = chat(&model, 8).to_string();
    let lines = {
        let (url, body, http) = (url.clone(), body.clone(), http.clone());
        tokio::task::spawn_blocking(move || {
            harness::node_peer(
                "mpp_charge.mjs",
                &["--url", &url, "--body", &body, "--pay", &http],
            )
        })
        .await
        .expect("node")
    };
    let out = &lines[0];
    let offered = out["offered"].as_array().expect("challenges");
    let ours = offered
        .iter()
        .find(|c| c["method"] == "lightning")
        .unwrap_or_else(|| panic!("mppx read a lightning challenge: {out}"));
    assert_eq!(ours["intent"], "charge");
    assert_eq!(ours["request"]["currency"], "sat", "{ours}");
    assert_eq!(ours["request"]["methodDetails"]["network"], "regtest");
    assert!(
        ours["expires"].as_str().is_some_and(|e| e.ends_with('Z')),
        "{ours}"
    );

    assert_eq!(out["status"], 200, "{out}");
    let receipt = &out["receipt"];
    assert_eq!(receipt["status"], "success", "{out}");
    assert_eq!(receipt["method"], "lightning");
    let reference = receipt["reference"].as_str().expect("reference");
    let hash = dvmd::wallet::PaymentHash::try_from(reference.to_owned()).expect("a payment hash");
    let charged = out["body"]["dvmd"]["charge_msat"].as_u64().expect("charge");
    assert!(
        out["body"]["choices"][0]["message"]["content"].is_string(),
        "{out}"
    );

    // The paid call ran on the payment hash's account; what it left is there.
    harness::settled_jobs(daemon.pipeline().book().store()).await;
    let store = daemon.pipeline().book().store();
    let jobs = harness::jobs(store);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].customer, dvmd::ledger::Account::Token(hash));
    let left = daemon
        .pipeline()
        .balance_of(dvmd::ledger::Account::Token(hash))
        .await
        .expect("balance");
    let paid = daemon
        .pipeline()
        .book()
        .payment(&hash)
        .await
        .expect("read")
        .expect("the payment")
        .amount_msat;
    assert_eq!(left, paid - charged);
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}
