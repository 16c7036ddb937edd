//! An OpenAI-compatible server that answers at once, for load tests and benchmarks that
//! measure everything but the model.
//!
//! It speaks just enough HTTP/1.1 for `POST /v1/chat/completions` (streamed or not) and
//! `GET /v1/models`, on kept-alive connections with TCP_NODELAY, and writes each answer in one
//! piece: a stub that answers in two writes meets the client's delayed ACK and measures itself
//! (~40 ms per call).

use std::net::SocketAddr;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The completion every request gets (cut to `max_tokens` words).
pub const STUB_REPLY: &str = "Hello from the dvmd stub server.";

/// Largest request head or body the stub reads.
const MAX_REQUEST_BYTES: usize = 1 << 20;

/// A running stub server.
pub struct StubServer {
    addr: SocketAddr,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl StubServer {
    /// Listen on a free loopback port and serve until dropped or [`StubServer::stop`].
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (accept_cancel, connections) = (cancel.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = accept_cancel.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let cancel = accept_cancel.clone();
                connections.spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = serve(stream) => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            cancel,
            tasks,
        })
    }

    /// The base URL to configure as `[infer.openai] base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stop accepting and close every connection.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for StubServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        let Some((head_len, body_len)) = read_head(&mut stream, &mut buf).await? else {
            return Ok(());
        };
        while buf.len() < head_len + body_len {
            if read_more(&mut stream, &mut buf).await? == 0 {
                return Ok(());
            }
        }
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        let body = buf[head_len..head_len + body_len].to_vec();
        buf.drain(..head_len + body_len);
        let request_line = head.lines().next().unwrap_or_default();
        let answer =
            if request_line.starts_with("POST ") && request_line.contains("/chat/completions") {
                completion(&body)
            } else if request_line.starts_with("GET ") && request_line.contains("/models") {
                let models = json!({"object": "list", "data": [{"id": "stub", "object": "model"}]});
                response("200 OK", "application/json", &models.to_string())
            } else {
                response("404 Not Found", "text/plain", "not found\n")
            };
        stream.write_all(answer.as_bytes()).await?;
    }
}

/// Read until a full request head is buffered; `None` when the peer closed between requests.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<(usize, usize)>> {
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]);
            let body_len = head
                .lines()
                .filter_map(|line| line.split_once(':'))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, value)| value.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body_len > MAX_REQUEST_BYTES {
                return Err(std::io::Error::other("request body too large"));
            }
            return Ok(Some((pos + 4, body_len)));
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return Err(std::io::Error::other("request head too large"));
        }
        if read_more(stream, buf).await? == 0 {
            return Ok(None);
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// The answer to a chat completion: [`STUB_REPLY`] cut to `max_tokens` words, one token per
/// word, the prompt one token per 4 bytes of message content.
fn completion(body: &[u8]) -> String {
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
        let error =
            json!({"error": {"message": "body is not JSON", "type": "invalid_request_error"}});
        return response("400 Bad Request", "application/json", &error.to_string());
    };
    let max_tokens = request["max_tokens"].as_u64().unwrap_or(u64::MAX);
    let words: Vec<&str> = STUB_REPLY.split_whitespace().collect();
    let completion_tokens = (words.len() as u64).min(max_tokens);
    let text = words[..completion_tokens as usize].join(" ");
    let finish = if completion_tokens < words.len() as u64 {
        "length"
    } else {
        "stop"
    };
    let prompt_bytes: usize = request["messages"]
        .as_array()
        .map(|messages| {
            messages
                .iter()
                .filter_map(|m| m["content"].as_str())
                .map(str::len)
                .sum()
        })
        .unwrap_or(0);
    let usage = json!({
        "prompt_tokens": prompt_bytes.div_ceil(4),
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_bytes.div_ceil(4) as u64 + completion_tokens,
    });
    if request["stream"].as_bool() == Some(true) {
        let delta = json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": null}]});
        let end = json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]});
        let usage = json!({"object": "chat.completion.chunk", "choices": [], "usage": usage});
        let body = format!("data: {delta}\n\ndata: {end}\n\ndata: {usage}\n\ndata: [DONE]\n\n");
        response("200 OK", "text/event-stream", &body)
    } else {
        let body = json!({
            "object": "chat.completion",
            "model": "stub",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage,
        });
        response("200 OK", "application/json", &body.to_string())
    }
}

fn response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_completion_is_cut_to_max_tokens_and_reports_usage() {
        let answer = completion(
            br#"{"messages":[{"role":"user","content":"12345678"}],"max_tokens":2,"stream":true}"#,
        );
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(answer.contains(r#""content":"Hello from""#), "{answer}");
        assert!(answer.contains(r#""finish_reason":"length""#));
        assert!(answer.contains(r#""prompt_tokens":2"#));
        assert!(answer.contains(r#""completion_tokens":2"#));
        assert!(answer.ends_with("data: [DONE]\n\n"));
        let (head, body) = answer.split_once("\r\n\r\n").expect("head");
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}
