//! How the `llama` backend samples: the request's settings checked and turned into a
//! llama.cpp sampler chain, and the bytes of sampled tokens turned into text.

use llama_cpp_2::sampling::LlamaSampler;

use crate::infer::{InferError, Sampling};

/// Sampling defaults for what a request leaves out: llama.cpp's (and llama-server's), so both
/// backends behave alike. Tiny models ramble into noise without the top-k / top-p / min-p cuts.
pub const DEFAULT_TEMPERATURE: f32 = 0.8;
/// Default top-k.
pub const DEFAULT_TOP_K: u32 = 40;
/// Default top-p.
pub const DEFAULT_TOP_P: f32 = 0.95;
/// Min-p cut-off (not a request parameter).
const DEFAULT_MIN_P: f32 = 0.05;

/// Validated sampling parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct SamplerSettings {
    temperature: f32,
    top_k: Option<i32>,
    top_p: Option<f32>,
    min_p: f32,
    seed: u32,
}

impl SamplerSettings {
    pub(super) fn new(sampling: &Sampling) -> Result<Self, InferError> {
        let temperature = sampling.temperature.unwrap_or(DEFAULT_TEMPERATURE);
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(InferError::InvalidRequest(format!(
                "temperature must be a number >= 0, not {temperature}"
            )));
        }
        let top_p = sampling.top_p.unwrap_or(DEFAULT_TOP_P);
        if !(0.0..=1.0).contains(&top_p) {
            return Err(InferError::InvalidRequest(format!(
                "top_p must be between 0 and 1, not {top_p}"
            )));
        }
        let top_k = sampling.top_k.unwrap_or(DEFAULT_TOP_K);
        Ok(Self {
            temperature,
            // 0 means no cut-off, as in llama.cpp; beyond i32 is beyond any vocabulary anyway.
            top_k: (top_k > 0).then(|| i32::try_from(top_k).unwrap_or(i32::MAX)),
            // 1 keeps every token: the same as no cut-off, minus the work.
            top_p: (top_p < 1.0).then_some(top_p),
            min_p: DEFAULT_MIN_P,
            seed: sampling.seed.unwrap_or_else(rand::random),
        })
    }

    /// llama.cpp's own order (top-k, top-p, min-p, temperature, draw), so a seed samples what
    /// llama-server would with the same parameters.
    pub(super) fn sampler(&self) -> LlamaSampler {
        if self.temperature <= 0.0 {
            return LlamaSampler::greedy();
        }
        let mut chain = Vec::with_capacity(5);
        if let Some(k) = self.top_k {
            chain.push(LlamaSampler::top_k(k));
        }
        if let Some(p) = self.top_p {
            chain.push(LlamaSampler::top_p(p, 1));
        }
        chain.push(LlamaSampler::min_p(self.min_p, 1));
        chain.push(LlamaSampler::temp(self.temperature));
        chain.push(LlamaSampler::dist(self.seed));
        LlamaSampler::chain_simple(chain)
    }
}

/// Move the longest valid UTF-8 prefix out of `pending`. A token can end inside a multi-byte
/// character; its remaining bytes wait for the next token. Bytes that can never become valid
/// are replaced by U+FFFD rather than held forever, and at the `end` so is an unfinished tail.
pub(super) fn take_utf8(pending: &mut Vec<u8>, end: bool) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = pending;
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                out.push_str(valid);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                out.push_str(&String::from_utf8_lossy(valid));
                match e.error_len() {
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = after.get(bad..).unwrap_or_default();
                    }
                    None if end => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &[];
                        break;
                    }
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    let consumed = pending.len() - rest.len();
    pending.drain(..consumed);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_utf8_holds_split_characters_back() {
        let euro = "€".as_bytes();
        let mut pending = euro[..2].to_vec();
        assert_eq!(take_utf8(&mut pending, false), "");
        assert_eq!(pending.len(), 2);
        pending.extend_from_slice(&euro[2..]);
        pending.extend_from_slice(b"x");
        assert_eq!(take_utf8(&mut pending, false), "€x");
        assert!(pending.is_empty());
    }

    #[test]
    fn take_utf8_replaces_bytes_that_never_become_valid() {
        let mut pending = vec![b'a', 0xff, b'b', 0xe2, 0x82];
        assert_eq!(take_utf8(&mut pending, false), "a\u{fffd}b");
        assert_eq!(pending, vec![0xe2, 0x82]);
        assert_eq!(take_utf8(&mut pending, true), "\u{fffd}");
        assert!(pending.is_empty());
    }

    #[test]
    fn sampling_is_validated() {
        let bad = |sampling: Sampling| {
            matches!(
                SamplerSettings::new(&sampling),
                Err(InferError::InvalidRequest(_))
            )
        };
        assert!(bad(Sampling {
            temperature: Some(f32::NAN),
            ..Sampling::default()
        }));
        assert!(bad(Sampling {
            temperature: Some(-1.0),
            ..Sampling::default()
        }));
        assert!(bad(Sampling {
            top_p: Some(1.5),
            ..Sampling::default()
        }));
        let default = SamplerSettings::new(&Sampling::default());
        assert!(matches!(default, Ok(s) if s.temperature == DEFAULT_TEMPERATURE));
    }
}
