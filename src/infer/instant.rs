//! A backend that answers at once with a fixed completion, for benchmarks and pipeline tests
//! that measure everything but the model. Never selected by configuration.

use futures::stream;

use super::{
    Backend, FinishReason, GenerateEvent, GenerateRequest, GenerateStream, InferError, Usage,
};

/// Answers every request with the same text.
#[derive(Debug, Clone)]
pub struct InstantBackend {
    reply: String,
}

impl InstantBackend {
    /// A backend that always answers `reply`.
    pub fn new(reply: impl Into<String>) -> Self {
        Self {
            reply: reply.into(),
        }
    }

    /// The words of the reply still to say: after those `request` continues from.
    fn words<'a>(&'a self, request: &GenerateRequest) -> Vec<&'a str> {
        let said = request
            .continue_from
            .as_deref()
            .map_or(0, |said| said.split_whitespace().count());
        self.reply.split_whitespace().skip(said).collect()
    }

    /// One "token" per whitespace-separated word, the prompt (and what it continues from) one
    /// per 4 bytes.
    fn usage(&self, request: &GenerateRequest, max_tokens: u32) -> Usage {
        let said = request.continue_from.as_deref().map_or(0, str::len);
        let prompt_bytes: usize = request
            .messages
            .iter()
            .map(|m| m.content.len())
            .sum::<usize>()
            + said;
        Usage {
            prompt_tokens: u32::try_from(prompt_bytes.div_ceil(4)).unwrap_or(u32::MAX),
            completion_tokens: u32::try_from(self.words(request).len())
                .unwrap_or(u32::MAX)
                .min(max_tokens),
        }
    }
}

#[async_trait::async_trait]
impl Backend for InstantBackend {
    fn name(&self) -> &str {
        "instant"
    }

    async fn count_prompt_tokens(
        &self,
        request: &GenerateRequest,
    ) -> Result<Option<u32>, InferError> {
        Ok(Some(self.usage(request, 0).prompt_tokens))
    }

    async fn generate(
        &self,
        request: GenerateRequest,
        max_tokens: u32,
    ) -> Result<GenerateStream, InferError> {
        let usage = self.usage(&request, max_tokens);
        let words = self.words(&request);
        let mut text = words[..usage.completion_tokens as usize].join(" ");
        if request.continue_from.is_some() && !text.is_empty() {
            text.insert(0, ' ');
        }
        let finish = if (usage.completion_tokens as usize) < words.len() {
            FinishReason::Length
        } else {
            FinishReason::Stop
        };
        Ok(Box::pin(stream::iter([
            Ok(GenerateEvent::Text(text)),
            Ok(GenerateEvent::Done { usage, finish }),
        ])))
    }
}
