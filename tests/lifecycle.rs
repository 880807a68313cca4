//! `tuneloop loop`: a cycle trains, gates, registers and promotes; running it again
//! with no new feedback does nothing; a cycle killed after registering reuses its
//! version instead of registering it twice; new feedback makes a second version whose
//! rollback restores the first adapter's bytes. With `--nproc-per-node`, the cycle's
//! fine-tune runs data-parallel over worker processes and gives one process's adapter.

mod common;

use std::path::{Path, PathBuf};

use common::{adapter_values, add_second_agent, feedback_head, promoted_adapter, tuneloop_cmd};
use tuneloop::lifecycle::{run as run_loop, LoopConfig, TrainOn};
use tuneloop::registry::Registry;
use tuneloop::util::rel_l2;

/// A cycle for every agent, its fine-tune in this process.
fn run(
    cfg: &LoopConfig,
    only: Option<&str>,
    force: bool,
    progress: bool,
) -> anyhow::Result<Vec<tuneloop::lifecycle::CycleOutcome>> {
    run_loop(cfg, only, force, progress, &TrainOn::InProcess)
}

fn setup(tmp: &Path) -> LoopConfig {
    LoopConfig::load(&common::loop_setup(tmp, |recipe| recipe)).unwrap()
}

/// The agent's cycle run directories so far (none before its first cycle starts).
fn cycle_dirs(cfg: &LoopConfig) -> Vec<PathBuf> {
    match cfg.work_dir.join("order-help").read_dir() {
        Ok(d) => d.map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn loop_is_idempotent_resumable_and_rolls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path());
    let rows = run(&cfg, None, false, false).unwrap();
    assert_eq!(rows[0].version.as_deref(), Some("v1"), "{rows:?}");
    assert_eq!(rows[0].gate, Some(true));
    let reg = Registry::open(&cfg.registry).unwrap();
    assert_eq!(reg.aliases("order-help").unwrap()["production"].version, "v1");
    let v1 = promoted_adapter(&reg, "order-help", "production");

    // no new feedback: nothing happens
    let rows = run(&cfg, None, false, false).unwrap();
    assert!(rows[0].version.is_none() && rows[0].action.contains("no new feedback"), "{rows:?}");
    assert_eq!(reg.versions("order-help").unwrap().len(), 1);

    // killed after registering, before it noted what it saw: the rerun reuses v1
    std::fs::remove_file(cfg.work_dir.join("order-help/loop_state.json")).unwrap();
    let rows = run(&cfg, None, false, false).unwrap();
    assert_eq!(rows[0].version.as_deref(), Some("v1"), "{rows:?}");
    assert_eq!(reg.versions("order-help").unwrap().len(), 1, "registered twice");

    // new feedback: v2 from v1, promoted; rollback restores v1's exact bytes
    let more = feedback_head("configs/quickstart/feedback-day2.jsonl", 30);
    std::fs::write(cfg.agents[0].feedback_dir.join("day2.jsonl"), more).unwrap();
    let rows = run(&cfg, None, false, false).unwrap();
    assert_eq!(rows[0].version.as_deref(), Some("v2"), "{rows:?}");
    let v2 = reg.version("order-help", "v2").unwrap();
    assert_eq!(v2.lineage.parent.as_deref(), Some("v1"));
    assert!(v2.lineage.gate_report.is_some());
    assert_ne!(promoted_adapter(&reg, "order-help", "production"), v1);
    reg.rollback("order-help", "test", "rollback").unwrap();
    assert_eq!(promoted_adapter(&reg, "order-help", "production"), v1);
}

#[test]
fn a_failing_gate_registers_but_keeps_production() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = setup(tmp.path());
    cfg.agents[0].gate.margin = 10.0; // no accuracy can beat the base by 10
    let rows = run(&cfg, None, false, false).unwrap();
    assert_eq!(rows[0].gate, Some(false), "{rows:?}");
    assert!(rows[0].action.contains("gate failed"));
    let reg = Registry::open(&cfg.registry).unwrap();
    assert_eq!(reg.versions("order-help").unwrap().len(), 1);
    assert!(!reg.aliases("order-help").unwrap().contains_key("production"));
}

#[test]
fn a_full_fine_tuning_recipe_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path());
    let recipe = tmp.path().join("recipe.yaml");
    let text = std::fs::read_to_string(&recipe).unwrap();
    assert!(text.contains("  full: false"));
    std::fs::write(&recipe, text.replace("  full: false", "  full: true")).unwrap();
    let e = format!("{:#}", run(&cfg, None, false, false).unwrap_err());
    assert!(e.contains("order-help") && e.contains("recipe.yaml") && e.contains("peft.full"), "{e}");
    // nothing was trained or registered
    let runs = cycle_dirs(&cfg);
    assert!(runs.iter().all(|r| !r.join("checkpoints").exists() && !r.join("model").exists()), "{runs:?}");
    assert!(Registry::open(&cfg.registry).unwrap().versions("order-help").map_or(true, |v| v.is_empty()));
}

