//! An HF tokenizer folder: `tokenizer.json` plus the chat template and special tokens
//! from `tokenizer_config.json` (or `chat_template.jinja`), rendered as transformers'
//! `apply_chat_template` renders them.

use super::jinja::{self, GENERATION_FILTER};
use anyhow::{anyhow, bail, Context, Result};
use minijinja::{Environment, OutputSpanKind, Value};
use serde_json::Value as Json;
use std::ops::Range;
use std::path::Path;
use tokenizers::Tokenizer;

const TEMPLATE_NAME: &str = "chat_template";

/// The special-token names transformers puts in the template's scope
/// (`tokenizer.special_tokens_map`).
const SPECIAL_TOKEN_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A tokenizer and its chat template, loaded from one HF model folder.
pub struct ChatModel {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

impl ChatModel {
    pub fn load(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", tok_path.display()))?;
        // transformers turns off any truncation/padding saved in tokenizer.json unless a
        // call asks for it; an example is always tokenized whole here.
        tokenizer.with_truncation(None).map_err(|e| anyhow!("{}: {e}", tok_path.display()))?;
        tokenizer.with_padding(None);
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let source = find_template_source(dir, &config)?;
        let mut specials = special_tokens(&config);
        // special_tokens_map.json, where present, overrides tokenizer_config.json as it
        // does when transformers loads a tokenizer.
        if let Some(map) = read_json_if_exists(&dir.join("special_tokens_map.json"))? {
            for (key, value) in special_tokens(&map) {
                specials.retain(|(k, _)| *k != key);
                specials.push((key, value));
            }
        }
        let template = ChatTemplate::new(&source, specials)
            .with_context(|| format!("{}: cannot compile the chat template", dir.display()))?;
        Ok(ChatModel { tokenizer, template })
    }
}

fn read_json_if_exists(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    crate::util::read_json(path).map(Some)
}

/// transformers' precedence: `chat_template.jinja` beside the tokenizer, then
/// `chat_template` in tokenizer_config.json (a string, or a list of `{name, template}`
/// of which "default" is used), then a processor's `chat_template.json`.
fn find_template_source(dir: &Path, config: &Json) -> Result<String> {
    let jinja_path = dir.join("chat_template.jinja");
    if jinja_path.exists() {
        return std::fs::read_to_string(&jinja_path)
            .with_context(|| format!("cannot read {}", jinja_path.display()));
    }
    let config_path = dir.join("tokenizer_config.json");
    match config.get("chat_template") {
        Some(Json::String(s)) => return Ok(s.clone()),
        Some(Json::Array(list)) => {
            let named = |name: &str| list.iter().find(|t| t.get("name").and_then(Json::as_str) == Some(name));
            return match named("default").and_then(|t| t.get("template")).and_then(Json::as_str) {
                Some(s) => Ok(s.to_string()),
                None => {
                    bail!("{}: `chat_template` lists no template named \"default\"", config_path.display())
                }
            };
        }
        Some(Json::Null) | None => {}
        Some(_) => bail!("{}: `chat_template` must be a string or a list", config_path.display()),
    }
    if let Some(Json::String(s)) =
        read_json_if_exists(&dir.join("chat_template.json"))?.as_ref().and_then(|j| j.get("chat_template"))
    {
        return Ok(s.clone());
    }
    bail!(
        "{}: no chat template (looked for chat_template.jinja and `chat_template` in tokenizer_config.json)",
        dir.display()
    )
}

/// Special tokens as template variables; a token is a string or an AddedToken object
/// `{"content": ...}`. Unset (null) tokens are left out, as in `special_tokens_map`.
fn special_tokens(config: &Json) -> Vec<(String, Value)> {
    fn token_text(v: &Json) -> Option<String> {
        match v {
            Json::String(s) => Some(s.clone()),
            Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
            _ => None,
        }
    }
    let mut out = Vec::new();
    for key in SPECIAL_TOKEN_KEYS {
        if let Some(text) = config.get(key).and_then(token_text) {
            out.push((key.to_string(), Value::from(text)));
        }
    }
    if let Some(Json::Array(list)) = config.get("additional_special_tokens") {
        let texts: Vec<Value> = list.iter().filter_map(token_text).map(Value::from).collect();
        out.push(("additional_special_tokens".to_string(), Value::from(texts)));
    }
    out
}

/// The rendered text and, for templates with `{% generation %}` blocks, the character
/// ranges those blocks produced (what HF's AssistantTracker records).
#[derive(Debug, Clone)]
pub struct Rendered {
    pub text: String,
    pub generation_spans: Vec<Range<usize>>,
}

/// A compiled HF chat template and the variables it reads besides the conversation.
pub struct ChatTemplate {
    env: Environment<'static>,
    has_generation: bool,
    special_tokens: Vec<(String, Value)>,
}

impl ChatTemplate {
    pub fn new(source: &str, special_tokens: Vec<(String, Value)>) -> Result<Self> {
        let (source, has_generation) = jinja::rewrite_generation_tags(source);
        let mut env = jinja::environment()?;
        env.add_template_owned(TEMPLATE_NAME, source).map_err(|e| anyhow!("{e:#}"))?;
        Ok(ChatTemplate { env, has_generation, special_tokens })
    }

