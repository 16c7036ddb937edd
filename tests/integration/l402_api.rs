//! L402 on loopback, with clients that share nothing with dvmd: a prepaid token used as the
//! OpenAI SDK's API key until it runs dry; macaroons read and made by PyPI `pymacaroons`
//! (identifier checked byte for byte against aperture's layout); `@getalby/lightning-tools`
//! `fetchWithL402` paying from an LNbits wallet; every forgery refused with 401 and nothing
//! charged; challenge floods limited per client address.

use std::sync::Arc;

use base64::Engine;
use dvmd::daemon::Daemon;
use dvmd::infer::instant::InstantBackend;
use dvmd::l402::Macaroon;
use dvmd::ledger::Account;
use dvmd::wallet::{
    Invoice, InvoiceRequest, PaymentHash, PaymentSent, PaymentStatus, Wallet, WalletError,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;

use crate::harness;
use crate::lnbits::Lnbits;

/// A 402's challenge: the macaroon (base64) and invoice, the same in both headers.
struct Challenge {
    macaroon: String,
    invoice: String,
    hash: PaymentHash,
    body: Value,
}

/// The real dev wallet, counting the lookups of each payment hash (to show a booked token is
/// never looked up again).
struct Counting {
    inner: Arc<dyn Wallet>,
    lookups: Arc<Mutex<HashMap<PaymentHash, usize>>>,
}

#[async_trait::async_trait]
impl Wallet for Counting {
    fn name(&self) -> &'static str {
        "counting"
    }
    fn unknown_means_unsent(&self) -> bool {
        self.inner.unknown_means_unsent()
    }
    async fn create_invoice(&self, request: InvoiceRequest) -> Result<Invoice, WalletError> {
        self.inner.create_invoice(request).await
    }
    async fn lookup(&self, hash: &PaymentHash) -> Result<PaymentStatus, WalletError> {
        *self.lookups.lock().expect("lock").entry(*hash).or_default() += 1;
        self.inner.lookup(hash).await
    }
    async fn pay(&self, bolt11: &str, max_fee_msat: u64) -> Result<PaymentSent, WalletError> {
        self.inner.pay(bolt11, max_fee_msat).await
    }
    fn pays_amountless(&self) -> bool {
        self.inner.pays_amountless()
    }
    async fn pay_amountless(
        &self,
        bolt11: &str,
        amount_msat: u64,
        max_fee_msat: u64,
    ) -> Result<PaymentSent, WalletError> {
        self.inner
            .pay_amountless(bolt11, amount_msat, max_fee_msat)
            .await
    }
    async fn lookup_payment(
        &self,
        hash: &PaymentHash,
    ) -> Result<dvmd::wallet::OutgoingStatus, WalletError> {
        self.inner.lookup_payment(hash).await
    }
    async fn balance(&self) -> Result<u64, WalletError> {
        self.inner.balance().await
    }
    fn settlements(&self) -> tokio::sync::broadcast::Receiver<PaymentHash> {
        self.inner.settlements()
    }
    async fn follow(&self, cancel: tokio_util::sync::CancellationToken) {
        self.inner.follow(cancel).await
    }
}

async fn start(edit: impl FnOnce(&mut dvmd::config::FileConfig)) -> (tempfile::TempDir, Daemon) {
    let data = harness::data_dir();
    let backend = Arc::new(InstantBackend::new("paid with a macaroon"));
    let daemon = harness::start(harness::dev_config(data.path(), edit), Some(backend)).await;
    (data, daemon)
}

async fn post(url: &str, auth: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = reqwest::Client::new().post(url).json(body);
    if let Some(auth) = auth {
        request = request.header("Authorization", auth);
    }
    request.send().await.expect("send")
}

