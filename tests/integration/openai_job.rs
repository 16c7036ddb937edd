//! A full paid job served by the `openai` backend against llama-server.

use dvmd::customer::{self, Customer};

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
        .get(&request.id)
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
