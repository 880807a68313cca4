//! The registry's writers: registering a version and moving aliases. Each runs under
//! the agent's lock from its first read to its last write, so a read-modify-write
//! never interleaves with another writer's, in this process or another.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::aliases::{self, Action, Alias, Aliases, HistoryEntry};
use super::lineage::{Lineage, NewVersion};
use super::lock::WriterLock;
use super::names::{check_agent, check_alias, check_version, current_user, now_rfc3339};
use super::store::{self, TEMP_PREFIX};
use super::{Registry, CANARY, PRODUCTION};
use crate::model::safetensors_io::TensorStore;

/// The state a writer works from, read after taking the lock and tidying up.
struct Session {
    _lock: WriterLock,
    aliases: Aliases,
    history: Vec<HistoryEntry>,
}

/// One alias change a writer asks for; `to: None` removes the alias.
struct Change {
    alias: String,
    to: Option<String>,
    weight: Option<u32>,
}

fn who_or_default(who: &str) -> String {
    if who.trim().is_empty() {
        current_user()
    } else {
        who.to_string()
    }
}

/// Refuses an adapter directory a server could not load, before anything is copied.
fn check_adapter_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!("adapter directory {} does not exist", dir.display());
    }
    let cfg = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg).with_context(|| {
        format!("{}: not a PEFT adapter directory (no adapter_config.json)", dir.display())
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", cfg.display()))?;
    if !v.is_object() {
        bail!("{}: not a JSON object", cfg.display());
    }
    let weights = dir.join("adapter_model.safetensors");
    if !weights.is_file() {
        bail!("{}: not a PEFT adapter directory (no adapter_model.safetensors)", dir.display());
    }
    TensorStore::open_file(&weights)?;
    Ok(())
}

impl Registry {
    /// Takes the agent's lock, then repairs what a killed writer may have left: temp
    /// version dirs, a torn last history line, and an `aliases.json` that lags the
    /// history by the change its writer did not get to write.
    fn begin_write(&self, agent: &str) -> Result<Session> {
        let versions = self.versions_dir(agent)?;
        std::fs::create_dir_all(&versions).with_context(|| format!("creating {}", versions.display()))?;
        let lock = WriterLock::acquire(&self.lock_path(agent)?)?;
        store::clean_temps(&versions)?;
        let history_path = self.history_path(agent)?;
        aliases::repair_history_tail(&history_path)?;
        let history = aliases::read_history(&history_path)?;
        let aliases_path = self.aliases_path(agent)?;
        let aliases = if history.is_empty() {
            // no log to rebuild from: the file is the only truth there is
            aliases::read_aliases(&aliases_path)?
        } else {
            let expected = aliases::replay(&history);
            let on_disk = aliases::read_aliases(&aliases_path).ok();
            if on_disk.as_ref() != Some(&expected) {
                tracing::warn!(
                    "{}: brought up to date with {} (an earlier writer was interrupted)",
                    aliases_path.display(),
                    history_path.display()
                );
                aliases::write_aliases(&aliases_path, &expected)?;
            }
            expected
        };
        Ok(Session { _lock: lock, aliases, history })
    }

    /// Registers an adapter as the agent's next version and returns its name (`v4`).
    ///
    /// The adapter is copied into a temp dir inside `versions/`, its lineage written,
    /// everything synced, and the dir renamed to `vN` in one step: a kill at any point
    /// leaves either no `vN` or a complete one. Holding the lock throughout keeps the
    /// numbers contiguous and means any temp dir seen by a later writer is stale.
    pub fn register(&self, agent: &str, new: NewVersion) -> Result<String> {
        check_agent(agent)?;
        check_adapter_dir(&new.adapter_dir)?;
        if let Some(p) = &new.parent {
            check_version(p).context("parent")?;
        }
        let session = self.begin_write(agent)?;
        let versions = self.versions_dir(agent)?;
        let existing = store::version_dirs(&versions)?;
        if let Some(p) = &new.parent {
            if !versions.join(p).is_dir() {
                bail!("parent {p}: agent `{agent}` has no such version");
            }
        }
        let n = existing.last().map_or(1, |last| last + 1);
        let version = format!("v{n}");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = versions.join(format!("{TEMP_PREFIX}{version}-{}-{nanos}", std::process::id()));
        let result = (|| -> Result<()> {
            std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let adapter_files = store::copy_tree(&new.adapter_dir, &tmp.join("adapter"))
                .with_context(|| format!("copying the adapter from {}", new.adapter_dir.display()))?;
            let lineage = Lineage {
                agent: agent.to_string(),
                version: version.clone(),
                parent: new.parent.clone(),
                created_at: now_rfc3339(),
                created_by: who_or_default(&new.created_by),
                base_model: new.base_model.clone(),
                tokenizer_sha256: new.tokenizer_sha256.clone(),
                recipe: new.recipe.clone(),
                data_manifest: new.data_manifest.clone(),
                metrics: new.metrics.clone(),
                gate_report: new.gate_report.clone(),
                adapter_files,
            };
            let mut bytes = serde_json::to_vec_pretty(&lineage)?;
            bytes.push(b'\n');
            crate::util::atomic_write(&tmp.join("lineage.json"), &bytes)?;
            store::sync_dir(&tmp)?;
            std::fs::rename(&tmp, versions.join(&version))
                .with_context(|| format!("renaming {} to {version}", tmp.display()))?;
            store::sync_dir(&versions)
        })();
        if let Err(e) = result {
            // best effort: the next writer removes it anyway
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("registering {version} of agent `{agent}`")));
        }
        drop(session);
        Ok(version)
    }

    /// Appends the history lines for `changes` (skipping those that change nothing)
    /// and then replaces `aliases.json`; returns the new aliases.
    fn commit(
        &self,
        agent: &str,
        session: &Session,
        changes: Vec<Change>,
        action: Action,
        who: &str,
        why: &str,
    ) -> Result<Aliases> {
        let (time, who) = (now_rfc3339(), who_or_default(who));
        let mut next = session.aliases.clone();
        let mut entries = Vec::new();
        for c in changes {
            let prev = next.get(&c.alias).cloned();
            let unchanged = match (&prev, &c.to) {
                (Some(p), Some(to)) => p.version == *to && p.weight == c.weight,
                (None, None) => true,
                _ => false,
            };
            if unchanged {
                continue;
            }
            entries.push(HistoryEntry {
                time: time.clone(),
                who: who.clone(),
                alias: c.alias.clone(),
                from: prev.map(|p| p.version),
                to: c.to.clone(),
                weight: c.weight,
                why: why.to_string(),
                action,
            });
            match c.to {
                Some(version) => next.insert(c.alias, Alias { version, weight: c.weight }),
                None => next.remove(&c.alias),
            };
        }
        if !entries.is_empty() {
            aliases::append_history(&self.history_path(agent)?, &entries)?;
            aliases::write_aliases(&self.aliases_path(agent)?, &next)?;
        }
        Ok(next)
    }

    fn require_version(&self, agent: &str, version: &str) -> Result<()> {
        check_version(version)?;
        if !self.versions_dir(agent)?.join(version).is_dir() {
            let latest = self.latest(agent)?.unwrap_or_else(|| "none registered".to_string());
            bail!("agent `{agent}` has no version {version} (latest: {latest})");
        }
        Ok(())
    }

    /// Points `alias` at `version`. `weight` (percent of traffic) is recorded as given;
    /// `None` keeps the alias's current weight, and a new `production` takes whatever
    /// share a canary leaves. This is the raw move: [`Registry::promote`],
    /// [`Registry::canary`] and [`Registry::rollback`] keep production and canary
    /// weights adding up to 100.
    pub fn set_alias(
        &self,
        agent: &str,
        alias: &str,
        version: &str,
        weight: Option<u32>,
        who: &str,
        why: &str,
    ) -> Result<Aliases> {
        check_alias(alias)?;
        if let Some(w) = weight {
            if w > 100 {
                bail!("weight {w} is not a percentage (0..=100)");
            }
        }
        self.require_agent(agent)?;
        let s = self.begin_write(agent)?;
        self.require_version(agent, version)?;
        let weight = weight.or_else(|| s.aliases.get(alias).and_then(|a| a.weight)).or_else(|| {
            (alias == PRODUCTION)
                .then(|| 100 - s.aliases.get(CANARY).and_then(|c| c.weight).unwrap_or(0).min(100))
        });
        if alias == CANARY && weight.is_none() {
            bail!("a new canary needs a weight (the percent of traffic it gets)");
        }
        let change = Change { alias: alias.to_string(), to: Some(version.to_string()), weight };
        self.commit(agent, &s, vec![change], Action::Set, who, why)
    }

    /// Removes `alias` (say, a canary that is abandoned); production takes back the
    /// canary's share.
    pub fn remove_alias(&self, agent: &str, alias: &str, who: &str, why: &str) -> Result<Aliases> {
        check_alias(alias)?;
        self.require_agent(agent)?;
        let s = self.begin_write(agent)?;
        if !s.aliases.contains_key(alias) {
            bail!("agent `{agent}` has no alias `{alias}`");
        }
        if alias == PRODUCTION {
            bail!("production cannot be removed; promote or roll back to another version instead");
        }
        let mut changes = vec![Change { alias: alias.to_string(), to: None, weight: None }];
        if alias == CANARY {
            if let Some(p) = s.aliases.get(PRODUCTION) {
                changes.push(Change {
                    alias: PRODUCTION.into(),
                    to: Some(p.version.clone()),
                    weight: Some(100),
                });
            }
        }
        self.commit(agent, &s, changes, Action::Remove, who, why)
    }

    /// Production's weight beside `canary`, and the canary change that goes with
    /// moving production to `target`: a canary of `target` itself is done and removed.
    fn production_moves_to(s: &Session, target: &str) -> Vec<Change> {
        match s.aliases.get(CANARY) {
            Some(c) if c.version == target => vec![
                Change { alias: PRODUCTION.into(), to: Some(target.to_string()), weight: Some(100) },
                Change { alias: CANARY.into(), to: None, weight: None },
            ],
            Some(c) => {
                let w = 100 - c.weight.unwrap_or(0).min(100);
                vec![Change { alias: PRODUCTION.into(), to: Some(target.to_string()), weight: Some(w) }]
            }
            None => {
                vec![Change { alias: PRODUCTION.into(), to: Some(target.to_string()), weight: Some(100) }]
            }
        }
    }

    /// Makes `version` production with all the traffic. A canary of that same version
    /// is removed; a canary of another version keeps its share, and production gets
    /// the rest, so the weights always add up to 100.
    pub fn promote(&self, agent: &str, version: &str, who: &str, why: &str) -> Result<Aliases> {
        self.require_agent(agent)?;
        let s = self.begin_write(agent)?;
        self.require_version(agent, version)?;
        let changes = Self::production_moves_to(&s, version);
        self.commit(agent, &s, changes, Action::Promote, who, why)
    }

    /// Sends `weight` percent of traffic to `version` as the canary; production keeps
    /// `100 - weight`.
    pub fn canary(&self, agent: &str, version: &str, weight: u32, who: &str, why: &str) -> Result<Aliases> {
        if !(1..=99).contains(&weight) {
            bail!("canary weight {weight}: use 1..=99 percent (promote gives a version all the traffic)");
        }
        self.require_agent(agent)?;
        let s = self.begin_write(agent)?;
        self.require_version(agent, version)?;
        let Some(prod) = s.aliases.get(PRODUCTION) else {
            bail!("agent `{agent}` has no production version to share traffic with; promote one first");
        };
        if prod.version == version {
            bail!("{version} is already production; a canary must be another version");
        }
        let changes = vec![
            Change { alias: CANARY.into(), to: Some(version.to_string()), weight: Some(weight) },
            Change { alias: PRODUCTION.into(), to: Some(prod.version.clone()), weight: Some(100 - weight) },
        ];
        self.commit(agent, &s, changes, Action::Canary, who, why)
    }

    /// Puts production back on the version it served before its last change, and
    /// returns that version. Rollbacks stack: after v1 -> v2 -> v3, one rollback gives
    /// v2 and a second gives v1 (not v3 again).
    pub fn rollback(&self, agent: &str, who: &str, why: &str) -> Result<String> {
        self.rollback_impl(agent, None, who, why)
    }

    /// Puts production back on an explicit, earlier `version`.
    pub fn rollback_to(&self, agent: &str, version: &str, who: &str, why: &str) -> Result<String> {
        self.rollback_impl(agent, Some(version), who, why)
    }

    fn rollback_impl(&self, agent: &str, to: Option<&str>, who: &str, why: &str) -> Result<String> {
        self.require_agent(agent)?;
        let s = self.begin_write(agent)?;
        let Some(prod) = s.aliases.get(PRODUCTION) else {
            bail!("agent `{agent}` has no production version: nothing to roll back");
        };
        let target = match to {
            Some(v) => {
                self.require_version(agent, v)?;
                if v == prod.version {
                    bail!("{v} is already production: nothing to roll back");
                }
                v.to_string()
            }
            None => {
                let stack = aliases::serving_stack(&s.history, PRODUCTION);
                if stack.last() != Some(&prod.version) {
                    bail!(
                        "agent `{agent}`: history.jsonl does not end with production on {} \
                         (was aliases.json edited by hand?); name the version to roll back to",
                        prod.version
                    );
                }
                match stack.len() {
                    0 | 1 => bail!(
                        "agent `{agent}`: production has served only {} (earlier versions were rolled \
                         back from); nothing to roll back to — name a version to roll back to",
                        prod.version
                    ),
                    n => stack[n - 2].clone(),
                }
            }
        };
        let changes = Self::production_moves_to(&s, &target);
        self.commit(agent, &s, changes, Action::Rollback, who, why)?;
        Ok(target)
    }
}
