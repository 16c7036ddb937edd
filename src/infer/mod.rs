//! Inference backends: the [`Backend`] trait and its implementations.
//!
//! A backend turns a chat request into a stream of text pieces that ends with the exact token
//! usage. Pricing charges from that usage, so a backend must count tokens itself, never estimate.

pub mod instant;
pub mod llama;
pub mod openai;
pub mod template;

use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

/// One message of a chat conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl ChatMessage {
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".to_owned(),
            content: content.into(),
        }
    }
}

/// Sampling parameters, as NIP-90 `param` tags or OpenAI request fields carry them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Temperature; `None` means the backend default. 0 means greedy.
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold.
    pub top_p: Option<f32>,
    /// Top-k cut-off.
    pub top_k: Option<u32>,
    /// Seed for reproducible sampling.
    pub seed: Option<u32>,
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The model name asked for; backends with one model ignore it.
    pub model: Option<String>,
    /// The conversation; the last message is usually the user's prompt.
    pub messages: Vec<ChatMessage>,
    /// Sampling parameters.
    pub sampling: Sampling,
    /// Text the assistant already said in answer to `messages`: generation goes on from its end
    /// (a job continued after it stopped at its budget). The prompt then ends with it, so its
    /// tokens count as prompt tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continue_from: Option<String>,
}

/// Exact token counts of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the rendered prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// Why a generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// The model ended its turn.
    Stop,
    /// The completion budget (`max_tokens`) ran out.
    Length,
}

/// One item of a generation stream.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// A piece of generated text (one or more tokens, always valid UTF-8).
    Text(String),
    /// The last item: exact usage and why generation stopped.
    Done {
        /// Exact token counts.
        usage: Usage,
        /// Why it stopped.
        finish: FinishReason,
    },
}

/// Errors of an inference backend.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The request cannot run on this backend (prompt too long for the context, bad params).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The backend failed (model error, server unreachable, malformed response).
    #[error("backend failed: {0}")]
    Backend(String),
    /// The backend did not answer in time.
    #[error("backend timed out after {0} s")]
    Timeout(u64),
}

/// A stream of generation events; dropping it cancels the generation.
pub type GenerateStream = BoxStream<'static, Result<GenerateEvent, InferError>>;

/// An inference backend. One conformance suite (tests/) runs against every implementation.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and metrics (`llama`, `openai`, `instant`).
    fn name(&self) -> &str;

    /// Exact number of prompt tokens `request` will use, when the backend can tell before
    /// running (the quote uses it); `None` when it cannot (the quote then estimates).
    async fn count_prompt_tokens(
        &self,
        request: &GenerateRequest,
    ) -> Result<Option<u32>, InferError>;

    /// Start generating at most `max_tokens` completion tokens. The stream yields text pieces
    /// and ends with exactly one [`GenerateEvent::Done`] carrying exact usage.
    async fn generate(
        &self,
        request: GenerateRequest,
        max_tokens: u32,
    ) -> Result<GenerateStream, InferError>;
}

/// Drain a generation stream into the full completion text and its usage.
pub async fn collect(
    mut stream: GenerateStream,
) -> Result<(String, Usage, FinishReason), InferError> {
    use futures::StreamExt;
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        match event? {
            GenerateEvent::Text(piece) => text.push_str(&piece),
            GenerateEvent::Done { usage, finish } => return Ok((text, usage, finish)),
        }
    }
    Err(InferError::Backend(
        "generation stream ended without usage".to_owned(),
    ))
}
