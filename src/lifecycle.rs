//! `tuneloop loop -c loop.yaml`: one learning cycle for each agent that has new
//! feedback and whose cadence allows it. Collect → prepare → fine-tune (from the
//! production adapter, or fresh) → eval → gate → register → promote or keep.
//!
//! Idempotent: an agent whose feedback files are all as the last cycle saw them
//! (`<work_dir>/<agent>/loop_state.json`) is skipped. Resumable: a cycle's run directory is named by its inputs, so a killed
//! cycle resumes its fine-tune from the last checkpoint, and a version already
//! registered for the same inputs is reused rather than registered twice. The fine-tune
//! runs in this process, or data-parallel over worker processes ([`TrainOn`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::dist::launch::{run_workers, LaunchArgs, Output};
use crate::eval::gate::{self, GateConfig, GateInputs, GateReport};
use crate::eval::{EvalOptions, Turns};
use crate::model::Model;
use crate::ops::backend::{AnyBackend, BackendKind};
use crate::ops::cpu::{CpuOps, CpuTensor};
use crate::ops::cuda::{CudaOps, CudaTensor, DType};
use crate::ops::Ops;
use crate::recipe::Recipe;
use crate::registry::{sha256_hex, NewVersion, Registry};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    /// The adapter registry's root directory.
    pub registry: PathBuf,
    /// The base model every agent's adapters are trained on.
    pub base_model: PathBuf,
    /// Where each cycle's fine-tune run lives: `<work_dir>/<agent>/<cycle>`.
    pub work_dir: PathBuf,
    pub agents: Vec<AgentConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub name: String,
    /// Every `*.jsonl` file here is this agent's feedback log.
    pub feedback_dir: PathBuf,
    /// The fine-tune recipe; the loop sets its model.path, data.train, output_dir and
    /// peft.init_from.
    pub recipe: PathBuf,
    /// Least time between two cycles of this agent.
    #[serde(default)]
    pub cadence_hours: f64,
    #[serde(default = "default_start")]
    pub start_from: StartFrom,
    #[serde(default)]
    pub eval: AgentEval,
    #[serde(default)]
    pub gate: GateConfig,
    /// Where a version that passes the gate goes.
    #[serde(default = "default_promote")]
    pub promote: Promote,
    #[serde(default = "default_canary_weight")]
    pub canary_weight: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// Keep training the adapter in production (fresh when there is none).
    Production,
    Fresh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Promote {
    Production,
    Canary,
}

fn default_start() -> StartFrom {
    StartFrom::Production
}
fn default_promote() -> Promote {
    Promote::Production
}
fn default_canary_weight() -> u32 {
    10
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentEval {
    /// The agent's task eval set; empty = the held-out split of the cycle's feedback.
    pub task: Vec<PathBuf>,
    /// A general regression set, compared against the base model.
    pub regression: Vec<PathBuf>,
    pub max_new_tokens: Option<usize>,
    pub turns: Option<Turns>,
}

impl LoopConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: LoopConfig = serde_norway::from_str(&text).map_err(|e| match e.location() {
            Some(l) => anyhow::anyhow!("{}:{}:{}: {e}", path.display(), l.line(), l.column()),
            None => anyhow::anyhow!("{}: {e}", path.display()),
        })?;
        if cfg.agents.is_empty() {
            bail!("{}: no agents", path.display());
        }
        for a in &cfg.agents {
            crate::registry::check_agent(&a.name).with_context(|| path.display().to_string())?;
            if a.eval.regression.is_empty() {
                bail!("{}: agent {}: eval.regression needs at least one file", path.display(), a.name);
            }
        }
        Ok(cfg)
    }
}

/// What the last cycle of an agent saw: `<registry>/<agent>/loop_state.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Feedback file name → SHA-256 of its contents.
    pub seen: BTreeMap<String, String>,
    pub last_cycle_unix: u64,
    pub last_version: Option<String>,
}

/// A cycle as planned before it starts: what it trains on and from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Plan {
    seen: BTreeMap<String, String>,
    production: Option<String>,
    parent: Option<String>,
    cycle_id: String,
}

/// One agent's row of the summary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CycleOutcome {
    pub agent: String,
    pub action: String,
    pub version: Option<String>,
    pub gate: Option<bool>,
    pub task: Option<String>,
    pub regression: Option<String>,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn feedback_files(dir: &Path) -> Result<BTreeMap<String, (PathBuf, String)>> {
    let mut out = BTreeMap::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading feedback dir {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let p = e.path();
        if p.extension().is_some_and(|x| x == "jsonl") && p.is_file() {
            let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            out.insert(e.file_name().to_string_lossy().to_string(), (p, sha256_hex(&bytes)));
        }
    }
    Ok(out)
}

