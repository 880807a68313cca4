//! The `tuneloop` command line: parses, then calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use tuneloop::ops::cpu::CpuOps;

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

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    /// The f32 reference backend.
    Cpu,
    /// The fastest backend this build can run (the CPU backend in this build).
    Auto,
}

#[derive(Subcommand)]
enum Command {
    /// Replay golden cases made with HF transformers + PEFT and compare every tensor.
    Parity {
        /// Case directories (`model/`, `adapter/`, `case.json`, `expected.safetensors`).
        #[arg(long = "case", num_args = 1.., required = true)]
        cases: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "auto")]
        backend: Backend,
        /// Relative L2 tolerance for every float tensor.
        #[arg(long, default_value_t = 1e-4)]
        tol: f64,
    },
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Parity { cases, backend, tol } => {
            let ops = match backend {
                Backend::Cpu | Backend::Auto => CpuOps,
            };
            let (mut passed, mut failed) = (0, 0);
            for case in &cases {
                let report = tuneloop::parity::run_case(&ops, case, tol)?;
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
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
