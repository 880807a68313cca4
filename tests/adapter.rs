//! PEFT adapter directories: bit-identical round trips, the config keys PEFT and vLLM
//! read, PEFT's fresh initialisation, and the scaling rules.

mod common;

use tuneloop::model::lora::peft_name;
use tuneloop::model::safetensors_io::TensorStore;
use tuneloop::model::{Adapter, LoraConfig, Model, Proj};
use tuneloop::ops::{cpu::CpuOps, Ops};

#[test]
fn adapter_round_trips_bit_identical() {
    let ops = CpuOps;
    for case in common::CASES {
        let dir = common::golden(case);
        let model = Model::load(&ops, &dir.join("model")).unwrap();
        let a = Adapter::load(&ops, &dir.join("adapter"), &model.cfg).unwrap();
        let out = tempfile::tempdir().unwrap();
        a.save(&ops, out.path()).unwrap();
        // the tensors are the golden file's, bit for bit, under the same names
        let orig = TensorStore::open_file(&dir.join("adapter/adapter_model.safetensors")).unwrap();
        let ours = TensorStore::open_file(&out.path().join("adapter_model.safetensors")).unwrap();
        assert_eq!(orig.names(), ours.names(), "{case}");
        for n in orig.names() {
            let (x, y) = (orig.get(n).unwrap(), ours.get(n).unwrap());
            assert_eq!((x.dtype, &x.shape, x.bytes), (y.dtype, &y.shape, y.bytes), "{case}: {n}");
        }
        // reading ours back and writing again gives the same bytes
        let b = Adapter::load(&ops, out.path(), &model.cfg).unwrap();
        assert_eq!(b.cfg, a.cfg);
        let again = tempfile::tempdir().unwrap();
        b.save(&ops, again.path()).unwrap();
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            assert_eq!(
                std::fs::read(out.path().join(f)).unwrap(),
                std::fs::read(again.path().join(f)).unwrap()
            );
        }
        // no temp files left behind
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 2);
    }
}

#[test]
fn written_config_carries_what_peft_and_vllm_read() {
    let mut cfg = LoraConfig::new(16, 32.0, vec![Proj::Q, Proj::V, Proj::Down]);
    cfg.base_model_name_or_path = Some("meta-llama/Llama-3.2-1B".into());
    cfg.lora_dropout = 0.05;
    let v = cfg.to_json();
    assert_eq!(v["peft_type"], "LORA");
    assert_eq!(v["task_type"], "CAUSAL_LM");
    assert_eq!(v["r"], 16);
    assert_eq!(v["lora_alpha"], 32);
    assert_eq!(v["bias"], "none");
    assert_eq!(v["use_rslora"], false);
    assert_eq!(v["use_dora"], false);
    assert_eq!(v["fan_in_fan_out"], false);
    assert_eq!(v["base_model_name_or_path"], "meta-llama/Llama-3.2-1B");
    assert_eq!(v["target_modules"], serde_json::json!(["q_proj", "v_proj", "down_proj"]));
    assert!(v["modules_to_save"].is_null());
    assert_eq!(LoraConfig::from_json(&v).unwrap(), cfg);
    // a non-integer alpha survives too
    let odd = LoraConfig::new(3, 7.5, Proj::ALL.to_vec());
    assert_eq!(LoraConfig::from_json(&odd.to_json()).unwrap(), odd);
}

#[test]
fn scaling_follows_peft() {
    let mut c = LoraConfig::new(8, 12.0, vec![Proj::Q]);
    assert_eq!(c.scale(), 1.5);
    c.use_rslora = true;
    assert!((c.scale() - 12.0 / 8f32.sqrt()).abs() < 1e-6);
}

#[test]
fn bad_adapter_configs_are_refused_by_name() {
    let ok = LoraConfig::new(4, 8.0, vec![Proj::Q]).to_json();
    for (key, val, msg) in [
        ("peft_type", serde_json::json!("IA3"), "peft_type"),
        ("bias", serde_json::json!("all"), "bias"),
        ("use_dora", serde_json::json!(true), "use_dora"),
        ("target_modules", serde_json::json!(["q_proj", "lm_head"]), "lm_head"),
        ("target_modules", serde_json::json!(".*proj"), "pattern"),
        ("r", serde_json::json!(0), "`r`"),
    ] {
        let mut v = ok.clone();
        v[key] = val;
        let e = format!("{:#}", LoraConfig::from_json(&v).unwrap_err());
        assert!(e.contains(msg), "{key}: {e}");
    }
}

#[test]
fn adapter_missing_a_tensor_is_named() {
    let ops = CpuOps;
    let model = Model::load(&ops, &common::golden("llama-gqa").join("model")).unwrap();
    // the file holds every projection but up_proj; the config claims all seven
    let fewer = LoraConfig::new(4, 8.0, Proj::ALL.into_iter().filter(|&p| p != Proj::Up).collect());
    let out = tempfile::tempdir().unwrap();
    Adapter::init(&ops, &fewer, &model.cfg, 0).unwrap().save(&ops, out.path()).unwrap();
    let all = LoraConfig::new(4, 8.0, Proj::ALL.to_vec());
    std::fs::write(out.path().join("adapter_config.json"), all.to_json().to_string()).unwrap();
    let e = format!("{:#}", Adapter::load(&ops, out.path(), &model.cfg).err().expect("must fail"));
    assert!(e.contains(&peft_name(0, Proj::Up, 'A')) && e.contains("missing tensor"), "{e}");
}

#[test]
fn fresh_init_is_peft_kaiming_uniform_and_seeded() {
    let ops = CpuOps;
    let model = Model::load(&ops, &common::golden("llama3-rope-tied").join("model")).unwrap();
    let cfg = LoraConfig::new(8, 16.0, Proj::ALL.to_vec());
    let a = Adapter::init(&ops, &cfg, &model.cfg, 7).unwrap();
    let b = Adapter::init(&ops, &cfg, &model.cfg, 7).unwrap();
    let c = Adapter::init(&ops, &cfg, &model.cfg, 8).unwrap();
    let mut differs = false;
    for (((name, ta), (_, tb)), (_, tc)) in a.named().into_iter().zip(b.named()).zip(c.named()) {
        let (va, vb, vc) = (ops.download(ta).unwrap(), ops.download(tb).unwrap(), ops.download(tc).unwrap());
        assert_eq!(va, vb, "{name}: same seed, same values");
        differs |= va != vc;
        if name.contains("lora_B") {
            assert!(va.iter().all(|&x| x == 0.0), "{name}: B starts at zero");
        } else {
            let fan_in = ops.shape(ta)[1] as f32;
            let bound = 1.0 / fan_in.sqrt();
            assert!(va.iter().all(|x| x.abs() <= bound), "{name}: outside U(-1/sqrt(in), 1/sqrt(in))");
            let max = va.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(max > 0.8 * bound, "{name}: values should fill the range");
            let mean = va.iter().sum::<f32>() / va.len() as f32;
            assert!(mean.abs() < 0.1 * bound, "{name}: mean {mean}");
        }
    }
    assert!(differs, "another seed gives other values");
}
