//! Chat templates: a conversation (a list of role and content messages) as the prompt text a
//! model was trained on, rendered with a Jinja engine ([minijinja]) from the model directory's
//! template, as Hugging Face's `apply_chat_template` does.
//!
//! The template comes from, in this order: a `chat_template.jinja` file in the model directory,
//! the `chat_template` key of its `tokenizer_config.json` (a string, or a list of named
//! templates of which `default` is taken), or the documented plain default
//! ([`DEFAULT_TEMPLATE`]): one `role: content` line per message and `assistant: ` as the
//! generation prompt. Templates see `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token` and a `raise_exception(message)` function, with Python's string methods
//! (`strip`, `startswith`, …) and the whitespace rules of Hugging Face's environment
//! (`trim_blocks`, `lstrip_blocks`).
//!
//! Continuing a conversation from a state ([`ChatTemplate::delta`]) ingests only the text that
//! the new messages add: the whole conversation is rendered and the text the state already
//! holds must be its prefix, so that a conversation continued turn by turn is the same token
//! sequence as the whole conversation rendered at once. A template that rewrites earlier turns
//! (it strips the assistant's text, say) is refused for that conversation with
//! [`Error::ChatTemplate`].
//!
//! ```
//! use performer::chat::{ChatTemplate, Message};
//! let t = ChatTemplate::plain();
//! let prompt = t.render(&[Message::new("user", "Hello")], true)?;
//! assert_eq!(prompt, "user: Hello\nassistant: ");
//! # Ok::<(), performer::Error>(())
//! ```

use std::fmt;
use std::path::Path;

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The plain template of a model without one: a `role: content` line per message, and
/// `assistant: ` (a space after the colon: the reply's text follows it verbatim) as the
/// generation prompt.
pub const DEFAULT_TEMPLATE: &str = "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";

