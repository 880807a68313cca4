//! `tuneloop finetune -c recipe.yaml`: feedback log -> filtered, deduplicated
//! conversations -> chat-template tokens and labels -> packed rows -> the training loop
//! -> a PEFT adapter directory (or, with `peft.full`, a fully fine-tuned HF model
//! directory) with the tokenizer, metrics, a loss curve and a data manifest.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::pack::Example;
use super::trainer::{train_data_parallel, TrainConfig, TrainOutcome};
use crate::data::feedback::{self, FeedbackFilter, Summary};
use crate::data::{tokenize_conversation, ChatModel, LineError};
use crate::dist::nccl::NcclGroup;
use crate::dist::{Collective, DistEnv, Single, TcpGroup};
use crate::model::{Adapter, Model};
use crate::ops::backend::AnyBackend;
use crate::ops::cuda::CudaOps;
use crate::ops::{cpu::CpuOps, AdamWParams, Ops};
use crate::recipe::Recipe;

/// What a run made and measured.
pub struct FinetuneReport {
    pub output_dir: PathBuf,
    /// Whether the whole model was trained (`peft.full`) rather than an adapter.
    pub full: bool,
    /// What the run made: the PEFT adapter `output_dir/adapter`, or with `peft.full` the
    /// HF model directory `output_dir/model`.
    pub trained_dir: PathBuf,
    pub train_summary: Summary,
    pub n_train: usize,
    pub n_val: usize,
    pub outcome: TrainOutcome,
}

/// One tokenized example with where it came from.
struct Tokenized {
    example: Example,
    hash: String,
}

#[derive(Serialize)]
struct Manifest<'a> {
    train_files: &'a [PathBuf],
    validation_files: &'a [PathBuf],
    filters: &'a FeedbackFilter,
    val_fraction: f64,
    summary: &'a Summary,
    /// Content hashes (SHA-256 of the canonical conversation) of every example used.
    train: Vec<&'a str>,
    validation: Vec<&'a str>,
}

fn tokenize(
    chat: &ChatModel,
    examples: &[feedback::Example],
    max_tokens: Option<usize>,
) -> Result<(Vec<Tokenized>, usize)> {
    let mut out = Vec::with_capacity(examples.len());
    let mut too_long = 0;
    for ex in examples {
        let t = tokenize_conversation(chat, &ex.conv).map_err(|e| LineError {
            file: ex.source.0.clone(),
            line: ex.source.1,
            message: format!("{e:#}"),
        })?;
        if max_tokens.is_some_and(|m| t.input_ids.len() > m) {
            too_long += 1;
            continue;
        }
        out.push(Tokenized { example: Example { ids: t.input_ids, labels: t.labels }, hash: ex.hash_hex() });
    }
    Ok((out, too_long))
}

/// The backend a recipe asks for, on GPU `ordinal` for CUDA: `auto` takes CUDA when a
/// GPU and the kernels are there and otherwise the CPU backend, which computes in f32
/// whatever `model.dtype` says.
pub fn backend(recipe: &Recipe, ordinal: usize) -> Result<AnyBackend> {
    crate::ops::backend::select_on(recipe.backend, recipe.model.dtype, ordinal, true)
}

/// Runs the recipe in this process alone.
pub fn finetune(
    recipe: &Recipe,
    resume: bool,
    stop_after: Option<usize>,
    progress: bool,
) -> Result<FinetuneReport> {
    finetune_distributed(recipe, resume, stop_after, progress, &DistEnv::single())
}

