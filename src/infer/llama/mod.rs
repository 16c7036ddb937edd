//! The `llama` backend: a GGUF model run in-process by llama.cpp, streamed token by token.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend as Runtime;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::vocab::LlamaVocab;
use tokio::sync::mpsc;

mod sampler;

use self::sampler::{take_utf8, SamplerSettings};
pub use self::sampler::{DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P};
use super::template::ChatTemplate;
use super::{
    Backend, FinishReason, GenerateEvent, GenerateRequest, GenerateStream, InferError, Usage,
};

/// Context window when the configuration does not say.
pub const DEFAULT_CONTEXT_TOKENS: u32 = 2048;

/// GGUF metadata key of the Hugging Face chat template.
const TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// Text events buffered between the generating thread and the consumer; a slow consumer makes
/// generation wait instead of piling up text.
const CHANNEL_CAPACITY: usize = 64;

/// How to load the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaConfig {
    /// The GGUF file.
    pub model_path: PathBuf,
    /// CPU threads; `None` means [`default_threads`].
    pub threads: Option<u32>,
    /// Context window in tokens: prompt plus completion must fit.
    pub context_tokens: u32,
}

impl LlamaConfig {
    /// Defaults for `model_path`: [`default_threads`] and [`DEFAULT_CONTEXT_TOKENS`].
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            threads: None,
            context_tokens: DEFAULT_CONTEXT_TOKENS,
        }
    }
}

/// Available cores minus one, at least 1. Leaving a core free matters: when every core runs a
/// llama.cpp thread, one preempted thread stalls the others at each barrier and throughput
/// collapses.
pub fn default_threads() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    u32::try_from(cores.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// llama.cpp's process-wide state. `llama_backend_init` may run only once per process, so every
/// [`LlamaBackend::load`] shares this one.
fn runtime() -> Result<&'static Runtime, InferError> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            // Before init, which already logs: llama.cpp writes to stderr unless redirected.
            // Through tracing its chatter (target `llama-cpp-2`) obeys the daemon's filter.
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            Runtime::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| InferError::Backend(format!("llama.cpp failed to initialise: {e}")))
}

/// An embedded llama.cpp model.
#[derive(Clone)]
pub struct LlamaBackend {
    inner: Arc<Loaded>,
}

struct Loaded {
    runtime: &'static Runtime,
    model: LlamaModel,
    template: ChatTemplate,
    /// Text of the BOS token, stripped from rendered prompts that start with it because the
    /// tokenizer adds the token itself (`add_bos`); otherwise it would appear twice.
    bos_text: String,
    eos_text: String,
    add_bos: bool,
    add_eos: bool,
    threads: u32,
    context_tokens: u32,
    /// Creating contexts from one model concurrently is unsound in llama.cpp (it writes to the
    /// model), so creations take turns.
    context_lock: Mutex<()>,
}

impl std::fmt::Debug for LlamaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaBackend")
            .field("threads", &self.inner.threads)
            .field("context_tokens", &self.inner.context_tokens)
            .finish_non_exhaustive()
    }
}

