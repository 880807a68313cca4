//! Ingestion, the first step of a fine-tune: an agent's logged conversations and its
//! users' feedback in, the conversations worth training on out, with a summary of what
//! was kept and why the rest was dropped.
//!
//! Each line of a JSONL file is one record:
//! - an OpenAI chat conversation, `{"messages": [...], "tools": [...]?}`;
//! - a prompt/completion pair, `{"prompt": "...", "completion": "..."}`;
//! - a **feedback record**: either of those plus any of `rating` (a number),
//!   `thumbs_up` (`true`/`false`) and `feedback` (`"up"`/`"down"`).
//!
//! Other top-level keys (`id`, `timestamp`, `agent`, ...) are metadata and ignored; a
//! feedback key whose value is `null` counts as absent. `thumbs_up` and `feedback` give
//! the record's thumbs; when both are present they must agree.
//!
//! Every line must be valid, whatever the filters would do with it: [`load`] stops at the
//! first bad line with a `file:line: what is wrong` error and returns nothing else, so a
//! caller that writes its outputs after `load` writes none for bad data. A line is bad
//! when it is not valid JSON, has an unknown role, a `tool` message that answers no
//! earlier assistant tool call, no assistant message to train on (none, or all with
//! `"weight": 0`), a `rating` that is not a number, a `thumbs_up` that is not a boolean
//! or a `feedback` other than "up" and "down".
//!
//! Valid records then go through, in this order (each dropped record is counted once, for
//! the first reason that applies):
//! 1. the [`Format`]: a record of another shape is dropped as *wrong format*;
//! 2. [`FeedbackFilter::min_rating`]: a record rated below it is dropped as *low rating*
//!    (records without a rating pass);
//! 3. [`FeedbackFilter::drop_thumbs_down`]: a thumbs-down record is dropped;
//! 4. deduplication (when asked): a conversation identical to one already kept is
//!    dropped as *duplicate*, so the first copy that passed the filters is the one kept.
//!
//! Records without any feedback are kept. [`FeedbackFilter::max_tokens`] needs the
//! tokenizer and is not applied here: the caller tokenizes the kept examples, drops the
//! long ones and counts them with [`Summary::record_too_long`].
//!
//! Conversations are identified by a content hash, SHA-256 of their canonical JSON (see
//! [`content_hash`]): stable across runs and machines, it decides deduplication and the
//! train/validation [`split`].

use super::conversation::{decode_line, field, parse_object, Conversation, Role};
use super::JsonlReader;
use crate::recipe::{DataFormat, Filters};
use anyhow::{anyhow, bail, Result};
use minijinja::value::ValueKind;
use minijinja::Value;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Which record shapes a file may hold; records of another shape are dropped and counted
/// as *wrong format*.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Any record: chat, prompt/completion, with or without feedback.
    #[default]
    Auto,
    /// `messages` records (with or without feedback); prompt/completion ones are dropped.
    Chat,
    /// `prompt`/`completion` records (with or without feedback); chat ones are dropped.
    PromptCompletion,
    /// Records with a `rating`, `thumbs_up` or `feedback`, of either shape; records
    /// without feedback are dropped.
    Feedback,
}

