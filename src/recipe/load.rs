//! Reading a recipe: the file, then the overrides, then defaults and validation. Each
//! failure names where it came from: `file:line:col` for the file, the override itself
//! for an override.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_norway::{Mapping, Value};

use super::{overrides, Recipe};

impl Recipe {
    /// Reads the recipe at `path` and applies `overrides` (`("peft.r", "8")` pairs, as
    /// [`super::split_overrides`] makes them) in order; later ones win.
    pub fn load(path: &Path, overrides: &[(String, String)]) -> Result<Recipe> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading recipe {}", path.display()))?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// [`Recipe::load`] on text already in memory; `source` names it in errors.
    pub fn parse(text: &str, source: &str, overrides: &[(String, String)]) -> Result<Recipe> {
        let mut tree: Value = serde_norway::from_str(text).map_err(|e| located(source, &e))?;
        if tree.is_null() {
            // An empty file (or only comments) is a recipe of defaults; overrides may
            // supply the required keys.
            tree = Value::Mapping(Mapping::new());
        } else if tree.is_mapping() {
            // Type-check the file on its own, from its text, so that an unknown key or a
            // wrong type is reported with its line: the YAML value tree keeps no positions.
            // Required keys are checked later, so overrides may still supply them.
            serde_norway::from_str::<Recipe>(text).map_err(|e| located(source, &e))?;
        } else {
            bail!("{source}: a recipe is a mapping of sections (model:, peft:, data:, ...)");
        }

        for (key, raw) in overrides {
            let ctx = || format!("override `--{key}={raw}`");
            let value = overrides::parse_value(raw).with_context(ctx)?;
            overrides::set(&mut tree, key, value).with_context(ctx)?;
            // Checked one at a time, so a bad key or value is blamed on the override that
            // brought it (the file alone already passed).
            serde_norway::from_value::<Recipe>(tree.clone()).map_err(|e| anyhow!("{}: {e}", ctx()))?;
        }

        default_num_epochs(&mut tree);
        let recipe: Recipe = serde_norway::from_value(tree).map_err(|e| anyhow!("{source}: {e}"))?;
        recipe
            .check()
            .map_err(|problems| anyhow!("{source}: invalid recipe:\n  - {}", problems.join("\n  - ")))?;
        Ok(recipe)
    }
}

/// `num_epochs` defaults to 1 only when `max_steps` is unset. It is decided on the tree,
/// where a key left out differs from an explicit `num_epochs: null`.
fn default_num_epochs(tree: &mut Value) {
    let Value::Mapping(root) = tree else { return };
    let section = root.entry(Value::String("step_scheduler".into())).or_insert(Value::Null);
    if section.is_null() {
        *section = Value::Mapping(Mapping::new());
    }
    let Value::Mapping(s) = section else { return };
    let max_steps_set = s.get("max_steps").is_some_and(|v| !v.is_null());
    if !max_steps_set && !s.contains_key("num_epochs") {
        s.insert(Value::String("num_epochs".into()), Value::Number(1.into()));
    }
}

/// `source:line:col: message` from a YAML error, dropping serde_norway's own trailing
/// ` at line L column C` so the position is said once, in the form editors jump to.
fn located(source: &str, err: &serde_norway::Error) -> anyhow::Error {
    let msg = err.to_string();
    match err.location() {
        Some(loc) => {
            let at = format!(" at line {} column {}", loc.line(), loc.column());
            anyhow!("{source}:{}:{}: {}", loc.line(), loc.column(), msg.replacen(&at, "", 1))
        }
        None => anyhow!("{source}: {msg}"),
    }
}