#[test]
fn a_cycle_on_two_workers_trains_the_adapter_of_one_process() {
    let one = tempfile::tempdir().unwrap();
    let cfg = setup(one.path());
    let rows = run(&cfg, None, false, false).unwrap();
    assert_eq!(rows[0].version.as_deref(), Some("v1"), "{rows:?}");

    let two = tempfile::tempdir().unwrap();
    let cfg2 = setup(two.path());
    let out = tuneloop_cmd()
        .args(["loop", "--nproc-per-node", "2", "-c"])
        .arg(two.path().join("loop.yaml"))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("launching 2 worker(s)") && stderr.contains("all 2 ranks arrived"), "{stderr}");
    // standard output is the summary table alone: the workers' lines went to stderr
    assert!(stdout.starts_with("| agent |") && stdout.contains("| order-help | v1 | pass |"), "{stdout}");
    assert!(!stdout.contains("trained 4 steps") && stderr.contains("trained 4 steps"), "{stdout}");

    // the cycle's run directory: one per set of inputs
    let run_dir = |cfg: &LoopConfig| {
        let dirs = cycle_dirs(cfg);
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        dirs[0].clone()
    };
    let e = rel_l2(
        &adapter_values(&run_dir(&cfg2), &cfg2.base_model),
        &adapter_values(&run_dir(&cfg), &cfg.base_model),
    );
    assert!(e < 1e-4, "2 workers vs 1 process: adapters differ by {e:.2e}");
    let reg2 = Registry::open(&cfg2.registry).unwrap();
    assert_eq!(reg2.aliases("order-help").unwrap()["production"].version, "v1");
}

#[test]
fn loop_refuses_to_run_as_one_rank_of_many() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    let out = tuneloop_cmd()
        .args(["loop", "-c"])
        .arg(tmp.path().join("loop.yaml"))
        .envs([("RANK", "1"), ("WORLD_SIZE", "2")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("rank 1 of 2") && err.contains("--nproc-per-node"), "{err}");
    assert!(!tmp.path().join("work").exists(), "it started a cycle");
}

#[test]
fn an_interrupted_cycle_keeps_its_checkpoint_and_the_next_run_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path());
    let recipe = tmp.path().join("recipe.yaml");
    let text = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(&recipe, text.replace("max_steps: 4", "max_steps: 40")).unwrap();
    let child = tuneloop_cmd()
        .args(["loop", "-c"])
        .arg(tmp.path().join("loop.yaml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // the cycle's run directory, once its fine-tune has logged two steps
    let t0 = std::time::Instant::now();
    let run_dir = loop {
        if let Some(d) = cycle_dirs(&cfg).pop() {
            break d;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "no cycle after a minute");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    common::wait_for_steps(&run_dir, 2);
    common::send_signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted: stopped by a signal after step") && err.contains("order-help"),
        "{err}"
    );
    let stopped_at = common::train_losses(&run_dir).len();
    assert!(stopped_at < 40, "the cycle ran to its end");
    let reg = Registry::open(&cfg.registry).unwrap();
    assert!(reg.versions("order-help").map_or(true, |v| v.is_empty()), "an interrupted cycle registered");

    // the next run resumes the same cycle from its checkpoint and registers it
    let rows = run(&cfg, None, false, false).unwrap();
    assert_eq!(rows[0].version.as_deref(), Some("v1"), "{rows:?}");
    assert_eq!(common::train_losses(&run_dir).len(), 40, "the cycle's steps, each logged once");
}

/// The agents of one run share the base model: it is loaded once, and what each agent
/// trains and promotes is what it would be if it ran alone.
#[test]
fn agents_on_one_base_load_it_once_and_train_as_alone() {
    let both = tempfile::tempdir().unwrap();
    setup(both.path());
    add_second_agent(both.path());
    let out = tuneloop_cmd().args(["loop", "-c"]).arg(both.path().join("loop.yaml")).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("| order-help | v1 |") && stdout.contains("| returns | v1 |"), "{stdout}");
    assert_eq!(stderr.matches("loaded on cpu, kept for the agents after this one").count(), 1, "{stderr}");

    let alone = tempfile::tempdir().unwrap();
    setup(alone.path());
    add_second_agent(alone.path());
    let cfg = LoopConfig::load(&alone.path().join("loop.yaml")).unwrap();
    let rows = run(&cfg, Some("returns"), false, false).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].version.as_deref(), Some("v1"), "{rows:?}");

    let promoted = |tmp: &Path| {
        promoted_adapter(&Registry::open(tmp.join("registry")).unwrap(), "returns", "production")
    };
    assert_eq!(
        promoted(both.path()),
        promoted(alone.path()),
        "the second agent's adapter depends on the first"
    );
    let reg = Registry::open(both.path().join("registry")).unwrap();
    assert_ne!(
        promoted_adapter(&reg, "order-help", "production"),
        promoted(both.path()),
        "the two agents trained on different feedback"
    );
}
