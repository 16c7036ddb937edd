//! The HTTP job doors on loopback: `/v1/chat/completions` called by the official OpenAI SDK
//! (PyPI `openai`, NIP-98 signed by PyPI `nostr-sdk`) on the real model, whole and streamed,
//! paid from the npub's balance, with a 402 and a top-up invoice when it is short; a stream the
//! client drops, charged for what was generated; `/v1/jobs` created, read by its owner only, and
//! refused without a trace; calls racing for one balance; and a restart, after which a
//! `/v1/jobs` job resumes and a chat completion's hold is released; and a client that opens a
//! stream and reads nothing, which holds no worker.

use std::sync::Arc;
use std::time::Duration;

use dvmd::daemon::Daemon;
use dvmd::infer::instant::InstantBackend;
use dvmd::infer::{
    Backend, FinishReason, GenerateEvent, GenerateRequest, GenerateStream, InferError, Usage,
};
use dvmd::job::{Door, Job, JobState};
use futures::StreamExt;
use nostr_sdk::Keys;
use serde_json::{json, Value};

use crate::harness::{self, GatedBackend};

/// Words one every 10 ms until the budget runs out: a generation long enough to walk away from.
struct Trickle;

#[async_trait::async_trait]
impl Backend for Trickle {
    fn name(&self) -> &str {
        "trickle"
    }

    async fn count_prompt_tokens(
        &self,
        request: &GenerateRequest,
    ) -> Result<Option<u32>, InferError> {
        let bytes: usize = request.messages.iter().map(|m| m.content.len()).sum();
        Ok(Some(u32::try_from(bytes.div_ceil(4)).unwrap_or(u32::MAX)))
    }

    async fn generate(
        &self,
        request: GenerateRequest,
        max_tokens: u32,
    ) -> Result<GenerateStream, InferError> {
        let prompt_tokens = self.count_prompt_tokens(&request).await?.unwrap_or(0);
        let words = futures::stream::unfold(0u32, move |n| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if n < max_tokens {
                Some((Ok(GenerateEvent::Text(format!("w{n} "))), n + 1))
            } else if n == max_tokens {
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens: max_tokens,
                };
                let done = GenerateEvent::Done {
                    usage,
                    finish: FinishReason::Length,
                };
                Some((Ok(done), n + 1))
            } else {
                None
            }
        });
        Ok(words.boxed())
    }
}

async fn start(backend: Option<Arc<dyn Backend>>) -> (tempfile::TempDir, Daemon) {
    let data = harness::data_dir();
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), backend).await;
    (data, daemon)
}

/// One call with a NIP-98 header (with a nonce: the tests repeat calls within a second; the
/// OpenAI SDK test signs with PyPI nostr-sdk, and `account_api` with nostr-tools): (status,
/// JSON body).
async fn signed(
    keys: &Keys,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let text = body.map(Value::to_string);
    let header = harness::nip98_with_nonce(keys, url, method.as_str(), text.as_deref());
    send(header, method, url, text).await
}

