//! Checkpoints that lose nothing: each is written whole into a temp directory and
//! renamed to `step-NNNNNN`, so a run killed at any point leaves either a complete
//! checkpoint or none that resume would pick. A checkpoint holds the trained tensors
//! (the adapter as a PEFT directory `adapter/`, or in a full fine-tuning run the model
//! as an HF directory `model/`, both f32), AdamW's moments and the trainer's position;
//! data order and dropout masks are pure functions of the seed and the step, so that is
//! all a bit-exact resume needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::params::Trainable;
use crate::model::safetensors_io::{decode_f32, write_f32, TensorStore};
use crate::ops::{AdamWParams, Ops};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// The epoch and the row within it where the next step's data starts.
    pub epoch: usize,
    pub cursor: usize,
    pub total_steps: usize,
    pub seed: u64,
    pub tokens_seen: u64,
}

const STATE: &str = "trainer_state.json";

fn step_dir_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// Writes a checkpoint under `root` and returns its directory.
pub fn save<O: Ops, P: Trainable<O::Tensor>>(
    ops: &O,
    root: &Path,
    state: &TrainerState,
    params: &P,
    opt: &AdamW<P>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let fin = root.join(step_dir_name(state.step));
    if fin.exists() {
        bail!("checkpoint {} exists already", fin.display());
    }
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".tmp-{}-", step_dir_name(state.step)))
        .tempdir_in(root)
        .with_context(|| format!("creating a temp dir in {}", root.display()))?;
    params.save(ops, &tmp.path().join(P::DIR))?;
    let mut moments = BTreeMap::new();
    for (prefix, a) in [("m", &opt.m), ("v", &opt.v)] {
        for (name, t) in a.named() {
            moments.insert(format!("{prefix}.{name}"), (ops.shape(t).to_vec(), ops.download(t)?));
        }
    }
    write_f32(&tmp.path().join("optimizer.safetensors"), &moments, None)?;
    let json = serde_json::json!({"trainer": state, "adamw": {
        "lr": opt.hp.lr, "betas": [opt.hp.beta1, opt.hp.beta2], "eps": opt.hp.eps,
        "weight_decay": opt.hp.weight_decay, "step": opt.step}});
    crate::util::atomic_write(&tmp.path().join(STATE), &serde_json::to_vec_pretty(&json)?)?;
    let tmp = tmp.keep();
    std::fs::rename(&tmp, &fin)
        .with_context(|| format!("renaming {} to {}", tmp.display(), fin.display()))?;
    if let Ok(d) = std::fs::File::open(root) {
        let _ = d.sync_all();
    }
    Ok(fin)
}

/// Complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(out) };
    for e in entries {
        let e = e.with_context(|| format!("reading {}", root.display()))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) {
            if e.path().join(STATE).exists() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Removes all but the newest `keep` checkpoints, and temp directories that a killed
/// run left behind.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list(root)?;
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-step-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

/// What a checkpoint restores: the trainer's position, the trained tensors and the
/// optimizer.
pub type Resumed<P> = (TrainerState, P, AdamW<P>);

/// Reads a checkpoint back.
pub fn load<O: Ops, P: Trainable<O::Tensor>>(ops: &O, dir: &Path, frozen: &P::Frozen) -> Result<Resumed<P>> {
    let state_path = dir.join(STATE);
    let v = crate::util::read_json(&state_path)?;
    let state: TrainerState = serde_json::from_value(v["trainer"].clone())
        .with_context(|| format!("{}: no valid `trainer` section", state_path.display()))?;
    let hp: AdamWParams = {
        let a = &v["adamw"];
        let f = |x: &serde_json::Value| x.as_f64().map(|x| x as f32);
        (|| {
            Some(AdamWParams {
                lr: f(&a["lr"])?,
                beta1: f(&a["betas"][0])?,
                beta2: f(&a["betas"][1])?,
                eps: f(&a["eps"])?,
                weight_decay: f(&a["weight_decay"])?,
            })
        })()
        .with_context(|| format!("{}: no valid `adamw` section", state_path.display()))?
    };
    let params_dir = dir.join(P::DIR);
    ensure!(
        params_dir.is_dir(),
        "{}: no `{}` directory, so not a checkpoint of this kind of run (LoRA and full \
         fine-tuning checkpoints do not mix)",
        dir.display(),
        P::DIR
    );
    let params = P::load(ops, &params_dir, frozen)?;
    let store = TensorStore::open_file(&dir.join("optimizer.safetensors"))?;
    let mut opt = AdamW::new(ops, &params, hp)?;
    opt.step = v["adamw"]["step"].as_u64().context("trainer_state.json: adamw.step missing")?;
    for (prefix, moments) in [("m", &mut opt.m), ("v", &mut opt.v)] {
        let names: Vec<String> = moments.named().into_iter().map(|(n, _)| n).collect();
        for (name, t) in names.iter().zip(moments.tensors_mut()) {
            let key = format!("{prefix}.{name}");
            let shape = ops.shape(t).to_vec();
            let w = store.get_shaped(&key, &shape)?;
            *t = ops.upload(&decode_f32(&w)?, &shape)?;
        }
    }
    Ok((state, params, opt))
}