    /// Whether the template marks assistant output with `{% generation %}`.
    pub fn has_generation_markers(&self) -> bool {
        self.has_generation
    }

    /// Renders like `apply_chat_template(messages, tools=tools, tokenize=False,
    /// add_generation_prompt=...)`: `tools` and `documents` are `none` when absent, and
    /// the special tokens are in scope.
    pub fn render(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<Rendered> {
        let mut vars: Vec<(String, Value)> = self.special_tokens.clone();
        vars.push(("messages".into(), Value::from(messages.to_vec())));
        vars.push(("tools".into(), tools.cloned().unwrap_or(Value::from(()))));
        vars.push(("documents".into(), Value::from(())));
        vars.push(("add_generation_prompt".into(), Value::from(add_generation_prompt)));
        let ctx = Value::from_pairs(vars);
        let template = self.env.get_template(TEMPLATE_NAME)?;
        let render_err = |e: minijinja::Error| anyhow!("chat template: {}", describe(&e));
        if !self.has_generation {
            let text = template.render(ctx).map_err(render_err)?;
            return Ok(Rendered { text, generation_spans: Vec::new() });
        }
        let (text, spans) = template.render_with_spans(ctx).map_err(render_err)?;
        let source = template.source();
        // A generation block is a filter block; its captured body is written in one
        // piece and attributed to the filter's name in the source.
        let byte_spans: Vec<Range<usize>> = spans
            .iter()
            .filter(|s| {
                s.kind() == OutputSpanKind::Expression
                    && source.get(s.source_range()) == Some(GENERATION_FILTER)
            })
            .map(|s| s.output_range())
            .collect();
        let generation_spans = byte_to_char_ranges(&text, &byte_spans);
        Ok(Rendered { text, generation_spans })
    }
}

/// The error with its causes; MiniJinja puts the template location in the chain.
fn describe(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Converts sorted, non-overlapping byte ranges of `text` into character ranges:
/// tokenizer offsets and HF's spans count characters (Python string indices).
fn byte_to_char_ranges(text: &str, ranges: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(ranges.len());
    let (mut byte, mut chars) = (0usize, 0usize);
    let mut advance = |to: usize| {
        chars += text.get(byte..to).map_or(0, |s| s.chars().count());
        byte = to.max(byte);
        chars
    };
    for r in ranges {
        let start = advance(r.start);
        let end = advance(r.end);
        out.push(start..end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_spans_are_char_ranges() {
        let src = "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}!{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, vec![]).unwrap();
        assert!(t.has_generation_markers());
        let msgs = [
            Value::from_pairs([("role", "user"), ("content", "é")]),
            Value::from_pairs([("role", "assistant"), ("content", "ü東")]),
        ];
        let r = t.render(&msgs, None, false).unwrap();
        assert_eq!(r.text, "<user>é<assistant>ü東!");
        assert_eq!(r.generation_spans, vec![18..21]);
        let chars: String = r.text.chars().skip(18).take(3).collect();
        assert_eq!(chars, "ü東!");
    }

    #[test]
    fn scope_has_tools_none_and_special_tokens() {
        let src = "{{ bos_token }}{{ tools is none }}{{ tools is defined }}{{ add_generation_prompt }}";
        let t = ChatTemplate::new(src, vec![("bos_token".into(), Value::from("<s>"))]).unwrap();
        assert_eq!(t.render(&[], None, true).unwrap().text, "<s>TrueTrueTrue");
    }
}
