//! A full paid job served by the `openai` backend against llama-server.

use dvmd::customer::{self, Customer, Reply};
use dvmd::nip90::JobStatus;
use nostr_sdk::{Filter, JsonUtil};

use crate::conformance::LlamaServer;
use crate::harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_job_through_an_openai_compatible_server() {
    let server = LlamaServer::start().await;
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        file.infer.backend = "openai".into();
        file.infer.openai.base_url = server.base_url.clone();
        file.infer.openai.model = "smollm2".into();
        file.infer.openai.context_tokens = 2048;
    });
    let daemon = harness::start(config, None).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let request = alice
        .post(customer::text_request(
            "What colour is the sky?",
            &[("max_tokens", "16"), ("temperature", "0")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let (_, bolt11) = harness::invoice(&mut alice, &request.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    let result = harness::result(&mut alice, &request.id).await;
    assert!(!result.content.trim().is_empty());
    let job = daemon
        .pipeline()
        .book()
        .get(&request.id.into())
        .await
        .expect("read")
        .expect("job");
    let usage = job.usage.expect("usage from the server's stream");
    assert!(usage.prompt_tokens > 0 && (1..=16).contains(&usage.completion_tokens));

    // Refused before any invoice: a model the server is not configured for (it would be
    // forwarded upstream at our price), and a prompt that cannot fit the server's window.
    let other_model = alice
        .post(customer::text_request(
            "Hi",
            &[("max_tokens", "16"), ("model", "gpt-4")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let info = harness::error_info(&mut alice, &other_model.id).await;
    assert!(info.contains("this service runs `smollm2`"), "{info}");
    let overflow = alice
        .post(customer::text_request(
            &"many words ".repeat(400),
            &[("max_tokens", "1000")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let info = harness::error_info(&mut alice, &overflow.id).await;
    assert!(info.contains("context window of 2048 tokens"), "{info}");
    alice.shutdown().await;
    daemon.stop().await;
    harness::ledger_ok(&harness::open_store(data.path()));
}

/// An OpenAI-compatible server that fails every request with a 500 whose body holds details a
/// customer must never see. Returns its base URL (with `/v1`).
async fn failing_upstream(body: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut buf).await;
                let response = format!(
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/v1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_error_reaches_the_log_not_the_customer() {
    const SECRET: &str = "SECRET-UPSTREAM-DETAIL";
    let body = r#"{"error": "SECRET-UPSTREAM-DETAIL at /srv/models/private.gguf"}"#;
    let upstream = failing_upstream(body).await;
    let data = harness::data_dir();
    let config = harness::dev_config(data.path(), |file| {
        file.infer.backend = "openai".into();
        file.infer.openai.base_url = upstream.clone();
        file.infer.openai.model = "private-model".into();
    });
    let daemon = harness::start(config, None).await;
    let ready = daemon.ready().clone();
    let mut alice = Customer::connect(&ready.relay_url).await.expect("connect");
    let request = alice
        .post(customer::text_request(
            "Hello",
            &[("max_tokens", "8")],
            None,
            Some(ready.pubkey),
        ))
        .await
        .expect("post");
    let (paid, bolt11) = harness::invoice(&mut alice, &request.id).await;
    harness::dev_pay(&ready.http_url, &bolt11).await;
    let info = match alice
        .wait_for(&request.id, harness::REPLY_TIMEOUT, |r| {
            matches!(
                r,
                Reply::Feedback {
                    status: Some(JobStatus::Error),
                    ..
                }
            )
        })
        .await
        .expect("error feedback")
    {
        Reply::Feedback { info, .. } => info,
        _ => unreachable!(),
    };
    assert!(info.starts_with("the model failed (ref "), "{info}");
    assert!(
        info.contains(&format!("the {paid} msat you paid are credited")),
        "{info}"
    );

    // Nothing we published names the upstream, its body or a path.
    let ours = alice
        .client()
        .fetch_events(
            Filter::new().author(ready.pubkey),
            std::time::Duration::from_secs(2),
        )
        .await
        .expect("fetch");
    assert!(!ours.is_empty());
    for event in ours.iter() {
        let json = event.as_json();
        let host = upstream
            .trim_start_matches("http://")
            .trim_end_matches("/v1");
        for leak in [SECRET, "/srv/models", "private.gguf", host] {
            assert!(!json.contains(leak), "`{leak}` published in {json}");
        }
    }
    alice.shutdown().await;
    daemon.stop().await;
    let store = harness::open_store(data.path());
    harness::ledger_ok(&store);
    assert_eq!(harness::balance(&store, &request.pubkey), paid);
}
