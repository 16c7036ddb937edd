//! The kind 5050 text-generation profile (`nips/dvmd-5050.md`): which inputs and params a
//! request may carry, their units, ranges and defaults.

use super::{InputType, JobInput, JobRequest, RequestError};
use crate::infer::{ChatMessage, GenerateRequest, Sampling};

/// Limits an operator sets on kind 5050 jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextGenerationLimits {
    /// `max_tokens` when the request does not say.
    pub default_max_tokens: u32,
    /// The largest `max_tokens` accepted.
    pub max_tokens_limit: u32,
    /// The largest prompt accepted, in bytes (all inputs together).
    pub max_prompt_bytes: usize,
}

/// A validated kind 5050 job.
#[derive(Debug, Clone, PartialEq)]
pub struct TextGeneration {
    /// What to run.
    pub request: GenerateRequest,
    /// Completion budget in tokens.
    pub max_tokens: u32,
}

impl TextGeneration {
    /// Validate a parsed request against the profile and the operator's limits.
    pub fn from_request(
        job: &JobRequest,
        limits: &TextGenerationLimits,
    ) -> Result<Self, RequestError> {
        if let Some(defect) = &job.defect {
            return Err(defect.clone());
        }
        Self::from_parts(&job.inputs, &job.params, limits)
    }

    /// Validate inputs and params (as `i` and `param` tags carry them, or `POST /v1/jobs`)
    /// against the profile and the operator's limits.
    pub fn from_parts(
        inputs: &[JobInput],
        params: &[(String, String)],
        limits: &TextGenerationLimits,
    ) -> Result<Self, RequestError> {
        let mut parts = Vec::with_capacity(inputs.len());
        for input in inputs {
            match &input.input_type {
                InputType::Text | InputType::Prompt => parts.push(input.value.as_str()),
                other => return Err(RequestError::UnsupportedInput(other.as_str().to_owned())),
            }
        }
        if parts.is_empty() {
            return Err(RequestError::NoInput);
        }
        let prompt = parts.join("\n\n");
        if prompt.len() > limits.max_prompt_bytes {
            return Err(RequestError::TooLarge {
                size: prompt.len(),
                limit: limits.max_prompt_bytes,
            });
        }

        let max_tokens = match param(params, "max_tokens") {
            None => limits.default_max_tokens,
            Some(raw) => {
                let n: u32 = parse(raw, "max_tokens", "a whole number of tokens")?;
                if n == 0 || n > limits.max_tokens_limit {
                    return Err(bad(
                        "max_tokens",
                        format!("{n} is outside 1..={}", limits.max_tokens_limit),
                    ));
                }
                n
            }
        };
        let sampling = Sampling {
            temperature: param_in(params, "temperature", 0.0..=2.0)?,
            top_p: param_in(params, "top_p", 0.0..=1.0)?,
            top_k: match param(params, "top_k") {
                None => None,
                Some(raw) => {
                    let k: u32 = parse(raw, "top_k", "a whole number")?;
                    if k == 0 {
                        return Err(bad("top_k", "must be at least 1".to_owned()));
                    }
                    Some(k)
                }
            },
            seed: match param(params, "seed") {
                None => None,
                Some(raw) => Some(parse(raw, "seed", "a whole number below 2^32")?),
            },
        };
        Ok(Self {
            request: GenerateRequest {
                continue_from: None,
                model: param(params, "model").map(str::to_owned),
                messages: vec![ChatMessage::user(prompt)],
                sampling,
            },
            max_tokens,
        })
    }
}