impl LlamaBackend {
    /// Render and tokenize on the blocking pool: the template and the tokenizer are model
    /// work, and a long prompt takes milliseconds that a tokio worker must not spend.
    async fn tokenize(&self, request: GenerateRequest) -> Result<Vec<LlamaToken>, InferError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.tokenize(&request))
            .await
            .map_err(|e| InferError::Backend(format!("tokenizer task failed: {e}")))?
    }

    /// Load the model. Blocking (reads the whole GGUF): call it from a blocking thread.
    pub fn load(config: &LlamaConfig) -> Result<Self, InferError> {
        let path = &config.model_path;
        if !path.is_file() {
            return Err(InferError::Backend(format!(
                "model file {} does not exist",
                path.display()
            )));
        }
        if config.context_tokens == 0 {
            return Err(InferError::Backend(
                "context_tokens must be at least 1".to_owned(),
            ));
        }
        let threads = config.threads.unwrap_or_else(default_threads).max(1);
        if i32::try_from(threads).is_err() || i32::try_from(config.context_tokens).is_err() {
            return Err(InferError::Backend(
                "threads or context_tokens out of range".to_owned(),
            ));
        }
        let runtime = runtime()?;
        let model = LlamaModel::load_from_file(runtime, path, &LlamaModelParams::default())
            .map_err(|e| {
                InferError::Backend(format!("cannot load model {}: {e}", path.display()))
            })?;

        if config.context_tokens > model.n_ctx_train() {
            tracing::warn!(
                context_tokens = config.context_tokens,
                trained = model.n_ctx_train(),
                "context window is larger than the model was trained for; quality may suffer"
            );
        }

        let vocab = model.vocab();
        let bos_text = special_text(&vocab, vocab.bos());
        let eos_text = special_text(&vocab, vocab.eos());
        let template = match model.meta_val_str(TEMPLATE_KEY) {
            Ok(source) => {
                ChatTemplate::new(&source, bos_text.clone(), eos_text.clone()).map_err(|e| {
                    InferError::Backend(format!("{} of {}: {e}", TEMPLATE_KEY, path.display()))
                })?
            }
            Err(_) => {
                tracing::warn!(model = %path.display(), "model has no chat template; using ChatML");
                ChatTemplate::chatml(bos_text.clone(), eos_text.clone())?
            }
        };
        let add_bos = vocab.should_add_bos();
        let add_eos = vocab.should_add_eos();
        let loaded = Loaded {
            runtime,
            model,
            template,
            bos_text,
            eos_text,
            add_bos,
            add_eos,
            threads,
            context_tokens: config.context_tokens,
            context_lock: Mutex::new(()),
        };
        loaded.warm_up()?;
        tracing::info!(
            model = %path.display(),
            params = loaded.model.n_params(),
            threads,
            context_tokens = config.context_tokens,
            "model loaded"
        );
        Ok(Self {
            inner: Arc::new(loaded),
        })
    }

    /// CPU threads generation uses.
    pub fn threads(&self) -> u32 {
        self.inner.threads
    }

    /// Context window in tokens.
    pub fn context_tokens(&self) -> u32 {
        self.inner.context_tokens
    }
}

/// How a special token is spelled in templates (`bos_token`, `eos_token`); empty when the
/// vocabulary has none.
fn special_text(vocab: &LlamaVocab<'_>, token: LlamaToken) -> String {
    if token.0 < 0 || token.0 >= vocab.n_tokens() {
        return String::new();
    }
    String::from_utf8_lossy(&vocab.token_to_piece(token, true, None)).into_owned()
}

impl Loaded {
    fn tokenize(&self, request: &GenerateRequest) -> Result<Vec<LlamaToken>, InferError> {
        let mut rendered = self.template.render(&request.messages, true)?;
        if let Some(said) = &request.continue_from {
            // The assistant's turn is open at the end of the rendered prompt: what it already
            // said goes there, and generation goes on from it.
            rendered.push_str(said);
        }
        let mut prompt = rendered.as_str();
        // Mirrors llama.cpp's own chat path so counts match what llama-server would charge.
        if self.add_bos && !self.bos_text.is_empty() {
            prompt = prompt
                .strip_prefix(self.bos_text.as_str())
                .unwrap_or(prompt);
        }
        if self.add_eos && !self.eos_text.is_empty() {
            prompt = prompt
                .strip_suffix(self.eos_text.as_str())
                .unwrap_or(prompt);
        }
        let tokens = self.model.vocab().tokenize(prompt.as_bytes(), true, true);
        if tokens.is_empty() {
            return Err(InferError::InvalidRequest("the prompt is empty".to_owned()));
        }
        Ok(tokens)
    }

    /// Run the model once on one token. The weights are memory-mapped, so otherwise the first
    /// request pays for paging them in (it ran at half speed); this also proves at startup
    /// that the model runs at all.
    fn warm_up(&self) -> Result<(), InferError> {
        let mut ctx = self.new_context(1)?;
        let mut batch = LlamaBatch::new(1, 1);
        batch
            .add(LlamaToken(0), 0, &[0], true)
            .map_err(batch_error)?;
        ctx.decode(&mut batch)
            .map_err(|e| InferError::Backend(format!("the model does not run: {e}")))
    }

