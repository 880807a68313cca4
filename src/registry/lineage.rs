//! `lineage.json`: where a version came from (base model, tokenizer, data, recipe),
//! how it trained, whether it passed the gate, and who registered it when.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::model::export::TOKENIZER_FILES;
use crate::model::safetensors_io::TensorStore;

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(sha256_hex(&bytes))
}

/// The identity of the frozen base model an adapter was trained on.
///
/// Hashing every weight of an 8B checkpoint would take minutes per registration, so the
/// weights are identified by their layout instead: the sha256 of the sharded index, or
/// of the sorted tensor names, dtypes and shapes of a single-file checkpoint. Together
/// with the hash of `config.json` that tells different architectures and different
/// checkpoint layouts apart, which is what decides whether an adapter can load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModel {
    pub path: String,
    pub config_sha256: String,
    pub weights_sha256: String,
    /// `model.safetensors.index.json` or `tensor-list`: what `weights_sha256` hashed.
    pub weights_hashed_from: String,
}

impl BaseModel {
    pub fn describe(dir: &Path) -> Result<Self> {
        let config = dir.join("config.json");
        if !config.is_file() {
            bail!("base model {}: no config.json there", dir.display());
        }
        let config_sha256 = sha256_file(&config)?;
        let index = dir.join("model.safetensors.index.json");
        let (weights_sha256, weights_hashed_from) = if dir.join("model.safetensors").is_file() {
            let store = TensorStore::open_dir(dir)?;
            let mut listing = String::new();
            for name in store.names() {
                let w = store.get(name)?;
                listing.push_str(&format!("{name}\t{:?}\t{:?}\n", w.dtype, w.shape));
            }
            (sha256_hex(listing.as_bytes()), "tensor-list".to_string())
        } else if index.is_file() {
            (sha256_file(&index)?, "model.safetensors.index.json".to_string())
        } else {
            bail!("base model {}: no model.safetensors nor model.safetensors.index.json", dir.display());
        };
        // absolute, since a relative path means nothing to whoever reads the lineage later
        let path = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        Ok(Self { path: path.display().to_string(), config_sha256, weights_sha256, weights_hashed_from })
    }

    /// Same config and same weight layout, wherever the copies live.
    pub fn same_as(&self, other: &BaseModel) -> bool {
        self.config_sha256 == other.config_sha256 && self.weights_sha256 == other.weights_sha256
    }
}

/// One hash over the tokenizer and chat-template files present in `dir` (`None` when
/// there are none): a changed chat template changes what the adapter was trained to
/// see, even with the same base weights.
pub fn tokenizer_sha256(dir: &Path) -> Result<Option<String>> {
    let mut h = Sha256::new();
    let mut any = false;
    for f in TOKENIZER_FILES {
        let p = dir.join(f);
        if p.is_file() {
            let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            // name and length first, so moving bytes between files changes the hash
            h.update(f.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
            any = true;
        }
    }
    Ok(any.then(|| h.finalize().iter().map(|b| format!("{b:02x}")).collect()))
}

/// A file of the adapter directory as it was registered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHash {
    pub bytes: u64,
    pub sha256: String,
}

/// Everything `lineage.json` records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    pub agent: String,
    pub version: String,
    pub parent: Option<String>,
    pub created_at: String,
    pub created_by: String,
    pub base_model: BaseModel,
    pub tokenizer_sha256: Option<String>,
    /// The resolved recipe text the run wrote (`recipe.yaml`), verbatim.
    pub recipe: Option<String>,
    /// The run's `data_manifest.json`, verbatim.
    pub data_manifest: Option<Value>,
    /// A summary of `metrics.jsonl` (see [`summarize_metrics`]) plus any caller's numbers.
    pub metrics: BTreeMap<String, f64>,
    pub gate_report: Option<Value>,
    /// Every file copied into `adapter/`, by relative path.
    pub adapter_files: BTreeMap<String, FileHash>,
}

