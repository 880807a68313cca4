//! What changed between two versions: recipe lines, metrics, training data, base model
//! and tokenizer identity, adapter config, and the adapter tensors themselves.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use serde_json::Value;

use super::lineage::BaseModel;
use super::{Registry, VersionInfo};
use crate::model::safetensors_io::{decode_f32, TensorStore};

/// One tensor of the two adapters. `max_abs_diff` is `None` when the tensor is only in
/// one of them or the shapes differ.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDiff {
    pub name: String,
    pub shape_a: Option<Vec<usize>>,
    pub shape_b: Option<Vec<usize>>,
    pub max_abs_diff: Option<f64>,
}

/// A field present in either version with different values (JSON text; `None`: absent).
#[derive(Clone, Debug, PartialEq)]
pub struct FieldDiff {
    pub field: String,
    pub a: Option<String>,
    pub b: Option<String>,
}

/// The example hashes of one split (`train`, `validation`), compared as sets.
#[derive(Clone, Debug, PartialEq)]
pub struct ExampleSetDiff {
    pub split: String,
    pub count_a: usize,
    pub count_b: usize,
    /// Only in b.
    pub added: Vec<String>,
    /// Only in a.
    pub removed: Vec<String>,
}

/// The differences between versions `a` and `b` of one agent; render it with
/// [`super::cli::render_diff`].
#[derive(Clone, Debug, PartialEq)]
pub struct VersionDiff {
    pub agent: String,
    pub a: String,
    pub b: String,
    pub parents: (Option<String>, Option<String>),
    pub base_a: BaseModel,
    pub base_b: BaseModel,
    pub tokenizer: (Option<String>, Option<String>),
    /// Changed recipe lines in order: `('-', line)` only in a, `('+', line)` only in b,
    /// each with the YAML keys it sits under (`optimizer`).
    pub recipe: Vec<(char, String, String)>,
    /// Every metric of either version: `(name, a, b)`.
    pub metrics: Vec<(String, Option<f64>, Option<f64>)>,
    /// Data manifest fields that differ (filters, summary counts, files).
    pub data_fields: Vec<FieldDiff>,
    pub data_examples: Vec<ExampleSetDiff>,
    /// `adapter_config.json` keys that differ (r, alpha, target modules).
    pub adapter_config: Vec<FieldDiff>,
    /// The adapter files byte for byte (by their registered hashes).
    pub adapter_identical: bool,
    pub tensors: Vec<TensorDiff>,
    pub gate: (Option<bool>, Option<bool>),
}

impl VersionDiff {
    /// The largest elementwise difference over every tensor both adapters hold.
    pub fn max_abs_diff(&self) -> Option<(&str, f64)> {
        self.tensors.iter().filter_map(|t| t.max_abs_diff.map(|d| (t.name.as_str(), d))).fold(
            None,
            |best, (n, d)| match best {
                Some((_, bd)) if bd >= d => best,
                _ => Some((n, d)),
            },
        )
    }
}

impl Registry {
    /// The structured differences between versions (or aliases) `a` and `b`.
    pub fn diff_report(&self, agent: &str, a: &str, b: &str) -> Result<VersionDiff> {
        let va = self.version(agent, &self.resolve_version(agent, a)?)?;
        let vb = self.version(agent, &self.resolve_version(agent, b)?)?;
        compare(agent, &va, &vb)
    }

    /// Readable differences between versions (or aliases) `a` and `b`.
    pub fn diff(&self, agent: &str, a: &str, b: &str) -> Result<String> {
        Ok(super::cli::render_diff(&self.diff_report(agent, a, b)?))
    }
}

