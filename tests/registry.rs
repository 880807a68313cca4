//! The adapter registry: registration and lineage, promote / canary / rollback and
//! their history, concurrent writers (threads and processes), recovery from writers
//! killed mid-write, and diffs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tuneloop::model::lora::peft_name;
use tuneloop::model::safetensors_io::write_f32;
use tuneloop::model::{LoraConfig, Proj};
use tuneloop::registry::{cli, Action, Alias, HistoryEntry, NewVersion, Registry, WriterLock};

const AGENT: &str = "order-help";
/// Set in a child copy of this test binary to make `child_process_entry` do its work.
const CHILD_ENV: &str = "TUNELOOP_REGISTRY_TEST_CHILD";

/// A stand-in base model: what lineage hashes (config.json, tensor layout, tokenizer).
fn make_base_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llama", "hidden_size": 8}"#).unwrap();
    let mut t = BTreeMap::new();
    t.insert("model.embed_tokens.weight".to_string(), (vec![16, 8], vec![0.5f32; 128]));
    t.insert("model.norm.weight".to_string(), (vec![8], vec![1.0f32; 8]));
    write_f32(&dir.join("model.safetensors"), &t, None).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"chat_template": "{{ messages }}"}"#).unwrap();
}

/// A PEFT adapter directory with LoRA on q/v of one layer; `seed` sets the values.
fn make_adapter(dir: &Path, seed: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = LoraConfig::new(4, 8.0, vec![Proj::Q, Proj::V]);
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec_pretty(&cfg.to_json()).unwrap())
        .unwrap();
    let mut t = BTreeMap::new();
    for (k, p) in [Proj::Q, Proj::V].into_iter().enumerate() {
        let val = |i: usize| ((i * 7 + k * 3 + seed as usize * 11) % 17) as f32 / 17.0 - 0.5;
        t.insert(peft_name(0, p, 'A'), (vec![4, 8], (0..32).map(val).collect()));
        t.insert(peft_name(0, p, 'B'), (vec![8, 4], (0..32).map(|i| val(i + 5) * seed as f32).collect()));
    }
    write_f32(&dir.join("adapter_model.safetensors"), &t, None).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"chat_template": "{{ messages }}"}"#).unwrap();
}