/// The summary of a run's `metrics.jsonl` that goes into the lineage: the last step,
/// the final and best losses, the final validation accuracy. An unterminated last line
/// (a run killed mid-write) is skipped.
pub fn summarize_metrics(path: &Path) -> Result<BTreeMap<String, f64>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let complete = crate::util::whole_lines(&text);
    let mut out = BTreeMap::new();
    let mut best_val: Option<f64> = None;
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
        let num = |k: &str| v.get(k).and_then(Value::as_f64);
        if let Some(step) = num("step") {
            out.insert("steps".to_string(), step);
        }
        for (key, name) in [
            ("loss", "final_loss"),
            ("val_loss", "final_val_loss"),
            ("val_token_accuracy", "final_val_token_accuracy"),
        ] {
            if let Some(x) = num(key) {
                out.insert(name.to_string(), x);
            }
        }
        if let Some(x) = num("val_loss") {
            best_val = Some(best_val.map_or(x, |b: f64| b.min(x)));
        }
    }
    if let Some(b) = best_val {
        out.insert("best_val_loss".to_string(), b);
    }
    Ok(out)
}

/// What a caller hands to [`super::Registry::register`]; the registry adds the agent,
/// version number, creation time and adapter file hashes.
#[derive(Clone, Debug)]
pub struct NewVersion {
    /// A PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`,
    /// tokenizer files if any); its files are copied in.
    pub adapter_dir: PathBuf,
    pub base_model: BaseModel,
    pub tokenizer_sha256: Option<String>,
    pub recipe: Option<String>,
    pub data_manifest: Option<Value>,
    pub metrics: BTreeMap<String, f64>,
    pub gate_report: Option<Value>,
    /// The version this one was trained from or replaces; must already be registered.
    pub parent: Option<String>,
    pub created_by: String,
}

impl NewVersion {
    /// An adapter with its base model and nothing else known about it.
    pub fn new(adapter_dir: &Path, base_model_dir: &Path) -> Result<Self> {
        let tokenizer = match tokenizer_sha256(base_model_dir)? {
            Some(h) => Some(h),
            None => tokenizer_sha256(adapter_dir)?,
        };
        Ok(Self {
            adapter_dir: adapter_dir.to_path_buf(),
            base_model: BaseModel::describe(base_model_dir)?,
            tokenizer_sha256: tokenizer,
            recipe: None,
            data_manifest: None,
            metrics: BTreeMap::new(),
            gate_report: None,
            parent: None,
            created_by: super::names::current_user(),
        })
    }

    /// What `tuneloop finetune` wrote into `run_dir`: `adapter/`, `recipe.yaml`,
    /// `data_manifest.json`, `metrics.jsonl`, and `gate.json` if the gate ran there.
    /// The base model is `base_model_dir` or else the recipe's `model.path` (relative
    /// to the current directory, as the run itself read it).
    pub fn from_run(run_dir: &Path, base_model_dir: Option<&Path>) -> Result<Self> {
        let adapter = run_dir.join("adapter");
        if !adapter.is_dir() {
            bail!("{}: no adapter/ directory (did the run finish at least one step?)", run_dir.display());
        }
        let recipe_path = run_dir.join("recipe.yaml");
        let recipe = if recipe_path.is_file() {
            Some(
                std::fs::read_to_string(&recipe_path)
                    .with_context(|| format!("reading {}", recipe_path.display()))?,
            )
        } else {
            None
        };
        let base_dir = match base_model_dir {
            Some(d) => d.to_path_buf(),
            None => {
                let from_recipe = recipe.as_deref().map(model_path_of_recipe).transpose()?.flatten();
                match from_recipe {
                    Some(p) => p,
                    None => bail!(
                        "{}: cannot tell the base model (no model.path in recipe.yaml); name its directory",
                        run_dir.display()
                    ),
                }
            }
        };
        let mut v = Self::new(&adapter, &base_dir).with_context(|| {
            format!("describing the base model of {} (name its directory if it moved)", run_dir.display())
        })?;
        v.recipe = recipe;
        v.data_manifest = read_json_if_present(&run_dir.join("data_manifest.json"))?;
        v.gate_report = read_json_if_present(&run_dir.join("gate.json"))?;
        let metrics = run_dir.join("metrics.jsonl");
        if metrics.is_file() {
            v.metrics = summarize_metrics(&metrics)?;
        }
        Ok(v)
    }
}

fn model_path_of_recipe(text: &str) -> Result<Option<PathBuf>> {
    let v: serde_norway::Value = serde_norway::from_str(text).context("recipe.yaml is not valid YAML")?;
    Ok(v.get("model").and_then(|m| m.get("path")).and_then(|p| p.as_str()).map(PathBuf::from))
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    Ok(Some(v))
}
