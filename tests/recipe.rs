//! The recipe: the bundled quickstart, defaults, overrides, located errors, validation
//! and the `--print-config` round trip.

use std::path::{Path, PathBuf};

use tuneloop::ops::backend::BackendKind;
use tuneloop::ops::cuda::DType;
use tuneloop::recipe::{all_linear, split_overrides, DataFormat, Decay, Recipe, StepScheduler};

const MINIMAL: &str = "model:\n  path: models/tiny\ndata:\n  train: data/train.jsonl\noutput_dir: runs/x\n";

fn quickstart_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.yaml")
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The full error chain as the CLI prints it.
fn err_of(r: anyhow::Result<Recipe>) -> String {
    match r {
        Ok(recipe) => panic!("expected an error, got {recipe:?}"),
        Err(e) => format!("{e:#}"),
    }
}

fn minimal_with(overrides: &[(&str, &str)]) -> anyhow::Result<Recipe> {
    Recipe::parse(MINIMAL, "minimal.yaml", &pairs(overrides))
}

/// A recipe file on disk, so errors name a real file.
fn write_recipe(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("quickstart.yaml");
    std::fs::write(&path, text).expect("write recipe");
    (dir, path)
}

#[test]
fn quickstart_parses() {
    let r = Recipe::load(&quickstart_path(), &[]).expect("quickstart.yaml loads");
    assert_eq!(r.model.path, Path::new("target/quickstart/base-model"));
    assert_eq!(r.data.train, vec![PathBuf::from("configs/quickstart/feedback.jsonl")]);
    assert!(r.data.validation.is_empty());
    assert_eq!(r.data.val_fraction, 0.2);
    assert_eq!(r.data.seq_len, 256);
    assert!(r.data.packing);
    let s = &r.step_scheduler;
    assert_eq!((s.global_batch_size, s.local_batch_size, s.grad_accum_steps()), (8, 4, 2));
    assert_eq!((s.max_steps, s.num_epochs), (Some(100), None));
    assert_eq!((s.val_every_steps, s.ckpt_every_steps), (Some(10), Some(20)));
    assert_eq!(r.optimizer.lr, 8e-3);
    assert_eq!(r.lr_scheduler.warmup_steps, 5);
    assert_eq!(r.lr_scheduler.decay, Decay::Cosine);
    assert_eq!((r.peft.r, r.peft.alpha), (8, 16.0));
    assert_eq!(r.peft.target_modules, all_linear());
    assert_eq!(r.output_dir, Path::new("runs/quickstart"));
    assert_eq!(r.backend, BackendKind::Auto);
    assert_eq!(r.seed, 42);
    let lora = r.peft.lora_config().expect("lora config");
    assert_eq!(lora.target_modules.len(), 7);
    assert_eq!(lora.scale(), 2.0);
}

#[test]
fn defaults_fill_in() {
    let r = minimal_with(&[]).expect("minimal recipe");
    let want = Recipe {
        model: tuneloop::recipe::ModelSection { path: "models/tiny".into(), dtype: DType::Bf16 },
        data: tuneloop::recipe::DataSection { train: vec!["data/train.jsonl".into()], ..Default::default() },
        output_dir: "runs/x".into(),
        ..Default::default()
    };
    assert_eq!(r, want);
    // Spot-check the documented values, not just agreement with Default.
    assert_eq!(r.peft.r, 16);
    assert_eq!(r.peft.alpha, 32.0);
    assert_eq!(
        r.peft.target_modules,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    );
    assert_eq!(r.data.format, DataFormat::Auto);
    assert!(r.data.filters.drop_thumbs_down);
    assert_eq!(r.data.seq_len, 1024);
    assert_eq!(r.step_scheduler, StepScheduler::default());
    assert_eq!((r.step_scheduler.max_steps, r.step_scheduler.num_epochs), (None, Some(1)));
    assert_eq!(r.optimizer.betas, [0.9, 0.999]);
    assert_eq!(r.optimizer.lr, 2e-4);
    assert_eq!(r.clip_grad_norm, Some(1.0));
    assert_eq!(r.checkpoint.keep_last, 2);
    assert_eq!(r.backend, BackendKind::Auto);
}