async fn send(
    header: String,
    method: reqwest::Method,
    url: &str,
    text: Option<String>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, url)
        .header("Authorization", header);
    if let Some(text) = text {
        request = request
            .header("Content-Type", "application/json")
            .body(text);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({
        "messages": [{ "role": "user", "content": "Say hello." }],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// The quote of a chat call for a fresh npub: its 402 says it (and mints a top-up invoice).
async fn quote_of(http: &str, body: &Value) -> u64 {
    let (status, refused) = signed(
        &Keys::generate(),
        reqwest::Method::POST,
        &format!("{http}/v1/chat/completions"),
        Some(body),
    )
    .await;
    assert_eq!(status, 402, "{refused}");
    refused["top_up"]["quote_msat"].as_u64().expect("quote")
}

fn http_jobs(daemon: &Daemon) -> Vec<Job> {
    harness::jobs(daemon.pipeline().book().store())
        .into_iter()
        .filter(|job| job.door.is_http())
        .collect()
}

async fn wait_settled(daemon: &Daemon, id: &dvmd::job::JobId) -> Job {
    for _ in 0..500 {
        let job = daemon.pipeline().book().get(id).await.expect("read");
        if let Some(job) = job.filter(|j| j.state == JobState::Settled) {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {id} never settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_chats_on_an_npubs_balance_whole_and_streamed() {
    let (_data, daemon) = start(None).await;
    let http = daemon.ready().http_url.clone();
    let model = harness::served_model(&http).await;
    let base = format!("{http}/v1");
    let keys = Keys::generate();
    let secret = keys.secret_key().to_secret_hex();
    let sdk = |extra: &[&str]| {
        let mut args = vec![
            "--base-url",
            &base,
            "--secret",
            &secret,
            "--model",
            &model,
            "--max-tokens",
            "12",
        ];
        args.extend_from_slice(extra);
        harness::python_peer("openai_chat.py", &args)
    };

    // No balance: 402, with an invoice for the shortfall; nothing opened.
    let refused = sdk(&[]);
    assert_eq!(refused[0]["status"], 402, "{refused:?}");
    let top_up = &refused[0]["response"]["top_up"];
    let quote = top_up["quote_msat"].as_u64().expect("quote");
    let asked = top_up["amount_msat"].as_u64().expect("amount");
    assert_eq!(asked, quote.div_ceil(1000).max(1) * 1000, "{top_up}");
    assert_eq!(top_up["credits"], keys.public_key().to_hex());
    // What the call is expected to cost, beside the invoice: with no history yet, the p90 is
    // the cap, and the quote is the p90.
    let estimate = &top_up["estimate"];
    assert_eq!(estimate["p90_msat"], quote, "{top_up}");
    assert_eq!(estimate["cap_msat"], quote, "{top_up}");
    assert!(estimate["p50_msat"].as_u64().expect("p50") < quote);
    assert_eq!(estimate["confidence"], 0);
    assert!(http_jobs(&daemon).is_empty(), "a 402 opens no job");

    // Paid, it credits the npub; the retry (a new NIP-98 event) is served.
    let hash = dvmd::wallet::PaymentHash::try_from(
        top_up["payment_hash"].as_str().expect("hash").to_owned(),
    )
    .expect("hash");
    harness::dev_pay(&http, top_up["bolt11"].as_str().expect("bolt11")).await;
    harness::wait_for_booking(daemon.pipeline().book(), &hash).await;
    harness::http_top_up(&daemon, &keys, 3 * asked).await;

    let whole = sdk(&["--calls", "2"]);
    let streamed = sdk(&["--stream"]);
    let mut charged = 0;
    for answer in whole.iter().chain(&streamed) {
        assert_eq!(answer["status"], 200, "{answer}");
        assert!(!answer["content"].as_str().expect("content").is_empty());
        let completion = answer["usage"]["completion_tokens"]
            .as_u64()
            .expect("usage");
        assert!((1..=12).contains(&completion), "{answer}");
        let charge = answer["dvmd"]["charge_msat"].as_u64().expect("charge");
        assert!(charge > 0 && charge <= quote, "{answer}");
        // Learning from the calls before it can only bring the quote down.
        assert!(answer["dvmd"]["quote_msat"].as_u64().expect("quote") <= quote);
        // The receipt: the usage at the rates, what the call held, charged and gave back.
        let receipt = &answer["dvmd"]["receipt"];
        assert_eq!(receipt["charged_msat"], charge, "{answer}");
        assert_eq!(receipt["completion_tokens"], completion, "{answer}");
        let rates = &receipt["rates"];
        let at = |tokens: &Value, rate: &Value| {
            (tokens.as_u64().expect("tokens") * rate.as_u64().expect("rate")).div_ceil(1000)
        };
        assert_eq!(
            charge,
            rates["base_fee_msat"].as_u64().expect("base")
                + at(
                    &receipt["prompt_tokens"],
                    &rates["prompt_msat_per_1k_tokens"]
                )
                + at(
                    &receipt["completion_tokens"],
                    &rates["completion_msat_per_1k_tokens"]
                ),
            "{answer}"
        );
        let paid = receipt["paid_msat"].as_u64().expect("paid");
        assert_eq!(receipt["returned_msat"], paid - charge, "{answer}");
        assert!(["stop", "length"].contains(&receipt["finish"].as_str().expect("finish")));
        charged += charge;
    }
    assert!(
        streamed[0]["chunks"].as_u64().expect("chunks") >= 3,
        "{streamed:?}"
    );

    harness::settled_jobs(daemon.pipeline().book().store()).await;
    let jobs = http_jobs(&daemon);
    assert_eq!(jobs.len(), 3);
    for job in &jobs {
        assert_eq!(job.door, Door::HttpChat);
        assert_eq!(job.state, JobState::Settled);
        assert_eq!(job.held_msat, 0);
    }
    let store = daemon.pipeline().book().store();
    assert_eq!(
        harness::balance(store, &keys.public_key()),
        asked + 3 * asked - charged,
        "two top-ups less what three calls cost"
    );
    harness::ledger_ok(store);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_client_drops_is_stopped_and_charged_for_what_was_generated() {
    let (_data, daemon) = start(Some(Arc::new(Trickle))).await;
    let http = daemon.ready().http_url.clone();
    let keys = Keys::generate();
    let body = chat(500, true);
    let quote = quote_of(&http, &body).await;
    harness::http_top_up(&daemon, &keys, quote.div_ceil(1000) * 1000).await;

    let url = format!("{http}/v1/chat/completions");
    let header = harness::nip98_with_nonce(&keys, &url, "post", Some(&body.to_string()));
    let response = reqwest::Client::new()
        .post(&url)
        .header("Authorization", header)
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-dvmd-job"]
        .to_str()
        .expect("job header")
        .to_owned();
    let mut stream = response.bytes_stream();
    let mut seen = String::new();
    while seen.matches("\"content\":\"w").count() < 5 {
        let chunk = stream.next().await.expect("more").expect("chunk");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(stream);

    let id = dvmd::job::JobId::from_hex(&id).expect("job id");
    let job = wait_settled(&daemon, &id).await;
    let usage = job.usage.expect("usage");
    assert!(
        (5..100).contains(&usage.completion_tokens),
        "stopped soon after the client left: {usage:?}"
    );
    let charge = job.charge_msat.expect("charged");
    assert!(charge > 0 && charge < quote, "{charge} of {quote}");
    assert_eq!(
        job.reason.as_deref().map(|r| r.contains("client left")),
        Some(true),
        "{:?}",
        job.reason
    );
    let store = daemon.pipeline().book().store();
    assert_eq!(
        harness::balance(store, &keys.public_key()),
        quote.div_ceil(1000) * 1000 - charge
    );
    harness::ledger_ok(store);
    daemon.stop().await;
}

/// Every word at once, each 16 KB: a generation far faster than a client that reads nothing
/// takes it.
struct Gush;

#[async_trait::async_trait]
impl Backend for Gush {
    fn name(&self) -> &str {
        "gush"
    }

    async fn count_prompt_tokens(
        &self,
        request: &GenerateRequest,
    ) -> Result<Option<u32>, InferError> {
        Trickle.count_prompt_tokens(request).await
    }

    async fn generate(
        &self,
        request: GenerateRequest,
        max_tokens: u32,
    ) -> Result<GenerateStream, InferError> {
        let prompt_tokens = self.count_prompt_tokens(&request).await?.unwrap_or(0);
        // 16 KB a word, 16 MB in all: more than the connection's buffers (hyper's, about
        // 400 KB, and the kernel's send buffer, at most `net.ipv4.tcp_wmem`'s 4 MB by default)
        // and a queue of 256 pieces (4 MB) hold together. With 2 MB, the old queue passed.
        let words = (0..max_tokens).map(|n| Ok(GenerateEvent::Text(format!("{n:0>16383} "))));
        let done = GenerateEvent::Done {
            usage: Usage {
                prompt_tokens,
                completion_tokens: max_tokens,
            },
            finish: FinishReason::Length,
        };
        Ok(futures::stream::iter(words.chain([Ok(done)])).boxed())
    }
}

/// A client opens a stream and then reads nothing, its connection open (a receive window of a
/// few KB). The one worker must not wait on it: it generates the whole answer into the call's
/// own queue, the job settles charged for what was generated, and another customer's call
/// runs meanwhile. Before, the worker waited on a queue of 256 pieces once the socket was full,
/// and every job, relay jobs too, stopped until `job_timeout_secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_holds_no_worker() {
    use tokio::io::AsyncWriteExt;
    let (_data, daemon) = start(Some(Arc::new(Gush))).await;
    let http = daemon.ready().http_url.clone();
    let keys = Keys::generate();
    let tokens = 1_000;
    let body = chat(tokens, true);
    let quote = quote_of(&http, &body).await;
    harness::http_top_up(&daemon, &keys, quote.div_ceil(1000) * 1000).await;

    // By hand, on a socket with a small receive buffer: nothing is ever read from it.
    let url = format!("{http}/v1/chat/completions");
    let text = body.to_string();
    let header = harness::nip98_with_nonce(&keys, &url, "post", Some(&text));
    let address: std::net::SocketAddr =
        http.trim_start_matches("http://").parse().expect("address");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("buffer");
    let mut silent = socket.connect(address).await.expect("connect");
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nAuthorization: {header}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    );
    silent.write_all(request.as_bytes()).await.expect("request");
    // Its job holds the worker before the other call is made.
    let mine = |job: &Job| job.customer == dvmd::ledger::Account::from(keys.public_key());
    for _ in 0..500 {
        if http_jobs(&daemon)
            .iter()
            .any(|job| mine(job) && job.state != JobState::Received)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        http_jobs(&daemon).iter().any(mine),
        "the unread call opened its job"
    );

    // Another customer's call is answered while that connection sits there.
    let other = Keys::generate();
    let small = chat(8, false);
    let small_quote = quote_of(&http, &small).await;
    harness::http_top_up(&daemon, &other, small_quote.div_ceil(1000) * 1000).await;
    let answered = tokio::time::timeout(
        Duration::from_secs(60),
        signed(&other, reqwest::Method::POST, &url, Some(&small)),
    )
    .await
    .expect("a call while a stream goes unread (the worker waited on the reader)");
    assert_eq!(answered.0, 200, "{}", answered.1);

    // The unread answer was generated in full and is charged as generated.
    let job = http_jobs(&daemon)
        .into_iter()
        .find(mine)
        .expect("the unread call's job");
    let job = wait_settled(&daemon, &job.id).await;
    assert_eq!(job.usage.expect("usage").completion_tokens, tokens);
    let charge = job.charge_msat.expect("charged");
    assert!(charge > 0 && charge <= quote, "{charge} of {quote}");
    drop(silent);
    harness::ledger_ok(daemon.pipeline().book().store());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_jobs_are_owned_validated_and_refused_without_a_trace() {
    let backend = Arc::new(InstantBackend::new("a stored answer"));
    let (_data, daemon) = start(Some(backend)).await;
    let http = daemon.ready().http_url.clone();
    let url = format!("{http}/v1/jobs");
    let keys = Keys::generate();
    let job = json!({
        "kind": 5050,
        "inputs": [{ "value": "Say hi.", "type": "text" }],
        "params": { "max_tokens": 8 },
    });

    // Short: 402 and a top-up invoice; nothing opened.
    let (status, refused) = signed(&keys, reqwest::Method::POST, &url, Some(&job)).await;
    assert_eq!(status, 402, "{refused}");
    let quote = refused["top_up"]["quote_msat"].as_u64().expect("quote");
    harness::http_top_up(&daemon, &keys, quote.div_ceil(1000) * 1000 * 2).await;

    let entries = |daemon: &Daemon| {
        let store = daemon.pipeline().book().store();
        harness::ledger_ok(store).entries
    };
    let before = (http_jobs(&daemon).len(), entries(&daemon));
    for (bad, why) in [
        (
            json!({ "kind": 5999, "inputs": [{ "value": "x" }] }),
            "kind",
        ),
        (json!({ "kind": 5050, "inputs": [] }), "no input"),
        (
            json!({ "kind": 5050, "inputs": [{ "value": "x" }], "params": { "max_tokens": 0 } }),
            "max_tokens",
        ),
        (
            json!({ "kind": 5050, "inputs": [{ "value": "x" }], "bid_msat": 1 }),
            "bid",
        ),
        (
            json!({ "kind": 5050, "inputs": [{ "value": "x" }], "surprise": true }),
            "unknown field",
        ),
    ] {
        let (status, body) = signed(&keys, reqwest::Method::POST, &url, Some(&bad)).await;
        assert_eq!(status, 400, "{why}: {body}");
        assert!(body["error"]["message"].is_string(), "{why}: {body}");
    }
    let unsigned = reqwest::Client::new()
        .post(&url)
        .json(&job)
        .send()
        .await
        .expect("send");
    // No credential at all: an L402 challenge (an invoice, no job, no ledger entry).
    assert_eq!(unsigned.status(), 402);
    let schemes: Vec<_> = unsigned
        .headers()
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(' ').next().map(str::to_owned))
        .collect();
    // The `Payment` ones: a charge, and a session (the dev wallet can refund one).
    assert_eq!(schemes, ["LSAT", "L402", "Payment", "Payment"]);
    assert_eq!(
        (http_jobs(&daemon).len(), entries(&daemon)),
        before,
        "refusals open nothing and move nothing"
    );

    let (status, created) = signed(&keys, reqwest::Method::POST, &url, Some(&job)).await;
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    let job_id = dvmd::job::JobId::from_hex(&id).expect("job id");
    wait_settled(&daemon, &job_id).await;
    let show = format!("{http}/v1/jobs/{id}");
    let (status, shown) = signed(&keys, reqwest::Method::GET, &show, None).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["state"], "settled");
    assert_eq!(shown["result"], "a stored answer");
    assert_eq!(shown["door"], "http_job");
    let charge = shown["charge_msat"].as_u64().expect("charge");
    assert_eq!(shown["released_msat"], quote - charge);

    // Another npub, or an id that is nobody's: 404 either way.
    let (status, _) = signed(&Keys::generate(), reqwest::Method::GET, &show, None).await;
    assert_eq!(status, 404);
    let (status, _) = signed(
        &keys,
        reqwest::Method::GET,
        &format!("{http}/v1/jobs/{}", "ab".repeat(32)),
        None,
    )
    .await;
    assert_eq!(status, 404);
    harness::ledger_ok(daemon.pipeline().book().store());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_racing_for_one_balance_never_spend_it_twice() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let backend = Arc::new(GatedBackend {
        inner: InstantBackend::new("one of three"),
        gate: gate.clone(),
    });
    let (_data, daemon) = start(Some(backend)).await;
    let http = daemon.ready().http_url.clone();
    let body = chat(8, false);
    let quote = quote_of(&http, &body).await;
    // Room for three quotes, not four.
    let topped = (3 * quote + quote / 2).div_ceil(1000) * 1000;
    assert!(topped < 4 * quote, "quote {quote} too small for the test");
    let keys = Keys::generate();
    harness::http_top_up(&daemon, &keys, topped).await;

    let url = format!("{http}/v1/chat/completions");
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let (keys, url, body) = (keys.clone(), url.clone(), body.clone());
            let text = body.to_string();
            let header = harness::nip98_with_nonce(&keys, &url, "post", Some(&text));
            tokio::spawn(async move { send(header, reqwest::Method::POST, &url, Some(text)).await })
        })
        .collect();
    // Three hold their quotes at the gate; the other seven are refused meanwhile.
    for _ in 0..1_000 {
        if calls.iter().filter(|c| c.is_finished()).count() == 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        http_jobs(&daemon).len(),
        3,
        "three opened, held at the gate"
    );
    gate.add_permits(10);
    let mut statuses = Vec::new();
    let mut charged = 0;
    for call in calls {
        let (status, answer) = call.await.expect("call");
        if status == 200 {
            charged += answer["dvmd"]["charge_msat"].as_u64().expect("charge");
        } else {
            assert_eq!(status, 402, "{answer}");
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(http_jobs(&daemon).len(), 3);
    let store = daemon.pipeline().book().store();
    harness::settled_jobs(store).await;
    assert_eq!(
        harness::balance(store, &keys.public_key()),
        topped - charged
    );
    harness::ledger_ok(store);
    daemon.stop().await;
}

/// One NIP-98 signature pays for one job. The same signed call made again is refused as a
/// replay while the daemon runs; after a restart (its replay cache empty, the auth event still
/// inside its window) it finds the job it opened, whose id is the auth event's, and is refused
/// with that id: not run, not charged again. The same for `/v1/jobs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_call_made_again_after_a_restart_is_not_run_or_charged_again() {
    let data = harness::data_dir();
    let listen = format!("127.0.0.1:{}", harness::free_port());
    async fn start(data: &std::path::Path, listen: &str) -> Daemon {
        let backend = Arc::new(InstantBackend::new("said once"));
        harness::start(harness::dev_config_at(data, listen, |_| {}), Some(backend)).await
    }
    let daemon = start(data.path(), &listen).await;
    let http = daemon.ready().http_url.clone();
    let keys = Keys::generate();
    let chat_body = chat(8, false).to_string();
    let chat_url = format!("{http}/v1/chat/completions");
    let jobs_url = format!("{http}/v1/jobs");
    let job_body =
        json!({ "kind": 5050, "inputs": [{ "value": "Say hi." }], "params": { "max_tokens": 8 } })
            .to_string();
    let quote = quote_of(&http, &chat(8, false)).await;
    harness::http_top_up(&daemon, &keys, (4 * quote).div_ceil(1000) * 1000).await;
    let chat_header = harness::nip98_with_nonce(&keys, &chat_url, "post", Some(&chat_body));
    let job_header = harness::nip98_with_nonce(&keys, &jobs_url, "post", Some(&job_body));
    async fn post(header: &str, url: &str, body: &str) -> (u16, Value) {
        let body = Some(body.to_owned());
        send(header.to_owned(), reqwest::Method::POST, url, body).await
    }

    let (status, answer) = post(&chat_header, &chat_url, &chat_body).await;
    assert_eq!(status, 200, "{answer}");
    let (status, created) = post(&job_header, &jobs_url, &job_body).await;
    assert_eq!(status, 202, "{created}");
    let job_id = dvmd::job::JobId::from_hex(created["id"].as_str().expect("id")).expect("id");
    wait_settled(&daemon, &job_id).await;
    let (status, replayed) = post(&chat_header, &chat_url, &chat_body).await;
    assert_eq!(status, 401, "a replay while the daemon runs: {replayed}");
    let store = daemon.pipeline().book().store();
    let balance = harness::balance(store, &keys.public_key());
    let opened = http_jobs(&daemon).len();
    assert_eq!(opened, 2);
    daemon.stop().await;

    let daemon = start(data.path(), &listen).await;
    for (header, url, body) in [
        (&chat_header, &chat_url, &chat_body),
        (&job_header, &jobs_url, &job_body),
    ] {
        let (status, refused) = post(header, url, body).await;
        assert_eq!(status, 409, "{url} made again after the restart: {refused}");
        assert_eq!(refused["error"]["code"], "already_ran", "{refused}");
    }
    let (status, shown) = signed(
        &keys,
        reqwest::Method::GET,
        &format!("{jobs_url}/{job_id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["state"], "settled");
    assert_eq!(http_jobs(&daemon).len(), opened, "nothing opened again");
    let store = daemon.pipeline().book().store();
    assert_eq!(
        harness::balance(store, &keys.public_key()),
        balance,
        "nothing charged again"
    );
    harness::ledger_ok(store);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_http_jobs_resume_and_chat_holds_are_released() {
    let data = harness::data_dir();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let gated = Arc::new(GatedBackend {
        inner: InstantBackend::new("never said"),
        gate,
    });
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), Some(gated)).await;
    let http = daemon.ready().http_url.clone();
    let keys = Keys::generate();
    let chat_body = chat(8, true);
    let quote = quote_of(&http, &chat_body).await;
    let topped = (4 * quote).div_ceil(1000) * 1000;
    harness::http_top_up(&daemon, &keys, topped).await;

    // A streamed chat completion and a /v1/jobs job, both stuck at the gate, holding quotes.
    let url = format!("{http}/v1/chat/completions");
    let header = harness::nip98_with_nonce(&keys, &url, "post", Some(&chat_body.to_string()));
    let streaming = reqwest::Client::new()
        .post(&url)
        .header("Authorization", header)
        .header("Content-Type", "application/json")
        .body(chat_body.to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(streaming.status(), 200);
    let job = json!({ "kind": 5050, "inputs": [{ "value": "Say hello." }], "params": { "max_tokens": 8 } });
    let (status, created) = signed(
        &keys,
        reqwest::Method::POST,
        &format!("{http}/v1/jobs"),
        Some(&job),
    )
    .await;
    assert_eq!(status, 202, "{created}");
    let stored = dvmd::job::JobId::from_hex(created["id"].as_str().expect("id")).expect("id");
    let held: u64 = http_jobs(&daemon).iter().map(|j| j.held_msat).sum();
    assert_eq!(held, 2 * quote);
    daemon.stop().await;
    drop(streaming);

    let backend = Arc::new(InstantBackend::new("said after the restart"));
    let daemon = harness::start(harness::dev_config(data.path(), |_| {}), Some(backend)).await;
    let resumed = wait_settled(&daemon, &stored).await;
    assert_eq!(resumed.result.as_deref(), Some("said after the restart"));
    let charge = resumed.charge_msat.expect("charged");
    assert!(charge > 0);
    let chat_job = http_jobs(&daemon)
        .into_iter()
        .find(|j| j.door == Door::HttpChat)
        .expect("the chat job");
    let chat_job = wait_settled(&daemon, &chat_job.id).await;
    assert_eq!(chat_job.charge_msat, Some(0));
    assert!(
        chat_job
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("restarted"),
        "{:?}",
        chat_job.reason
    );
    let store = daemon.pipeline().book().store();
    assert_eq!(harness::balance(store, &keys.public_key()), topped - charge);
    let totals = harness::ledger_ok(store);
    assert_eq!(totals.held_msat, 0);
    daemon.stop().await;
}