fn compare(agent: &str, va: &VersionInfo, vb: &VersionInfo) -> Result<VersionDiff> {
    let (la, lb) = (&va.lineage, &vb.lineage);
    let keys: BTreeSet<&String> = la.metrics.keys().chain(lb.metrics.keys()).collect();
    let metrics = keys
        .into_iter()
        .map(|k| (k.clone(), la.metrics.get(k).copied(), lb.metrics.get(k).copied()))
        .collect();

    let (data_fields, data_examples) = manifest_diff(la.data_manifest.as_ref(), lb.data_manifest.as_ref());
    let cfg_a = read_json(&va.adapter_dir.join("adapter_config.json"));
    let cfg_b = read_json(&vb.adapter_dir.join("adapter_config.json"));
    let gate = |g: &Option<Value>| g.as_ref().and_then(|v| v.get("passed")).and_then(Value::as_bool);
    Ok(VersionDiff {
        agent: agent.to_string(),
        a: va.version.clone(),
        b: vb.version.clone(),
        parents: (la.parent.clone(), lb.parent.clone()),
        base_a: la.base_model.clone(),
        base_b: lb.base_model.clone(),
        tokenizer: (la.tokenizer_sha256.clone(), lb.tokenizer_sha256.clone()),
        recipe: recipe_diff(la.recipe.as_deref().unwrap_or(""), lb.recipe.as_deref().unwrap_or("")),
        metrics,
        data_fields,
        data_examples,
        adapter_config: changed_fields(&flatten_json(cfg_a.as_ref()), &flatten_json(cfg_b.as_ref())),
        adapter_identical: la.adapter_files == lb.adapter_files,
        tensors: tensor_diff(va, vb)?,
        gate: (gate(&la.gate_report), gate(&lb.gate_report)),
    })
}

fn read_json(path: &std::path::Path) -> Option<Value> {
    std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok())
}

fn tensor_diff(va: &VersionInfo, vb: &VersionInfo) -> Result<Vec<TensorDiff>> {
    let sa = TensorStore::open_file(&va.adapter_dir.join("adapter_model.safetensors"))?;
    let sb = TensorStore::open_file(&vb.adapter_dir.join("adapter_model.safetensors"))?;
    let names: BTreeSet<&str> = sa.names().into_iter().chain(sb.names()).collect();
    let mut out = Vec::new();
    for name in names {
        let wa = sa.contains(name).then(|| sa.get(name)).transpose()?;
        let wb = sb.contains(name).then(|| sb.get(name)).transpose()?;
        let max_abs_diff = match (&wa, &wb) {
            (Some(x), Some(y)) if x.shape == y.shape => {
                let (x, y) = (decode_f32(x)?, decode_f32(y)?);
                Some(x.iter().zip(&y).map(|(p, q)| (*p as f64 - *q as f64).abs()).fold(0.0, f64::max))
            }
            _ => None,
        };
        out.push(TensorDiff {
            name: name.to_string(),
            shape_a: wa.map(|w| w.shape.clone()),
            shape_b: wb.map(|w| w.shape.clone()),
            max_abs_diff,
        });
    }
    Ok(out)
}

/// The `-`/`+` lines of a line diff (longest common subsequence), each with the YAML
/// keys it sits under, found from the indentation of the lines above it.
fn recipe_diff(a: &str, b: &str) -> Vec<(char, String, String)> {
    let la: Vec<&str> = a.lines().collect();
    let lb: Vec<&str> = b.lines().collect();
    let (ctx_a, ctx_b) = (yaml_context(&la), yaml_context(&lb));
    let (n, m) = (la.len(), lb.len());
    let mut out = Vec::new();
    // A recipe is tens of lines; past a few million cells, list whole texts instead of
    // spending the memory on a table.
    if n.saturating_mul(m) > 4_000_000 {
        out.extend(la.iter().zip(&ctx_a).map(|(l, c)| ('-', l.to_string(), c.clone())));
        out.extend(lb.iter().zip(&ctx_b).map(|(l, c)| ('+', l.to_string(), c.clone())));
        return out;
    }
    // lcs[i][j] = LCS length of la[i..] and lb[j..]
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if la[i] == lb[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && la[i] == lb[j] {
            i += 1;
            j += 1;
        } else if j >= m || (i < n && lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(('-', la[i].to_string(), ctx_a[i].clone()));
            i += 1;
        } else {
            out.push(('+', lb[j].to_string(), ctx_b[j].clone()));
            j += 1;
        }
    }
    out
}

/// For each line, the dotted keys of the YAML mappings that enclose it.
fn yaml_context(lines: &[&str]) -> Vec<String> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut out = Vec::with_capacity(lines.len());
    for line in lines {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            out.push(stack.iter().map(|(_, k)| k.as_str()).collect::<Vec<_>>().join("."));
            continue;
        }
        // list items (`- x`) sit at their parent key's indentation in block style
        let is_item = trimmed.starts_with("- ") || trimmed == "-";
        while stack.last().is_some_and(|(ind, _)| *ind > indent || (*ind == indent && !is_item)) {
            stack.pop();
        }
        out.push(stack.iter().map(|(_, k)| k.as_str()).collect::<Vec<_>>().join("."));
        // a key that opens a block (`optimizer:`) encloses the lines below it
        if !is_item {
            if let Some(key) = trimmed.strip_suffix(':') {
                stack.push((indent, key.trim().to_string()));
            }
        }
    }
    out
}