impl Format {
    const NAMES: [(&'static str, Format); 4] = [
        ("auto", Format::Auto),
        ("chat", Format::Chat),
        ("prompt_completion", Format::PromptCompletion),
        ("feedback", Format::Feedback),
    ];

    fn accepts(self, record: &Record) -> bool {
        match self {
            Format::Auto => true,
            Format::Chat => !record.prompt_completion,
            Format::PromptCompletion => record.prompt_completion,
            Format::Feedback => record.rating.is_some() || record.thumbs.is_some(),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Format::NAMES.iter().find(|(_, v)| v == self).map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

impl FromStr for Format {
    type Err = anyhow::Error;

    /// `auto`, `chat`, `prompt_completion` (or `prompt-completion`) or `feedback`.
    fn from_str(s: &str) -> Result<Self> {
        let name = if s == "prompt-completion" { "prompt_completion" } else { s };
        Format::NAMES.iter().find(|(n, _)| *n == name).map(|&(_, v)| v).ok_or_else(|| {
            anyhow!("unknown data format {s:?}; expected auto, chat, prompt_completion or feedback")
        })
    }
}

impl From<DataFormat> for Format {
    fn from(f: DataFormat) -> Self {
        match f {
            DataFormat::Auto => Format::Auto,
            DataFormat::Chat => Format::Chat,
            DataFormat::PromptCompletion => Format::PromptCompletion,
            DataFormat::Feedback => Format::Feedback,
        }
    }
}

/// Which records to keep.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct FeedbackFilter {
    /// Keep records rated at least this; records without a rating are kept.
    pub min_rating: Option<f64>,
    /// Drop records with `thumbs_up: false` or `feedback: "down"`.
    pub drop_thumbs_down: bool,
    /// Longest example to train on, in tokens. Carried for the caller, which applies it
    /// after tokenizing (see [`Summary::record_too_long`]); [`load`] ignores it.
    pub max_tokens: Option<usize>,
}

impl From<&Filters> for FeedbackFilter {
    fn from(f: &Filters) -> Self {
        FeedbackFilter {
            min_rating: f.min_rating,
            drop_thumbs_down: f.drop_thumbs_down,
            max_tokens: f.max_tokens,
        }
    }
}

/// One conversation to train on.
#[derive(Debug, Clone)]
pub struct Example {
    pub conv: Conversation,
    /// The file it came from and its 1-based line number there.
    pub source: (PathBuf, usize),
    /// SHA-256 of the conversation's canonical JSON, see [`content_hash`].
    pub hash: [u8; 32],
    pub rating: Option<f64>,
    /// `Some(true)` for a thumbs-up, `Some(false)` for a thumbs-down.
    pub thumbs: Option<bool>,
}

impl Example {
    /// The content hash in lowercase hex.
    pub fn hash_hex(&self) -> String {
        self.hash.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The hash's first 8 bytes as a big-endian integer: where the example falls in
    /// [0, 2^64) for [`split`].
    pub fn split_key(&self) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.hash[..8]);
        u64::from_be_bytes(first)
    }
}

/// Counts of dropped records by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Dropped {
    pub wrong_format: usize,
    pub low_rating: usize,
    pub thumbs_down: usize,
    pub duplicate: usize,
    /// Set by the caller that applies [`FeedbackFilter::max_tokens`].
    pub too_long: usize,
}

impl Dropped {
    pub fn total(&self) -> usize {
        self.wrong_format + self.low_rating + self.thumbs_down + self.duplicate + self.too_long
    }
}

/// What [`load`] read and did; `lines_read == kept + dropped.total()`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub files: usize,
    /// Records read: the non-blank lines of all files.
    pub lines_read: usize,
    pub kept: usize,
    /// Of the kept records, those with a rating, a thumbs or neither.
    pub kept_rated: usize,
    pub kept_thumbs: usize,
    pub kept_without_feedback: usize,
    pub dropped: Dropped,
}

impl Summary {
    /// Moves `n` kept examples to *dropped, too long* (for the caller that applies
    /// [`FeedbackFilter::max_tokens`]).
    pub fn record_too_long(&mut self, n: usize) {
        let n = n.min(self.kept);
        self.kept -= n;
        self.dropped.too_long += n;
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.dropped;
        let rows = [
            ("lines read", self.lines_read),
            ("kept", self.kept),
            ("dropped", d.total()),
            ("  wrong format", d.wrong_format),
            ("  low rating", d.low_rating),
            ("  thumbs down", d.thumbs_down),
            ("  duplicate", d.duplicate),
            ("  too long", d.too_long),
        ];
        let files = if self.files == 1 { "file" } else { "files" };
        writeln!(f, "{} {files}", self.files)?;
        for (name, count) in rows {
            writeln!(f, "  {name:<16}{count:>7}")?;
        }
        write!(
            f,
            "  kept: {} rated, {} with thumbs, {} without feedback",
            self.kept_rated, self.kept_thumbs, self.kept_without_feedback
        )
    }
}

