//! The `tuneloop` command line: parses, then calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{ensure, Context, Result};
use clap::{Parser, Subcommand};

use std::io::{IsTerminal, Write};

use tuneloop::model::{Adapter, Model};
use tuneloop::ops::backend::BackendKind;
use tuneloop::ops::cpu::CpuOps;
use tuneloop::ops::cuda::DType;

#[derive(Parser)]
#[command(
    name = "tuneloop",
    version,
    about = "Fine-tune, validate and promote LoRA adapters from an agent's feedback log"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a model runs.
#[derive(clap::Args, Debug, Clone, Copy)]
struct BackendArgs {
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,
    /// Storage type of activations and base weights on the CUDA backend (the CPU
    /// backend computes in f32).
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DType,
}

impl BackendArgs {
    fn open(self) -> Result<tuneloop::ops::backend::AnyBackend> {
        tuneloop::ops::backend::select_on(self.backend, self.dtype, 0, true)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Replay golden cases made with HF transformers + PEFT and compare every tensor.
    Parity {
        /// Case directories (`model/`, `adapter/`, `case.json`, `expected.safetensors`).
        #[arg(long = "case", num_args = 1.., required = true)]
        cases: Vec<PathBuf>,
        #[command(flatten)]
        backend: BackendArgs,
        /// Relative L2 tolerance for every float tensor (default 1e-4 in f32, which the
        /// CPU backend always computes in, 2e-2 in bf16, where the greedy decode is
        /// checked by teacher forcing).
        #[arg(long)]
        tol: Option<f64>,
    },
    /// Fine-tune a LoRA adapter (or, with `peft.full: true`, every weight) as a YAML
    /// recipe says. Any recipe key can be overridden after the options:
    /// `--section.key=value` or `--section.key value`.
    Finetune {
        /// The recipe (see configs/quickstart.yaml).
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
        /// Continue from the newest checkpoint in the recipe's output_dir.
        #[arg(long)]
        resume: bool,
        /// Print the resolved recipe (defaults and overrides applied) and exit.
        #[arg(long)]
        print_config: bool,
        /// Stop after this many steps (checkpointing), as if the run went on: `--resume`
        /// continues it exactly.
        #[arg(long)]
        stop_after_steps: Option<usize>,
        #[command(flatten)]
        launch: LaunchFlags,
        /// Recipe overrides, `--a.b=value` or `--a.b value`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0.., value_name = "--KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Evaluate a model (+ adapter) on conversation files: held-out loss, perplexity,
    /// token accuracy, and generation scored by exact match and tool-call accuracy.
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// JSONL conversation files.
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<PathBuf>,
        #[command(flatten)]
        gen: GenArgs,
        /// Also write the report (with every generated sample) as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        on: BackendArgs,
    },
    /// Decide whether a candidate adapter may replace the version in service: its task
    /// metric must beat the current version's by the margin, and its regression metric
    /// stay within the tolerance of the base model's. Exit status 0 = pass, 1 = fail.
    Gate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        candidate: PathBuf,
        /// The adapter in service (default: the base model alone).
        #[arg(long)]
        current: Option<PathBuf>,
        #[arg(long, num_args = 1.., required = true)]
        task: Vec<PathBuf>,
        #[arg(long, num_args = 1.., required = true)]
        regression: Vec<PathBuf>,
        #[arg(long, default_value = "token_accuracy")]
        task_metric: String,
        #[arg(long, default_value_t = 0.0)]
        margin: f64,
        #[arg(long, default_value = "loss")]
        regression_metric: String,
        #[arg(long, default_value_t = 0.05)]
        tolerance: f64,
        #[command(flatten)]
        gen: GenArgs,
        /// Where gate.json and gate.md go.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        on: BackendArgs,
    },
    /// One learning cycle for each agent with new feedback: fine-tune, eval, gate,
    /// register, promote or keep. Running it again with no new feedback does nothing.
    Loop {
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Ignore the agents' cadence.
        #[arg(long)]
        force: bool,
        /// Run each cycle's fine-tune data-parallel over N worker processes on this node
        /// (one per GPU), as `finetune --nproc-per-node N`; eval and gate stay on one.
        #[arg(long, value_name = "N")]
        nproc_per_node: Option<usize>,
    },
    /// The adapter registry: versions, aliases (production, canary, ...) and history.
    Registry {
        /// Registry root (default: $TUNELOOP_REGISTRY, else ./registry).
        #[arg(long, global = true)]
        root: Option<PathBuf>,
        #[command(subcommand)]
        command: RegistryCommand,
    },
    /// Look at training data as the model will see it.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Write a new HF model directory with random weights of a preset's shapes and the
    /// given tokenizer (a base for trying the pipeline without downloading a checkpoint).
    InitModel {
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// HF tokenizer folder (`tokenizer.json`, `tokenizer_config.json`).
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Standard deviation of the random embeddings (HF initialises at 0.02; larger
        /// lets an adapter on the frozen base make confident predictions).
        #[arg(long, default_value_t = 0.02)]
        embed_std: f32,
    },
    /// Time LoRA training steps (forward, loss, backward, AdamW; with --full, full
    /// fine-tuning ones) on random weights of a model's real shapes: tokens/s, model
    /// TFLOP/s, MFU, peak memory, time per op.
    Bench {
        /// tiny, smollm2-135m, qwen2.5-0.5b, llama3.2-1b, llama3.1-8b or qwen2.5-7b.
        #[arg(long, required_unless_present = "model", conflicts_with = "model")]
        preset: Option<String>,
        /// An HF model directory; only its config.json is read.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// LoRA rank on all seven projections (alpha = 2r).
        #[arg(long, default_value_t = 16)]
        lora_r: usize,
        /// LoRA dropout on the LoRA paths' inputs (PEFT's `lora_dropout`; 0: none).
        #[arg(long, default_value_t = 0.0)]
        lora_dropout: f32,
        /// Keep only each layer's input and recompute its activations in the backward;
        /// `--recompute K` does it in every K-th layer only (layers 0, K, 2K, ...).
        #[arg(long, value_name = "K", num_args = 0..=1, default_missing_value = "1")]
        recompute: Option<usize>,
        /// Pack the batch's tokens as one run of documents of random lengths up to --seq.
        #[arg(long)]
        packing: bool,
        /// Run each LoRA path as separate products instead of folded into the frozen
        /// one (what the fold gains, on a backend that folds: CUDA).
        #[arg(long)]
        lora_apart: bool,
        /// Full fine-tuning steps: every weight trained (f32 masters, bf16 copies on CUDA)
        /// and no adapter.
        #[arg(long, conflicts_with = "lora_apart")]
        full: bool,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Skip the extra profiled step (the time split per op).
        #[arg(long)]
        no_profile: bool,
        /// Size of the square GEMM the MFU is taken against (default 4096 on CUDA, 1024 on CPU).
        #[arg(long)]
        gemm_size: Option<usize>,
        #[command(flatten)]
        backend: BackendArgs,
        /// Print one JSON line instead of markdown tables.
        #[arg(long)]
        json: bool,
        /// Time each kernel on its own at these shapes (--steps calls each) against its
        /// floor, instead of whole training steps.
        #[arg(long)]
        kernels: bool,
    },
    /// Export a model with an adapter: `--merge` folds the LoRA weights into the base
    /// and writes a plain HF model directory (safetensors in the base's dtypes, its
    /// config, the tokenizer), one tensor in memory at a time.
    Export {
        /// Base model directory.
        #[arg(long)]
        model: PathBuf,
        /// PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Merge the adapter into the base weights (the only export so far).
        #[arg(long, required = true)]
        merge: bool,
    },
}

/// Generation settings shared by `eval` and `gate`.
#[derive(clap::Args, Clone, Debug)]
struct GenArgs {
    #[arg(long, default_value_t = 96)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = no top-k cut.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Conversations generated together through one KV cache.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Score the last assistant turn of each conversation, or every assistant turn.
    #[arg(long, value_enum, default_value = "last")]
    turns: tuneloop::eval::Turns,
}

impl GenArgs {
    fn options(&self, generate: bool) -> tuneloop::eval::EvalOptions {
        tuneloop::eval::EvalOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: tuneloop::model::generate::Sampling {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            batch_size: self.batch_size,
            turns: self.turns,
            generate,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Agents, or one agent's versions with their aliases.
    List { agent: Option<String> },
    /// A version's lineage: base model, data, recipe, metrics, gate report, files.
    Show { agent: String, version: String },
    /// Register a finetune output directory as the agent's next version.
    Register {
        agent: String,
        run_dir: PathBuf,
        #[arg(long)]
        base_model: Option<PathBuf>,
        #[arg(long)]
        parent: Option<String>,
    },
    /// Send all production traffic to a version.
    Promote {
        agent: String,
        version: String,
        #[arg(long, default_value = "")]
        why: String,
    },
    /// Send `--weight` percent of traffic to a version as the canary.
    Canary {
        agent: String,
        version: String,
        #[arg(long)]
        weight: u32,
        #[arg(long, default_value = "")]
        why: String,
    },
    /// Production goes back to the version it served before (or `--to` one).
    Rollback {
        agent: String,
        #[arg(long)]
        to: Option<String>,
        #[arg(long, default_value = "")]
        why: String,
    },
    /// Point an alias at a version (or `--remove` it).
    Alias {
        agent: String,
        alias: String,
        version: Option<String>,
        #[arg(long)]
        weight: Option<u32>,
        #[arg(long)]
        remove: bool,
        #[arg(long, default_value = "")]
        why: String,
    },
    /// Every alias change: who, when, from, to, why.
    History { agent: String },
    /// What differs between two versions (or aliases).
    Diff { agent: String, a: String, b: String },
    /// Print the adapter directory of a version or alias.
    Resolve { agent: String, version: String },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Print each conversation's `{"input_ids": [...], "labels": [...]}`, one JSON line
    /// per input line, rendered with the model's chat template (no truncation, no packing).
    Inspect {
        /// Model (or tokenizer) directory with `tokenizer.json` and the chat template.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// JSON lines output (the only format so far).
        #[arg(long, required = true)]
        json: bool,
    },
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Parity { cases, backend, tol } => {
            let ops = backend.open()?;
            let dtype = ops.dtype();
            let tol = tol.unwrap_or(if dtype == tuneloop::ops::cuda::DType::F32 { 1e-4 } else { 2e-2 });
            let greedy = tuneloop::parity::GreedyCheck::for_dtype(dtype);
            let (mut passed, mut failed) = (0, 0);
            for case in &cases {
                let report = tuneloop::with_backend!(&ops, |ops| tuneloop::parity::run_case_with(
                    ops, case, tol, greedy
                ))?;
                let body = report.render();
                // the per-case summary line is replaced by one total line at the end
                let body = body.rsplit_once('\n').map(|(b, _)| b).unwrap_or(&body);
                println!("{body}\n");
                failed += report.failed();
                passed += report.checks.len() - report.failed();
            }
            println!("parity: {passed} passed, {failed} failed");
            Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Finetune { config, resume, print_config, stop_after_steps, launch, overrides } => {
            let overrides = tuneloop::recipe::split_overrides(&overrides)?;
            let recipe = tuneloop::recipe::Recipe::load(&config, &overrides)?;
            if print_config {
                print!("{}", recipe.to_yaml());
                return Ok(ExitCode::SUCCESS);
            }
            // Ctrl-C or SIGTERM: stop after the step with a checkpoint (a second: at once)
            tuneloop::interrupt::install()?;
            if let Some(args) = launch.launcher() {
                let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
                tuneloop::dist::launch::launch(&args, &argv)?;
                return Ok(ExitCode::SUCCESS);
            }
            let env = tuneloop::dist::DistEnv::from_env()?;
            let progress = std::io::stderr().is_terminal();
            let r = tuneloop::train::finetune::finetune_distributed(
                &recipe,
                resume,
                stop_after_steps,
                progress,
                &env,
            )?;
            if !env.is_root() {
                return Ok(ExitCode::SUCCESS);
            }
            let vals = r.outcome.val_points();
            println!("trained {} steps on {} examples ({} held out)", r.outcome.steps, r.n_train, r.n_val);
            if let (Some(first), Some(last)) = (vals.first(), vals.last()) {
                println!("| held-out | step {} | step {} |", first.0, last.0);
                println!("| --- | --- | --- |");
                println!("| loss | {:.4} | {:.4} |", first.1, last.1);
                println!("| token accuracy | {:.3} | {:.3} |", first.2, last.2);
            }
            println!("{}: {}", if r.full { "model" } else { "adapter" }, r.trained_dir.display());
            println!("metrics: {}", r.output_dir.join("metrics.jsonl").display());
            println!("loss curve: {}", r.output_dir.join("loss.png").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval { model, adapter, data, gen, json, on } => {
            let chat = tuneloop::data::ChatModel::load(&model)?;
            let set = tuneloop::eval::load_set(&data)?;
            let backend = on.open()?;
            let report = tuneloop::with_backend!(&backend, |ops| {
                let mut base = Model::load(ops, &model)?;
                let lora = adapter.as_ref().map(|a| Adapter::load(ops, a, &base.cfg)).transpose()?;
                if let Some(a) = &lora {
                    base.reserve_lora_tails(ops, a)?;
                }
                tuneloop::eval::evaluate(ops, &base, lora.as_ref(), &chat, &set, &gen.options(true))?
            });
            println!("{}", report.table());
            if let Some(path) = json {
                tuneloop::util::atomic_write(&path, &serde_json::to_vec_pretty(&report)?)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Gate {
            model,
            candidate,
            current,
            task,
            regression,
            task_metric,
            margin,
            regression_metric,
            tolerance,
            gen,
            out,
            on,
        } => {
            let cfg = tuneloop::eval::gate::GateConfig { task_metric, margin, regression_metric, tolerance };
            let backend = on.open()?;
            let opts = gen.options(true);
            let inputs = tuneloop::eval::gate::GateInputs {
                model_dir: &model,
                candidate: &candidate,
                current: current.as_deref(),
                task: &task,
                regression: &regression,
                cfg: &cfg,
                opts: &opts,
            };
            let report = tuneloop::with_backend!(&backend, |ops| inputs.run(ops))?;
            report.write(&out)?;
            print!("{}", report.markdown());
            Ok(if report.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Loop { config, agent, force, nproc_per_node } => {
            let cfg = tuneloop::lifecycle::LoopConfig::load(&config)?;
            let env = tuneloop::dist::DistEnv::from_env()?;
            ensure!(
                env.world_size <= 1,
                "loop runs as one process, but this one is rank {} of {} (RANK/WORLD_SIZE or Slurm's \
                 variables): start it once, with --nproc-per-node N for a data-parallel fine-tune",
                env.rank,
                env.world_size
            );
            tuneloop::interrupt::install()?;
            let train = match nproc_per_node {
                None => tuneloop::lifecycle::TrainOn::InProcess,
                Some(n) => tuneloop::lifecycle::TrainOn::Workers {
                    exe: std::env::current_exe().context("finding the tuneloop executable")?,
                    nproc_per_node: n,
                },
            };
            let rows = tuneloop::lifecycle::run(
                &cfg,
                agent.as_deref(),
                force,
                std::io::stderr().is_terminal(),
                &train,
            )?;
            print!("{}", tuneloop::lifecycle::summary_table(&rows));
            Ok(ExitCode::SUCCESS)
        }
        Command::Registry { root, command } => {
            use tuneloop::registry::cli as render;
            let reg = tuneloop::registry::Registry::open(render::default_root(root))?;
            let who = tuneloop::registry::current_user();
            let out = match command {
                RegistryCommand::List { agent: None } => {
                    let mut rows = Vec::new();
                    for a in reg.agents()? {
                        rows.push((a.clone(), reg.versions(&a)?.len(), reg.aliases(&a)?));
                    }
                    render::render_agents(&rows)
                }
                RegistryCommand::List { agent: Some(a) } => {
                    render::render_list(&a, &reg.versions(&a)?, &reg.aliases(&a)?)
                }
                RegistryCommand::Show { agent, version } => {
                    let v = reg.version(&agent, &reg.resolve_version(&agent, &version)?)?;
                    render::render_show(&v, &reg.aliases(&agent)?)
                }
                RegistryCommand::Register { agent, run_dir, base_model, parent } => {
                    let mut nv = tuneloop::registry::NewVersion::from_run(&run_dir, base_model.as_deref())?;
                    nv.parent = parent;
                    format!("registered {agent} {}\n", reg.register(&agent, nv)?)
                }
                RegistryCommand::Promote { agent, version, why } => {
                    render::render_aliases(&reg.promote(&agent, &version, &who, &why)?)
                }
                RegistryCommand::Canary { agent, version, weight, why } => {
                    render::render_aliases(&reg.canary(&agent, &version, weight, &who, &why)?)
                }
                RegistryCommand::Rollback { agent, to, why } => {
                    let v = match to {
                        Some(v) => reg.rollback_to(&agent, &v, &who, &why)?,
                        None => reg.rollback(&agent, &who, &why)?,
                    };
                    format!("production is {v} again\n{}", render::render_aliases(&reg.aliases(&agent)?))
                }
                RegistryCommand::Alias { agent, alias, version, weight, remove, why } => {
                    match (version, remove) {
                        (_, true) => render::render_aliases(&reg.remove_alias(&agent, &alias, &who, &why)?),
                        (Some(v), false) => {
                            render::render_aliases(&reg.set_alias(&agent, &alias, &v, weight, &who, &why)?)
                        }
                        (None, false) => anyhow::bail!("registry alias: name a VERSION, or pass --remove"),
                    }
                }
                RegistryCommand::History { agent } => render::render_history(&reg.history(&agent)?),
                RegistryCommand::Diff { agent, a, b } => reg.diff(&agent, &a, &b)?,
                RegistryCommand::Resolve { agent, version } => {
                    format!("{}\n", reg.resolve(&agent, &version)?.display())
                }
            };
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Data { command: DataCommand::Inspect { model, data, json: _ } } => {
            // Buffered: on an error nothing is printed, so no partial output.
            let mut buf = Vec::new();
            tuneloop::data::inspect(&model, &data, &mut buf)?;
            std::io::stdout().write_all(&buf)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::InitModel { preset, tokenizer, out, seed, embed_std } => {
            tuneloop::model::export::init_random_model(&CpuOps, &preset, &tokenizer, &out, seed, embed_std)?;
            println!("wrote {} (preset {preset}, seed {seed})", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            preset,
            model,
            seq,
            batch,
            lora_r,
            lora_dropout,
            recompute,
            packing,
            lora_apart,
            full,
            warmup,
            steps,
            no_profile,
            gemm_size,
            backend,
            json,
            kernels,
        } => {
            use tuneloop::bench::{BenchOptions, ModelSource};
            let source = match (preset, model) {
                (_, Some(dir)) => ModelSource::Dir(dir),
                (Some(name), None) => ModelSource::Preset(name),
                (None, None) => anyhow::bail!("bench: give --preset NAME or --model DIR"),
            };
            let opts = BenchOptions {
                seq,
                batch,
                lora_r,
                lora_dropout,
                recompute: match recompute {
                    None => tuneloop::model::decoder::Recompute::Off,
                    Some(k) => tuneloop::model::decoder::Recompute::every(k)
                        .context("bench: --recompute K needs K >= 1 (every K-th layer)")?,
                },
                packing,
                lora_apart,
                full,
                warmup,
                steps,
                profile: !no_profile,
                gemm_size,
                ..BenchOptions::new(source)
            };
            // refuse what cannot run before opening a backend
            opts.check()?;
            let ops = backend.open()?;
            if kernels {
                let report =
                    tuneloop::with_backend!(&ops, |ops| tuneloop::bench::kernels::run_kernels(ops, &opts))?;
                if json {
                    println!("{}", report.json_line()?);
                } else {
                    print!("{}", report.markdown());
                }
                return Ok(ExitCode::SUCCESS);
            }
            let report = tuneloop::with_backend!(&ops, |ops| tuneloop::bench::run(ops, &opts))?;
            if json {
                println!("{}", report.json_line()?);
            } else {
                print!("{}", report.markdown());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { model, adapter, out, merge: _ } => {
            let r = tuneloop::model::export::merge_export(&model, &adapter, &out)?;
            println!(
                "wrote merged model {} ({} tensors, {} with the adapter folded in, {:.2} GiB in the base's dtypes)",
                out.display(),
                r.tensors,
                r.merged,
                tuneloop::util::gib(r.bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Data-parallel launch, as torchrun's flags.
#[derive(clap::Args, Debug)]
struct LaunchFlags {
    /// Start N worker processes on this node (one per GPU), data-parallel over NCCL (TCP
    /// on the CPU backend). Under torchrun or Slurm leave it out: their RANK/WORLD_SIZE/
    /// MASTER_ADDR/MASTER_PORT (or SLURM_PROCID/SLURM_NTASKS) are read instead.
    #[arg(long, value_name = "N")]
    nproc_per_node: Option<usize>,
    /// Nodes in the run (with --nproc-per-node).
    #[arg(long, default_value_t = 1, requires = "nproc_per_node")]
    nnodes: usize,
    /// This node's index, 0..nnodes.
    #[arg(long, default_value_t = 0, requires = "nproc_per_node")]
    node_rank: usize,
    /// Address of node 0, where rank 0 listens for the rendezvous (default 127.0.0.1
    /// on one node).
    #[arg(long, requires = "nproc_per_node")]
    master_addr: Option<String>,
    /// Port of the rendezvous (default: a free port on one node, 29500 across nodes).
    #[arg(long, requires = "nproc_per_node")]
    master_port: Option<u16>,
}

impl LaunchFlags {
    fn launcher(&self) -> Option<tuneloop::dist::launch::LaunchArgs> {
        Some(tuneloop::dist::launch::LaunchArgs {
            nproc_per_node: self.nproc_per_node?,
            nnodes: self.nnodes,
            node_rank: self.node_rank,
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
        })
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        // stopped by a signal with its work kept: 130, as a shell reports SIGINT
        Err(e) if e.downcast_ref::<tuneloop::interrupt::Interrupted>().is_some() => {
            eprintln!("{e:#}");
            ExitCode::from(tuneloop::interrupt::EXIT_STATUS)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