fn parse<T: std::str::FromStr>(raw: &str, name: &str, expected: &str) -> Result<T, RequestError> {
    raw.trim()
        .parse()
        .map_err(|_| bad(name, format!("`{raw}` is not {expected}")))
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

fn param_in(
    params: &[(String, String)],
    name: &str,
    range: std::ops::RangeInclusive<f32>,
) -> Result<Option<f32>, RequestError> {
    let Some(raw) = param(params, name) else {
        return Ok(None);
    };
    let value: f32 = parse(raw, name, "a number")?;
    if !value.is_finite() || !range.contains(&value) {
        return Err(bad(
            name,
            format!("{raw} is outside {}..={}", range.start(), range.end()),
        ));
    }
    Ok(Some(value))
}

fn bad(name: &str, reason: String) -> RequestError {
    RequestError::BadParam {
        name: name.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use nostr_sdk::{EventBuilder, Keys, Kind, Tag};

    use super::*;

    const LIMITS: TextGenerationLimits = TextGenerationLimits {
        default_max_tokens: 256,
        max_tokens_limit: 1024,
        max_prompt_bytes: 100,
    };

    fn job(tags: Vec<Vec<&str>>) -> Result<TextGeneration, RequestError> {
        let tags = tags.into_iter().map(|t| Tag::parse(t).expect("tag"));
        let event = EventBuilder::new(Kind::from(5050), "")
            .tags(tags)
            .sign_with_keys(&Keys::generate())
            .expect("sign");
        TextGeneration::from_request(&JobRequest::parse(&event).expect("request"), &LIMITS)
    }

    #[test]
    fn defaults() {
        let tg = job(vec![vec!["i", "Hello", "text"]]).expect("valid");
        assert_eq!(tg.max_tokens, 256);
        assert_eq!(tg.request.messages, vec![ChatMessage::user("Hello")]);
        assert_eq!(tg.request.sampling, Sampling::default());
        assert_eq!(tg.request.model, None);
    }

    #[test]
    fn params_and_prompt_inputs() {
        let tg = job(vec![
            vec!["i", "Part one", "prompt"],
            vec!["i", "Part two", "text"],
            vec!["param", "model", "smollm2"],
            vec!["param", "max_tokens", "32"],
            vec!["param", "temperature", "0"],
            vec!["param", "top_p", "0.9"],
            vec!["param", "top_k", "40"],
            vec!["param", "seed", "7"],
        ])
        .expect("valid");
        assert_eq!(tg.max_tokens, 32);
        assert_eq!(tg.request.messages[0].content, "Part one\n\nPart two");
        assert_eq!(tg.request.model.as_deref(), Some("smollm2"));
        assert_eq!(
            tg.request.sampling,
            Sampling {
                temperature: Some(0.0),
                top_p: Some(0.9),
                top_k: Some(40),
                seed: Some(7)
            }
        );
    }

    #[test]
    fn refusals_say_why() {
        let long = "x".repeat(101);
        let cases: Vec<(Vec<Vec<&str>>, &str)> = vec![
            (vec![], "no `i` input"),
            (
                vec![vec!["i", "https://x", "url"]],
                "`url` is not supported",
            ),
            (vec![vec!["i", "abc", "event"]], "`event` is not supported"),
            (
                vec![vec!["i", "x", "telepathy"]],
                "`telepathy` is not supported",
            ),
            (
                vec![
                    vec!["i", "x", "text"],
                    vec!["param", "max_tokens", "999999999"],
                ],
                "outside 1..=1024",
            ),
            (
                vec![vec!["i", "x", "text"], vec!["param", "max_tokens", "0"]],
                "outside 1..=1024",
            ),
            (
                vec![vec!["i", "x", "text"], vec!["param", "max_tokens", "many"]],
                "not a whole number",
            ),
            (
                vec![vec!["i", "x", "text"], vec!["param", "temperature", "NaN"]],
                "temperature",
            ),
            (
                vec![vec!["i", "x", "text"], vec!["param", "temperature", "9"]],
                "outside 0..=2",
            ),
            (
                vec![vec!["i", "x", "text"], vec!["param", "top_k", "0"]],
                "at least 1",
            ),
            (
                vec![vec!["i", "x", "text"], vec!["param", "seed", "-1"]],
                "seed",
            ),
            (vec![vec!["i", &long, "text"]], "at most 100"),
            (
                vec![vec!["i", "x", "text"], vec!["bid", "x"]],
                "malformed `bid`",
            ),
        ];
        for (tags, why) in cases {
            let err = job(tags.clone()).expect_err("refused").to_string();
            assert!(err.contains(why), "{tags:?}: {err}");
        }
    }
}
