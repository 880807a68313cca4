//! `tuneloop eval`: a model (+ adapter) on conversation files. Held-out loss,
//! perplexity and token accuracy on the trained tokens; then generation from each
//! conversation's context up to its last assistant turn (or every assistant turn),
//! scored against that turn: exact match for text, tool-call accuracy for calls.

pub mod gate;
pub mod toolcalls;

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::data::feedback::{self, FeedbackFilter, Format};
use crate::data::{tokenize_conversation, ChatModel, Conversation, LineError, Role};
use crate::model::generate::Sampling;
use crate::model::{Adapter, Decoder, Model};
use crate::ops::Ops;
use crate::train::pack::Example;
use crate::train::trainer::evaluate as heldout_loss;
use toolcalls::{calls_match, parse_calls, Call};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Turns {
    /// The last assistant turn of each conversation.
    Last,
    /// Every assistant turn, each with the conversation before it as context.
    All,
}

#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub batch_size: usize,
    pub seq_len: usize,
    pub turns: Turns,
    /// Skip generation (loss metrics only).
    pub generate: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 96,
            sampling: Sampling::greedy(),
            batch_size: 8,
            seq_len: 4096,
            turns: Turns::Last,
            generate: true,
        }
    }
}

/// One generated turn and how it scored.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub file: PathBuf,
    pub line: usize,
    pub turn: usize,
    pub kind: &'static str,
    pub reference: String,
    pub generated: String,
    pub correct: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EvalReport {
    pub conversations: usize,
    pub loss: Option<f64>,
    pub perplexity: Option<f64>,
    pub token_accuracy: Option<f64>,
    /// Text turns generated and how many matched exactly (whitespace-normalised).
    pub text_turns: usize,
    pub exact_match: Option<f64>,
    /// Tool-call turns generated and how many made the right calls.
    pub tool_turns: usize,
    pub tool_call_accuracy: Option<f64>,
    pub samples: Vec<Sample>,
}

impl EvalReport {
    /// A metric by name: `loss`, `perplexity`, `token_accuracy`, `exact_match`,
    /// `tool_call_accuracy`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        match name {
            "loss" => self.loss,
            "perplexity" => self.perplexity,
            "token_accuracy" => self.token_accuracy,
            "exact_match" => self.exact_match,
            "tool_call_accuracy" => self.tool_call_accuracy,
            _ => None,
        }
    }

    pub fn table(&self) -> String {
        let f = |x: Option<f64>, d: usize| x.map_or("-".to_string(), |v| format!("{v:.d$}"));
        let mut s = String::new();
        let _ = writeln!(s, "| metric | value |\n| --- | --- |");
        let _ = writeln!(s, "| conversations | {} |", self.conversations);
        let _ = writeln!(s, "| loss | {} |", f(self.loss, 4));
        let _ = writeln!(s, "| perplexity | {} |", f(self.perplexity, 2));
        let _ = writeln!(s, "| token accuracy | {} |", f(self.token_accuracy, 3));
        let _ = writeln!(s, "| exact match ({} text turns) | {} |", self.text_turns, f(self.exact_match, 3));
        let _ = write!(
            s,
            "| tool-call accuracy ({} turns) | {} |",
            self.tool_turns,
            f(self.tool_call_accuracy, 3)
        );
        s
    }
}

/// An eval set: every conversation of the files, unfiltered and not deduplicated.
pub fn load_set(paths: &[PathBuf]) -> Result<Vec<feedback::Example>> {
    let keep_all = FeedbackFilter { min_rating: None, drop_thumbs_down: false, max_tokens: None };
    Ok(feedback::load(paths, Format::Auto, &keep_all, false)?.examples)
}

/// Tokens that end generation: the config's EOS ids and the usual end-of-turn tokens
/// the tokenizer knows.
pub fn stop_tokens(model_eos: &[u32], chat: &ChatModel) -> Vec<u32> {
    let mut stop = model_eos.to_vec();
    for t in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<|eom_id|>"] {
        if let Some(id) = chat.tokenizer.token_to_id(t) {
            if !stop.contains(&id) {
                stop.push(id);
            }
        }
    }
    stop
}

fn to_json(v: &minijinja::Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

struct Item<'a> {
    ex: &'a feedback::Example,
    turn: usize,
    prompt: Vec<u32>,
    reference_text: String,
    reference_calls: Vec<Call>,
}

