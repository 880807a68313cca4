//! Training data: OpenAI-format JSONL conversations -> HF chat template -> token ids and
//! labels, reproducing what transformers' `apply_chat_template` gives a Python trainer.
//!
//! - [`conversation`]: parse and check one JSONL line;
//! - `jinja`, `pyjson`, `strftime`: the Python/Jinja2 behaviour templates rely on.

#![allow(dead_code)] // the Jinja helpers are used by the template loader, which comes next

pub mod conversation;
mod jinja;
mod pyjson;
mod strftime;

pub use conversation::{parse_line, Conversation, Message, Role, ToolCall};

use anyhow::Result;
use std::io::{BufRead, BufReader};
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
        let file = std::fs::File::open(path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        Ok(Self::new(BufReader::new(file), path))
    }
}

impl<R: BufRead> JsonlReader<R> {
    pub fn new(reader: R, file: &Path) -> Self {
        JsonlReader {
            reader,
            file: file.to_path_buf(),
            line: 0,
            buf: Vec::new(),
        }
    }

    fn error(&self, message: String) -> LineError {
        LineError {
            file: self.file.clone(),
            line: self.line,
            message,
        }
    }
}

impl<R: BufRead> Iterator for JsonlReader<R> {
    type Item = Result<(usize, Conversation), LineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            self.line += 1;
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(self.error(format!("cannot read: {e}")))),
            }
            let text = match std::str::from_utf8(&self.buf) {
                Ok(t) => t,
                Err(e) => return Some(Err(self.error(format!("not valid UTF-8: {e}")))),
            };
            let text = if self.line == 1 {
                text.trim_start_matches('\u{feff}')
            } else {
                text
            };
            if text.trim().is_empty() {
                continue;
            }
            let parsed = parse_line(text).map_err(|e| format!("{e:#}"));
            return Some(parsed.map(|c| (self.line, c)).map_err(|m| self.error(m)));
        }
    }
}