/// The kept examples, in file and line order, and what happened to every record.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub examples: Vec<Example>,
    pub summary: Summary,
}

/// A valid line, before filtering.
struct Record {
    conv: Conversation,
    prompt_completion: bool,
    rating: Option<f64>,
    thumbs: Option<bool>,
}

/// Reads `paths` in order, checks every line, and keeps the records that `format` and
/// `filter` let through, dropping repeated conversations when `dedup` is set (see the
/// module documentation for the order of the steps). The first bad line anywhere fails
/// the whole load with a `file:line:` error.
pub fn load(paths: &[PathBuf], format: Format, filter: &FeedbackFilter, dedup: bool) -> Result<Loaded> {
    let mut summary = Summary { files: paths.len(), ..Summary::default() };
    let mut examples = Vec::new();
    let mut seen = HashSet::new();
    let mut first_wrong_format = None;
    for path in paths {
        let mut reader = JsonlReader::open(path)?;
        while let Some(next) = reader.next_text() {
            let (line, record) = match next {
                Ok((line, text)) => (line, parse_record(text).map_err(|e| format!("{e:#}"))),
                Err(e) => return Err(e.into()),
            };
            let record = record.map_err(|message| reader.error(message))?;
            summary.lines_read += 1;

            if !format.accepts(&record) {
                summary.dropped.wrong_format += 1;
                first_wrong_format.get_or_insert_with(|| format!("{}:{line}", path.display()));
                continue;
            }
            if let (Some(min), Some(rating)) = (filter.min_rating, record.rating) {
                if rating < min {
                    summary.dropped.low_rating += 1;
                    continue;
                }
            }
            if filter.drop_thumbs_down && record.thumbs == Some(false) {
                summary.dropped.thumbs_down += 1;
                continue;
            }
            let hash = content_hash(&record.conv);
            if dedup && !seen.insert(hash) {
                summary.dropped.duplicate += 1;
                continue;
            }

            summary.kept += 1;
            summary.kept_rated += usize::from(record.rating.is_some());
            summary.kept_thumbs += usize::from(record.thumbs.is_some());
            summary.kept_without_feedback += usize::from(record.rating.is_none() && record.thumbs.is_none());
            examples.push(Example {
                conv: record.conv,
                source: (path.clone(), line),
                hash,
                rating: record.rating,
                thumbs: record.thumbs,
            });
        }
    }
    if let Some(first) = first_wrong_format {
        tracing::warn!(
            "skipped {} records that are not in the {format} format (the first at {first})",
            summary.dropped.wrong_format
        );
    }
    Ok(Loaded { examples, summary })
}

fn parse_record(text: &str) -> Result<Record> {
    let root = decode_line(text)?;
    let conv = parse_object(&root)?;
    let present = |key: &str| field(&root, key).filter(|v| !v.is_none());

    let rating = match present("rating") {
        None => None,
        Some(v) if v.kind() == ValueKind::Number => Some(
            f64::try_from(v.clone()).map_err(|_| anyhow!("`rating` {} is out of range", json_text(&v)))?,
        ),
        Some(v) => bail!("`rating` must be a number, got {}", json_text(&v)),
    };
    let thumbs_up = match present("thumbs_up") {
        None => None,
        Some(v) if v.kind() == ValueKind::Bool => Some(v.is_true()),
        Some(v) => bail!("`thumbs_up` must be true or false, got {}", json_text(&v)),
    };
    let feedback = match present("feedback") {
        None => None,
        Some(v) => match v.as_str() {
            Some("up") => Some(true),
            Some("down") => Some(false),
            _ => bail!("`feedback` must be \"up\" or \"down\", got {}", json_text(&v)),
        },
    };
    let thumbs = match (thumbs_up, feedback) {
        (Some(a), Some(b)) if a != b => {
            bail!("`thumbs_up` ({a}) and `feedback` (\"{}\") disagree", if b { "up" } else { "down" })
        }
        (a, b) => a.or(b),
    };
    if !conv.has_trained_output() {
        bail!("no assistant message to train on (none, or all have \"weight\": 0)");
    }
    Ok(Record { conv, prompt_completion: field(&root, "messages").is_none(), rating, thumbs })
}