fn state_path(cfg: &LoopConfig, agent: &str) -> PathBuf {
    cfg.work_dir.join(agent).join("loop_state.json")
}

fn load_state(cfg: &LoopConfig, agent: &str) -> Result<LoopState> {
    let p = state_path(cfg, agent);
    match std::fs::read_to_string(&p) {
        Ok(t) => serde_json::from_str(&t).with_context(|| format!("{}: invalid", p.display())),
        Err(_) => Ok(LoopState::default()),
    }
}

fn fmt_cmp(c: &gate::Comparison) -> String {
    let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.3}"));
    format!("{} {} vs {} ({})", c.metric, f(c.candidate), f(c.reference), c.reference_label)
}

/// Where a cycle's fine-tune runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrainOn {
    /// In this process, on one device.
    InProcess,
    /// Data-parallel over `nproc_per_node` worker processes on this node (one per GPU):
    /// `exe finetune -c <recipe> [--resume] --key=value ...`, the loop's overrides given
    /// as the command line's, started and watched as `finetune --nproc-per-node` does.
    Workers { exe: PathBuf, nproc_per_node: usize },
}

/// Runs one cycle for every agent (`only`: just that one); `force` ignores cadence.
pub fn run(
    cfg: &LoopConfig,
    only: Option<&str>,
    force: bool,
    progress: bool,
    train: &TrainOn,
) -> Result<Vec<CycleOutcome>> {
    let reg = Registry::open(&cfg.registry)?;
    let mut out = Vec::new();
    let mut base = None;
    for agent in cfg.agents.iter().filter(|a| only.is_none_or(|o| o == a.name)) {
        if crate::interrupt::requested() {
            bail!(crate::interrupt::Interrupted {
                what: format!("stopped by a signal before agent {}'s cycle", agent.name)
            });
        }
        let outcome = cycle(cfg, &reg, agent, force, progress, train, &mut base)
            .with_context(|| format!("agent {}", agent.name))?;
        out.push(outcome);
    }
    if let Some(o) = only {
        if out.is_empty() {
            bail!("no agent named `{o}` in the loop config");
        }
    }
    Ok(out)
}

/// The loop's base model, loaded once on the backend the agents' recipes ask for and
/// kept for the next agent that asks for the same one: the agents share `base_model`.
struct SharedBase {
    backend: BackendKind,
    dtype: DType,
    loaded: LoadedBase,
}

enum LoadedBase {
    Cpu(CpuOps, Box<Model<CpuTensor>>),
    Cuda(Box<CudaOps>, Box<Model<CudaTensor>>),
}

impl SharedBase {
    /// `slot`'s base if it was loaded for `recipe`'s backend and dtype, else the base
    /// loaded anew (the one there dropped first: one base at a time).
    fn for_recipe<'a>(slot: &'a mut Option<SharedBase>, dir: &Path, recipe: &Recipe) -> Result<&'a mut Self> {
        let (backend, dtype) = (recipe.backend, recipe.model.dtype);
        if slot.as_ref().is_some_and(|b| b.backend != backend || b.dtype != dtype) {
            *slot = None;
        }
        if slot.is_none() {
            let backend_ops = crate::train::finetune::backend(recipe, 0)?;
            let on = backend_ops.name();
            let loaded = match backend_ops {
                AnyBackend::Cpu(ops) => {
                    let m = Model::load(&ops, dir)?;
                    LoadedBase::Cpu(ops, Box::new(m))
                }
                AnyBackend::Cuda(ops) => {
                    let m = Model::load(ops.as_ref(), dir)?;
                    LoadedBase::Cuda(ops, Box::new(m))
                }
            };
            eprintln!("base model {}: loaded on {on}, kept for the agents after this one", dir.display());
            *slot = Some(SharedBase { backend, dtype, loaded });
        }
        slot.as_mut().context("the base model is loaded")
    }
}

/// Trains (unless `trained`) and gates one cycle on the loaded base, in this process.
fn train_and_gate<O: Ops>(
    ops: &O,
    base: &mut Model<O::Tensor>,
    recipe: &Recipe,
    trained: bool,
    resume: bool,
    progress: bool,
    gate: &GateInputs<'_>,
) -> Result<GateReport> {
    if !trained {
        crate::train::finetune::finetune_on(ops, base, recipe, resume, progress)?;
    }
    gate.run_on(ops, base)
}