/// Runs the recipe as rank `env.rank` of a data-parallel run (or alone, for a plain
/// [`DistEnv::single`]): on the CUDA backend over NCCL on GPU `env.local_rank`, on the
/// CPU backend over TCP. Only rank 0 writes the output directory.
pub fn finetune_distributed(
    recipe: &Recipe,
    resume: bool,
    stop_after: Option<usize>,
    progress: bool,
    env: &DistEnv,
) -> Result<FinetuneReport> {
    let backend = backend(recipe, env.local_rank)?;
    let gpu = match backend {
        AnyBackend::Cuda(_) => format!(", GPU {}", env.local_rank),
        AnyBackend::Cpu(_) => String::new(),
    };
    if env.launched {
        crate::dist::say(
            env.rank,
            format_args!("joining a world of {} on the {} backend{gpu}", env.world_size, backend.name()),
        );
    } else {
        eprintln!("backend: {}{gpu}", backend.name());
    }
    match &backend {
        AnyBackend::Cpu(ops) => {
            let group: Box<dyn Collective<CpuOps>> =
                if env.launched { Box::new(TcpGroup::join(env)?) } else { Box::new(Single) };
            run(ops, group.as_ref(), recipe, resume, stop_after, progress)
        }
        AnyBackend::Cuda(ops) => {
            let group: Box<dyn Collective<CudaOps>> =
                if env.launched { Box::new(NcclGroup::join(ops, env)?) } else { Box::new(Single) };
            run(ops.as_ref(), group.as_ref(), recipe, resume, stop_after, progress)
        }
    }
}

/// Runs a LoRA recipe in this process on `base`, its `model.path` already loaded on
/// `ops` (`tuneloop loop` loads the base once for all its agents). `base` gets room for
/// the adapter's low-rank update; its weights stay as they are.
pub fn finetune_on<O: Ops>(
    ops: &O,
    base: &mut Model<O::Tensor>,
    recipe: &Recipe,
    resume: bool,
    progress: bool,
) -> Result<FinetuneReport> {
    ensure!(!recipe.peft.full, "a full fine-tune trains its own copy of the model, not a shared base");
    run_with(ops, &Single, recipe, Weights::Frozen(base), resume, None, progress)
}

/// What a run trains: a LoRA adapter on a frozen base, or the whole model.
enum Weights<'a, T> {
    Frozen(&'a mut Model<T>),
    /// `peft.full`: the f32 master weights, trained in place.
    Trained(Model<T>),
}

fn run<O: Ops>(
    ops: &O,
    dist: &dyn Collective<O>,
    recipe: &Recipe,
    resume: bool,
    stop_after: Option<usize>,
    progress: bool,
) -> Result<FinetuneReport> {
    let model_dir = &recipe.model.path;
    if !model_dir.join("config.json").exists() {
        bail!(
            "model.path {}: no config.json there (for the bundled quickstart, run scripts/quickstart.sh, \
             which creates the tiny base model first)",
            model_dir.display()
        );
    }
    // a full run trains f32 master weights; a LoRA run's base stays in the base-weight type
    if recipe.peft.full {
        let model = Model::load_master(ops, model_dir)?;
        run_with(ops, dist, recipe, Weights::Trained(model), resume, stop_after, progress)
    } else {
        let mut model = Model::load(ops, model_dir)?;
        run_with(ops, dist, recipe, Weights::Frozen(&mut model), resume, stop_after, progress)
    }
}

