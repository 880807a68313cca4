//! A signal (Ctrl-C, `kill`, a scheduler's preemption) loses no work: `finetune` stops
//! after the step it is in with a checkpoint and exit status 130, and `--resume` then
//! gives the uninterrupted run's adapter bit for bit; under the launcher every worker
//! stops after the same step; a second signal ends the run at once.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{
    base_model, quickstart_finetune, send_signal as signal, train_losses, tuneloop_cmd, wait_for_steps,
};

const STEPS: usize = 40;

fn args(base: &Path, out: &Path, flags: &[&str]) -> Vec<String> {
    args_with(base, out, flags, 8)
}

/// With a global batch of `global` sequences (4 a micro-batch).
fn args_with(base: &Path, out: &Path, flags: &[&str], global: usize) -> Vec<String> {
    let overrides = [
        format!("--step_scheduler.max_steps={STEPS}"),
        format!("--step_scheduler.global_batch_size={global}"),
        "--step_scheduler.val_every_steps=1000".into(),
        "--step_scheduler.ckpt_every_steps=1000".into(),
        "--backend=cpu".into(),
    ];
    quickstart_finetune(base, out, flags, &overrides)
}

fn start(base: &Path, out: &Path, flags: &[&str]) -> Child {
    start_with(base, out, flags, 8)
}

fn start_with(base: &Path, out: &Path, flags: &[&str], global: usize) -> Child {
    tuneloop_cmd()
        .args(args_with(base, out, flags, global))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn checkpoint_steps(out: &Path) -> Vec<usize> {
    tuneloop::train::checkpoint::list(&out.join("checkpoints")).unwrap().into_iter().map(|(s, _)| s).collect()
}

fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn a_signal_stops_after_the_step_with_a_checkpoint_and_resume_finishes_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let plain = tmp.path().join("plain");
    let out = tuneloop_cmd().args(args(&base, &plain, &[])).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let run = tmp.path().join("run");
    let child = start(&base, &run, &[]);
    wait_for_steps(&run, 2);
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("signal: stopping after the current training step"), "{err}");
    assert!(err.contains("interrupted: stopped by a signal after step") && err.contains("--resume"), "{err}");
    // the checkpoint is the last logged step's; nothing says the run is done
    let logged = train_losses(&run).len();
    assert!((2..STEPS).contains(&logged), "stopped after {logged} of {STEPS} steps");
    assert_eq!(checkpoint_steps(&run), vec![logged]);
    assert!(!run.join("adapter").exists() && !run.join("loss.png").exists());

    let out = tuneloop_cmd().args(args(&base, &run, &["--resume"])).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        adapter(&run),
        adapter(&plain),
        "the resumed run's adapter differs from the uninterrupted one's"
    );
    assert_eq!(train_losses(&run), train_losses(&plain));
}

#[test]
fn the_launcher_stops_its_workers_after_the_same_step() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let run = tmp.path().join("run");
    let child = start(&base, &run, &["--nproc-per-node", "2"]);
    wait_for_steps(&run, 2);
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("asking the workers to stop"), "{err}");
    assert!(err.contains("2 worker(s) stopped by a signal after the same step"), "{err}");
    let logged = train_losses(&run).len();
    assert!((2..STEPS).contains(&logged), "stopped after {logged} of {STEPS} steps");
    assert_eq!(checkpoint_steps(&run), vec![logged]);

    // one process takes it from there (another world size)
    let stop = (logged + 1).to_string();
    let out =
        tuneloop_cmd().args(args(&base, &run, &["--resume", "--stop-after-steps", &stop])).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(checkpoint_steps(&run), vec![logged, logged + 1]);
}

#[test]
fn a_second_signal_ends_the_run_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_model(tmp.path());
    let run = tmp.path().join("run");
    // steps of 16 micro-batches, so that both signals land in one (two signals sent at
    // once may arrive as one: they are 50 ms apart)
    let child = start_with(&base, &run, &[], 64);
    wait_for_steps(&run, 1);
    signal(&child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(50));
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    // gone in the step the signals came in: no checkpoint written, no adapter
    assert!(checkpoint_steps(&run).is_empty() && !run.join("adapter").exists());
}
