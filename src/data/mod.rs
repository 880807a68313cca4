//! Training data: OpenAI-format JSONL conversations -> HF chat template -> token ids and
//! labels, reproducing what transformers' `apply_chat_template` gives a Python trainer.
//!
//! - `jinja`, `pyjson`, `strftime`: the Python/Jinja2 behaviour templates rely on.

#![allow(dead_code)] // used by the template loader, which comes next

mod jinja;
mod pyjson;
mod strftime;