/// What `tuneloop finetune` leaves in its output dir, in miniature.
fn make_run(dir: &Path, base: &Path, seed: u32, lr: &str, train: &[&str]) {
    make_adapter(&dir.join("adapter"), seed);
    let recipe = format!(
        "model:\n  path: {}\n  dtype: f32\npeft:\n  r: 4\n  alpha: 8.0\n  target_modules:\n  - q_proj\n  - v_proj\n\
         optimizer:\n  lr: {lr}\n  weight_decay: 0.0\nseed: {seed}\n",
        base.display()
    );
    std::fs::write(dir.join("recipe.yaml"), recipe).unwrap();
    let manifest = serde_json::json!({
        "train_files": ["feedback.jsonl"],
        "summary": {"kept": train.len(), "dropped": {"low_rating": 2}},
        "train": train,
        "validation": ["vhash1"],
    });
    std::fs::write(dir.join("data_manifest.json"), serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let metrics = format!(
        "{{\"step\":0,\"val_loss\":6.5}}\n{{\"step\":1,\"loss\":6.0}}\n{{\"step\":2,\"loss\":{}}}\n\
         {{\"step\":2,\"val_loss\":{},\"val_token_accuracy\":0.5}}\n{{\"step\":3,\"lo",
        5.0 - seed as f64 * 0.1,
        5.5 - seed as f64 * 0.1
    );
    std::fs::write(dir.join("metrics.jsonl"), metrics).unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
    runs: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let (root, base, runs) =
            (tmp.path().join("registry"), tmp.path().join("base"), tmp.path().join("runs"));
        make_base_model(&base);
        Self { _tmp: tmp, root, base, runs }
    }

    fn reg(&self) -> Registry {
        Registry::open(&self.root).unwrap()
    }

    /// Registers a fresh run trained with `seed` and learning rate `lr`.
    fn register(&self, seed: u32, lr: &str, parent: Option<&str>) -> String {
        let run = self.runs.join(format!("run{seed}"));
        make_run(&run, &self.base, seed, lr, &["h1", "h2", &format!("h{}", seed + 10)]);
        let mut nv = NewVersion::from_run(&run, None).unwrap();
        nv.parent = parent.map(str::to_string);
        nv.created_by = "tester".into();
        self.reg().register(AGENT, nv).unwrap()
    }
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn register_list_show() {
    let fx = Fixture::new();
    let reg = fx.reg();
    assert!(reg.agents().unwrap().is_empty());
    assert!(!fx.root.exists(), "opening for a read creates nothing");

    assert_eq!(fx.register(1, "0.0002", None), "v1");
    assert_eq!(fx.register(2, "0.0001", Some("v1")), "v2");
    assert_eq!(reg.agents().unwrap(), [AGENT]);

    let versions = reg.versions(AGENT).unwrap();
    assert_eq!(versions.iter().map(|v| v.version.as_str()).collect::<Vec<_>>(), ["v1", "v2"]);
    let v2 = reg.version(AGENT, "v2").unwrap();
    let l = &v2.lineage;
    assert_eq!((l.agent.as_str(), l.version.as_str(), l.parent.as_deref()), (AGENT, "v2", Some("v1")));
    assert_eq!(l.created_by, "tester");
    assert_eq!(l.created_at.len(), 20, "{}", l.created_at);
    assert!(l.created_at.ends_with('Z') && l.created_at.as_bytes()[10] == b'T');
    // base model identity: config hash is sha256 of the file's bytes
    let cfg_bytes = std::fs::read(fx.base.join("config.json")).unwrap();
    assert_eq!(l.base_model.config_sha256, tuneloop::registry::sha256_hex(&cfg_bytes));
    assert_eq!(l.base_model.weights_hashed_from, "tensor-list");
    assert_eq!(l.base_model.weights_sha256.len(), 64);
    assert!(l.tokenizer_sha256.is_some());
    assert!(l.recipe.as_deref().unwrap().contains("lr: 0.0001"));
    assert_eq!(l.data_manifest.as_ref().unwrap()["train"].as_array().unwrap().len(), 3);
    // metrics summary; the torn last metrics line is skipped
    assert_eq!(l.metrics["steps"], 2.0);
    assert!((l.metrics["final_loss"] - 4.8).abs() < 1e-12);
    assert!((l.metrics["best_val_loss"] - 5.3).abs() < 1e-12);
    assert_eq!(l.metrics["final_val_token_accuracy"], 0.5);
    // the adapter was copied in, tokenizer files included, and hashed
    let src = fx.runs.join("run2/adapter");
    assert_eq!(adapter_bytes(&v2.adapter_dir), adapter_bytes(&src));
    assert!(v2.adapter_dir.join("tokenizer_config.json").is_file());
    assert_eq!(
        l.adapter_files.keys().collect::<Vec<_>>(),
        ["adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"]
    );
    assert_eq!(reg.resolve(AGENT, "v1").unwrap(), fx.root.join(AGENT).join("versions/v1/adapter"));
    // lineage.json on disk is plain JSON any tool can read
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(v2.dir.join("lineage.json")).unwrap()).unwrap();
    assert_eq!(raw["parent"], "v1");
    assert!(raw["base_model"]["path"].as_str().unwrap().ends_with("base"));

    // rendering
    let list = cli::render_list(AGENT, &versions, &reg.aliases(AGENT).unwrap());
    assert!(list.contains("VERSION") && list.contains("v1") && list.contains("v2"), "{list}");
    let show = cli::render_show(&v2, &reg.aliases(AGENT).unwrap());
    for needle in ["parent", "v1", "tester", "adapter_model.safetensors", "best_val_loss", "lr: 0.0001"] {
        assert!(show.contains(needle), "{needle} missing from:\n{show}");
    }
    let agents = cli::render_agents(&[(AGENT.to_string(), 2, reg.aliases(AGENT).unwrap())]);
    assert!(agents.contains(AGENT), "{agents}");

    // clear errors
    assert!(err_text(reg.version(AGENT, "v7")).contains("no version v7 (latest: v2)"));
    assert!(err_text(reg.version(AGENT, "seven")).contains("not a version name"));
    assert!(err_text(reg.versions("nobody")).contains("no agent `nobody` (agents: order-help)"));
    assert!(err_text(reg.versions("../etc")).contains("not valid"));
    assert!(err_text(reg.resolve(AGENT, "production")).contains("no alias `production`"));
    let mut nv = NewVersion::from_run(&fx.runs.join("run1"), None).unwrap();
    nv.parent = Some("v9".into());
    assert!(err_text(reg.register(AGENT, nv.clone())).contains("parent v9"));
    nv.parent = None;
    assert!(err_text(reg.register("bad name", nv.clone())).contains("agent name"));
    let broken = fx.runs.join("broken");
    make_adapter(&broken, 3);
    let weights = broken.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    nv.adapter_dir = broken.clone();
    assert!(err_text(reg.register(AGENT, nv.clone())).contains("truncated or corrupt"));
    std::fs::remove_file(&weights).unwrap();
    assert!(err_text(reg.register(AGENT, nv)).contains("no adapter_model.safetensors"));
    assert!(err_text(NewVersion::from_run(&fx.runs.join("nothing"), None)).contains("no adapter/"));
    // failed registrations took no number and left nothing behind
    assert_eq!(reg.latest(AGENT).unwrap().as_deref(), Some("v2"));
    assert_eq!(std::fs::read_dir(fx.root.join(AGENT).join("versions")).unwrap().count(), 2);
}