    /// A context for `tokens` positions. Sized per request rather than to the full window:
    /// allocating and clearing the KV cache is most of a context's creation time (about 30 ms
    /// for 2048 positions of SmolLM2-135M, a few ms for a few hundred).
    fn new_context(&self, tokens: u32) -> Result<LlamaContext<'_>, InferError> {
        let threads = i32::try_from(self.threads).unwrap_or(i32::MAX);
        let n_ctx = tokens.clamp(1, self.context_tokens);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let _turn = self
            .context_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.model
            .new_context(self.runtime, params)
            .map_err(|e| InferError::Backend(format!("cannot create a llama.cpp context: {e}")))
    }

    /// Generate on the calling (blocking) thread, sending events to `tx`. Returns early, without
    /// error, when the receiver is gone: the consumer cancelled.
    fn run(
        &self,
        prompt: &[LlamaToken],
        max_tokens: u32,
        sampling: &SamplerSettings,
        tx: &mpsc::Sender<Result<GenerateEvent, InferError>>,
    ) -> Result<(), InferError> {
        let prompt_tokens = count(prompt.len())?;
        if max_tokens == 0 {
            let usage = Usage {
                prompt_tokens,
                completion_tokens: 0,
            };
            let _ = tx.blocking_send(Ok(GenerateEvent::Done {
                usage,
                finish: FinishReason::Length,
            }));
            return Ok(());
        }
        let started = Instant::now();
        let mut ctx = self.new_context(prompt_tokens.saturating_add(max_tokens))?;
        let context_ready = Instant::now();
        let n_batch = usize::try_from(ctx.n_batch()).unwrap_or(usize::MAX).max(1);
        let mut batch = LlamaBatch::new(n_batch.min(prompt.len()).max(1), 1);

        let mut position: i32 = 0;
        for chunk in prompt.chunks(n_batch) {
            if tx.is_closed() {
                return Ok(());
            }
            batch.clear();
            for (i, token) in chunk.iter().enumerate() {
                let last = i + 1 == chunk.len();
                batch
                    .add(*token, position, &[0], last)
                    .map_err(batch_error)?;
                position += 1;
            }
            ctx.decode(&mut batch)
                .map_err(|e| InferError::Backend(format!("prompt decode failed: {e}")))?;
        }

        let prompt_done = Instant::now();
        let vocab = self.model.vocab();
        let mut sampler = sampling.sampler();
        let mut pending: Vec<u8> = Vec::new();
        let mut completion_tokens: u32 = 0;
        let finish = loop {
            if completion_tokens >= max_tokens {
                break FinishReason::Length;
            }
            // `sample` also feeds the token back to the chain (`accept`).
            let token = sampler.sample(&ctx, batch.n_tokens() - 1);
            // The end-of-turn token counts: it was generated, like llama-server counts it.
            completion_tokens += 1;
            if vocab.is_eog(token) {
                break FinishReason::Stop;
            }
            vocab.token_to_piece_into(token, &mut pending, false, None);
            let text = take_utf8(&mut pending, false);
            if !text.is_empty() && tx.blocking_send(Ok(GenerateEvent::Text(text))).is_err() {
                return Ok(());
            }
            if completion_tokens >= max_tokens {
                break FinishReason::Length;
            }
            if tx.is_closed() {
                return Ok(());
            }
            batch.clear();
            batch
                .add(token, position, &[0], true)
                .map_err(batch_error)?;
            position += 1;
            ctx.decode(&mut batch)
                .map_err(|e| InferError::Backend(format!("decode failed: {e}")))?;
        };
        let finished = Instant::now();
        tracing::debug!(
            prompt_tokens,
            completion_tokens,
            context_ms = ms(context_ready - started),
            prompt_ms = ms(prompt_done - context_ready),
            generation_ms = ms(finished - prompt_done),
            "generated"
        );
        let tail = take_utf8(&mut pending, true);
        if !tail.is_empty() && tx.blocking_send(Ok(GenerateEvent::Text(tail))).is_err() {
            return Ok(());
        }
        let usage = Usage {
            prompt_tokens,
            completion_tokens,
        };
        // The receiver may be gone by now; nothing is left to stop.
        let _ = tx.blocking_send(Ok(GenerateEvent::Done { usage, finish }));
        Ok(())
    }
}

