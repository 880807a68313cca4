//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A file or folder of the repository, by its path from the root.
pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn golden(case: &str) -> PathBuf {
    repo_file("tests/fixtures/hf-goldens").join(case)
}

pub const CASES: [&str; 3] = ["llama-gqa", "llama3-rope-tied", "qwen2-bias"];

/// Copies a golden case's model directory into a fresh temp dir (writable).
pub fn copy_model(case: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(golden(case).join("model")).expect("model dir") {
        let p = entry.expect("entry").path();
        std::fs::copy(&p, dir.path().join(p.file_name().expect("name"))).expect("copy");
        let mut perm = std::fs::metadata(dir.path().join(p.file_name().unwrap())).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(dir.path().join(p.file_name().unwrap()), perm).unwrap();
    }
    dir
}

/// The small training run the trainer tests share: 6 steps of 4 rows (2 per
/// micro-batch), validation every 3 and a checkpoint every 2 steps, dropout 0.1.
pub fn train_config(out: &Path) -> tuneloop::train::trainer::TrainConfig {
    tuneloop::train::trainer::TrainConfig {
        seq_len: 32,
        packing: true,
        global_batch: 4,
        local_batch: 2,
        max_steps: Some(6),
        epochs: None,
        val_every: Some(3),
        ckpt_every: Some(2),
        keep_last: 2,
        adamw: tuneloop::ops::AdamWParams {
            lr: 5e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        warmup_steps: 2,
        decay: tuneloop::train::schedule::Decay::Cosine,
        min_lr_ratio: 0.0,
        clip_grad_norm: Some(1.0),
        lora_dropout: 0.1,
        recompute: tuneloop::model::decoder::Recompute::Off,
        seed: 7,
        output_dir: out.to_path_buf(),
        stop_after: None,
        progress: false,
    }
}

/// The folder of the test suite's CUDA emulator (`tests/emu`: stand-ins for libcuda.so,
/// libcublasLt.so and libnccl.so that run the kernels on the CPU), when the build made
/// it (it does whenever it compiles the kernels) and it is still there (a test binary
/// copied to a GPU machine runs without it).
pub fn emulator_dir() -> Option<&'static str> {
    option_env!("TUNELOOP_EMU_LIB_DIR").filter(|d| Path::new(d).join("libcuda.so").is_file())
}

/// What a test that needs the CUDA emulator says when it is skipped.
pub fn skipped_without_emulator() {
    eprintln!("skipped: no CUDA emulator here (a build compiles it with the kernels, by nvcc)");
}

/// Points `cmd`'s library search at the CUDA emulator, so a CUDA backend it starts runs
/// on the CPU. `None` when this build has no emulator.
pub fn on_emulator(cmd: &mut std::process::Command) -> Option<&mut std::process::Command> {
    let dir = emulator_dir()?;
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{dir}:{old}"),
        _ => dir.to_string(),
    };
    // the activation arena's reused places filled with NaNs before each use, as the
    // emulator fills fresh allocations: a kernel that reads what it did not write shows
    Some(cmd.env("LD_LIBRARY_PATH", path).env("TUNELOOP_ARENA_POISON", "1"))
}

/// Runs `cmd` (already pointed at the emulator) and fails the test with its output
/// unless it succeeds; returns its stdout and stderr.
pub fn run_ok(cmd: &mut std::process::Command, what: &str) -> (String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// A port on loopback that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback").local_addr().expect("address").port()
}

/// The `tuneloop` binary, run from the repository root, with no launcher's variables
/// (torchrun's or Slurm's) inherited from the test's environment.
pub fn tuneloop_cmd() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tuneloop"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    for k in
        ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"]
    {
        c.env_remove(k);
    }
    c
}

/// `finetune -c configs/quickstart.yaml` of base model `base` into `out`, with `flags`
/// (before the recipe overrides, which take the rest of the line) and then `overrides`.
pub fn quickstart_finetune(base: &Path, out: &Path, flags: &[&str], overrides: &[String]) -> Vec<String> {
    let mut args: Vec<String> = ["finetune", "-c", "configs/quickstart.yaml"].map(String::from).to_vec();
    args.extend(flags.iter().map(|f| f.to_string()));
    args.push(format!("--model.path={}", base.display()));
    args.push(format!("--output_dir={}", out.display()));
    args.extend_from_slice(overrides);
    args
}

/// A tiny random base model with the quickstart's tokenizer, made by `init-model` in
/// `dir/base`.
pub fn base_model(dir: &Path) -> PathBuf {
    let base = dir.join("base");
    let out = tuneloop_cmd()
        .args(["init-model", "--tokenizer", "configs/quickstart/tokenizer", "--out"])
        .arg(&base)
        .output()
        .expect("tuneloop runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    base
}

/// Training steps the run in `run_dir` has logged so far: whole lines of metrics.jsonl
/// with a loss (the file may be read while a line is being written).
pub fn logged_steps(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join("metrics.jsonl")).map_or(0, |t| {
        t.split_inclusive('\n').filter(|l| l.ends_with('\n') && l.contains("\"loss\"")).count()
    })
}