/// Each history line as `alias: from -> to (weight)`, `-` for nothing.
fn history_moves(reg: &Registry) -> Vec<String> {
    let o = |x: Option<String>| x.unwrap_or_else(|| "-".into());
    reg.history(AGENT)
        .unwrap()
        .into_iter()
        .map(|e| {
            format!("{}: {} -> {} ({})", e.alias, o(e.from), o(e.to), o(e.weight.map(|w| w.to_string())))
        })
        .collect()
}

fn alias(v: &str, w: u32) -> Alias {
    Alias { version: v.into(), weight: Some(w) }
}

#[test]
fn promote_and_canary_weights_and_history() {
    let fx = Fixture::new();
    let reg = fx.reg();
    for s in 1..=3 {
        fx.register(s, "0.0002", None);
    }
    let a = reg.promote(AGENT, "v1", "alice", "first release").unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a["production"], alias("v1", 100));

    let a = reg.canary(AGENT, "v2", 10, "bob", "try v2").unwrap();
    assert_eq!((a["production"].clone(), a["canary"].clone()), (alias("v1", 90), alias("v2", 10)));
    assert_eq!(reg.aliases(AGENT).unwrap(), a);
    assert_eq!(reg.resolve(AGENT, "canary").unwrap(), reg.resolve(AGENT, "v2").unwrap());

    // promoting the canary's version ends the canary
    let a = reg.promote(AGENT, "v2", "bob", "v2 is better").unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a["production"], alias("v2", 100));

    // a canary of another version keeps its share through a promote
    reg.canary(AGENT, "v3", 25, "bob", "try v3").unwrap();
    let a = reg.promote(AGENT, "v1", "carol", "back to basics").unwrap();
    assert_eq!((a["production"].clone(), a["canary"].clone()), (alias("v1", 75), alias("v3", 25)));
    // removing the canary hands its share back
    let a = reg.remove_alias(AGENT, "canary", "carol", "v3 abandoned").unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a["production"], alias("v1", 100));

    // a plain alias without weight
    let a = reg.set_alias(AGENT, "staging", "v3", None, "dave", "for QA").unwrap();
    assert_eq!(a["staging"], Alias { version: "v3".into(), weight: None });
    // nothing changes, nothing is logged
    let before = reg.history(AGENT).unwrap().len();
    reg.promote(AGENT, "v1", "carol", "again").unwrap();
    assert_eq!(reg.history(AGENT).unwrap().len(), before);

    assert_eq!(
        history_moves(&reg),
        [
            "production: - -> v1 (100)",
            "canary: - -> v2 (10)",
            "production: v1 -> v1 (90)",
            "production: v1 -> v2 (100)",
            "canary: v2 -> - (-)",
            "canary: - -> v3 (25)",
            "production: v2 -> v2 (75)",
            "production: v2 -> v1 (75)",
            "canary: v3 -> - (-)",
            "production: v1 -> v1 (100)",
            "staging: - -> v3 (-)",
        ]
    );
    // the file itself: one JSON object per line with the documented keys
    let text = std::fs::read_to_string(fx.root.join(AGENT).join("history.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for k in ["time", "who", "alias", "from", "to", "weight", "why"] {
        assert!(first.get(k).is_some(), "history line lacks `{k}`: {first}");
    }
    assert_eq!((first["who"].as_str(), first["why"].as_str()), (Some("alice"), Some("first release")));
    let h = reg.history(AGENT).unwrap();
    assert_eq!(h[1].action, Action::Canary);
    assert_eq!(h[3].action, Action::Promote);
    // aliases.json is the documented map
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.root.join(AGENT).join("aliases.json")).unwrap()).unwrap();
    assert_eq!(raw["production"], serde_json::json!({"version": "v1", "weight": 100}));
    let table = cli::render_history(&h);
    assert!(table.contains("v1 -> v2") && table.contains("first release"), "{table}");
    assert!(cli::render_aliases(&reg.aliases(AGENT).unwrap()).contains("staging"));

    // refused moves
    assert!(err_text(reg.canary(AGENT, "v1", 10, "x", "")).contains("already production"));
    assert!(err_text(reg.canary(AGENT, "v2", 100, "x", "")).contains("1..=99"));
    assert!(err_text(reg.canary(AGENT, "v2", 0, "x", "")).contains("1..=99"));
    assert!(err_text(reg.promote(AGENT, "v9", "x", "")).contains("no version v9"));
    assert!(err_text(reg.set_alias(AGENT, "Prod", "v1", None, "x", "")).contains("alias `Prod`"));
    assert!(err_text(reg.set_alias(AGENT, "v2", "v1", None, "x", "")).contains("reads as a version"));
    assert!(err_text(reg.set_alias(AGENT, "ab", "v1", Some(101), "x", "")).contains("percentage"));
    assert!(err_text(reg.set_alias(AGENT, "canary", "v2", None, "x", "")).contains("needs a weight"));
    assert!(err_text(reg.remove_alias(AGENT, "production", "x", "")).contains("cannot be removed"));
    assert!(err_text(reg.promote("nobody", "v1", "x", "")).contains("no agent"));
}