#[test]
fn num_epochs_defaults_only_without_max_steps() {
    let r = minimal_with(&[("step_scheduler.max_steps", "20")]).expect("recipe");
    assert_eq!((r.step_scheduler.max_steps, r.step_scheduler.num_epochs), (Some(20), None));
    assert_eq!(r.step_scheduler.total_steps(1000), 20);
    let r = minimal_with(&[("step_scheduler.max_steps", "20"), ("step_scheduler.num_epochs", "2")])
        .expect("recipe");
    assert_eq!(r.step_scheduler.total_steps(5), 10, "whichever comes first");
}

#[test]
fn empty_sections_and_shapes() {
    let text = "model: {path: m}\npeft:\ndata:\n  train: [a.jsonl, b.jsonl]\n  validation: v.jsonl\n  \
                format: prompt_completion\noutput_dir: o\n";
    let r = Recipe::parse(text, "t.yaml", &[]).expect("recipe");
    assert_eq!(r.peft, Default::default());
    assert_eq!(r.data.train, [PathBuf::from("a.jsonl"), PathBuf::from("b.jsonl")]);
    assert_eq!(r.data.validation, [PathBuf::from("v.jsonl")]);
    assert_eq!(r.data.format, DataFormat::PromptCompletion);
    let r = Recipe::parse(
        "",
        "empty.yaml",
        &pairs(&[("model.path", "m"), ("data.train", "t"), ("output_dir", "o")]),
    )
    .expect("an empty file with the required keys as overrides");
    assert_eq!(r.model.path, Path::new("m"));
}

#[test]
fn overrides_in_both_forms_change_fields() {
    let cli = args(&[
        "--peft.r=8",
        "--step_scheduler.max_steps",
        "20",
        "--peft.target_modules=[q_proj,v_proj]",
        "--clip_grad_norm=null",
        "--optimizer.lr",
        "1e-3",
        "--model.dtype=f32",
        "--lr_scheduler.decay",
        "linear",
        "--data.filters.min_rating=3.5",
        "--backend=cpu",
    ]);
    let overrides = split_overrides(&cli).expect("well-formed");
    let (_dir, path) = write_recipe(MINIMAL);
    let r = Recipe::load(&path, &overrides).expect("recipe with overrides");
    assert_eq!(r.peft.r, 8);
    assert_eq!(r.step_scheduler.max_steps, Some(20));
    assert_eq!(r.step_scheduler.num_epochs, None);
    assert_eq!(r.peft.target_modules, ["q_proj", "v_proj"]);
    assert_eq!(r.clip_grad_norm, None);
    assert_eq!(r.optimizer.lr, 1e-3);
    assert_eq!(r.model.dtype, DType::F32);
    assert_eq!(r.lr_scheduler.decay, Decay::Linear);
    assert_eq!(r.data.filters.min_rating, Some(3.5));
    assert_eq!(r.backend, BackendKind::Cpu);
}

#[test]
fn later_overrides_win_and_may_supply_required_keys() {
    let text = "model: {path: m}\ndata: {train: t.jsonl}\n";
    let r = Recipe::parse(text, "t.yaml", &pairs(&[("output_dir", "a"), ("peft.r", "4"), ("peft.r", "2")]))
        .expect("recipe");
    assert_eq!(r.output_dir, Path::new("a"));
    assert_eq!(r.peft.r, 2);
}

#[test]
fn all_linear_string_is_accepted() {
    let r = minimal_with(&[("peft.target_modules", "all-linear")]).expect("recipe");
    assert_eq!(r.peft.target_modules, all_linear());
    let e = err_of(minimal_with(&[("peft.target_modules", "attn")]));
    assert!(e.contains("--peft.target_modules=attn") && e.contains("all-linear"), "{e}");
}

#[test]
fn activation_checkpointing_takes_a_bool_or_a_layer_interval() {
    use tuneloop::model::decoder::Recompute;
    for (value, want) in [
        ("false", Recompute::Off),
        ("true", Recompute::Every(1)),
        ("1", Recompute::Every(1)),
        ("3", Recompute::Every(3)),
    ] {
        let r = minimal_with(&[("activation_checkpointing", value)]).expect(value);
        assert_eq!(r.activation_checkpointing, want, "{value}");
        let back = Recipe::parse(&r.to_yaml(), "printed.yaml", &[]).expect("printed config parses");
        assert_eq!(back.activation_checkpointing, want, "{value} printed and read back");
    }
    for bad in ["0", "-2", "sometimes", "1.5"] {
        let e = err_of(minimal_with(&[("activation_checkpointing", bad)]));
        assert!(e.contains("activation_checkpointing") && e.contains("every k-th layer"), "{bad}: {e}");
    }
    let e = err_of(Recipe::parse(&format!("{MINIMAL}activation_checkpointing: 0\n"), "ac.yaml", &[]));
    assert!(e.starts_with("ac.yaml:6:") && e.contains("every k-th layer"), "{e}");
}