fn run_with<O: Ops>(
    ops: &O,
    dist: &dyn Collective<O>,
    recipe: &Recipe,
    weights: Weights<'_, O::Tensor>,
    resume: bool,
    stop_after: Option<usize>,
    progress: bool,
) -> Result<FinetuneReport> {
    let root = dist.rank() == 0;
    let model_dir = &recipe.model.path;
    let chat = ChatModel::load(model_dir)
        .with_context(|| format!("loading the tokenizer of {}", model_dir.display()))?;

    // data
    let d = &recipe.data;
    let filter = FeedbackFilter::from(&d.filters);
    let loaded = feedback::load(&d.train, d.format.into(), &filter, d.dedup)?;
    let mut summary = loaded.summary;
    let (train_raw, val_raw) = if d.validation.is_empty() {
        feedback::split(loaded.examples, d.val_fraction)
    } else {
        (loaded.examples, feedback::load(&d.validation, d.format.into(), &filter, d.dedup)?.examples)
    };
    let (train_tok, too_long) = tokenize(&chat, &train_raw, d.filters.max_tokens)?;
    summary.record_too_long(too_long);
    let (val_tok, _) = tokenize(&chat, &val_raw, d.filters.max_tokens)?;
    if train_tok.is_empty() {
        bail!("no training examples left after filtering:\n{summary}");
    }
    if root {
        eprintln!("data: {} train / {} validation examples\n{summary}", train_tok.len(), val_tok.len());
    }

    // adapter: continue from one, or fresh; none when the whole model is trained
    let job = match weights {
        Weights::Trained(model) => {
            if recipe.peft.dropout > 0.0 && root {
                eprintln!("peft.dropout applies to LoRA paths only: full fine-tuning ignores it");
            }
            Job::Full(model)
        }
        Weights::Frozen(model) => {
            let adapter = lora_adapter(ops, recipe, model, model_dir)?;
            model.reserve_lora_tails(ops, &adapter)?;
            Job::Lora(model, adapter)
        }
    };

    let out = &recipe.output_dir;
    if root {
        write_run_files(recipe, &filter, &summary, &train_tok, &val_tok, &val_raw)?;
    }

    let s = &recipe.step_scheduler;
    let o = &recipe.optimizer;
    let cfg = TrainConfig {
        seq_len: d.seq_len,
        packing: d.packing,
        global_batch: s.global_batch_size,
        local_batch: s.local_batch_size,
        max_steps: s.max_steps,
        epochs: s.num_epochs,
        val_every: s.val_every_steps,
        ckpt_every: s.ckpt_every_steps,
        keep_last: recipe.checkpoint.keep_last,
        adamw: AdamWParams {
            lr: o.lr as f32,
            beta1: o.betas[0] as f32,
            beta2: o.betas[1] as f32,
            eps: o.eps as f32,
            weight_decay: o.weight_decay as f32,
        },
        warmup_steps: recipe.lr_scheduler.warmup_steps,
        decay: recipe.lr_scheduler.decay,
        min_lr_ratio: recipe.lr_scheduler.min_lr_ratio,
        clip_grad_norm: recipe.clip_grad_norm,
        lora_dropout: recipe.peft.dropout,
        recompute: recipe.activation_checkpointing,
        seed: recipe.seed,
        output_dir: out.clone(),
        stop_after,
        progress,
    };
    let train_ex: Vec<Example> = train_tok.into_iter().map(|t| t.example).collect();
    let val_ex: Vec<Example> = val_tok.into_iter().map(|t| t.example).collect();
    let (trained_dir, outcome) = match job {
        Job::Lora(model, adapter) => {
            let (adapter, outcome) =
                train_data_parallel(ops, model, adapter, &train_ex, &val_ex, &cfg, resume, dist)?;
            let dir = out.join("adapter");
            if outcome.steps > 0 && root {
                save_adapter(ops, &adapter, &dir, model_dir)?;
            }
            (dir, outcome)
        }
        Job::Full(model) => {
            // Full fine-tuning: the loaded model's f32 tensors are the master weights
            // AdamW updates in place; nothing stays frozen.
            let (model, outcome) =
                train_data_parallel(ops, &(), model, &train_ex, &val_ex, &cfg, resume, dist)?;
            let dir = out.join("model");
            if outcome.steps > 0 && root {
                save_model(ops, &model, &dir, model_dir)?;
            }
            (dir, outcome)
        }
    };
    if root {
        super::plot::loss_curve_png(&outcome.history, &out.join("loss.png"))?;
    }
    Ok(FinetuneReport {
        output_dir: out.clone(),
        full: recipe.peft.full,
        trained_dir,
        train_summary: summary,
        n_train: train_ex.len(),
        n_val: val_ex.len(),
        outcome,
    })
}

/// A run's weights once its adapter is made.
enum Job<'a, T> {
    Lora(&'a Model<T>, Adapter<T>),
    Full(Model<T>),
}