#[test]
fn rollback_restores_the_previous_adapter_bytes() {
    let fx = Fixture::new();
    let reg = fx.reg();
    for s in 1..=3 {
        fx.register(s, "0.0002", None);
    }
    assert!(err_text(reg.rollback(AGENT, "x", "")).contains("no production version"));
    reg.promote(AGENT, "v1", "ops", "release").unwrap();
    assert!(err_text(reg.rollback(AGENT, "ops", "")).contains("nothing to roll back to"));

    let v1_bytes = adapter_bytes(&reg.resolve(AGENT, "v1").unwrap());
    let v2_bytes = adapter_bytes(&reg.resolve(AGENT, "v2").unwrap());
    assert_ne!(v1_bytes, v2_bytes);
    reg.promote(AGENT, "v2", "ops", "release v2").unwrap();
    assert_eq!(adapter_bytes(&reg.resolve(AGENT, "production").unwrap()), v2_bytes);
    assert_eq!(reg.rollback(AGENT, "ops", "v2 regressed").unwrap(), "v1");
    let prod = reg.resolve(AGENT, "production").unwrap();
    assert_eq!(adapter_bytes(&prod), v1_bytes, "rollback must serve v1's exact bytes");
    assert_eq!(prod, reg.resolve(AGENT, "v1").unwrap());
    let last = reg.history(AGENT).unwrap().pop().unwrap();
    assert_eq!(
        (last.from.as_deref(), last.to.as_deref(), last.action),
        (Some("v2"), Some("v1"), Action::Rollback)
    );
    assert_eq!(last.why, "v2 regressed");
    // a second rollback does not flip back to the version just rolled back from
    assert!(err_text(reg.rollback(AGENT, "ops", "")).contains("nothing to roll back to"));

    // rollbacks stack: v1 -> v2 -> v3, back to v2, back to v1
    reg.promote(AGENT, "v2", "ops", "").unwrap();
    reg.promote(AGENT, "v3", "ops", "").unwrap();
    assert_eq!(reg.rollback(AGENT, "ops", "").unwrap(), "v2");
    assert_eq!(reg.rollback(AGENT, "ops", "").unwrap(), "v1");
    // an explicit target
    assert_eq!(reg.rollback_to(AGENT, "v3", "ops", "hotfix").unwrap(), "v3");
    assert!(err_text(reg.rollback_to(AGENT, "v3", "ops", "")).contains("already production"));
    // rolling back onto the canary's version ends the canary
    reg.promote(AGENT, "v1", "ops", "").unwrap();
    reg.canary(AGENT, "v2", 30, "ops", "").unwrap();
    assert_eq!(reg.aliases(AGENT).unwrap()["production"], alias("v1", 70));
    assert_eq!(reg.rollback(AGENT, "ops", "").unwrap(), "v3");
    assert_eq!(reg.aliases(AGENT).unwrap()["production"], alias("v3", 70));
    assert_eq!(reg.rollback_to(AGENT, "v2", "ops", "").unwrap(), "v2");
    let a = reg.aliases(AGENT).unwrap();
    assert_eq!((a.len(), a["production"].clone()), (1, alias("v2", 100)));
}

