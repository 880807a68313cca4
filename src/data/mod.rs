//! Training data: OpenAI-format JSONL conversations -> HF chat template -> token ids and
//! labels, reproducing what transformers' `apply_chat_template` gives a Python trainer.
//!
//! - [`conversation`]: parse and check one JSONL line;
//! - [`template`]: load an HF tokenizer folder and render its chat template;
//! - [`feedback`]: load agent logs with user feedback, filter, deduplicate and split;
//! - [`labels`]: tokenize the rendering and decide which tokens are trained;
//! - `jinja`, `pyjson`, `strftime`: the Python/Jinja2 behaviour templates rely on.

pub mod conversation;
pub mod feedback;
mod jinja;
pub mod labels;
mod pyjson;
mod strftime;
pub mod template;

pub use conversation::{parse_line, Conversation, Message, Role, ToolCall};
pub use labels::{tokenize_conversation, Tokenized, IGNORE_INDEX};
pub use template::{ChatModel, ChatTemplate, Rendered};

use anyhow::Result;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// An error about one line of a data file, shown as `file:line: what is wrong`.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct LineError {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    pub message: String,
}

/// Reads conversations from a JSONL file, one per non-blank line, with their 1-based
/// line numbers.
pub struct JsonlReader<R> {
    reader: R,
    file: PathBuf,
    line: usize,
    buf: Vec<u8>,
}

impl JsonlReader<BufReader<std::fs::File>> {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        Ok(Self::new(BufReader::new(file), path))
    }
}

impl<R: BufRead> JsonlReader<R> {
    pub fn new(reader: R, file: &Path) -> Self {
        JsonlReader { reader, file: file.to_path_buf(), line: 0, buf: Vec::new() }
    }

    /// An error about the line read last.
    pub fn error(&self, message: String) -> LineError {
        LineError { file: self.file.clone(), line: self.line, message }
    }

    /// The next non-blank line's number and text (a UTF-8 byte-order mark at the start
    /// of the file removed), without parsing it.
    pub fn next_text(&mut self) -> Option<Result<(usize, &str), LineError>> {
        loop {
            self.buf.clear();
            self.line += 1;
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(self.error(format!("cannot read: {e}")))),
            }
            let (start, blank) = match std::str::from_utf8(&self.buf) {
                Ok(text) => {
                    let body = if self.line == 1 { text.trim_start_matches('\u{feff}') } else { text };
                    (text.len() - body.len(), body.trim().is_empty())
                }
                Err(e) => return Some(Err(self.error(format!("not valid UTF-8: {e}")))),
            };
            if blank {
                continue;
            }
            // Checked above: valid UTF-8, and `start` is a character boundary.
            let text = std::str::from_utf8(&self.buf[start..]).unwrap_or_default();
            return Some(Ok((self.line, text)));
        }
    }
}

impl<R: BufRead> Iterator for JsonlReader<R> {
    type Item = Result<(usize, Conversation), LineError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (line, parsed) = match self.next_text()? {
            Ok((line, text)) => (line, parse_line(text).map_err(|e| format!("{e:#}"))),
            Err(e) => return Some(Err(e)),
        };
        Some(parsed.map(|c| (line, c)).map_err(|m| self.error(m)))
    }
}

#[derive(serde::Serialize)]
struct InspectRecord<'a> {
    input_ids: &'a [u32],
    labels: &'a [i64],
}

/// `tuneloop data inspect --json`: for each conversation of `data_file`, in order, one
/// line `{"input_ids": [...], "labels": [...]}` as the model in `model_dir` will be
/// trained on it (no truncation, no packing).
pub fn inspect(model_dir: &Path, data_file: &Path, out: &mut dyn Write) -> Result<()> {
    let model = ChatModel::load(model_dir)?;
    for record in JsonlReader::open(data_file)? {
        let (line, conv) = record?;
        let tokenized = tokenize_conversation(&model, &conv).map_err(|e| LineError {
            file: data_file.to_path_buf(),
            line,
            message: format!("{e:#}"),
        })?;
        let record = InspectRecord { input_ids: &tokenized.input_ids, labels: &tokenized.labels };
        serde_json::to_writer(&mut *out, &record)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}
