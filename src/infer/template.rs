//! Chat templates: renders a conversation into a prompt with the model's own Jinja template.

use minijinja::{context, Environment, Error, ErrorKind};

use super::{ChatMessage, InferError};

/// The ChatML template, as Hugging Face writes it; used when a model ships no template.
pub const CHATML: &str = concat!(
    "{% for message in messages %}",
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
);

const NAME: &str = "chat";

/// A compiled chat template with the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compile `source` (a Hugging Face `chat_template`). `bos_token` and `eos_token` are the
    /// texts the template sees as `bos_token` / `eos_token`.
    pub fn new(
        source: &str,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, InferError> {
        let mut env = Environment::new();
        // Hugging Face renders with these jinja2 settings; templates are written against them.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // HF templates call Python string methods (`.strip()`, `.startswith()`, `.items()`).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| InferError::Backend(format!("chat template does not compile: {e}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The ChatML template (`<|im_start|>role\n…<|im_end|>`).
    pub fn chatml(
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, InferError> {
        Self::new(CHATML, bos_token, eos_token)
    }

    /// Render `messages` into a prompt. With `add_generation_prompt` the prompt ends with the
    /// opening of the assistant's turn, which is what generation continues from.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, InferError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| InferError::Backend(format!("chat template missing: {e}")))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| {
                // Templates raise to reject conversations they cannot express (roles that do
                // not alternate, a system message where none is allowed): the caller's fault.
                if is_raised(&e) {
                    InferError::InvalidRequest(format!(
                        "chat template rejected the conversation: {}",
                        detail(&e)
                    ))
                } else {
                    InferError::Backend(format!("chat template failed: {e}"))
                }
            })
    }
}

/// `raise_exception(message)`, the function HF templates call to refuse a conversation.
fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message).with_source(Raised))
}

/// Marks errors from `raise_exception`, so they are told apart from template bugs.
#[derive(Debug)]
struct Raised;

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for Raised {}

fn is_raised(error: &Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if e.is::<Raised>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn detail(error: &Error) -> String {
    error
        .detail()
        .map_or_else(|| error.to_string(), ToOwned::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's `tokenizer.chat_template`, verbatim from its GGUF.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage {
                role: "system".to_owned(),
                content: "You are terse.".to_owned(),
            },
            ChatMessage::user("Name a colour."),
        ]
    }

    const EXPECTED: &str = "<|im_start|>system\nYou are terse.<|im_end|>\n\
                            <|im_start|>user\nName a colour.<|im_end|>\n\
                            <|im_start|>assistant\n";

    #[test]
    fn chatml_renders_system_and_user() -> Result<(), InferError> {
        let template = ChatTemplate::chatml("<|im_start|>", "<|im_end|>")?;
        assert_eq!(template.render(&conversation(), true)?, EXPECTED);
        Ok(())
    }

    #[test]
    fn chatml_without_generation_prompt_ends_after_last_turn() -> Result<(), InferError> {
        let template = ChatTemplate::chatml("", "")?;
        let prompt = template.render(&conversation(), false)?;
        assert_eq!(prompt, EXPECTED.trim_end_matches("<|im_start|>assistant\n"));
        Ok(())
    }

    #[test]
    fn smollm2_template_matches_chatml_with_a_system_message() -> Result<(), InferError> {
        let template = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>")?;
        assert_eq!(template.render(&conversation(), true)?, EXPECTED);
        Ok(())
    }

    #[test]
    fn smollm2_template_adds_its_default_system_message() -> Result<(), InferError> {
        let template = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>")?;
        let prompt = template.render(&[ChatMessage::user("Hi")], true)?;
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        Ok(())
    }

    #[test]
    fn special_tokens_and_python_methods_are_available() -> Result<(), InferError> {
        let source = "{{ bos_token }}{% for m in messages %}[{{ m.role.upper() }}] \
                      {{ m['content'].strip() }}{% if m.content.startswith(' ') %}!{% endif %}\
                      {{ eos_token }}{% endfor %}";
        let template = ChatTemplate::new(source, "<s>", "</s>")?;
        let prompt = template.render(&[ChatMessage::user("  padded ")], false)?;
        assert_eq!(prompt, "<s>[USER] padded!</s>");
        Ok(())
    }

    #[test]
    fn tojson_and_loop_controls_work() -> Result<(), InferError> {
        // Tool-aware templates (Qwen, Llama 3) use both.
        let source = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}\
                      {{ m.content | tojson }}{% endfor %}";
        let template = ChatTemplate::new(source, "", "")?;
        let messages = [
            ChatMessage::user("say \"hi\""),
            ChatMessage::user("skipped"),
        ];
        assert_eq!(template.render(&messages, false)?, r#""say \"hi\"""#);
        Ok(())
    }

    #[test]
    fn trim_blocks_like_hugging_face() -> Result<(), InferError> {
        let source = "{% for m in messages %}\n  {% if m.role == 'user' %}\nU:{{ m.content }}\n  {% endif %}\n{% endfor %}";
        let template = ChatTemplate::new(source, "", "")?;
        assert_eq!(template.render(&[ChatMessage::user("a")], false)?, "U:a\n");
        Ok(())
    }

    #[test]
    fn raise_exception_is_an_invalid_request() -> Result<(), InferError> {
        let source = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('System first, please') }}{% endif %}";
        let template = ChatTemplate::new(source, "", "")?;
        match template.render(&[ChatMessage::user("hi")], true) {
            Err(InferError::InvalidRequest(message)) => {
                assert!(message.contains("System first, please"), "{message}");
            }
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn broken_template_fails_to_compile() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(InferError::Backend(_))
        ));
    }
}