/// What a concurrent writer does: register `n` versions; promote the first, send the
/// others alternately to canary and to the writer's own alias. Returns the versions.
fn writer_routine(root: &Path, base: &Path, scratch: &Path, id: &str, n: usize) -> Vec<String> {
    let reg = Registry::open(root).unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let adapter = scratch.join(format!("{id}-{i}"));
        make_adapter(&adapter, (i + 1) as u32);
        let mut nv = NewVersion::new(&adapter, base).unwrap();
        nv.created_by = id.to_string();
        let v = reg.register(AGENT, nv).unwrap();
        let why = format!("{id}-{i}");
        match i % 3 {
            0 => {
                reg.promote(AGENT, &v, id, &why).unwrap();
            }
            1 => {
                reg.canary(AGENT, &v, 20, id, &why).unwrap();
            }
            _ => {
                reg.set_alias(AGENT, &format!("w-{id}"), &v, None, id, &why).unwrap();
            }
        }
        out.push(v);
    }
    out
}

/// Runs inside a child copy of this test binary (see `spawn_child`); a no-op otherwise.
#[test]
fn child_process_entry() {
    let Ok(mode) = std::env::var(CHILD_ENV) else { return };
    let var = |k: &str| PathBuf::from(std::env::var(k).unwrap());
    match mode.as_str() {
        "writer" => {
            let id = std::env::var("CHILD_ID").unwrap();
            let n: usize = std::env::var("CHILD_N").unwrap().parse().unwrap();
            for v in writer_routine(&var("CHILD_ROOT"), &var("CHILD_BASE"), &var("CHILD_SCRATCH"), &id, n) {
                println!("REGISTERED {v}");
            }
        }
        "hold-lock" => {
            let _lock = WriterLock::acquire(&var("CHILD_LOCK")).unwrap();
            println!("LOCKED");
            std::thread::sleep(Duration::from_secs(120));
        }
        other => panic!("unknown child mode {other}"),
    }
}