/// Scalars of a JSON tree by dotted path; arrays are kept whole as JSON text.
fn flatten_json(v: Option<&Value>) -> BTreeMap<String, String> {
    fn walk(v: &Value, path: String, out: &mut BTreeMap<String, String>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    walk(x, if path.is_empty() { k.clone() } else { format!("{path}.{k}") }, out);
                }
            }
            other => {
                out.insert(path, other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Some(v) = v {
        walk(v, String::new(), &mut out);
    }
    out
}

fn changed_fields(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<FieldDiff> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| FieldDiff { field: k.clone(), a: a.get(k).cloned(), b: b.get(k).cloned() })
        .collect()
}

/// The example-hash lists `tuneloop finetune` writes, compared as sets.
const EXAMPLE_SPLITS: [&str; 2] = ["train", "validation"];

fn manifest_diff(a: Option<&Value>, b: Option<&Value>) -> (Vec<FieldDiff>, Vec<ExampleSetDiff>) {
    let hashes = |v: Option<&Value>, split: &str| -> Option<Vec<String>> {
        let arr = v?.get(split)?.as_array()?;
        arr.iter().map(|x| x.as_str().map(str::to_string)).collect()
    };
    let strip = |v: Option<&Value>| -> Option<Value> {
        let mut v = v?.clone();
        if let Value::Object(m) = &mut v {
            for s in EXAMPLE_SPLITS {
                if m.get(s).is_some_and(|x| x.as_array().is_some_and(|a| a.iter().all(Value::is_string))) {
                    m.remove(s);
                }
            }
        }
        Some(v)
    };
    let fields = changed_fields(&flatten_json(strip(a).as_ref()), &flatten_json(strip(b).as_ref()));
    let mut examples = Vec::new();
    for split in EXAMPLE_SPLITS {
        let (ha, hb) = (hashes(a, split), hashes(b, split));
        if ha.is_none() && hb.is_none() {
            continue;
        }
        let (ha, hb) = (ha.unwrap_or_default(), hb.unwrap_or_default());
        let (sa, sb): (BTreeSet<&String>, BTreeSet<&String>) = (ha.iter().collect(), hb.iter().collect());
        let added = hb.iter().filter(|h| !sa.contains(h)).cloned().collect();
        let removed = ha.iter().filter(|h| !sb.contains(h)).cloned().collect();
        examples.push(ExampleSetDiff {
            split: split.to_string(),
            count_a: ha.len(),
            count_b: hb.len(),
            added,
            removed,
        });
    }
    (fields, examples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_lines_with_their_keys() {
        let a = "model:\n  path: base\noptimizer:\n  lr: 0.0002\n  eps: 1e-8\npeft:\n  target_modules:\n  - q_proj\n";
        let b = "model:\n  path: base\noptimizer:\n  lr: 0.0001\n  eps: 1e-8\npeft:\n  target_modules:\n  - q_proj\n  - v_proj\n";
        let d = recipe_diff(a, b);
        assert_eq!(
            d,
            vec![
                ('-', "  lr: 0.0002".to_string(), "optimizer".to_string()),
                ('+', "  lr: 0.0001".to_string(), "optimizer".to_string()),
                ('+', "  - v_proj".to_string(), "peft.target_modules".to_string()),
            ]
        );
        assert!(recipe_diff(a, a).is_empty());
    }

    #[test]
    fn manifests_compare_examples_as_sets() {
        let a =
            serde_json::json!({"summary": {"kept": 3}, "train": ["h1", "h2", "h3"], "validation": ["h9"]});
        let b = serde_json::json!({"summary": {"kept": 4}, "train": ["h2", "h3", "h4", "h5"], "validation": ["h9"]});
        let (fields, ex) = manifest_diff(Some(&a), Some(&b));
        assert_eq!(
            fields,
            vec![FieldDiff { field: "summary.kept".into(), a: Some("3".into()), b: Some("4".into()) }]
        );
        let set = |split: &str, count_a, count_b, added: &[&str], removed: &[&str]| ExampleSetDiff {
            split: split.into(),
            count_a,
            count_b,
            added: added.iter().map(|h| h.to_string()).collect(),
            removed: removed.iter().map(|h| h.to_string()).collect(),
        };
        assert_eq!(ex, vec![set("train", 3, 4, &["h4", "h5"], &["h1"]), set("validation", 1, 1, &[], &[])]);
    }
}