fn cycle(
    cfg: &LoopConfig,
    reg: &Registry,
    a: &AgentConfig,
    force: bool,
    progress: bool,
    train: &TrainOn,
    base: &mut Option<SharedBase>,
) -> Result<CycleOutcome> {
    let skip = |why: String| CycleOutcome {
        agent: a.name.clone(),
        action: why,
        version: None,
        gate: None,
        task: None,
        regression: None,
    };
    let state = load_state(cfg, &a.name)?;
    let files = feedback_files(&a.feedback_dir)?;
    let new: Vec<&String> =
        files.iter().filter(|(n, (_, h))| state.seen.get(*n) != Some(h)).map(|(n, _)| n).collect();
    if new.is_empty() {
        return Ok(skip("no new feedback: skipped".into()));
    }
    let since = now_unix().saturating_sub(state.last_cycle_unix) as f64 / 3600.0;
    if !force && state.last_cycle_unix > 0 && since < a.cadence_hours {
        return Ok(skip(format!(
            "new feedback, but cadence is {}h ({since:.1}h since the last cycle)",
            a.cadence_hours
        )));
    }

    // The cycle's plan (its inputs and the version in service it starts from) is fixed
    // before anything happens, so a cycle killed after promoting its version resumes
    // as the same cycle instead of starting from that version.
    let seen: BTreeMap<String, String> = files.iter().map(|(n, (_, h))| (n.clone(), h.clone())).collect();
    let known = reg.agents()?.contains(&a.name);
    // kept after the cycle too: loop_state.json is what says a cycle is done
    let pending_path = cfg.work_dir.join(&a.name).join("cycle_plan.json");
    let pending: Option<Plan> =
        std::fs::read_to_string(&pending_path).ok().and_then(|t| serde_json::from_str(&t).ok());
    let plan = match pending {
        Some(p) if p.seen == seen => p,
        _ => {
            let production =
                if known { reg.aliases(&a.name)?.get("production").map(|p| p.version.clone()) } else { None };
            let parent = match a.start_from {
                StartFrom::Production => production.clone(),
                StartFrom::Fresh => None,
            };
            let ident: String = seen.iter().map(|(n, h)| format!("{n}={h};")).collect::<String>()
                + &format!("from={parent:?}");
            let plan =
                Plan { seen, production, parent, cycle_id: sha256_hex(ident.as_bytes())[..12].to_string() };
            crate::util::atomic_write(&pending_path, &serde_json::to_vec_pretty(&plan)?)?;
            plan
        }
    };
    let Plan { seen, production, parent, cycle_id } = plan;
    let run_dir = cfg.work_dir.join(&a.name).join(&cycle_id);

    // fine-tune (resuming a killed cycle)
    let mut overrides: Vec<(String, String)> = vec![
        ("model.path".into(), cfg.base_model.display().to_string()),
        ("output_dir".into(), run_dir.display().to_string()),
        (
            "data.train".into(),
            format!(
                "[{}]",
                files.values().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        ),
    ];
    if let Some(v) = &parent {
        overrides.push(("peft.init_from".into(), reg.resolve(&a.name, v)?.display().to_string()));
    }
    let recipe = Recipe::load(&a.recipe, &overrides)?;
    ensure!(
        !recipe.peft.full,
        "{}: peft.full is true, but the loop versions, gates and promotes LoRA adapters on the shared \
         base model; give the agent a LoRA recipe (peft.full: false), or run full fine-tuning with \
         `tuneloop finetune`",
        a.recipe.display()
    );
    let done = run_dir.join("adapter").join("adapter_model.safetensors").exists()
        && run_dir.join("loss.png").exists();
    let resume = !crate::train::checkpoint::list(&run_dir.join("checkpoints"))?.is_empty();

    // gate: against production (or the base), on the task set and the regression set
    let task =
        if a.eval.task.is_empty() { vec![run_dir.join("validation.jsonl")] } else { a.eval.task.clone() };
    let mut opts = EvalOptions { turns: a.eval.turns.unwrap_or(Turns::Last), ..Default::default() };
    if let Some(n) = a.eval.max_new_tokens {
        opts.max_new_tokens = n;
    }
    let current = production.as_ref().map(|v| reg.resolve(&a.name, v)).transpose()?;
    let candidate = run_dir.join("adapter");
    let gate_inputs = GateInputs {
        model_dir: &cfg.base_model,
        candidate: &candidate,
        current: current.as_deref(),
        task: &task,
        regression: &a.eval.regression,
        cfg: &a.gate,
        opts: &opts,
    };
    let report = match train {
        TrainOn::InProcess => {
            let shared = SharedBase::for_recipe(base, &cfg.base_model, &recipe)?;
            match &mut shared.loaded {
                LoadedBase::Cpu(ops, m) => {
                    train_and_gate(ops, m, &recipe, done, resume, progress, &gate_inputs)
                }
                LoadedBase::Cuda(ops, m) => {
                    train_and_gate(ops.as_ref(), m, &recipe, done, resume, progress, &gate_inputs)
                }
            }?
        }
        TrainOn::Workers { exe, nproc_per_node } => {
            if !done {
                let mut argv: Vec<OsString> = vec!["finetune".into(), "-c".into(), a.recipe.clone().into()];
                if resume {
                    argv.push("--resume".into());
                }
                argv.extend(overrides.iter().map(|(k, v)| OsString::from(format!("--{k}={v}"))));
                let args = LaunchArgs {
                    nproc_per_node: *nproc_per_node,
                    nnodes: 1,
                    node_rank: 0,
                    master_addr: None,
                    master_port: None,
                };
                run_workers(&args, exe, &argv, Output::Stderr)
                    .with_context(|| format!("fine-tuning {}", run_dir.display()))?;
            }
            // The base is loaded for the gate alone and freed after it: kept, it would
            // hold memory on a GPU that the next agent's workers train on.
            let backend = crate::train::finetune::backend(&recipe, 0)?;
            crate::with_backend!(&backend, |ops| gate_inputs.run(ops))?
        }
    };
    report.write(&run_dir)?;

    // register (once per set of inputs) and promote
    let mut nv = NewVersion::from_run(&run_dir, Some(&cfg.base_model))?;
    nv.parent = parent.clone();
    let versions = if known { reg.versions(&a.name)? } else { Vec::new() };
    let existing = versions.into_iter().find(|v| {
        v.lineage.data_manifest == nv.data_manifest
            && v.lineage.recipe == nv.recipe
            && v.lineage.parent == nv.parent
    });
    let version = match existing {
        Some(v) => v.version,
        None => reg.register(&a.name, nv)?,
    };
    let why = report.reasons.join("; ");
    // a rerun of a cycle that already promoted its version changes nothing
    let serving = reg.aliases(&a.name)?.get("production").map(|p| p.version.clone());
    let action = if report.passed && serving.as_deref() == Some(version.as_str()) {
        format!("{version} is in production already (this cycle promoted it)")
    } else if report.passed {
        match a.promote {
            Promote::Production => {
                reg.promote(&a.name, &version, "tuneloop loop", &format!("gate passed: {why}"))?;
                format!("trained {version}, gate passed: promoted to production")
            }
            Promote::Canary => {
                reg.canary(
                    &a.name,
                    &version,
                    a.canary_weight,
                    "tuneloop loop",
                    &format!("gate passed: {why}"),
                )?;
                format!("trained {version}, gate passed: canary at {}%", a.canary_weight)
            }
        }
    } else {
        format!("trained {version}, gate failed: kept {}", production.as_deref().unwrap_or("the base model"))
    };
    let new_state = LoopState { seen, last_cycle_unix: now_unix(), last_version: Some(version.clone()) };
    crate::util::atomic_write(&state_path(cfg, &a.name), &serde_json::to_vec_pretty(&new_state)?)?;
    Ok(CycleOutcome {
        agent: a.name.clone(),
        action,
        version: Some(version),
        gate: Some(report.passed),
        task: Some(fmt_cmp(&report.task)),
        regression: Some(fmt_cmp(&report.regression)),
    })
}

/// The summary table `tuneloop loop` prints.
pub fn summary_table(rows: &[CycleOutcome]) -> String {
    let mut s = String::from(
        "| agent | version | gate | task | regression | action |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let gate = r.gate.map_or("-", |g| if g { "pass" } else { "fail" });
        let _ = writeln!(
            s,
            "| {} | {} | {gate} | {} | {} | {} |",
            r.agent,
            r.version.as_deref().unwrap_or("-"),
            r.task.as_deref().unwrap_or("-"),
            r.regression.as_deref().unwrap_or("-"),
            r.action
        );
    }
    s
}
