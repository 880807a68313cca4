//! Loading HF model directories: dtypes, sharded checkpoints, both RoPE config
//! styles, and clear errors (never a panic) on bad inputs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::{tensor::TensorView, Dtype};
use tuneloop::model::safetensors_io::TensorStore;
use tuneloop::model::{Adapter, Model, ModelConfig};
use tuneloop::ops::{cpu::CpuOps, Ops};

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read_all(path: &Path) -> Tensors {
    let store = TensorStore::open_file(path).unwrap();
    store
        .names()
        .into_iter()
        .map(|n| {
            let w = store.get(n).unwrap();
            (n.to_string(), (w.dtype, w.shape.clone(), w.bytes.to_vec()))
        })
        .collect()
}

fn write_all(path: &Path, t: &Tensors) {
    let views: Vec<(String, TensorView)> =
        t.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Model::load(&CpuOps, dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = common::copy_model("llama-gqa");
    let file = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len / 2).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated or corrupt"), "{e}");
    // a header cut short too
    f.set_len(5).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated or corrupt"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = common::copy_model("llama-gqa");
    let file = dir.path().join("model.safetensors");
    let mut t = read_all(&file);
    t.remove("model.layers.1.mlp.up_proj.weight").unwrap();
    write_all(&file, &t);
    let e = load_err(dir.path());
    assert!(e.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"), "{e}");
}

#[test]
fn wrong_shape_is_named() {
    let dir = common::copy_model("llama-gqa");
    let file = dir.path().join("model.safetensors");
    let mut t = read_all(&file);
    let k = t.get_mut("model.layers.0.self_attn.k_proj.weight").unwrap();
    assert_eq!(k.1, vec![32, 64]);
    k.1 = vec![64, 32];
    write_all(&file, &t);
    let e = load_err(dir.path());
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight")
            && e.contains("[64, 32]")
            && e.contains("[32, 64]"),
        "{e}"
    );
}

#[test]
fn wrong_dtype_is_named() {
    let dir = common::copy_model("qwen2-bias");
    let file = dir.path().join("model.safetensors");
    let mut t = read_all(&file);
    let b = t.get_mut("model.layers.0.self_attn.q_proj.bias").unwrap();
    b.0 = Dtype::I32;
    write_all(&file, &t);
    let e = load_err(dir.path());
    assert!(e.contains("model.layers.0.self_attn.q_proj.bias") && e.contains("I32"), "{e}");
}

#[test]
fn unknown_architecture_and_rope_type_are_named() {
    let dir = common::copy_model("llama-gqa");
    let cfg_path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, text.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt2\"")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("unsupported model_type `gpt2`"), "{e}");
    std::fs::write(&cfg_path, text.replace("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\"")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("unsupported rope type `yarn`"), "{e}");
    std::fs::write(&cfg_path, "{ not json").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");
}

#[test]
fn bad_case_fails_the_cli_with_a_message_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tuneloop"))
        .args(["parity", "--case"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("case.json") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn legacy_rope_keys_parse_like_rope_parameters() {
    let path = common::golden("llama3-rope-tied").join("model/config.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let new_style = ModelConfig::from_json(&v).unwrap();
    let mut old = v.clone();
    let params = old.as_object_mut().unwrap().remove("rope_parameters").unwrap();
    old["rope_theta"] = params["rope_theta"].clone();
    let mut scaling = params.clone();
    scaling.as_object_mut().unwrap().remove("rope_theta");
    old["rope_scaling"] = scaling;
    assert_eq!(ModelConfig::from_json(&old).unwrap(), new_style);
    // pre-4.45 checkpoints wrote `type` instead of `rope_type`
    let t = old["rope_scaling"]["rope_type"].take();
    old["rope_scaling"]["type"] = t;
    assert_eq!(ModelConfig::from_json(&old).unwrap(), new_style);
}

#[test]
fn bf16_f16_and_sharded_checkpoints_load() {
    let src = read_all(&common::golden("llama-gqa").join("model/model.safetensors"));
    for (dtype, convert) in [
        (Dtype::BF16, (|x: f32| bf16::from_f32(x).to_le_bytes().to_vec()) as fn(f32) -> Vec<u8>),
        (Dtype::F16, |x: f32| f16::from_f32(x).to_le_bytes().to_vec()),
    ] {
        let dir = common::copy_model("llama-gqa");
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        // two shards and an index, in the half-precision dtype
        let (mut a, mut b) = (Tensors::new(), Tensors::new());
        let mut weight_map = serde_json::Map::new();
        for (i, (name, (_, shape, bytes))) in src.iter().enumerate() {
            let half: Vec<u8> = f32s(bytes).into_iter().flat_map(convert).collect();
            let (shard, file) = if i % 2 == 0 {
                (&mut a, "model-00001-of-00002.safetensors")
            } else {
                (&mut b, "model-00002-of-00002.safetensors")
            };
            shard.insert(name.clone(), (dtype, shape.clone(), half));
            weight_map.insert(name.clone(), file.into());
        }
        write_all(&dir.path().join("model-00001-of-00002.safetensors"), &a);
        write_all(&dir.path().join("model-00002-of-00002.safetensors"), &b);
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();

        let model = Model::load(&CpuOps, dir.path()).unwrap();
        let q = CpuOps.download(&model.layers[1].proj[0].w).unwrap();
        let want: Vec<f32> = f32s(&src["model.layers.1.self_attn.q_proj.weight"].2)
            .into_iter()
            .map(
                |x| if dtype == Dtype::BF16 { bf16::from_f32(x).to_f32() } else { f16::from_f32(x).to_f32() },
            )
            .collect();
        assert_eq!(q, want, "{dtype:?}");
        // and it still runs, with the adapter, close to the f32 model
        let adapter =
            Adapter::load(&CpuOps, &common::golden("llama-gqa").join("adapter"), &model.cfg).unwrap();
        let dec = tuneloop::model::Decoder::new(&CpuOps, &model, Some(&adapter));
        let mut batch = tuneloop::train::TokenBatch::default();
        batch.push(&[1, 2, 3, 4], &[1, 2, 3, 4]);
        let loss = tuneloop::train::forward_backward(&dec, &batch, None, None).unwrap().mean_loss();
        assert!(loss.is_finite() && loss > 0.0);
    }
}

#[test]
fn shard_index_naming_a_tensor_its_file_lacks_is_an_error() {
    let dir = common::copy_model("llama-gqa");
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "model.safetensors", "lm_head.weight": "model.safetensors"}});
    std::fs::rename(dir.path().join("model.safetensors"), dir.path().join("shard.safetensors")).unwrap();
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn random_weights_are_the_same_on_any_number_of_threads() {
    // a tensor of more than one chunk of draws (the embedding: 300 × 4096 > 2^20 values)
    let mut cfg = tuneloop::model::presets::preset("tiny").unwrap();
    cfg.vocab_size = 300;
    cfg.hidden_size = 4096;
    cfg.num_hidden_layers = 1;
    let draw = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let m = pool.install(|| Model::random(&CpuOps, cfg.clone(), 5, 0.02).unwrap());
        CpuOps.download(&m.embed_tokens).unwrap()
    };
    let one = draw(1);
    assert!(one.len() > 1 << 20 && one.iter().all(|x| x.abs() <= 0.02 * 3f32.sqrt()));
    let rest = one.len() - (1 << 20);
    assert!(one[..rest] != one[1 << 20..], "every chunk draws its own values");
    assert!(one.iter().map(|x| x.to_bits()).eq(draw(3).iter().map(|x| x.to_bits())));
}