fn ms(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1000.0
}

fn batch_error(e: llama_cpp_2::llama_batch::BatchAddError) -> InferError {
    InferError::Backend(format!("llama.cpp batch: {e}"))
}

fn count(n: usize) -> Result<u32, InferError> {
    u32::try_from(n).map_err(|_| InferError::InvalidRequest(format!("{n} tokens is too many")))
}

#[async_trait::async_trait]
impl Backend for LlamaBackend {
    fn name(&self) -> &str {
        "llama"
    }

    async fn count_prompt_tokens(
        &self,
        request: &GenerateRequest,
    ) -> Result<Option<u32>, InferError> {
        let tokens = self.tokenize(request.clone()).await?;
        Ok(Some(count(tokens.len())?))
    }

    async fn generate(
        &self,
        request: GenerateRequest,
        max_tokens: u32,
    ) -> Result<GenerateStream, InferError> {
        let prompt = self.tokenize(request.clone()).await?;
        let prompt_tokens = count(prompt.len())?;
        let window = self.inner.context_tokens;
        if u64::from(prompt_tokens) + u64::from(max_tokens) > u64::from(window) {
            return Err(InferError::InvalidRequest(format!(
                "the prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}, but the \
                 context window holds {window} tokens in all; shorten the prompt or lower max_tokens"
            )));
        }
        let sampling = SamplerSettings::new(&request.sampling)?;

        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = inner.run(&prompt, max_tokens, &sampling, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|event| (event, rx))
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::Sampling;
    use crate::infer::{collect, ChatMessage};
    use futures::StreamExt;
    use std::path::Path;

    impl LlamaBackend {
        fn retokenized_len(&self, text: &str) -> u32 {
            let tokens = self
                .inner
                .model
                .vocab()
                .tokenize(text.as_bytes(), false, false);
            u32::try_from(tokens.len()).unwrap_or(u32::MAX)
        }
    }

    const DEFAULT_MODEL: &str = "/root/.cache/dvmd/models/SmolLM2-135M-Instruct.Q4_1.gguf";

    /// One model for all tests: loading it is the slow part.
    fn backend() -> &'static LlamaBackend {
        static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
        BACKEND.get_or_init(|| {
            let path = std::env::var("DVMD_MODEL").unwrap_or_else(|_| DEFAULT_MODEL.to_owned());
            assert!(
                Path::new(&path).is_file(),
                "test model {path} is missing: run `make model` or set DVMD_MODEL"
            );
            match LlamaBackend::load(&LlamaConfig::new(path)) {
                Ok(backend) => backend,
                Err(e) => panic!("loading the test model failed: {e}"),
            }
        })
    }

    fn request(prompt: &str, seed: u32) -> GenerateRequest {
        GenerateRequest {
            continue_from: None,
            model: None,
            messages: vec![
                ChatMessage {
                    role: "system".to_owned(),
                    content: "You are a helpful assistant.".to_owned(),
                },
                ChatMessage::user(prompt),
            ],
            sampling: Sampling {
                temperature: Some(0.0),
                seed: Some(seed),
                ..Sampling::default()
            },
        }
    }