/// Waits (two minutes at most) until the run in `run_dir` has logged `n` training steps.
pub fn wait_for_steps(run_dir: &Path, n: usize) {
    let t0 = std::time::Instant::now();
    while logged_steps(run_dir) < n {
        assert!(t0.elapsed() < std::time::Duration::from_secs(120), "no {n} steps logged after 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Sends signal `sig` to a running child process.
pub fn send_signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our running child's.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

/// The training losses of `run_dir/metrics.jsonl`, step by step.
pub fn train_losses(run_dir: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line")["loss"].as_f64())
        .collect()
}

/// Every value of the adapter a run wrote to `run_dir/adapter`, for base model `base`,
/// in the adapter's tensor order.
pub fn adapter_values(run_dir: &Path, base: &Path) -> Vec<f32> {
    use tuneloop::ops::Ops;
    let cpu = tuneloop::ops::cpu::CpuOps;
    let model = tuneloop::model::Model::load(&cpu, base).expect("base model");
    let adapter =
        tuneloop::model::Adapter::load(&cpu, &run_dir.join("adapter"), &model.cfg).expect("adapter");
    adapter.named().into_iter().flat_map(|(_, t)| cpu.download(t).expect("download")).collect()
}

/// A copy of the HF model directory `src` in `dst` with every weight stored in bf16
/// (rounded to nearest even), its config.json and tokenizer files as they are.
pub fn bf16_copy(src: &Path, dst: &Path) {
    use tuneloop::model::safetensors_io::{decode_f32, FloatDtype, TensorStore};
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && !path.to_string_lossy().contains("safetensors") {
            std::fs::copy(&path, dst.join(path.file_name().unwrap())).unwrap();
        }
    }
    let store = TensorStore::open_dir(src).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = store
        .names()
        .into_iter()
        .map(|name| {
            let w = store.get(name).unwrap();
            (name.to_string(), w.shape.clone(), FloatDtype::Bf16.encode(&decode_f32(&w).unwrap()))
        })
        .collect();
    let views = tensors.iter().map(|(n, shape, bytes)| {
        (
            n.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape.clone(), bytes).unwrap(),
        )
    });
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
}

/// The first `n` conversations of a bundled feedback log.
pub fn feedback_head(file: &str, n: usize) -> String {
    let text = std::fs::read_to_string(repo_file(file)).unwrap();
    text.lines().take(n).collect::<Vec<_>>().join("\n")
}

/// A `tuneloop loop` set up in `tmp`: a tiny random base model, the quickstart recipe cut
/// to 4 steps and then changed by `edit`, 60 conversations of feedback in an inbox, and
/// `loop.yaml` with one agent, `order-help`, whose gate passes whatever it measures.
/// Returns loop.yaml's path.
pub fn loop_setup(tmp: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let base = tmp.join("base");
    tuneloop::model::export::init_random_model(
        &tuneloop::ops::cpu::CpuOps,
        "tiny",
        &repo_file("configs/quickstart/tokenizer"),
        &base,
        0,
        0.08,
    )
    .unwrap();
    let recipe = std::fs::read_to_string(repo_file("configs/quickstart.yaml"))
        .unwrap()
        .replace("max_steps: 100", "max_steps: 4")
        .replace("val_every_steps: 10", "val_every_steps: 2")
        .replace("ckpt_every_steps: 20", "ckpt_every_steps: 2");
    std::fs::write(tmp.join("recipe.yaml"), edit(recipe)).unwrap();
    let inbox = tmp.join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let head = feedback_head("configs/quickstart/feedback.jsonl", 60);
    std::fs::write(inbox.join("day1.jsonl"), head).unwrap();
    let yaml = format!(
        "registry: {r}\nbase_model: {b}\nwork_dir: {w}\nagents:\n  - name: order-help\n    feedback_dir: {i}\n    recipe: {rc}\n    eval:\n      regression: [{reg}]\n      turns: last\n    gate:\n      task_metric: token_accuracy\n      margin: -1.0\n      regression_metric: loss\n      tolerance: 100.0\n",
        r = tmp.join("registry").display(),
        b = base.display(),
        w = tmp.join("work").display(),
        i = inbox.display(),
        rc = tmp.join("recipe.yaml").display(),
        reg = repo_file("configs/quickstart/regression.jsonl").display(),
    );
    std::fs::write(tmp.join("loop.yaml"), yaml).unwrap();
    tmp.join("loop.yaml")
}

/// A second agent on the same base, `returns`, in the loop.yaml of [`loop_setup`]: its
/// own feedback (40 conversations of the quickstart's second day), the first agent's
/// recipe and gate.
pub fn add_second_agent(tmp: &Path) {
    let inbox = tmp.join("inbox-returns");
    std::fs::create_dir_all(&inbox).unwrap();
    let day2 = feedback_head("configs/quickstart/feedback-day2.jsonl", 40);
    std::fs::write(inbox.join("day1.jsonl"), day2).unwrap();
    let yaml = std::fs::read_to_string(tmp.join("loop.yaml")).unwrap();
    let (_, first) = yaml.split_once("agents:\n").unwrap();
    let second = first.replacen("name: order-help", "name: returns", 1).replacen(
        &tmp.join("inbox").display().to_string(),
        &inbox.display().to_string(),
        1,
    );
    std::fs::write(tmp.join("loop.yaml"), format!("{yaml}{second}")).unwrap();
}

/// The bytes of the adapter that agent `agent`'s alias `alias` points to in `reg`.
pub fn promoted_adapter(reg: &tuneloop::registry::Registry, agent: &str, alias: &str) -> Vec<u8> {
    std::fs::read(reg.resolve(agent, alias).unwrap().join("adapter_model.safetensors")).unwrap()
}