/// A value as JSON text, for error messages.
fn json_text(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

/// SHA-256 of the conversation's canonical JSON, `{"messages":[...],"tools":[...]}`:
/// - each message as the chat template sees it (tool-call `arguments` parsed, list
///   content joined into a string), plus `"weight":0` on an untrained assistant message;
/// - `tools` left out when absent or empty;
/// - object keys sorted by their UTF-8 bytes, no whitespace, strings and numbers as
///   serde_json writes them.
///
/// Metadata and feedback keys are not part of it, and a prompt/completion record hashes
/// like the equivalent two-message chat record.
pub fn content_hash(conv: &Conversation) -> [u8; 32] {
    Sha256::digest(canonical_json(conv).as_bytes()).into()
}

/// The text [`content_hash`] hashes.
pub fn canonical_json(conv: &Conversation) -> String {
    let mut out = String::from("{\"messages\":[");
    for (i, msg) in conv.messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let mut pairs = map_entries(&msg.template_value);
        if msg.role == Role::Assistant && !msg.trained {
            pairs.push(("weight".to_string(), Value::from(0)));
        }
        write_map(pairs, &mut out);
    }
    out.push(']');
    if let Some(tools) = conv.tools.as_ref().filter(|t| t.len().unwrap_or(0) > 0) {
        out.push_str(",\"tools\":");
        write_canonical(tools, &mut out);
    }
    out.push('}');
    out
}

fn map_entries(map: &Value) -> Vec<(String, Value)> {
    let Ok(keys) = map.try_iter() else {
        return Vec::new();
    };
    keys.map(|k| {
        let value = map.get_item(&k).unwrap_or_default();
        let key = k.as_str().map_or_else(|| k.to_string(), str::to_string);
        (key, value)
    })
    .collect()
}

fn write_map(mut pairs: Vec<(String, Value)>, out: &mut String) {
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    out.push('{');
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_scalar(&Value::from(key.as_str()), out);
        out.push(':');
        write_canonical(value, out);
    }
    out.push('}');
}

/// Canonical JSON of a value decoded from JSON (maps with sorted keys, no whitespace).
fn write_canonical(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::Map => write_map(map_entries(v), out),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(&item, out);
            }
            out.push(']');
        }
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        _ => write_scalar(v, out),
    }
}

/// A string, number or boolean as serde_json writes it.
fn write_scalar(v: &Value, out: &mut String) {
    // Serializing a scalar that came from JSON cannot fail; other kinds (which JSON
    // data never holds) are written as their display text, quoted.
    match serde_json::to_string(v) {
        Ok(text) => out.push_str(&text),
        Err(_) => out.push_str(&serde_json::Value::from(v.to_string()).to_string()),
    }
}

/// Splits examples into (train, validation), keeping their order: an example goes to
/// validation when its [`Example::split_key`] / 2^64 is below `val_fraction`. The side
/// depends on the conversation alone, so it is the same on every run and whatever else
/// the files hold, and about `val_fraction` of the examples land in validation.
/// `val_fraction` is clamped to [0, 1] (NaN counts as 0); the caller validates it.
pub fn split(examples: Vec<Example>, val_fraction: f64) -> (Vec<Example>, Vec<Example>) {
    let fraction = if val_fraction.is_nan() { 0.0 } else { val_fraction.clamp(0.0, 1.0) };
    // 2^64 * fraction; `as` saturates, and 1.0 gives 2^64 exactly, above every key.
    let threshold = (fraction * 18_446_744_073_709_551_616.0) as u128;
    examples.into_iter().partition(|e| u128::from(e.split_key()) >= threshold)
}