/// Read a 402 and check its two challenges carry the same macaroon and invoice.
async fn challenge(response: reqwest::Response) -> Challenge {
    assert_eq!(response.status(), 402);
    let values: Vec<String> = response
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().expect("text").to_owned())
        .collect();
    assert_eq!(values.len(), 4, "{values:?}");
    assert!(values[0].starts_with("LSAT ") && values[1].starts_with("L402 "));
    assert!(
        values[2].starts_with("Payment ") && values[2].contains("intent=\"charge\""),
        "the HTTP Payment scheme beside: {values:?}"
    );
    assert!(
        values[3].starts_with("Payment ") && values[3].contains("intent=\"session\""),
        "and its session intent (the dev wallet refunds to amountless invoices): {values:?}"
    );
    assert_eq!(
        values[0].trim_start_matches("LSAT "),
        values[1].trim_start_matches("L402 "),
        "one macaroon and one invoice in both"
    );
    let field = |name: &str| {
        let start = values[1].find(&format!("{name}=\"")).expect(name) + name.len() + 2;
        let len = values[1][start..].find('"').expect("closing quote");
        values[1][start..start + len].to_owned()
    };
    let (macaroon, invoice) = (field("macaroon"), field("invoice"));
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["l402"]["macaroon"], macaroon.as_str());
    assert_eq!(body["l402"]["invoice"], invoice.as_str());
    let hash = PaymentHash::try_from(
        body["l402"]["payment_hash"]
            .as_str()
            .expect("hash")
            .to_owned(),
    )
    .expect("payment hash");
    Challenge {
        macaroon,
        invoice,
        hash,
        body,
    }
}

async fn buy(http: &str, amount_msat: u64) -> Challenge {
    let url = format!("{http}/v1/l402/token");
    challenge(post(&url, None, &json!({ "amount_msat": amount_msat })).await).await
}

fn root_key(data: &std::path::Path) -> String {
    std::fs::read_to_string(data.join(dvmd::identity::L402_ROOT_KEY_FILE))
        .expect("root key")
        .trim()
        .to_owned()
}