/// The run's record of what it was asked and what it read: `recipe.yaml`,
/// `data_manifest.json`, and the held-out conversations as logged (`validation.jsonl`,
/// for an eval or gate on them later).
fn write_run_files(
    recipe: &Recipe,
    filter: &FeedbackFilter,
    summary: &Summary,
    train_tok: &[Tokenized],
    val_tok: &[Tokenized],
    val_raw: &[feedback::Example],
) -> Result<()> {
    let out = &recipe.output_dir;
    let d = &recipe.data;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::util::atomic_write(&out.join("recipe.yaml"), recipe.to_yaml().as_bytes())?;
    let manifest = Manifest {
        train_files: &d.train,
        validation_files: &d.validation,
        filters: filter,
        val_fraction: d.val_fraction,
        summary,
        train: train_tok.iter().map(|t| t.hash.as_str()).collect(),
        validation: val_tok.iter().map(|t| t.hash.as_str()).collect(),
    };
    crate::util::atomic_write(&out.join("data_manifest.json"), &serde_json::to_vec_pretty(&manifest)?)?;
    // the held-out conversations as they were logged, for an eval or gate on them later
    crate::util::atomic_write(&out.join("validation.jsonl"), source_lines(val_raw)?.as_bytes())?;

    Ok(())
}

/// The JSONL lines the examples came from, in order.
fn source_lines(examples: &[feedback::Example]) -> Result<String> {
    let mut files: std::collections::HashMap<&Path, Vec<String>> = std::collections::HashMap::new();
    let mut out = String::new();
    for ex in examples {
        let (path, line) = (&ex.source.0, ex.source.1);
        if !files.contains_key(path.as_path()) {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            files.insert(path, text.lines().map(str::to_string).collect());
        }
        let lines = &files[path.as_path()];
        let text =
            lines.get(line.wrapping_sub(1)).with_context(|| format!("{}:{line}: gone", path.display()))?;
        out.push_str(text.trim_start_matches('\u{feff}'));
        out.push('\n');
    }
    Ok(out)
}

/// The adapter a LoRA run starts from: `peft.init_from`, or a fresh one.
fn lora_adapter<O: Ops>(
    ops: &O,
    recipe: &Recipe,
    model: &Model<O::Tensor>,
    model_dir: &Path,
) -> Result<Adapter<O::Tensor>> {
    let mut lora_cfg = recipe.peft.lora_config()?;
    lora_cfg.base_model_name_or_path = Some(model_dir.display().to_string());
    Ok(match &recipe.peft.init_from {
        Some(dir) => {
            let mut a = Adapter::load(ops, dir, &model.cfg)?;
            if a.cfg.r != lora_cfg.r || a.cfg.target_modules != lora_cfg.target_modules {
                bail!(
                    "peft.init_from {}: adapter has r={} on {:?}, the recipe asks for r={} on {:?}",
                    dir.display(),
                    a.cfg.r,
                    a.cfg.target_modules,
                    lora_cfg.r,
                    lora_cfg.target_modules
                );
            }
            a.cfg = lora_cfg;
            a
        }
        None => Adapter::init(ops, &lora_cfg, &model.cfg, recipe.seed)?,
    })
}

/// The deliverable: a PEFT adapter directory with the base model's tokenizer files,
/// loadable by HF PEFT and vLLM.
pub fn save_adapter<O: Ops>(
    ops: &O,
    adapter: &Adapter<O::Tensor>,
    dir: &Path,
    model_dir: &Path,
) -> Result<()> {
    adapter.save(ops, dir)?;
    crate::model::export::copy_tokenizer_files(model_dir, dir)?;
    Ok(())
}

/// The deliverable of full fine-tuning: an HF model directory loadable by transformers
/// and vLLM like the base: `model.safetensors` with each weight in the dtype the base
/// checkpoint stores it in (the f32 masters rounded to nearest even for a bf16 base, as
/// HF saves a model loaded in bf16; the checkpoints keep them in f32), the base's
/// `config.json` as it is (training changes no shape) and its tokenizer files.
pub fn save_model<O: Ops>(ops: &O, model: &Model<O::Tensor>, dir: &Path, base_dir: &Path) -> Result<()> {
    use crate::model::safetensors_io::{save_named_as, FloatDtype, TensorStore};
    let base = TensorStore::open_dir(base_dir)?;
    let dtype_of =
        |name: &str| base.get(name).ok().and_then(|w| FloatDtype::of(w.dtype)).unwrap_or(FloatDtype::F32);
    save_named_as(ops, model.named(), &dir.join("model.safetensors"), dtype_of)?;
    crate::model::export::copy_config_and_tokenizer(base_dir, dir)
}