/// The stop string of the plain template: the next line a user would write.
pub const DEFAULT_STOP: &str = "\nuser:";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or any role the template knows).
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message of `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Where a [`ChatTemplate`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// `chat_template.jinja` in the model directory.
    JinjaFile,
    /// The `chat_template` key of `tokenizer_config.json`.
    TokenizerConfig,
    /// [`DEFAULT_TEMPLATE`]: the model directory has none.
    Default,
    /// Given by the caller ([`ChatTemplate::new`]).
    Custom,
}

impl TemplateOrigin {
    /// A short name: `chat_template.jinja`, `tokenizer_config.json`, `default` or `custom`.
    pub fn name(self) -> &'static str {
        match self {
            TemplateOrigin::JinjaFile => "chat_template.jinja",
            TemplateOrigin::TokenizerConfig => "tokenizer_config.json",
            TemplateOrigin::Default => "default",
            TemplateOrigin::Custom => "custom",
        }
    }
}

/// A compiled chat template with its special tokens.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: TemplateOrigin,
    bos_token: String,
    eos_token: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenField {
    Text(String),
    Added { content: String },
}

/// `chat_template` in `tokenizer_config.json`: one template or a list of named ones.
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    chat_template: Option<TemplateField>,
    bos_token: Option<TokenField>,
    eos_token: Option<TokenField>,
}

fn token_text(t: Option<TokenField>) -> String {
    match t {
        Some(TokenField::Text(s)) | Some(TokenField::Added { content: s }) => s,
        None => String::new(),
    }
}

fn template_error(e: minijinja::Error) -> Error {
    // The error and its causes in one line (minijinja puts the template's line in its
    // display).
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    Error::ChatTemplate(msg)
}

impl ChatTemplate {
    /// The plain default ([`DEFAULT_TEMPLATE`]), no special tokens.
    pub fn plain() -> Self {
        let mut t = Self::new(DEFAULT_TEMPLATE, "", "").expect("the default template compiles");
        t.origin = TemplateOrigin::Default;
        t
    }

    /// Compiles `source` (Jinja) with the given special tokens. A syntax error is an
    /// [`Error::ChatTemplate`] naming it.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(template_error)?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(template_error)?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            origin: TemplateOrigin::Custom,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template of the model in `dir`: `chat_template.jinja`, else `chat_template` in
    /// `tokenizer_config.json`, else [`Self::plain`]. Special tokens come from
    /// `tokenizer_config.json` when it exists. An unreadable file, malformed JSON or a
    /// template that does not compile is an error.
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfig = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::ChatTemplate(format!("{}: {e}", config_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenizerConfig::default(),
            Err(e) => return Err(Error::io(&config_path, e)),
        };
        let bos = token_text(config.bos_token);
        let eos = token_text(config.eos_token);
        let jinja_path = dir.join("chat_template.jinja");
        let (source, origin) = match std::fs::read_to_string(&jinja_path) {
            Ok(text) => (text, TemplateOrigin::JinjaFile),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match config.chat_template {
                Some(TemplateField::One(s)) => (s, TemplateOrigin::TokenizerConfig),
                Some(TemplateField::Named(list)) => {
                    let names: Vec<String> = list.iter().map(|t| t.name.clone()).collect();
                    let t = list
                        .into_iter()
                        .find(|t| t.name == "default")
                        .ok_or_else(|| {
                            Error::ChatTemplate(format!(
                                "{}: no template named `default` among {names:?}",
                                config_path.display()
                            ))
                        })?;
                    (t.template, TemplateOrigin::TokenizerConfig)
                }
                None => return Ok(Self::plain()),
            },
            Err(e) => return Err(Error::io(&jinja_path, e)),
        };
        let mut t = Self::new(&source, &bos, &eos)?;
        t.origin = origin;
        Ok(t)
    }

    /// Where the template came from.
    pub fn origin(&self) -> TemplateOrigin {
        self.origin
    }

    /// The template's source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The beginning-of-sequence token's text (`""` if none).
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The end-of-sequence token's text (`""` if none).
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Where a reply ends: the end-of-sequence token's text, or [`DEFAULT_STOP`] for the plain
    /// template.
    pub fn stop_strings(&self) -> Vec<String> {
        if self.origin == TemplateOrigin::Default {
            vec![DEFAULT_STOP.to_string()]
        } else if self.eos_token.is_empty() {
            Vec::new()
        } else {
            vec![self.eos_token.clone()]
        }
    }

    /// The prompt text of `messages`, ending with the assistant's turn when
    /// `add_generation_prompt`. A template that raises an exception or fails at run time is an
    /// [`Error::ChatTemplate`] naming the reason.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template("chat").map_err(template_error)?;
        t.render(minijinja::context! {
            messages => minijinja::value::Serde(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(template_error)
    }

    /// The text a state must ingest to continue a conversation with `new` messages and the
    /// assistant's next turn, when it holds `history` already: `history` ends with the
    /// assistant's reply, whose content is exactly the text generated after the generation
    /// prompt of the messages before it. With no history: the whole prompt of `new`.
    ///
    /// The whole conversation is rendered; the text the state holds (the prompt of the
    /// messages before the reply, then the reply) must be its prefix, and what follows is
    /// returned. A template that renders the earlier turns otherwise once more messages follow
    /// them (it trims the reply, or moves a system message) is an [`Error::ChatTemplate`]
    /// saying so: continuing would not be the conversation sent whole.
    pub fn delta(&self, history: &[Message], new: &[Message]) -> Result<String> {
        let all: Vec<Message> = history.iter().chain(new).cloned().collect();
        let full = self.render(&all, true)?;
        let Some((reply, before)) = history.split_last() else {
            return Ok(full);
        };
        let held = self.render(before, true)? + &reply.content;
        match full.strip_prefix(&held) {
            Some(rest) => Ok(rest.to_string()),
            None => Err(Error::ChatTemplate(format!(
                "this chat template is not prefix-stable for this conversation: rendered whole, \
                 it does not start with the text the stored state holds (the earlier prompt and \
                 the reply, {} bytes), so it cannot be continued from that state",
                held.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ChatML, as in Qwen's and many fine-tunes' `tokenizer_config.json`.
    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Llama-2's template (abridged): `bos_token`, `raise_exception`, `strip()`, system
    /// message folded into the first user turn.
    const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    }

    #[test]
    fn the_plain_default_is_role_lines() {
        let t = ChatTemplate::plain();
        assert_eq!(t.origin(), TemplateOrigin::Default);
        let m = msgs(&[
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello"),
        ]);
        assert_eq!(
            t.render(&m, false).unwrap(),
            "system: Be brief.\nuser: Hi\nassistant: Hello\n"
        );
        assert_eq!(
            t.render(&m[..2], true).unwrap(),
            "system: Be brief.\nuser: Hi\nassistant: "
        );
        assert_eq!(t.stop_strings(), vec!["\nuser:".to_string()]);
    }

    #[test]
    fn chatml_renders_as_hugging_face_does() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let m = msgs(&[("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")]);
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(t.stop_strings(), vec!["<|im_end|>".to_string()]);
    }

    #[test]
    fn bos_eos_strip_and_raise_exception() {
        let t = ChatTemplate::new(LLAMA2, "<s>", "</s>").unwrap();
        let m = msgs(&[("system", "S"), ("user", " Hi "), ("assistant", "Yo")]);
        assert_eq!(
            t.render(&m, false).unwrap(),
            "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\n Hi [/INST] Yo </s>"
        );
        let bad = msgs(&[("user", "a"), ("user", "b")]);
        match t.render(&bad, true) {
            Err(Error::ChatTemplate(m)) => {
                assert!(m.contains("roles must alternate"), "{m}")
            }
            other => panic!("expected a template error, got {other:?}"),
        }
    }

    #[test]
    fn bad_templates_are_typed_errors() {
        for src in ["{% for m in messages %}", "{{ messages[ }}", "{% endif %}"] {
            assert!(
                matches!(ChatTemplate::new(src, "", ""), Err(Error::ChatTemplate(_))),
                "{src}"
            );
        }
        // Compiles, fails at render time: an undefined function.
        let t = ChatTemplate::new("{{ nope() }}", "", "").unwrap();
        assert!(matches!(t.render(&[], true), Err(Error::ChatTemplate(_))));
    }

    #[test]
    fn the_delta_is_the_suffix_of_the_whole_rendering() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let history = msgs(&[("user", "Hi"), ("assistant", "Hello")]);
        let new = msgs(&[("user", "Bye")]);
        let first = t.delta(&[], &history[..1]).unwrap();
        assert_eq!(
            first,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let d = t.delta(&history, &new).unwrap();
        assert_eq!(
            d,
            "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
        );
        let all: Vec<Message> = history.iter().chain(&new).cloned().collect();
        assert_eq!(first + "Hello" + &d, t.render(&all, true).unwrap());
    }

    #[test]
    fn a_template_that_rewrites_replies_is_refused_for_continuation() {
        // Llama-2 strips the reply: a reply with a trailing space is not held verbatim.
        let t = ChatTemplate::new(LLAMA2, "<s>", "</s>").unwrap();
        let history = msgs(&[("user", "Hi"), ("assistant", "Yo ")]);
        let err = t.delta(&history, &msgs(&[("user", "Bye")])).unwrap_err();
        assert!(
            matches!(&err, Error::ChatTemplate(m) if m.contains("prefix-stable")),
            "{err}"
        );
    }

    #[test]
    fn load_reads_the_jinja_file_then_tokenizer_config_then_the_default() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            ChatTemplate::load(dir.path()).unwrap().origin(),
            TemplateOrigin::Default
        );
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::json!({
                "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}],
                "bos_token": {"content": "<s>", "lstrip": false},
                "eos_token": "<|im_end|>",
            })
            .to_string(),
        )
        .unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap();
        assert_eq!(t.origin(), TemplateOrigin::TokenizerConfig);
        assert_eq!((t.bos_token(), t.eos_token()), ("<s>", "<|im_end|>"));
        assert_eq!(t.source(), CHATML);
        std::fs::write(dir.path().join("chat_template.jinja"), "{{ bos_token }}!").unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap();
        assert_eq!(t.origin(), TemplateOrigin::JinjaFile);
        assert_eq!(t.render(&[], false).unwrap(), "<s>!");
        std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
        assert!(matches!(
            ChatTemplate::load(dir.path()),
            Err(Error::ChatTemplate(_))
        ));
        std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), "{").unwrap();
        assert!(matches!(
            ChatTemplate::load(dir.path()),
            Err(Error::ChatTemplate(_))
        ));
    }
}