async fn token_balance(http: &str, auth: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("{http}/v1/l402/balance"))
        .header("Authorization", auth)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn chat(max_tokens: u32) -> Value {
    json!({
        "messages": [{ "role": "user", "content": "Say hello." }],
        "max_tokens": max_tokens,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepaid_token_pays_openai_sdk_calls_until_it_runs_dry() {
    let data = harness::data_dir();
    let lookups: Arc<Mutex<HashMap<PaymentHash, usize>>> = Arc::default();
    let counted = lookups.clone();
    let daemon = Daemon::start(
        harness::dev_config(data.path(), |_| {}),
        dvmd::daemon::Parts {
            backend: Some(Arc::new(InstantBackend::new("paid with a macaroon"))),
            wrap_wallet: Some(Arc::new(move |inner| {
                Arc::new(Counting {
                    inner,
                    lookups: counted.clone(),
                }) as Arc<dyn Wallet>
            })),
        },
    )
    .await
    .expect("daemon starts");
    let http = daemon.ready().http_url.clone();
    // What one call is quoted: the 402 of a call with no credential says so.
    let first = challenge(post(&format!("{http}/v1/chat/completions"), None, &chat(8)).await).await;
    let quote = first.body["l402"]["budget_msat"].as_u64().expect("budget");
    let amount = (3 * quote).div_ceil(1000) * 1000;

    let token = buy(&http, amount).await;
    let preimage = harness::dev_pay(&http, &token.invoice).await;
    let key = format!("{}:{preimage}", token.macaroon);
    let (status, balance) = token_balance(&http, &format!("L402 {key}")).await;
    assert_eq!(status, 200, "{balance}");
    assert_eq!(
        balance["balance_msat"], amount,
        "booked by the hint or the first credential"
    );
    let looked_up = |hash: &PaymentHash| lookups.lock().expect("lock").get(hash).copied();
    let before = looked_up(&token.hash);
    assert!(before.is_some(), "our wallet confirmed it");

    let base = format!("{http}/v1");
    let model = harness::served_model(&http).await;
    let sdk = |extra: &[&str]| {
        let mut args = vec![
            "--base-url",
            &base,
            "--api-key",
            &key,
            "--model",
            &model,
            "--max-tokens",
            "8",
        ];
        args.extend_from_slice(extra);
        harness::python_peer("openai_chat.py", &args)
    };
    let mut answers = sdk(&["--stream"]);
    answers.extend(sdk(&["--calls", "12"]));
    let statuses: Vec<u64> = answers
        .iter()
        .map(|a| a["status"].as_u64().expect("status"))
        .collect();
    let served = statuses.iter().take_while(|s| **s == 200).count();
    assert!(served >= 3, "{statuses:?}");
    assert!(
        statuses[served..].iter().all(|s| *s == 402) && served < statuses.len(),
        "served until dry, then 402: {statuses:?}"
    );
    let dry = &answers[served]["response"];
    assert!(dry["l402"]["invoice"].is_string(), "a new challenge: {dry}");
    let charged: u64 = answers[..served]
        .iter()
        .map(|a| a["dvmd"]["charge_msat"].as_u64().expect("charge"))
        .sum();

    assert_eq!(
        looked_up(&token.hash),
        before,
        "a booked token costs no wallet call, however often it is used"
    );
    harness::settled_jobs(daemon.pipeline().book().store()).await;
    let (_, left) = token_balance(&http, &format!("LSAT {key}")).await;
    let left = left["balance_msat"].as_u64().expect("balance");
    assert_eq!(left, amount - charged);
    assert!(left < quote, "dry: {left} left, a call is quoted {quote}");
    let metrics = reqwest::get(format!("{http}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    // The first call's 402, the prepaid token, and a new challenge for every call made dry.
    let challenges = 2 + statuses.len() - served;
    assert!(
        metrics.contains(&format!(
            "dvmd_payment_challenges_total{{kind=\"l402\"}} {challenges}\n"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "dvmd_http_jobs_opened_total{{door=\"http_chat\"}} {served}\n"
    )));
    let store = daemon.pipeline().book().store();
    let jobs = harness::jobs(store);
    assert_eq!(jobs.len(), served);
    assert!(jobs
        .iter()
        .all(|j| j.customer == Account::Token(token.hash)));
    harness::ledger_ok(store);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn macaroons_interoperate_with_pymacaroons_and_forgeries_are_refused() {
    let (data, daemon) = start(|_| {}).await;
    let http = daemon.ready().http_url.clone();
    let root = root_key(data.path());
    let token = buy(&http, 20_000).await;

    // pymacaroons reads dvmd's macaroon and verifies it under the root key (and not another).
    let inspect = |mac: &str, key: &str| {
        harness::python_peer(
            "macaroons.py",
            &["inspect", "--macaroon", mac, "--root-key", key],
        )
        .remove(0)
    };
    let read = inspect(&token.macaroon, &root);
    assert_eq!(read["verified"], true, "{read}");
    assert_eq!(read["location"], "dvmd");
    let record = daemon
        .pipeline()
        .book()
        .token(&token.hash)
        .await
        .expect("read")
        .expect("the token is recorded with its challenge");
    // aperture's lsat.Identifier: u16 version 0, payment hash, token id.
    assert_eq!(
        read["identifier"],
        format!("0000{}{}", token.hash, record.token_id)
    );
    let caveats: Vec<&str> = read["caveats"]
        .as_array()
        .expect("caveats")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(caveats[0], "services=dvmd:0");
    assert_eq!(
        caveats[1],
        format!("dvmd_valid_until={}", record.valid_until)
    );
    assert_eq!(caveats[2], format!("dvmd_model={}", record.model));
    assert_eq!(caveats[3], "dvmd_budget_msat=20000");
    assert_eq!(
        inspect(&token.macaroon, &"11".repeat(32))["verified"],
        false
    );

    let preimage = harness::dev_pay(&http, &token.invoice).await;
    // pymacaroons mints the same token under the root key: dvmd accepts it.
    let mint = |key: &str, identifier: &str, caveats: &[String]| {
        let mut args = vec!["mint", "--root-key", key, "--identifier", identifier];
        for caveat in caveats {
            args.extend(["--caveat", caveat.as_str()]);
        }
        harness::python_peer("macaroons.py", &args).remove(0)["macaroon"]
            .as_str()
            .expect("macaroon")
            .to_owned()
    };
    let identifier = read["identifier"].as_str().expect("identifier").to_owned();
    let owned: Vec<String> = caveats.iter().map(|c| (*c).to_owned()).collect();
    let theirs = mint(&root, &identifier, &owned);
    let (status, balance) = token_balance(&http, &format!("L402 {theirs}:{preimage}")).await;
    assert_eq!(status, 200, "{balance}");
    assert_eq!(balance["balance_msat"], 20_000);
    // As aperture's client (and lnget) send it: `LSAT …` then `L402 …`, two headers.
    let twice = reqwest::Client::new()
        .get(format!("{http}/v1/l402/balance"))
        .header(
            "Authorization",
            format!("LSAT {}:{preimage}", token.macaroon),
        )
        .header(
            "Authorization",
            format!("L402 {}:{preimage}", token.macaroon),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(twice.status(), 200);

    // Forgeries, each on a call that would charge: 401 with a reason, nothing opened.
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&token.macaroon)
        .expect("base64");
    let ours = Macaroon::from_bytes(&raw).expect("macaroon");
    let encode = |mac: &Macaroon| base64::engine::general_purpose::STANDARD.encode(mac.to_bytes());
    let mut tampered = ours.clone();
    tampered.caveats[3] = b"dvmd_budget_msat=99999999".to_vec();
    let mut forged = ours.clone();
    forged.signature[7] ^= 0x20;
    let with = |replace: usize, caveat: String| {
        let mut list = owned.clone();
        list[replace] = caveat;
        list
    };
    let expired = mint(
        &root,
        &identifier,
        &with(1, "dvmd_valid_until=1000".to_owned()),
    );
    let other_model = mint(&root, &identifier, &with(2, "dvmd_model=gpt-5".to_owned()));
    let other_root = mint(&"22".repeat(32), &identifier, &owned);
    let reminted_id = format!("0000{}{}", token.hash, "ab".repeat(32));
    let reminted = mint(&root, &reminted_id, &owned);
    let unpaid = buy(&http, 5_000).await;
    let guess = hex::encode([9u8; 32]);
    let attacks = [
        (
            "tampered caveat",
            format!("{}:{preimage}", encode(&tampered)),
            "altered",
        ),
        (
            "forged signature",
            format!("{}:{preimage}", encode(&forged)),
            "altered",
        ),
        (
            "wrong preimage",
            format!("{}:{guess}", token.macaroon),
            "preimage",
        ),
        ("expired", format!("{expired}:{preimage}"), "expired"),
        (
            "another model",
            format!("{other_model}:{preimage}"),
            "model",
        ),
        (
            "another root key",
            format!("{other_root}:{preimage}"),
            "altered",
        ),
        (
            "re-minted for a used hash",
            format!("{reminted}:{preimage}"),
            "not issued here",
        ),
        (
            "unpaid, preimage guessed",
            format!("{}:{guess}", unpaid.macaroon),
            "preimage",
        ),
        ("garbage", "not-a-macaroon:00".to_owned(), "malformed"),
    ];
    let url = format!("{http}/v1/chat/completions");
    for (what, credential, says) in attacks {
        for scheme in ["L402", "Bearer"] {
            let response = post(&url, Some(&format!("{scheme} {credential}")), &chat(8)).await;
            assert_eq!(response.status(), 401, "{what}");
            let body: Value = response.json().await.expect("json");
            let message = body["error"]["message"].as_str().expect("message");
            assert!(message.contains(says), "{what}: {message}");
        }
    }
    // A genuine token that stopped buying calls (expired, or minted for a model no longer
    // served) still proves what it holds: its balance reads, and it withdraws it (the same
    // check). On the code before, it was refused, and what it held was stranded.
    for stale in [&expired, &other_model] {
        let (status, balance) = token_balance(&http, &format!("L402 {stale}:{preimage}")).await;
        assert_eq!(status, 200, "{balance}");
        assert_eq!(balance["balance_msat"], 20_000);
    }
    let store = daemon.pipeline().book().store();
    assert!(harness::jobs(store).is_empty(), "no forgery opened a job");
    let totals = harness::ledger_ok(store);
    assert_eq!(
        totals.charge_msat + totals.reserve_msat,
        0,
        "nothing charged or held"
    );

    // The genuine token (as pymacaroons minted it) creates a /v1/jobs job and reads it back;
    // the job is its token's, nobody else's.
    let auth = format!("L402 {theirs}:{preimage}");
    let job =
        json!({ "kind": 5050, "inputs": [{ "value": "Say hi." }], "params": { "max_tokens": 4 } });
    let created = post(&format!("{http}/v1/jobs"), Some(&auth), &job).await;
    assert_eq!(created.status(), 202);
    let created: Value = created.json().await.expect("json");
    let show = format!("{http}/v1/jobs/{}", created["id"].as_str().expect("id"));
    let mut shown = Value::Null;
    for _ in 0..250 {
        shown = reqwest::Client::new()
            .get(&show)
            .header("Authorization", &auth)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        if shown["state"] == "settled" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(shown["state"], "settled", "{shown}");
    assert_eq!(shown["result"], "paid with a macaroon");
    let other = buy(&http, 1_000).await;
    let other_preimage = harness::dev_pay(&http, &other.invoice).await;
    let stranger = reqwest::Client::new()
        .get(&show)
        .header(
            "Authorization",
            format!("L402 {}:{other_preimage}", other.macaroon),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(stranger.status(), 404, "another token's job is not found");
    harness::ledger_ok(store);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_with_l402_pays_a_call_from_an_lnbits_wallet() {
    let lnbits = Lnbits::start().await;
    let operator = lnbits.create_wallet("dvmd").await;
    let customer = lnbits.create_wallet("customer").await;
    lnbits.fund(&customer, 10_000).await;
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        harness::use_lnbits(file, data.path(), &lnbits.url, &operator.inkey);
    });
    let backend = Arc::new(InstantBackend::new("paid through LNbits"));
    let daemon = harness::start(config, Some(backend)).await;
    let http = daemon.ready().http_url.clone();

    let answer = harness::node_peer(
        "fetch_l402.mjs",
        &[
            "--url",
            &format!("{http}/v1/chat/completions"),
            "--body",
            &chat(8).to_string(),
            "--lnbits",
            &lnbits.url,
            "--adminkey",
            &customer.adminkey,
        ],
    )
    .remove(0);
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["paid"], true);
    assert_eq!(
        answer["body"]["choices"][0]["message"]["content"],
        "paid through LNbits"
    );
    let paid_msat = answer["amount_sats"].as_u64().expect("sats") * 1000;
    let charge = answer["body"]["dvmd"]["charge_msat"]
        .as_u64()
        .expect("charge");
    assert!(charge > 0 && charge <= paid_msat);
    assert_eq!(lnbits.balance_msat(&operator).await, paid_msat);
    let store = daemon.pipeline().book().store();
    let jobs = harness::settled_jobs(store).await;
    assert_eq!(jobs.len(), 1);
    let Account::Token(hash) = jobs[0].customer else {
        panic!("an L402 job spends from its token: {:?}", jobs[0].customer);
    };
    let totals = harness::ledger_ok(store);
    assert_eq!(totals.payment_in_msat, paid_msat);
    assert_eq!(
        harness::account_balance(store, &Account::Token(hash)),
        paid_msat - charge,
        "the change stays on the token"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenges_are_limited_per_client_and_proxies_are_trusted_only_when_named() {
    let (_data, daemon) = start(|file| {
        file.http.max_challenges_per_ip_per_minute = 2;
        file.http.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let http = daemon.ready().http_url.clone();
    let url = format!("{http}/v1/l402/token");
    let body = json!({ "amount_msat": 1_000 });
    let from = |client: &'static str| {
        let (url, body) = (url.clone(), body.clone());
        async move {
            reqwest::Client::new()
                .post(&url)
                .header("X-Forwarded-For", format!("203.0.113.9, {client}"))
                .json(&body)
                .send()
                .await
                .expect("send")
        }
    };
    assert_eq!(from("198.51.100.1").await.status(), 402);
    assert_eq!(from("198.51.100.1").await.status(), 402);
    let limited = from("198.51.100.1").await;
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    // Another client behind the same proxy has its own bucket.
    assert_eq!(from("198.51.100.2").await.status(), 402);
    let payments = daemon
        .pipeline()
        .book()
        .store()
        .read(|r| Ok::<_, dvmd::store::StoreError>(r.keys(dvmd::store::Tree::L402Tokens).count()))
        .await
        .expect("read");
    assert_eq!(payments, 3, "a refused challenge mints nothing");

    // No public_url set: the trusted proxy's X-Forwarded-Proto/Host name the URL NIP-98 signs.
    let keys = nostr_sdk::Keys::generate();
    let public = "https://dvm.example/v1/account?limit=5";
    let account = |forwarded: bool| {
        let header = harness::nip98_with_nonce(&keys, public, "get", None);
        let mut request = reqwest::Client::new()
            .get(format!("{http}/v1/account?limit=5"))
            .header("Authorization", header);
        if forwarded {
            request = request
                .header("X-Forwarded-Proto", "https")
                .header("X-Forwarded-Host", "dvm.example");
        }
        request.send()
    };
    assert_eq!(account(true).await.expect("send").status(), 200);
    assert_eq!(account(false).await.expect("send").status(), 401);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_leftover_value_can_leave_by_its_own_credential() {
    let data = harness::data_dir();
    let daemon = harness::start(
        harness::dev_config(data.path(), |_| {}),
        Some(Arc::new(InstantBackend::new("unused"))),
    )
    .await;
    let http = daemon.ready().http_url.clone();
    let token = buy(&http, 30_000).await;
    let preimage = harness::dev_pay(&http, &token.invoice).await;
    let auth = format!("L402 {}:{preimage}", token.macaroon);
    assert_eq!(token_balance(&http, &auth).await.1["balance_msat"], 30_000);

    // Somewhere to send it: an invoice of the dev wallet's own (the only kind it pays), not
    // one this service issued for a payment.
    let dev = daemon.dev_wallet().expect("dev wallet");
    let target = dev
        .create_invoice(dvmd::wallet::InvoiceRequest {
            amount_msat: 12_000,
            description: dvmd::wallet::InvoiceDescription::Memo("home".into()),
            expiry_secs: 600,
        })
        .await
        .expect("invoice");
    let withdraw = |auth: String, bolt11: String| {
        let url = format!("{http}/v1/account/withdraw");
        async move {
            let response = reqwest::Client::new()
                .post(&url)
                .header("Authorization", auth)
                .json(&json!({ "bolt11": bolt11 }))
                .send()
                .await
                .expect("send");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("json"))
        }
    };
    let (status, payout) = withdraw(auth.clone(), target.bolt11.clone()).await;
    assert_eq!(status, 200, "{payout}");
    assert_eq!(payout["state"], "paid", "{payout}");
    assert_eq!(payout["account"], format!("l402:{}", token.hash));
    // What is left: the amount and the fee the dev wallet did not charge.
    let (_, left) = token_balance(&http, &auth).await;
    assert_eq!(left["balance_msat"], 18_000, "{left}");
    // A credential that does not hold is refused before anything moves.
    let forged = format!("L402 {}:{}", token.macaroon, "00".repeat(32));
    let (status, _) = withdraw(forged, target.bolt11).await;
    assert_eq!(status, 401);
    daemon.stop().await;
    let totals = harness::ledger_ok(&harness::open_store(data.path()));
    assert_eq!((totals.payout_msat, totals.in_flight_msat), (12_000, 0));
}

/// A call that does not sign (an L402 token here) is made idempotent by `Idempotency-Key`: the
/// same key on the same token names the same job, so a retry after a lost answer (or a
/// restart) gets 409 `already_ran` naming the job it opened, never a second run or charge,
/// and reads that job with `GET /v1/jobs/{id}`. A new key runs a new call; a malformed key is
/// refused before anything is priced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_makes_a_token_call_run_and_charge_once_across_a_restart() {
    let data = harness::data_dir();
    let listen = format!("127.0.0.1:{}", harness::free_port());
    async fn start_at(data: &std::path::Path, listen: &str) -> Daemon {
        let backend = Arc::new(InstantBackend::new("said once"));
        harness::start(harness::dev_config_at(data, listen, |_| {}), Some(backend)).await
    }
    let daemon = start_at(data.path(), &listen).await;
    let http = daemon.ready().http_url.clone();
    let url = format!("{http}/v1/chat/completions");
    let token = buy(&http, 20_000).await;
    let preimage = harness::dev_pay(&http, &token.invoice).await;
    let auth = format!("L402 {}:{preimage}", token.macaroon);
    let call = |key: &'static str| {
        reqwest::Client::new()
            .post(&url)
            .header("Authorization", &auth)
            .header("Idempotency-Key", key)
            .json(&chat(8))
            .send()
    };

    let first = call("order-42").await.expect("send");
    assert_eq!(first.status(), 200);
    let job = first
        .headers()
        .get("x-dvmd-job")
        .and_then(|v| v.to_str().ok())
        .expect("x-dvmd-job")
        .to_owned();
    let (_, balance) = token_balance(&http, &auth).await;
    let balance = balance["balance_msat"].as_u64().expect("balance");
    assert!(balance < 20_000, "the first call was charged");
    daemon.stop().await;

    let daemon = start_at(data.path(), &listen).await;
    let again = call("order-42").await.expect("send");
    assert_eq!(again.status(), 409);
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["error"]["code"], "already_ran", "{again}");
    assert!(
        again["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&job)),
        "{again}"
    );
    let (_, after) = token_balance(&http, &auth).await;
    assert_eq!(after["balance_msat"], balance, "nothing charged again");
    let shown = reqwest::Client::new()
        .get(format!("{http}/v1/jobs/{job}"))
        .header("Authorization", &auth)
        .send()
        .await
        .expect("send");
    assert_eq!(shown.status(), 200);
    let shown: Value = shown.json().await.expect("json");
    assert_eq!(shown["state"], "settled", "{shown}");

    assert_eq!(call("order-43").await.expect("send").status(), 200);
    let bad = call("a key with spaces").await.expect("send");
    assert_eq!(bad.status(), 400);
    harness::ledger_ok(daemon.pipeline().book().store());
    daemon.stop().await;
}

/// A holder narrows a prepaid token to a budget a call (`dvmd_budget_msat`, a first-party
/// caveat added as any macaroon library adds one) and hands it on: each call then costs at
/// most the budget, however long its answer could run (the call bids it: quoted, reserved and
/// charged within it), and a budget below the least a call can cost is refused, saying so. On
/// the code before, the caveat bounded only the quote, and the charge ran to the cap. A
/// narrowed token cannot withdraw what the token holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_caveat_caps_what_each_call_costs() {
    let data = harness::data_dir();
    let long = "word ".repeat(600);
    let daemon = harness::start(
        harness::dev_config(data.path(), |_| {}),
        Some(Arc::new(InstantBackend::new(long))),
    )
    .await;
    let http = daemon.ready().http_url.clone();
    let token = buy(&http, 500_000).await;
    let preimage = harness::dev_pay(&http, &token.invoice).await;
    let url = format!("{http}/v1/chat/completions");
    let call = |macaroon: String| {
        let url = url.clone();
        let auth = format!("L402 {macaroon}:{preimage}");
        async move {
            let response = post(&url, Some(&auth), &chat(512)).await;
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("json"))
        }
    };

    // The token as sold: a long answer, charged for every token.
    let (status, whole) = call(token.macaroon.clone()).await;
    assert_eq!(status, 200, "{whole}");
    let full = whole["dvmd"]["charge_msat"].as_u64().expect("charge");
    assert_eq!(whole["usage"]["completion_tokens"], 512, "{whole}");

    let narrowed = |caveat: String| {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&token.macaroon)
            .expect("base64");
        let mut macaroon = Macaroon::from_bytes(&raw).expect("macaroon");
        macaroon.add_caveat(caveat);
        base64::engine::general_purpose::STANDARD.encode(macaroon.to_bytes())
    };
    let budget = full / 2;
    let (status, capped) = call(narrowed(format!("dvmd_budget_msat={budget}"))).await;
    assert_eq!(status, 200, "{capped}");
    let charged = capped["dvmd"]["charge_msat"].as_u64().expect("charge");
    assert!(
        charged > 0 && charged <= budget,
        "charged {charged} msat on a budget of {budget}: {capped}"
    );
    assert!(
        capped["usage"]["completion_tokens"]
            .as_u64()
            .expect("tokens")
            < 512,
        "the answer stops at the budget: {capped}"
    );

    let (status, refused) = call(narrowed("dvmd_budget_msat=1".to_owned())).await;
    assert_eq!(status, 400, "{refused}");
    let message = refused["error"]["message"].as_str().expect("message");
    assert!(message.contains("dvmd_budget_msat"), "{message}");

    // What the token holds leaves only by the token as it was sold: the narrowed one, handed
    // on, cannot withdraw it.
    let target = daemon
        .dev_wallet()
        .expect("dev wallet")
        .create_invoice(dvmd::wallet::InvoiceRequest {
            amount_msat: 10_000,
            description: dvmd::wallet::InvoiceDescription::Memo("home".into()),
            expiry_secs: 600,
        })
        .await
        .expect("invoice");
    let narrowed_token = narrowed(format!("dvmd_budget_msat={budget}"));
    let withdrawn = reqwest::Client::new()
        .post(format!("{http}/v1/account/withdraw"))
        .header("Authorization", format!("L402 {narrowed_token}:{preimage}"))
        .json(&json!({ "bolt11": target.bolt11 }))
        .send()
        .await
        .expect("send");
    assert_eq!(withdrawn.status(), 403);
    let said: Value = withdrawn.json().await.expect("json");
    assert_eq!(said["error"]["code"], "narrowed_token", "{said}");

    let store = daemon.pipeline().book().store();
    harness::settled_jobs(store).await;
    assert_eq!(harness::jobs(store).len(), 2);
    let (_, left) = token_balance(&http, &format!("L402 {}:{preimage}", token.macaroon)).await;
    assert_eq!(left["balance_msat"], 500_000 - full - charged, "{left}");
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}