fn spawn_child(mode: &str, env: &[(&str, String)]) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["child_process_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

#[test]
fn concurrent_writers_threads_and_processes() {
    let fx = Fixture::new();
    let scratch = fx.runs.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let (n_procs, n_threads, per_writer) = (3, 3, 4);

    let children: Vec<_> = (0..n_procs)
        .map(|p| {
            spawn_child(
                "writer",
                &[
                    ("CHILD_ID", format!("proc{p}")),
                    ("CHILD_N", per_writer.to_string()),
                    ("CHILD_ROOT", fx.root.display().to_string()),
                    ("CHILD_BASE", fx.base.display().to_string()),
                    ("CHILD_SCRATCH", scratch.display().to_string()),
                ],
            )
        })
        .collect();
    let threads: Vec<_> = (0..n_threads)
        .map(|t| {
            let (root, base, scratch) = (fx.root.clone(), fx.base.clone(), scratch.clone());
            std::thread::spawn(move || {
                writer_routine(&root, &base, &scratch, &format!("thread{t}"), per_writer)
            })
        })
        .collect();

    let mut by_writer: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (t, h) in threads.into_iter().enumerate() {
        by_writer.insert(format!("thread{t}"), h.join().unwrap());
    }
    for (p, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "child {p} failed");
        let text = String::from_utf8(out.stdout).unwrap();
        // the harness prints `test child_process_entry ... ` before the test's own output
        let vs: Vec<String> = text
            .lines()
            .filter_map(|l| l.split_once("REGISTERED ").map(|(_, v)| v.trim().to_string()))
            .collect();
        by_writer.insert(format!("proc{p}"), vs);
    }

    let total = (n_procs + n_threads) * per_writer;
    let all: Vec<&String> = by_writer.values().flatten().collect();
    assert_eq!(all.len(), total, "{by_writer:?}");
    let unique: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(unique.len(), total, "a version number was handed out twice: {by_writer:?}");

    let reg = fx.reg();
    let versions = reg.versions(AGENT).unwrap();
    assert_eq!(versions.iter().map(|v| v.number).collect::<Vec<_>>(), (1..=total as u32).collect::<Vec<_>>());
    for (writer, vs) in &by_writer {
        for v in vs {
            assert_eq!(&reg.version(AGENT, v).unwrap().lineage.created_by, writer, "{v}");
        }
    }
    // no temp dirs left: every entry of versions/ is a version
    assert_eq!(std::fs::read_dir(fx.root.join(AGENT).join("versions")).unwrap().count(), total);

    // every change is in the history, and aliases.json is what the history leads to
    let history = reg.history(AGENT).unwrap();
    let whys: BTreeSet<&str> = history.iter().map(|e| e.why.as_str()).collect();
    for writer in by_writer.keys() {
        for i in 0..per_writer {
            assert!(whys.contains(format!("{writer}-{i}").as_str()), "{writer}-{i} missing from the history");
        }
    }
    let mut replayed: BTreeMap<String, Alias> = BTreeMap::new();
    for e in &history {
        match &e.to {
            Some(v) => replayed.insert(e.alias.clone(), Alias { version: v.clone(), weight: e.weight }),
            None => replayed.remove(&e.alias),
        };
    }
    let aliases = reg.aliases(AGENT).unwrap();
    assert_eq!(aliases, replayed);
    for (writer, vs) in &by_writer {
        assert_eq!(aliases[&format!("w-{writer}")].version, vs[2], "{writer}");
    }
    let (p, c) = (&aliases["production"], &aliases["canary"]);
    assert_eq!(p.weight.unwrap() + c.weight.unwrap(), 100);
    // the history's `from` chain is unbroken: each change starts where the last left off
    let mut current: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    for e in &history {
        let prev = current.get(e.alias.as_str()).copied().flatten();
        assert_eq!(e.from.as_deref(), prev, "history line {e:?} does not follow the one before");
        current.insert(e.alias.as_str(), e.to.as_deref());
    }
}

