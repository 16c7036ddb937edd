//! TEMPORARY STUB (replaced by the real backend).
use std::path::PathBuf;

use super::{Backend, GenerateRequest, GenerateStream, InferError};

/// Config.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// Path.
    pub model_path: PathBuf,
    /// Threads.
    pub threads: Option<u32>,
    /// Context.
    pub context_tokens: u32,
}

/// Stub.
pub struct LlamaBackend;

impl LlamaBackend {
    /// Stub.
    pub fn load(_config: &LlamaConfig) -> Result<Self, InferError> {
        Err(InferError::Backend("stub".into()))
    }
}

#[async_trait::async_trait]
impl Backend for LlamaBackend {
    fn name(&self) -> &str {
        "llama"
    }
    async fn count_prompt_tokens(&self, _r: &GenerateRequest) -> Result<Option<u32>, InferError> {
        Ok(None)
    }
    async fn generate(&self, _r: GenerateRequest, _m: u32) -> Result<GenerateStream, InferError> {
        Err(InferError::Backend("stub".into()))
    }
}
/// Stub.
pub fn default_threads() -> u32 {
    1
}
