//! The `openai` backend: any server with an OpenAI-compatible `/v1/chat/completions` (Ollama,
//! vLLM, llama-server), streamed, with usage from `stream_options.include_usage`.

use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::{
    Backend, ChatMessage, FinishReason, GenerateEvent, GenerateRequest, GenerateStream, InferError,
    Usage,
};

/// Where and how to reach the server.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Base URL up to and including `/v1`, e.g. `http://127.0.0.1:11434/v1`.
    pub base_url: String,
    /// Model name sent when the request names none.
    pub model: String,
    /// Bearer token, if the server wants one. Never logged.
    pub api_key: Option<String>,
    /// Longest a whole request may take.
    pub timeout: Duration,
}

/// The OpenAI-compatible backend.
pub struct OpenAiBackend {
    config: OpenAiConfig,
    http: reqwest::Client,
}

impl OpenAiBackend {
    /// A backend for `config`.
    pub fn new(config: OpenAiConfig) -> Result<Self, InferError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(config.timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| InferError::Backend(format!("http client: {e}")))?;
        Ok(Self { config, http })
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<ChunkUsage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Delta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct ChunkUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

/// Parser state over the server-sent events of one completion.
#[derive(Default)]
struct SseState {
    buffer: Vec<u8>,
    usage: Option<Usage>,
    finish: Option<FinishReason>,
    done: bool,
}

impl SseState {
    /// Feed raw bytes; return the text pieces of every complete event.
    fn feed(&mut self, bytes: &[u8]) -> Result<Vec<String>, InferError> {
        self.buffer.extend_from_slice(bytes);
        let mut pieces = Vec::new();
        while let Some(pos) = self.buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                self.done = true;
                continue;
            }
            let chunk: Chunk = serde_json::from_str(data)
                .map_err(|e| InferError::Backend(format!("malformed stream chunk: {e}")))?;
            if let Some(usage) = chunk.usage {
                self.usage = Some(Usage {
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                });
            }
            for choice in chunk.choices {
                if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                    pieces.push(text);
                }
                match choice.finish_reason.as_deref() {
                    Some("length") => self.finish = Some(FinishReason::Length),
                    Some(_) => self.finish = Some(FinishReason::Stop),
                    None => {}
                }
            }
        }
        Ok(pieces)
    }
}

#[async_trait::async_trait]
impl Backend for OpenAiBackend {
    fn name(&self) -> &str {
        "openai"
    }

    async fn count_prompt_tokens(
        &self,
        _request: &GenerateRequest,
    ) -> Result<Option<u32>, InferError> {
        // The OpenAI API has no tokenize endpoint; the quote estimates instead.
        Ok(None)
    }

    async fn generate(
        &self,
        request: GenerateRequest,
        max_tokens: u32,
    ) -> Result<GenerateStream, InferError> {
        let mut messages = request.messages;
        if let Some(said) = request.continue_from {
            // A last assistant message is continued, not answered: llama-server (its default
            // `prefill_assistant`) and Ollama do this as it is; vLLM is told by the two flags
            // below, which the others ignore.
            messages.push(ChatMessage {
                role: "assistant".to_owned(),
                content: said,
            });
        }
        let continuing = messages.last().is_some_and(|m| m.role == "assistant");
        let mut body = json!({
            "model": request.model.clone().unwrap_or_else(|| self.config.model.clone()),
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": true,
            "stream_options": { "include_usage": true },
        });
        let sampling = &request.sampling;
        if let Some(t) = sampling.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(p) = sampling.top_p {
            body["top_p"] = json!(p);
        }
        if let Some(k) = sampling.top_k {
            // Not in the OpenAI spec; llama-server, vLLM and Ollama read it.
            body["top_k"] = json!(k);
        }
        if let Some(seed) = sampling.seed {
            body["seed"] = json!(seed);
        }
        if continuing {
            body["continue_final_message"] = json!(true);
            body["add_generation_prompt"] = json!(false);
            // llama-server refuses to continue an answer of a template that thinks first.
            body["chat_template_kwargs"] = json!({ "enable_thinking": false });
        }
        let url = format!(
            "{}/chat/completions",
            self.config.base_url.trim_end_matches('/')
        );
        let timeout_secs = self.config.timeout.as_secs();
        // One retry when the request could not be sent: a pooled keep-alive connection the
        // server already closed (llama-server does after a cancelled stream) fails this way.
        // Nothing was generated for a request that was never sent, so retrying charges nothing.
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let mut call = self.http.post(&url).json(&body);
            if let Some(key) = &self.config.api_key {
                call = call.bearer_auth(key);
            }
            match call.send().await {
                Ok(response) => break response,
                Err(e) if e.is_timeout() => return Err(InferError::Timeout(timeout_secs)),
                Err(e) if attempt < 2 && (e.is_request() || e.is_connect()) => {
                    tracing::debug!(error = %e.without_url(), "retrying the inference request once");
                }
                // reqwest's message without the URL: it names only the host, never a query
                // or credentials.
                Err(e) => return Err(InferError::Backend(format!("{url}: {}", e.without_url()))),
            }
        };
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let text: String = text.chars().take(300).collect();
            return Err(if status.is_client_error() {
                InferError::InvalidRequest(format!("{status}: {text}"))
            } else {
                InferError::Backend(format!("{status}: {text}"))
            });
        }

        let bytes = response.bytes_stream();
        let stream = futures::stream::unfold(
            (
                bytes,
                SseState::default(),
                std::collections::VecDeque::new(),
                false,
            ),
            move |(mut bytes, mut state, mut queue, finished)| async move {
                loop {
                    if let Some(item) = queue.pop_front() {
                        return Some((item, (bytes, state, queue, finished)));
                    }
                    if finished {
                        return None;
                    }
                    match bytes.next().await {
                        Some(Ok(chunk)) => match state.feed(&chunk) {
                            Ok(pieces) => {
                                queue.extend(pieces.into_iter().map(|p| Ok(GenerateEvent::Text(p))))
                            }
                            Err(e) => return Some((Err(e), (bytes, state, queue, true))),
                        },
                        Some(Err(e)) => {
                            let err = if e.is_timeout() {
                                InferError::Timeout(timeout_secs)
                            } else {
                                InferError::Backend(format!("stream: {}", e.without_url()))
                            };
                            return Some((Err(err), (bytes, state, queue, true)));
                        }
                        None => {
                            let end = match state.usage {
                                Some(usage) => Ok(GenerateEvent::Done {
                                    usage,
                                    finish: state.finish.unwrap_or(FinishReason::Stop),
                                }),
                                None => Err(InferError::Backend(
                                    "the server reported no usage (stream_options.include_usage); cannot charge exactly".to_owned(),
                                )),
                            };
                            return Some((end, (bytes, state, queue, true)));
                        }
                    }
                }
            },
        );
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_streamed_chunks_and_usage() {
        let mut state = SseState::default();
        let part1 = b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"},\"finish_reason\":null}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo\"},\"finish";
        let part2 = b"_reason\":null}]}\n\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"total_tokens\":14}}\n\ndata: [DONE]\n\n";
        assert_eq!(state.feed(part1).expect("parse"), vec!["Hel"]);
        assert_eq!(state.feed(part2).expect("parse"), vec!["lo"]);
        assert_eq!(
            state.usage,
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 2
            })
        );
        assert_eq!(state.finish, Some(FinishReason::Length));
        assert!(state.done);
    }

    #[test]
    fn malformed_chunks_are_errors() {
        let mut state = SseState::default();
        assert!(state.feed(b"data: {not json}\n").is_err());
    }
}