#[test]
fn recovers_from_writers_killed_mid_write() {
    let fx = Fixture::new();
    let reg = fx.reg();
    fx.register(1, "0.0002", None);
    fx.register(2, "0.0002", None);
    reg.promote(AGENT, "v1", "ops", "release").unwrap();
    let agent_dir = fx.root.join(AGENT);

    // a writer killed while holding the lock: the OS releases it with the process
    let lock_path = agent_dir.join(".lock");
    let mut child = spawn_child("hold-lock", &[("CHILD_LOCK", lock_path.display().to_string())]);
    let t0 = Instant::now();
    while !WriterLock::is_held(&lock_path).unwrap() {
        assert!(t0.elapsed() < Duration::from_secs(60), "the child never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(lock_path.exists(), "the lock file is left behind, as after a crash");

    // ... after it had half-copied a version and half-written a history line
    let stale = agent_dir.join("versions/.tmp-v3-99999-1");
    std::fs::create_dir_all(stale.join("adapter")).unwrap();
    std::fs::write(stale.join("adapter/adapter_model.safetensors"), b"partial").unwrap();
    let history_path = agent_dir.join("history.jsonl");
    let mut text = std::fs::read_to_string(&history_path).unwrap();
    let committed = text.clone();
    text.push_str(
        r#"{"time":"2026-01-01T00:00:00Z","who":"ghost","alias":"production","from":"v1","to":"v2","wei"#,
    );
    std::fs::write(&history_path, &text).unwrap();

    // readers see a consistent registry meanwhile
    assert_eq!(reg.versions(AGENT).unwrap().len(), 2);
    assert_eq!(reg.history(AGENT).unwrap().len(), 1);
    assert_eq!(reg.resolve_version(AGENT, "production").unwrap(), "v1");

    // the next writer gets the lock at once, takes the next number, and tidies up
    let t0 = Instant::now();
    assert_eq!(fx.register(3, "0.0002", None), "v3");
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert!(!stale.exists(), "the stale temp dir is cleaned");
    assert_eq!(std::fs::read_to_string(&history_path).unwrap(), committed, "the torn line is cut off");
    reg.promote(AGENT, "v3", "ops", "after the crash").unwrap();
    let h = reg.history(AGENT).unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[1].to.as_deref(), Some("v3"));
    let raw = std::fs::read_to_string(&history_path).unwrap();
    assert!(raw.ends_with('\n') && raw.lines().all(|l| serde_json::from_str::<HistoryEntry>(l).is_ok()));

    // a writer killed between its history line and aliases.json: the next one rolls forward
    let mut text = std::fs::read_to_string(&history_path).unwrap();
    text.push_str(
        r#"{"time":"2026-01-01T00:00:00Z","who":"ghost","alias":"staging","from":null,"to":"v2","weight":null,"why":"qa"}"#,
    );
    text.push('\n');
    std::fs::write(&history_path, &text).unwrap();
    assert!(!reg.aliases(AGENT).unwrap().contains_key("staging"));
    reg.set_alias(AGENT, "nightly", "v1", None, "ops", "").unwrap();
    let a = reg.aliases(AGENT).unwrap();
    assert_eq!(a["staging"].version, "v2");
    assert_eq!(a["nightly"].version, "v1");
    assert_eq!(a["production"], alias("v3", 100));

    // a torn history line that is the whole file
    let other = "other-agent";
    let mut nv = NewVersion::from_run(&fx.runs.join("run1"), None).unwrap();
    nv.created_by = "t".into();
    reg.register(other, nv).unwrap();
    std::fs::write(fx.root.join(other).join("history.jsonl"), b"{\"time\":").unwrap();
    assert!(reg.history(other).unwrap().is_empty());
    reg.promote(other, "v1", "ops", "").unwrap();
    assert_eq!(reg.history(other).unwrap().len(), 1);

    // a corrupt line that is not the last is an error naming the line
    std::fs::write(&history_path, format!("not json\n{committed}")).unwrap();
    assert!(err_text(reg.history(AGENT)).contains("history.jsonl:1"));
}

#[test]
fn writers_killed_at_random_points_leave_only_complete_versions() {
    let fx = Fixture::new();
    let scratch = fx.runs.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let reg = fx.reg();
    let count = || reg.latest(AGENT).ok().flatten().map_or(0, |v| v[1..].parse::<u32>().unwrap());
    let mut by_victims = 0;
    for (round, delay_ms) in [60u64, 150, 250].into_iter().enumerate() {
        let at_spawn = count();
        let mut child = spawn_child(
            "writer",
            &[
                ("CHILD_ID", format!("victim{round}")),
                ("CHILD_N", "1000".to_string()),
                ("CHILD_ROOT", fx.root.display().to_string()),
                ("CHILD_BASE", fx.base.display().to_string()),
                ("CHILD_SCRATCH", scratch.display().to_string()),
            ],
        );
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL: no destructor, no cleanup
        child.wait().unwrap();

        // every vN there is complete: its lineage reads and its files match their hashes
        for v in reg.versions(AGENT).unwrap_or_default() {
            for (file, h) in &v.lineage.adapter_files {
                let bytes = std::fs::read(v.adapter_dir.join(file)).unwrap();
                assert_eq!(tuneloop::registry::sha256_hex(&bytes), h.sha256, "{} {file}", v.version);
            }
        }
        // and the next writer carries on: next number, no temp dirs, aliases consistent
        let before = count();
        by_victims += before - at_spawn;
        let v = fx.register(100 + round as u32, "0.0002", None);
        assert_eq!(v, format!("v{}", before + 1));
        reg.promote(AGENT, &v, "ops", "after a kill").unwrap();
        let versions_dir = fx.root.join(AGENT).join("versions");
        assert_eq!(std::fs::read_dir(&versions_dir).unwrap().count(), before as usize + 1);
        assert_eq!(reg.aliases(AGENT).unwrap()["production"].version, v);
        let raw = std::fs::read_to_string(fx.root.join(AGENT).join("history.jsonl")).unwrap();
        assert!(raw.lines().all(|l| serde_json::from_str::<HistoryEntry>(l).is_ok()));
    }
    assert!(by_victims > 0, "the killed writers never got to register anything; the test proved nothing");
}

#[test]
fn diff_names_changed_recipe_lines_metrics_data_and_tensors() {
    let fx = Fixture::new();
    let reg = fx.reg();
    fx.register(1, "0.0002", None);
    fx.register(2, "0.0001", Some("v1"));
    reg.promote(AGENT, "v1", "ops", "").unwrap();

    let text = reg.diff(AGENT, "production", "v2").unwrap();
    for needle in [
        "v1 -> v2",
        "- lr: 0.0002  [optimizer]",
        "+ lr: 0.0001  [optimizer]",
        "- seed: 1",
        "+ seed: 2",
        "final_loss",
        "train: 3 -> 3 examples, 1 added, 1 removed",
        "base model",
        "same (config",
        "max abs difference",
    ] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
    assert!(!text.contains("model:"), "unchanged recipe lines are not listed:\n{text}");
    let d = reg.diff_report(AGENT, "v1", "v2").unwrap();
    let (_, m) = d.max_abs_diff().unwrap();
    assert!(m > 0.0);
    assert!(!d.adapter_identical);
    assert_eq!(d.parents, (None, Some("v1".to_string())));

    // a version against itself
    let same = reg.diff(AGENT, "v1", "v1").unwrap();
    assert!(same.contains("unchanged") && same.contains("files identical"), "{same}");
    assert!(same.contains("all values equal"), "{same}");
    assert_eq!(reg.diff_report(AGENT, "v1", "v1").unwrap().max_abs_diff().unwrap().1, 0.0);
    assert!(err_text(reg.diff(AGENT, "v1", "v5")).contains("no version v5"));
}