#[test]
fn unknown_key_in_file_names_file_line_and_key() {
    let (_dir, path) =
        write_recipe("# a comment\nmodel:\n  pathh: models/tiny\ndata: {train: t}\noutput_dir: o\n");
    let e = err_of(Recipe::load(&path, &[]));
    assert!(e.contains("quickstart.yaml:3:"), "{e}");
    assert!(e.contains("pathh") && e.contains("model"), "{e}");
    let e = err_of(Recipe::parse(&format!("{MINIMAL}trainer:\n  max_steps: 3\n"), "top.yaml", &[]));
    assert!(e.starts_with("top.yaml:6:1:") && e.contains("unknown field `trainer`"), "{e}");
}

#[test]
fn wrong_type_in_file_is_located() {
    let text = format!("{MINIMAL}peft:\n  r: many\n");
    let e = err_of(Recipe::parse(&text, "r.yaml", &[]));
    assert!(e.starts_with("r.yaml:7:"), "{e}");
    assert!(e.contains("peft.r"), "{e}");
    let e = err_of(Recipe::parse(&format!("{MINIMAL}backend: tpu\n"), "b.yaml", &[]));
    assert!(e.starts_with("b.yaml:6:") && e.contains("tpu"), "{e}");
}

#[test]
fn yaml_syntax_error_is_located() {
    let e = err_of(Recipe::parse("model:\n  path: [unclosed\ndata: {train: t}\n", "s.yaml", &[]));
    assert!(e.starts_with("s.yaml:"), "{e}");
    let e = err_of(Recipe::parse("- a list\n", "l.yaml", &[]));
    assert!(e.contains("l.yaml") && e.contains("mapping"), "{e}");
}

#[test]
fn missing_file_is_named() {
    let e = err_of(Recipe::load(Path::new("no/such/recipe.yaml"), &[]));
    assert!(e.contains("no/such/recipe.yaml"), "{e}");
}

#[test]
fn unknown_override_key_names_the_override() {
    let e = err_of(minimal_with(&[("peft.rr", "3")]));
    assert!(e.contains("--peft.rr"), "{e}");
    let e = err_of(minimal_with(&[("trainer.max_steps", "3")]));
    assert!(e.contains("--trainer.max_steps"), "{e}");
    let e = err_of(minimal_with(&[("model.path.x", "3")]));
    assert!(e.contains("--model.path.x") && e.contains("model.path"), "{e}");
    let e = err_of(minimal_with(&[("peft.r", "eight")]));
    assert!(e.contains("--peft.r=eight"), "{e}");
}

#[test]
fn malformed_overrides_are_rejected() {
    for bad in [&["peft.r=8"][..], &["--peft.r"], &["--peft.r", "--seed=1"], &["--=1"], &["--peft..r=1"]] {
        assert!(split_overrides(&args(bad)).is_err(), "{bad:?} should be rejected");
    }
}

