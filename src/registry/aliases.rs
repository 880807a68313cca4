//! `aliases.json` (which version each alias serves, with its traffic weight) and
//! `history.jsonl` (every alias change, one JSON line each).
//!
//! The history is the log and `aliases.json` the state it leads to: a writer appends
//! its lines (one `write`, then fsync) before it replaces `aliases.json`. A writer
//! killed in between leaves a history one step ahead, and the next writer brings
//! `aliases.json` up to it; a writer killed during the append leaves an unterminated
//! last line, which readers skip and the next writer cuts off. A line counts once its
//! newline is on disk.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Where one alias points. `weight` is the share of traffic in percent for the
/// serving aliases (`production`, `canary`); other aliases may leave it out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// `aliases.json`: alias name -> target, sorted by name.
pub type Aliases = BTreeMap<String, Alias>;

/// What kind of operation wrote a history line. Rollbacks are marked so that a second
/// rollback goes further back instead of undoing the first one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Set,
    Promote,
    Canary,
    Rollback,
    Remove,
}

/// One line of `history.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub time: String,
    pub who: String,
    pub alias: String,
    /// The version the alias pointed at before (`null`: it did not exist).
    pub from: Option<String>,
    /// The version it points at now (`null`: the alias was removed).
    pub to: Option<String>,
    pub weight: Option<u32>,
    pub why: String,
    #[serde(default)]
    pub action: Action,
}

pub(crate) fn read_aliases(path: &Path) -> Result<Aliases> {
    if !path.exists() {
        return Ok(Aliases::new());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a map of alias -> {{\"version\", \"weight\"}}", path.display()))
}

pub(crate) fn write_aliases(path: &Path, aliases: &Aliases) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(aliases)?;
    bytes.push(b'\n');
    crate::util::atomic_write(path, &bytes)
}

/// The committed lines of `history.jsonl`: an unterminated last line is a write that
/// never finished and is skipped; any other bad line is corruption and an error.
pub(crate) fn read_history(path: &Path) -> Result<Vec<HistoryEntry>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let committed = crate::util::whole_lines(&text);
    let mut out = Vec::new();
    for (i, line) in committed.split('\n').enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let e = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a valid history line", path.display(), i + 1))?;
        out.push(e);
    }
    Ok(out)
}

/// Cuts an unterminated last line off `history.jsonl`, so the next append starts on a
/// line of its own. Writers only, under the lock.
pub(crate) fn repair_history_tail(path: &Path) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(false);
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let f =
        OpenOptions::new().write(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    f.set_len(keep as u64).with_context(|| format!("truncating the torn last line of {}", path.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    tracing::warn!("{}: dropped a torn last line left by an interrupted writer", path.display());
    Ok(true)
}

/// Appends `entries` as whole lines with one `write` and syncs them: the lines are
/// committed once this returns. Writers only, under the lock.
pub(crate) fn append_history(path: &Path, entries: &[HistoryEntry]) -> Result<()> {
    let mut buf = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut buf, e)?;
        buf.push(b'\n');
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(&buf).with_context(|| format!("appending to {}", path.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

/// The aliases that the history leads to, from an empty start.
pub(crate) fn replay(history: &[HistoryEntry]) -> Aliases {
    let mut out = Aliases::new();
    for e in history {
        match &e.to {
            Some(v) => {
                out.insert(e.alias.clone(), Alias { version: v.clone(), weight: e.weight });
            }
            None => {
                out.remove(&e.alias);
            }
        }
    }
    out
}

/// The versions `alias` has served, oldest first, as a stack that rollbacks pop: after
/// v1 -> v2 -> v3, a rollback leaves [v1, v2], and a second one [v1]. Weight-only
/// changes do not push; removing the alias clears it.
pub(crate) fn serving_stack(history: &[HistoryEntry], alias: &str) -> Vec<String> {
    let mut stack: Vec<String> = Vec::new();
    for e in history.iter().filter(|e| e.alias == alias) {
        let Some(to) = &e.to else {
            stack.clear();
            continue;
        };
        if e.action == Action::Rollback {
            // the version rolled back from is off the stack; going back to one that
            // served earlier drops everything after it too
            stack.pop();
            if let Some(pos) = stack.iter().rposition(|v| v == to) {
                stack.truncate(pos + 1);
            }
        }
        if stack.last() != Some(to) {
            stack.push(to.clone());
        }
    }
    stack
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(alias: &str, from: Option<&str>, to: Option<&str>, action: Action) -> HistoryEntry {
        HistoryEntry {
            time: "2026-01-01T00:00:00Z".into(),
            who: "t".into(),
            alias: alias.into(),
            from: from.map(Into::into),
            to: to.map(Into::into),
            weight: Some(100),
            why: String::new(),
            action,
        }
    }

    #[test]
    fn rollbacks_pop_the_stack() {
        let p = "production";
        let mut h = vec![
            entry(p, None, Some("v1"), Action::Promote),
            entry(p, Some("v1"), Some("v2"), Action::Promote),
            entry(p, Some("v2"), Some("v2"), Action::Canary), // weight change only
            entry("canary", None, Some("v3"), Action::Canary),
            entry(p, Some("v2"), Some("v3"), Action::Promote),
        ];
        assert_eq!(serving_stack(&h, p), ["v1", "v2", "v3"]);
        h.push(entry(p, Some("v3"), Some("v2"), Action::Rollback));
        assert_eq!(serving_stack(&h, p), ["v1", "v2"]);
        h.push(entry(p, Some("v2"), Some("v1"), Action::Rollback));
        assert_eq!(serving_stack(&h, p), ["v1"]);
        h.push(entry(p, Some("v1"), Some("v2"), Action::Promote));
        h.push(entry(p, Some("v2"), Some("v3"), Action::Promote));
        // an explicit rollback to a version further back drops what came after it
        h.push(entry(p, Some("v3"), Some("v1"), Action::Rollback));
        assert_eq!(serving_stack(&h, p), ["v1"]);
        // an explicit rollback to a version not on the stack replaces the top
        h.push(entry(p, Some("v1"), Some("v3"), Action::Rollback));
        assert_eq!(serving_stack(&h, p), ["v3"]);
        assert_eq!(replay(&h)["canary"].version, "v3");
        assert_eq!(replay(&h)[p].version, "v3");
    }
}
