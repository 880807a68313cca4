//! Token ids and training labels for one conversation.
//!
//! The rules (those of HF transformers, which the chat goldens pin down):
//! 1. Render the whole conversation once and tokenize the text once, adding no special
//!    tokens (the template writes `bos_token` itself where it wants one).
//! 2. Templates with `{% generation %}` blocks: the tokens of the blocks' output are
//!    trained, chosen as HF's `return_assistant_tokens_mask` chooses them (from the token
//!    holding a block's first character through the token holding its last).
//! 3. Otherwise each assistant message owns the text from the end of the rendering of
//!    the messages before it plus the generation prompt to the end of the rendering that
//!    includes it; a token is trained when its first character lies in such a span.
//! 4. An assistant message with `weight: 0` is rendered but none of the tokens starting
//!    in its span are trained, with or without generation blocks.
//!
//! All positions are character indices (Python string indices), as tokenizers reports
//! them from `encode_char_offsets`; Rust byte offsets would disagree on non-ASCII text.

use super::conversation::{Conversation, Role};
use super::template::ChatModel;
use anyhow::{anyhow, bail, Context, Result};
use minijinja::Value;
use std::ops::Range;
use tokenizers::Encoding;

/// The label of a token that is not trained (PyTorch's cross-entropy `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One conversation ready for training; `labels[i]` is `input_ids[i]` where token `i`
/// is trained and [`IGNORE_INDEX`] elsewhere (not shifted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    pub text: String,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

pub fn tokenize_conversation(model: &ChatModel, conv: &Conversation) -> Result<Tokenized> {
    let messages: Vec<Value> = conv.messages.iter().map(|m| m.template_value.clone()).collect();
    let tools = conv.tools.as_ref();
    let rendered = model.template.render(&messages, tools, false)?;
    let text = rendered.text;
    let encoding = model
        .tokenizer
        .encode_char_offsets(text.as_str(), false)
        .map_err(|e| anyhow!("cannot tokenize the rendered conversation: {e}"))?;
    let offsets = encoding.get_offsets();
    let mut trained = vec![false; encoding.len()];

    let has_markers = model.template.has_generation_markers();
    let any_untrained = conv.messages.iter().any(|m| m.role == Role::Assistant && !m.trained);
    let spans = if !has_markers || any_untrained {
        assistant_spans(model, &messages, tools, &text, conv)?
    } else {
        Vec::new()
    };

    if has_markers {
        mark_generation_spans(&encoding, &rendered.generation_spans, &mut trained);
        for (span, _) in spans.iter().filter(|(_, keep)| !keep) {
            set_tokens_starting_in(offsets, span, false, &mut trained);
        }
    } else {
        for (span, _) in spans.iter().filter(|(_, keep)| *keep) {
            set_tokens_starting_in(offsets, span, true, &mut trained);
        }
    }

    let input_ids = encoding.get_ids().to_vec();
    let labels = input_ids
        .iter()
        .zip(&trained)
        .map(|(&id, &t)| if t { i64::from(id) } else { IGNORE_INDEX })
        .collect();
    Ok(Tokenized { text, input_ids, labels })
}

/// Each assistant message's character span in `text` and whether it is trained, found by
/// rendering prefixes of the conversation (rule 3).
fn assistant_spans(
    model: &ChatModel,
    messages: &[Value],
    tools: Option<&Value>,
    text: &str,
    conv: &Conversation,
) -> Result<Vec<(Range<usize>, bool)>> {
    let mut spans = Vec::new();
    for (i, msg) in conv.messages.iter().enumerate() {
        if msg.role != Role::Assistant {
            continue;
        }
        let before = model
            .template
            .render(&messages[..i], tools, true)
            .with_context(|| format!("rendering the messages before messages[{i}] to find its span"))?;
        let through = model
            .template
            .render(&messages[..=i], tools, false)
            .with_context(|| format!("rendering the messages through messages[{i}] to find its span"))?;
        // The span is only meaningful if rendering more messages appends to the text;
        // templates that rewrite earlier turns need `{% generation %}` markers instead.
        if !text.starts_with(&through.text) {
            bail!(
                "the chat template renders messages[..={i}] as text that is not a prefix of the whole \
                 conversation, so the assistant span cannot be found; use a template with \
                 {{% generation %}} markers"
            );
        }
        let start = before.text.chars().count();
        let end = through.text.chars().count();
        spans.push((start..end, msg.trained));
    }
    Ok(spans)
}

/// Sets `trained[t] = value` for every token whose first character is in `span`.
fn set_tokens_starting_in(
    offsets: &[(usize, usize)],
    span: &Range<usize>,
    value: bool,
    trained: &mut [bool],
) {
    for (flag, &(start, _)) in trained.iter_mut().zip(offsets) {
        if span.contains(&start) {
            *flag = value;
        }
    }
}

/// HF's `return_assistant_tokens_mask`: for each block, the tokens from the one holding
/// its first character through the one holding its last; it stops at a block whose
/// first character no token holds, and runs to the end when the last one is not held.
fn mark_generation_spans(encoding: &Encoding, spans: &[Range<usize>], trained: &mut [bool]) {
    for span in spans.iter().filter(|s| !s.is_empty()) {
        let Some(first) = encoding.char_to_token(span.start, 0) else {
            break;
        };
        let last = encoding.char_to_token(span.end - 1, 0).unwrap_or(trained.len().saturating_sub(1));
        for flag in trained.iter_mut().take(last + 1).skip(first) {
            *flag = true;
        }
    }
}