    #[test]
    fn default_threads_leaves_a_core_free() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let expected = u32::try_from(cores.saturating_sub(1).max(1)).unwrap_or(u32::MAX);
        assert_eq!(default_threads(), expected);
    }

    #[tokio::test]
    async fn greedy_generation_counts_tokens_exactly() -> Result<(), InferError> {
        let backend = backend();
        let req = request("Write a long story about a dragon.", 7);
        let counted = backend.count_prompt_tokens(&req).await?;

        let mut stream = backend.generate(req.clone(), 12).await?;
        let mut text = String::new();
        let mut done = None;
        while let Some(event) = stream.next().await {
            match event? {
                GenerateEvent::Text(piece) => {
                    assert!(done.is_none(), "text after Done");
                    text.push_str(&piece);
                }
                GenerateEvent::Done { usage, finish } => done = Some((usage, finish)),
            }
        }
        let Some((usage, finish)) = done else {
            panic!("no Done event");
        };
        assert_eq!(Some(usage.prompt_tokens), counted);
        assert_eq!(usage.completion_tokens, 12, "{text:?}");
        assert_eq!(finish, FinishReason::Length);
        assert!(!text.is_empty());

        // Greedy output of a BPE model re-tokenises to the very tokens sampled.
        assert_eq!(backend.retokenized_len(&text), 12, "{text:?}");

        // Greedy is deterministic.
        let (again, usage_again, _) = collect(backend.generate(req, 12).await?).await?;
        assert_eq!(again, text);
        assert_eq!(usage_again, usage);
        Ok(())
    }

    #[tokio::test]
    async fn short_answer_stops_at_end_of_turn() -> Result<(), InferError> {
        let backend = backend();
        let req = request("Reply with just the word: yes", 1);
        let (text, usage, finish) = collect(backend.generate(req.clone(), 200).await?).await?;
        assert_eq!(finish, FinishReason::Stop, "{text:?}");
        // Every visible token, plus the end-of-turn token that is counted but not shown.
        assert_eq!(
            usage.completion_tokens,
            backend.retokenized_len(&text) + 1,
            "{text:?}"
        );
        assert!(!text.contains("<|im_end|>"), "{text:?}");
        assert_eq!(
            Some(usage.prompt_tokens),
            backend.count_prompt_tokens(&req).await?
        );
        Ok(())
    }

    #[tokio::test]
    async fn seeded_sampling_is_reproducible() -> Result<(), InferError> {
        let backend = backend();
        let mut req = request("Name three fruits.", 42);
        req.sampling = Sampling {
            temperature: Some(1.0),
            top_p: Some(0.95),
            top_k: Some(40),
            seed: Some(42),
        };
        let (a, usage_a, _) = collect(backend.generate(req.clone(), 24).await?).await?;
        let (b, usage_b, _) = collect(backend.generate(req, 24).await?).await?;
        assert_eq!(a, b);
        assert_eq!(usage_a, usage_b);
        Ok(())
    }

    #[tokio::test]
    async fn prompt_too_long_for_the_context_is_rejected() -> Result<(), InferError> {
        let backend = backend();
        let req = request("Hello there.", 1);
        let Some(prompt) = backend.count_prompt_tokens(&req).await? else {
            panic!("llama counts prompts exactly");
        };
        let fits = backend.context_tokens() - prompt;
        match backend.generate(req.clone(), fits + 1).await {
            Err(InferError::InvalidRequest(message)) => {
                assert!(message.contains("context"), "{message}")
            }
            Err(e) => panic!("expected InvalidRequest, got {e}"),
            Ok(_) => panic!("expected InvalidRequest, got a stream"),
        }
        // Exactly full is allowed; stop early by dropping the stream.
        let mut stream = backend.generate(req, fits).await?;
        assert!(stream.next().await.is_some());
        drop(stream);
        Ok(())
    }

    #[tokio::test]
    async fn zero_max_tokens_generates_nothing() -> Result<(), InferError> {
        let (text, usage, finish) = collect(backend().generate(request("Hi", 1), 0).await?).await?;
        assert_eq!(text, "");
        assert_eq!(usage.completion_tokens, 0);
        assert_eq!(finish, FinishReason::Length);
        Ok(())
    }

    #[tokio::test]
    async fn dropping_the_stream_stops_generation() -> Result<(), InferError> {
        let backend = backend();
        let mut stream = backend
            .generate(request("Count from 1 to 1000.", 1), 1000)
            .await?;
        assert!(matches!(
            stream.next().await,
            Some(Ok(GenerateEvent::Text(_)))
        ));
        drop(stream);
        // The generating thread notices at its next token; a following request still runs.
        let (_, usage, _) = collect(backend.generate(request("Hi", 1), 4).await?).await?;
        assert_eq!(usage.completion_tokens, 4);
        Ok(())
    }

    #[test]
    fn missing_model_is_a_clear_error() {
        match LlamaBackend::load(&LlamaConfig::new("/nonexistent/model.gguf")) {
            Err(InferError::Backend(message)) => {
                assert!(message.contains("does not exist"), "{message}")
            }
            other => panic!("expected Backend error, got {other:?}"),
        }
    }
}
