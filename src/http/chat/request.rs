//! The body of `POST /v1/chat/completions`: the fields of OpenAI's schema dvmd reads, checked
//! against the operator's limits and turned into the generation a kind 5050 job would run.

use serde::Deserialize;
use serde_json::Value;

use crate::http::api::OpenAiError;
use crate::infer::{ChatMessage, GenerateRequest, Sampling};
use crate::nip90::{TextGeneration, TextGenerationLimits};

/// The request fields dvmd reads; the rest of OpenAI's schema is accepted and ignored, except
/// the ones that would change the answer in ways it cannot honour (`n` above 1, `stop`, tools).
#[derive(Debug, Deserialize)]
pub(super) struct ChatRequest {
    model: Option<String>,
    messages: Vec<InMessage>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    #[serde(default)]
    pub(super) stream: bool,
    n: Option<u32>,
    stop: Option<Value>,
    tools: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Content,
}

#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
    #[default]
    None,
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl ChatRequest {
    /// The generation this asks for, checked against the operator's limits.
    pub(super) fn generation(
        self,
        limits: &TextGenerationLimits,
    ) -> Result<TextGeneration, OpenAiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(param("n", "only n = 1 is served"));
        }
        if self.stop.as_ref().is_some_and(|stop| !stop.is_null()) {
            return Err(param("stop", "stop sequences are not supported"));
        }
        if self.tools.as_ref().is_some_and(|tools| !tools.is_null()) {
            return Err(param("tools", "tools are not supported"));
        }
        if self.messages.is_empty() {
            return Err(param("messages", "at least one message is required"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        let mut bytes = 0usize;
        for message in self.messages {
            let role = match message.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(param(
                        "messages",
                        &format!("role `{other}` is not supported"),
                    ))
                }
            };
            let content = match message.content {
                Content::Text(text) => text,
                Content::None => String::new(),
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(piece)) => text.push_str(&piece),
                            (kind, _) => {
                                return Err(param(
                                    "messages",
                                    &format!("content of type `{kind}` is not supported"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            bytes += content.len();
            messages.push(ChatMessage {
                role: role.to_owned(),
                content,
            });
        }
        if bytes > limits.max_prompt_bytes {
            return Err(param(
                "messages",
                &format!(
                    "the messages hold {bytes} bytes; at most {} are accepted",
                    limits.max_prompt_bytes
                ),
            ));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => limits.default_max_tokens,
            Some(n) if (1..=limits.max_tokens_limit).contains(&n) => n,
            Some(n) => {
                return Err(param(
                    "max_tokens",
                    &format!("{n} is outside 1..={}", limits.max_tokens_limit),
                ))
            }
        };
        let temperature = in_range("temperature", self.temperature, 0.0..=2.0)?;
        let top_p = in_range("top_p", self.top_p, 0.0..=1.0)?;
        let seed = match self.seed {
            None => None,
            Some(seed) => Some(
                u32::try_from(seed)
                    .map_err(|_| param("seed", "must be a whole number in 0..2^32"))?,
            ),
        };
        Ok(TextGeneration {
            request: GenerateRequest {
                continue_from: None,
                model: self.model,
                messages,
                sampling: Sampling {
                    temperature,
                    top_p,
                    top_k: None,
                    seed,
                },
            },
            max_tokens,
        })
    }
}

fn in_range(
    name: &str,
    value: Option<f32>,
    range: std::ops::RangeInclusive<f32>,
) -> Result<Option<f32>, OpenAiError> {
    match value {
        Some(v) if !v.is_finite() || !range.contains(&v) => Err(param(
            name,
            &format!("{v} is outside {}..={}", range.start(), range.end()),
        )),
        value => Ok(value),
    }
}

fn param(name: &str, reason: &str) -> OpenAiError {
    OpenAiError::invalid(format!("`{name}`: {reason}"))
}
