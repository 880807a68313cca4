//! The adapter registry: every adapter an agent has been served, immutable, with its
//! lineage, and the aliases that say which version serves traffic.
//!
//! It is a plain directory, so any tool (a model server, a dashboard, `jq`) can read it
//! without tuneloop:
//!
//! ```text
//! <root>/<agent>/versions/v1/          immutable once written
//!       adapter/                       the PEFT directory, copied in (tokenizer files too)
//!       lineage.json                   base model, tokenizer, data, recipe, metrics, gate, parent
//! <root>/<agent>/aliases.json          {"production": {"version": "v1", "weight": 90},
//!                                       "canary": {"version": "v2", "weight": 10}}
//! <root>/<agent>/history.jsonl         one line per alias change
//! <root>/<agent>/.lock                 advisory lock file for writers
//! ```
//!
//! Readers take no lock: a version appears by one rename of a complete directory, and
//! `aliases.json` is replaced by a rename, so a reader sees the old state or the new
//! one. Writers of one agent go one at a time under an OS lock on `.lock`, which the OS
//! releases if the writer dies; each writer first tidies what a killed predecessor may
//! have left (temp version dirs, a torn history line, an `aliases.json` one step
//! behind its history).

mod aliases;
pub mod cli;
mod diff;
mod lineage;
mod lock;
mod names;
mod store;
mod write;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub use aliases::{Action, Alias, Aliases, HistoryEntry};
pub use diff::{ExampleSetDiff, FieldDiff, TensorDiff, VersionDiff};
pub use lineage::{
    sha256_hex, summarize_metrics, tokenizer_sha256, BaseModel, FileHash, Lineage, NewVersion,
};
pub use lock::WriterLock;
pub use names::{check_agent, check_alias, check_version, current_user, now_rfc3339, rfc3339_utc};

/// The alias that receives traffic, and the one that shares it while a candidate is tried.
pub const PRODUCTION: &str = "production";
pub const CANARY: &str = "canary";

/// A registered version and what its lineage says.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionInfo {
    pub version: String,
    pub number: u32,
    /// `<root>/<agent>/versions/vN`
    pub dir: PathBuf,
    /// `<root>/<agent>/versions/vN/adapter`, what a server loads.
    pub adapter_dir: PathBuf,
    pub lineage: Lineage,
}

/// A registry rooted at a directory. Cheap to open and to clone; it holds no handles,
/// so many may be open on one root, in one process or many.
#[derive(Clone, Debug)]
pub struct Registry {
    root: PathBuf,
}

impl Registry {
    /// Opens the registry at `root`. Nothing is created until the first write, so
    /// opening a mistyped path for a read creates no stray directory.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if root.exists() && !root.is_dir() {
            bail!("registry root {} is not a directory", root.display());
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn agent_dir(&self, agent: &str) -> Result<PathBuf> {
        check_agent(agent)?;
        Ok(self.root.join(agent))
    }

    fn versions_dir(&self, agent: &str) -> Result<PathBuf> {
        Ok(self.agent_dir(agent)?.join("versions"))
    }

    fn aliases_path(&self, agent: &str) -> Result<PathBuf> {
        Ok(self.agent_dir(agent)?.join("aliases.json"))
    }

    fn history_path(&self, agent: &str) -> Result<PathBuf> {
        Ok(self.agent_dir(agent)?.join("history.jsonl"))
    }

    fn lock_path(&self, agent: &str) -> Result<PathBuf> {
        Ok(self.agent_dir(agent)?.join(".lock"))
    }

    /// The agents with a directory here, sorted; none when the root does not exist yet.
    pub fn agents(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        if !self.root.is_dir() {
            return Ok(out);
        }
        let entries =
            std::fs::read_dir(&self.root).with_context(|| format!("listing {}", self.root.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("listing {}", self.root.display()))?;
            let Some(name) = e.file_name().to_str().map(str::to_string) else { continue };
            if check_agent(&name).is_ok() && e.path().is_dir() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Errors with the agents there are when `agent` has no directory.
    fn require_agent(&self, agent: &str) -> Result<PathBuf> {
        let dir = self.agent_dir(agent)?;
        if !dir.is_dir() {
            let known = self.agents()?;
            let known = if known.is_empty() { "none yet".to_string() } else { known.join(", ") };
            bail!("registry {}: no agent `{agent}` (agents: {known})", self.root.display());
        }
        Ok(dir)
    }

    /// Every version of `agent`, oldest first.
    pub fn versions(&self, agent: &str) -> Result<Vec<VersionInfo>> {
        self.require_agent(agent)?;
        let dir = self.versions_dir(agent)?;
        store::version_dirs(&dir)?.into_iter().map(|n| self.read_version(agent, &dir, n)).collect()
    }

    /// The newest version's name, if any.
    pub fn latest(&self, agent: &str) -> Result<Option<String>> {
        self.require_agent(agent)?;
        Ok(store::version_dirs(&self.versions_dir(agent)?)?.last().map(|n| format!("v{n}")))
    }

    /// One version, by name (`v2`).
    pub fn version(&self, agent: &str, version: &str) -> Result<VersionInfo> {
        let n = check_version(version)?;
        self.require_agent(agent)?;
        let dir = self.versions_dir(agent)?;
        if !dir.join(version).is_dir() {
            let latest = self.latest(agent)?.unwrap_or_else(|| "none registered".to_string());
            bail!("agent `{agent}` has no version {version} (latest: {latest})");
        }
        self.read_version(agent, &dir, n)
    }

    fn read_version(&self, agent: &str, versions_dir: &Path, n: u32) -> Result<VersionInfo> {
        let dir = versions_dir.join(format!("v{n}"));
        let path = dir.join("lineage.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("agent `{agent}` v{n}: reading {}", path.display()))?;
        let lineage: Lineage = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid lineage", path.display()))?;
        Ok(VersionInfo {
            version: format!("v{n}"),
            number: n,
            adapter_dir: dir.join("adapter"),
            dir,
            lineage,
        })
    }

    /// `aliases.json` (empty when no alias was ever set).
    pub fn aliases(&self, agent: &str) -> Result<Aliases> {
        self.require_agent(agent)?;
        aliases::read_aliases(&self.aliases_path(agent)?)
    }

    /// Every committed alias change, oldest first.
    pub fn history(&self, agent: &str) -> Result<Vec<HistoryEntry>> {
        self.require_agent(agent)?;
        aliases::read_history(&self.history_path(agent)?)
    }

    /// The version an alias or version name stands for: `production` -> `v3`, `v2` -> `v2`.
    pub fn resolve_version(&self, agent: &str, name: &str) -> Result<String> {
        if names::version_number(name).is_some() {
            return Ok(self.version(agent, name)?.version);
        }
        check_alias(name)?;
        let all = self.aliases(agent)?;
        match all.get(name) {
            Some(a) => Ok(a.version.clone()),
            None => {
                let known: Vec<&str> = all.keys().map(String::as_str).collect();
                let known = if known.is_empty() { "none set".to_string() } else { known.join(", ") };
                bail!("agent `{agent}` has no alias `{name}` (aliases: {known})")
            }
        }
    }

    /// The adapter directory an alias or version name stands for, what a server loads.
    pub fn resolve(&self, agent: &str, name: &str) -> Result<PathBuf> {
        let v = self.resolve_version(agent, name)?;
        let dir = self.versions_dir(agent)?.join(&v).join("adapter");
        if !dir.is_dir() {
            bail!(
                "agent `{agent}`: `{name}` points at {v}, which has no adapter directory {}",
                dir.display()
            );
        }
        Ok(dir)
    }
}