/// Each rule, broken by one override, with the words its message must contain.
#[test]
fn each_validation_rule_has_a_message() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("step_scheduler.global_batch_size", "6"), ("step_scheduler.local_batch_size", "4")], "divisible"),
        (&[("step_scheduler.local_batch_size", "0")], "must be > 0"),
        (&[("peft.r", "0")], "peft.r must be > 0"),
        (&[("peft.alpha", "0")], "peft.alpha must be > 0"),
        (&[("optimizer.lr", "0")], "optimizer.lr must be > 0"),
        (&[("optimizer.lr", "-1e-4")], "optimizer.lr must be > 0"),
        (&[("peft.dropout", "1.0")], "peft.dropout must be in [0, 1)"),
        (&[("peft.dropout", "-0.1")], "peft.dropout must be in [0, 1)"),
        (&[("data.val_fraction", "1.0")], "data.val_fraction must be in [0, 1)"),
        (&[("data.val_fraction", "-0.5")], "data.val_fraction must be in [0, 1)"),
        (&[("data.seq_len", "8")], "data.seq_len must be >= 16"),
        (&[("optimizer.betas", "[0.9, 1.0]")], "optimizer.betas"),
        (&[("optimizer.betas", "[-0.1, 0.9]")], "optimizer.betas"),
        (&[("optimizer.eps", "0")], "optimizer.eps"),
        (&[("optimizer.weight_decay", "-1")], "optimizer.weight_decay"),
        (&[("optimizer.name", "sgd")], "only `adamw`"),
        (&[("peft.target_modules", "[q_proj, qq_proj]")], "unknown module `qq_proj`"),
        (&[("peft.target_modules", "[q_proj, q_proj]")], "twice"),
        (&[("peft.target_modules", "[]")], "peft.target_modules is empty"),
        (&[("peft.full", "true"), ("peft.init_from", "adapters/v1")], "peft.init_from"),
        (&[("step_scheduler.num_epochs", "null")], "set max_steps or num_epochs"),
        (&[("step_scheduler.max_steps", "0")], "step_scheduler.max_steps must be > 0"),
        (&[("step_scheduler.num_epochs", "0")], "step_scheduler.num_epochs must be > 0"),
        (&[("step_scheduler.val_every_steps", "0")], "val_every_steps must be > 0"),
        (&[("step_scheduler.ckpt_every_steps", "0")], "ckpt_every_steps must be > 0"),
        (&[("step_scheduler.log_every_steps", "0")], "log_every_steps must be > 0"),
        (&[("lr_scheduler.min_lr_ratio", "1.5")], "lr_scheduler.min_lr_ratio"),
        (&[("clip_grad_norm", "0")], "clip_grad_norm must be > 0"),
        (&[("checkpoint.keep_last", "0")], "checkpoint.keep_last"),
        (&[("data.filters.max_tokens", "0")], "data.filters.max_tokens"),
        (&[("model.path", "\"\"")], "model.path is required"),
        (&[("data.train", "[]")], "data.train is required"),
        (&[("output_dir", "\"\"")], "output_dir is required"),
    ];
    for (overrides, want) in cases {
        let e = err_of(minimal_with(overrides));
        assert!(e.contains("minimal.yaml: invalid recipe") && e.contains(want), "{overrides:?}: {e}");
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let e = err_of(Recipe::parse("peft: {r: 0}\n", "bad.yaml", &[]));
    for want in ["model.path is required", "data.train is required", "output_dir is required", "peft.r"] {
        assert!(e.contains(want), "missing `{want}` in: {e}");
    }
}

#[test]
fn validate_checks_recipes_built_in_code() {
    let mut r = minimal_with(&[]).expect("recipe");
    r.validate().expect("a loaded recipe is valid");
    r.step_scheduler.local_batch_size = 3;
    let e = r.validate().expect_err("8 is not divisible by 3");
    assert!(e.to_string().contains("divisible"), "{e}");
}

#[test]
fn to_yaml_round_trips() {
    let quickstart = Recipe::load(&quickstart_path(), &[]).expect("quickstart");
    let odd = minimal_with(&[
        ("clip_grad_norm", "null"),
        ("peft.init_from", "adapters/v3"),
        ("peft.target_modules", "[v_proj]"),
        ("optimizer.eps", "1e-12"),
        ("data.validation", "[v1.jsonl, v2.jsonl]"),
        ("data.format", "feedback"),
        ("data.filters.max_tokens", "900"),
        ("step_scheduler.num_epochs", "3"),
    ])
    .expect("recipe");
    for r in [quickstart, minimal_with(&[]).expect("recipe"), odd] {
        let yaml = r.to_yaml();
        let back = Recipe::parse(&yaml, "printed.yaml", &[]).expect("printed config parses");
        assert_eq!(back, r, "{yaml}");
        // The printed config states every key, defaults included.
        for key in ["num_epochs:", "keep_last:", "min_lr_ratio:", "drop_thumbs_down:", "init_from:"] {
            assert!(yaml.contains(key), "`{key}` missing from:\n{yaml}");
        }
    }
}