fn items<'a>(chat: &ChatModel, set: &'a [feedback::Example], turns: Turns) -> Result<Vec<Item<'a>>> {
    let mut out = Vec::new();
    for ex in set {
        let conv: &Conversation = &ex.conv;
        let assistant: Vec<usize> = conv
            .messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == Role::Assistant)
            .map(|(i, _)| i)
            .collect();
        let picked: Vec<usize> = match turns {
            Turns::Last => assistant.last().copied().into_iter().collect(),
            Turns::All => assistant,
        };
        for turn in picked {
            let msgs: Vec<minijinja::Value> =
                conv.messages[..turn].iter().map(|m| m.template_value.clone()).collect();
            let err = |e: anyhow::Error| LineError {
                file: ex.source.0.clone(),
                line: ex.source.1,
                message: format!("{e:#}"),
            };
            let text = chat.template.render(&msgs, conv.tools.as_ref(), true).map_err(err)?.text;
            let enc = chat
                .tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
            let m = &conv.messages[turn];
            out.push(Item {
                ex,
                turn,
                prompt: enc.get_ids().to_vec(),
                reference_text: m.content.clone().unwrap_or_default(),
                reference_calls: m
                    .tool_calls
                    .iter()
                    .map(|c| Call { name: c.name.clone(), arguments: to_json(&c.arguments) })
                    .collect(),
            });
        }
    }
    Ok(out)
}

fn normalise(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs the eval set on `model` with `adapter` (or the base alone).
pub fn evaluate<O: Ops>(
    ops: &O,
    model: &Model<O::Tensor>,
    adapter: Option<&Adapter<O::Tensor>>,
    chat: &ChatModel,
    set: &[feedback::Example],
    opts: &EvalOptions,
) -> Result<EvalReport> {
    let dec = Decoder::new(ops, model, adapter);
    let mut report = EvalReport { conversations: set.len(), ..Default::default() };
    let mut tokenized = Vec::with_capacity(set.len());
    for ex in set {
        let t = tokenize_conversation(chat, &ex.conv).map_err(|e| LineError {
            file: ex.source.0.clone(),
            line: ex.source.1,
            message: format!("{e:#}"),
        })?;
        tokenized.push(Example { ids: t.input_ids, labels: t.labels });
    }
    if tokenized.iter().any(|e| e.labels.iter().any(|&l| l != -100)) {
        let (loss, acc) = heldout_loss(&dec, &tokenized, opts.seq_len, opts.batch_size)?;
        (report.loss, report.perplexity, report.token_accuracy) = (Some(loss), Some(loss.exp()), Some(acc));
    }
    if !opts.generate {
        return Ok(report);
    }
    let items = items(chat, set, opts.turns)?;
    let stop = stop_tokens(&model.cfg.eos_token_ids, chat);
    let (mut text_ok, mut tool_ok) = (0usize, 0usize);
    for batch in items.chunks(opts.batch_size.max(1)) {
        let prompts: Vec<Vec<u32>> = batch.iter().map(|i| i.prompt.clone()).collect();
        let outs =
            dec.generate(&prompts, opts.max_new_tokens, &stop, &opts.sampling).context("generating")?;
        for (item, out) in batch.iter().zip(outs) {
            let new: Vec<u32> =
                out[item.prompt.len()..].iter().copied().filter(|t| !stop.contains(t)).collect();
            let generated = chat
                .tokenizer
                .decode(&new, false)
                .map_err(|e| anyhow::anyhow!("decoding generated tokens: {e}"))?;
            let (kind, correct, reference) = if item.reference_calls.is_empty() {
                report.text_turns += 1;
                (
                    "text",
                    normalise(&generated) == normalise(&item.reference_text),
                    item.reference_text.clone(),
                )
            } else {
                report.tool_turns += 1;
                let ok = parse_calls(&generated).is_some_and(|g| calls_match(&g, &item.reference_calls));
                let r = item.reference_calls.iter().map(|c| format!("{}({})", c.name, c.arguments)).collect();
                ("tool_call", ok, r)
            };
            if correct {
                if kind == "text" {
                    text_ok += 1
                } else {
                    tool_ok += 1
                }
            }
            report.samples.push(Sample {
                file: item.ex.source.0.clone(),
                line: item.ex.source.1,
                turn: item.turn,
                kind,
                reference,
                generated,
                correct,
            });
        }
    }
    let rate = |ok: usize, n: usize| (n > 0).then(|| ok as f64 / n as f64);
    report.exact_match = rate(text_ok, report.text_turns);
    report.tool_call_accuracy = rate(tool_ok, report.tool_turns);
    Ok(report)
}
