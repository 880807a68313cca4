//! `tuneloop bench`: the FLOP count, the profiling wrapper, and the command's output.

use std::process::{Command, Output};

use tuneloop::bench::{anchors, packed_lengths, synthetic_batch, FullStep, LoraStep, Profiled};
use tuneloop::model::decoder::Recompute;
use tuneloop::model::presets::{linear_params, preset, step_flops, step_flops_per_token};
use tuneloop::model::{LoraConfig, Model, Proj};
use tuneloop::ops::cpu::{CpuOps, CpuTensor};

#[test]
fn flops_of_llama32_1b_at_seq_2048_by_hand() {
    // Llama-3.2-1B's config.json: hidden 2048, intermediate 8192, 16 layers, 32 heads
    // of 64, 8 kv heads, vocab 128256.
    let q = 2048 * 2048; // q_proj: hidden -> 32 heads × 64 = 4_194_304
    let kv = 2048 * 512; // k_proj, v_proj each: hidden -> 8 × 64 = 1_048_576
    let o = 2048 * 2048; // o_proj = 4_194_304
    let mlp = 3 * 2048 * 8192; // gate, up, down = 50_331_648
    let per_layer: u64 = q + 2 * kv + o + mlp; // 60_817_408
    assert_eq!(per_layer, 60_817_408);
    let lm_head: u64 = 2048 * 128_256; // 262_668_288 (tied to the embedding, counted anyway)
    let linear = 16 * per_layer + lm_head; // 973_078_528 + 262_668_288
    assert_eq!(linear, 1_235_746_816);
    // causal attention: 2·2·layers·seq·hidden / 2 = 2·2·16·2048·2048 / 2
    let attn: u64 = 2 * 2 * 16 * 2048 * 2048 / 2;
    assert_eq!(attn, 134_217_728);
    // 4 × 1_235_746_816 + 3.5 × 134_217_728 = 4_942_987_264 + 469_762_048
    let by_hand = 4.0 * linear as f64 + 3.5 * attn as f64;
    assert_eq!(by_hand, 5_412_749_312.0);

    let cfg = preset("llama3.2-1b").unwrap();
    assert_eq!(linear_params(&cfg), linear);
    assert_eq!(step_flops_per_token(&cfg, 2048, false), by_hand);
    // a [4, 2048] batch is 4 sequences of 2048 tokens at that rate
    assert_eq!(step_flops(&cfg, &[2048; 4], false), 4.0 * 2048.0 * by_hand);
}

#[test]
fn packed_documents_fill_the_batch_and_attend_over_less() {
    let lens = packed_lengths(4 * 256, 256, 7);
    assert_eq!(lens.iter().sum::<usize>(), 1024);
    assert!(lens.len() > 4, "{lens:?}");
    assert!(lens.iter().all(|&l| (1..=256).contains(&l)), "{lens:?}");
    let cfg = preset("tiny").unwrap();
    let plain = synthetic_batch(&cfg, 256, 4, false, 0).unwrap();
    let packed = synthetic_batch(&cfg, 256, 4, true, 0).unwrap();
    assert_eq!(plain.seq_lens, vec![256; 4]);
    assert_eq!(packed.ids.len(), plain.ids.len());
    assert!(packed.seq_lens.len() > 4);
    assert!(step_flops(&cfg, &packed.seq_lens, false) < step_flops(&cfg, &plain.seq_lens, false));
}

#[test]
fn anchors_match_only_their_own_shape() {
    let a = anchors::matching(Some("llama3.2-1b"), 2048, 4, false);
    assert_eq!(a.iter().map(|a| a.tokens_per_s).collect::<Vec<_>>(), vec![32_200.0, 49_600.0]);
    assert_eq!(anchors::matching(Some("llama3.1-8b"), 4096, 2, false).len(), 1);
    assert!(anchors::matching(Some("llama3.2-1b"), 2048, 2, false).is_empty());
    assert!(anchors::matching(Some("llama3.2-1b"), 2048, 4, true).is_empty());
    assert!(anchors::matching(None, 2048, 4, false).is_empty());
}

fn bits(t: &CpuTensor) -> Vec<u32> {
    t.data.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn profiled_cpu_gives_the_same_bits_and_times_every_op() {
    for packing in [false, true] {
        let cfg = preset("tiny").unwrap();
        let batch = synthetic_batch(&cfg, 48, 2, packing, 3).unwrap();
        let lora = LoraConfig::new(4, 8.0, Proj::ALL.to_vec());
        let mut plain = LoraStep::new(&CpuOps, cfg.clone(), &lora, batch.clone(), 5).unwrap();
        let mut profiled = LoraStep::new(&CpuOps, cfg, &lora, batch, 5).unwrap();
        let p = Profiled::new(&CpuOps);
        for _ in 0..2 {
            let a = plain.step(&CpuOps).unwrap();
            let b = profiled.step(&p).unwrap();
            assert_eq!(a.to_bits(), b.to_bits(), "loss");
        }
        let pairs = [
            (plain.params.named(), profiled.params.named()),
            (plain.grads.named(), profiled.grads.named()),
            (plain.opt.m.named(), profiled.opt.m.named()),
            (plain.opt.v.named(), profiled.opt.v.named()),
        ];
        for (xs, ys) in pairs {
            assert_eq!(xs.len(), ys.len());
            for ((n, x), (_, y)) in xs.iter().zip(&ys) {
                assert!(bits(x) == bits(y), "{n} differs under Profiled (packing {packing})");
            }
        }
        // the step changed the adapter, so the comparison above compared something
        let fresh = LoraStep::new(&CpuOps, preset("tiny").unwrap(), &lora, Default::default(), 5).unwrap();
        let moved =
            fresh.params.named().iter().zip(plain.params.named()).any(|(a, b)| bits(a.1) != bits(b.1));
        assert!(moved, "two AdamW steps left the adapter as initialised");

        let times = p.times();
        let layers = 4;
        for (op, calls) in [
            ("embedding_fwd", 2),
            ("linear_fwd", 2 * (7 * layers + 1)),
            // down_proj's input gradient and its LoRA gradients are two calls, the
            // SwiGLU backward's h between them
            ("linear_bwd", 2 * (8 * layers + 1)),
            ("attention_fwd", 2 * layers),
            ("attention_bwd", 2 * layers),
            // the backward recomputes both norms of a layer; its SwiGLU backward gives h
            ("rmsnorm_fwd", 2 * (2 * layers + 1) + 2 * 2 * layers),
            ("swiglu_fwd", 2 * layers),
            ("swiglu_bwd_h", 2 * layers),
            ("cross_entropy", 2),
            ("adamw_step", 2),
        ] {
            let t =
                times.iter().find(|t| t.op == op).unwrap_or_else(|| panic!("{op} not recorded: {times:?}"));
            assert_eq!(t.calls, calls as u64, "{op}");
            assert!(t.seconds > 0.0, "{op}: {t:?}");
        }
        assert!(times.iter().all(|t| t.op != "swiglu_bwd"), "swiglu_bwd_h in its place: {times:?}");
        assert!(times.windows(2).all(|w| w[0].seconds >= w[1].seconds), "sorted, most time first");

        // model FLOPs per op, two steps of 96 tokens on tiny (hidden 128, intermediate
        // 352, 4 heads of 32 and 2 kv heads, 4 layers, vocab 1024), LoRA r = 4
        let flops = |op: &str| times.iter().find(|t| t.op == op).map_or(0.0, |t| t.flops);
        let in_out = [(128, 128), (128, 64), (128, 64), (128, 128), (128, 352), (128, 352), (352, 128)];
        let frozen: f64 =
            4.0 * in_out.iter().map(|&(i, o)| (i * o) as f64).sum::<f64>() + (128 * 1024) as f64;
        let low_rank: f64 = 4.0 * 4.0 * in_out.iter().map(|&(i, o)| (i + o) as f64).sum::<f64>();
        let want = 2.0 * 2.0 * 96.0 * (frozen + low_rank);
        assert!(close(flops("linear_fwd"), want, 1e-12), "linear_fwd {} vs {want}", flops("linear_fwd"));
        let seq_lens = synthetic_batch(&preset("tiny").unwrap(), 48, 2, packing, 3).unwrap().seq_lens;
        let pairs: f64 = seq_lens.iter().map(|&l| (l * (l + 1) / 2) as f64).sum();
        let want = 2.0 * 4.0 * 4.0 * 128.0 * pairs;
        assert!(
            close(flops("attention_fwd"), want, 1e-12),
            "attention_fwd {} vs {want}",
            flops("attention_fwd")
        );
        assert!(close(flops("attention_bwd"), 2.5 * want, 1e-12));
        // the backward: the LoRA gradients, and dx through both paths of every layer but
        // layer 0's q, k and v (their dx would only reach the frozen embedding)
        let qkv_dx = (128 * (128 + 64 + 64) + 4 * (256 + 192 + 192)) as f64;
        let want = 2.0 * 2.0 * 96.0 * (frozen + 2.0 * low_rank - qkv_dx);
        assert!(close(flops("linear_bwd"), want, 1e-12), "linear_bwd {} vs {want}", flops("linear_bwd"));
        assert_eq!(flops("rmsnorm_fwd"), 0.0, "only matmuls are counted");
        assert_eq!(p.peak_memory(), None, "host tensors: no device memory to sample");
        p.reset();
        assert!(p.times().is_empty());
    }
}

#[test]
fn recompute_trains_the_same_bits() {
    let cfg = preset("tiny").unwrap();
    let batch = synthetic_batch(&cfg, 40, 2, true, 1).unwrap();
    let lora = LoraConfig::new(4, 8.0, Proj::ALL.to_vec());
    let mut kept = LoraStep::new(&CpuOps, cfg.clone(), &lora, batch.clone(), 2).unwrap();
    let mut recomputed = LoraStep::new(&CpuOps, cfg.clone(), &lora, batch.clone(), 2).unwrap();
    recomputed.recompute = Recompute::Every(1);
    let mut half = LoraStep::new(&CpuOps, cfg, &lora, batch, 2).unwrap();
    half.recompute = Recompute::Every(2);
    for _ in 0..2 {
        let loss = kept.step(&CpuOps).unwrap().to_bits();
        assert_eq!(loss, recomputed.step(&CpuOps).unwrap().to_bits());
        assert_eq!(loss, half.step(&CpuOps).unwrap().to_bits());
    }
    for ((n, a), ((_, b), (_, c))) in
        kept.grads.named().iter().zip(recomputed.grads.named().iter().zip(half.grads.named()))
    {
        assert!(bits(a) == bits(b), "{n} differs with recompute");
        assert!(bits(a) == bits(c), "{n} differs with recompute in every other layer");
    }
    // the recomputing step runs every layer's forward twice; every other layer's: layers
    // 0 and 2 of the 4
    for (step, forwards) in [(&mut recomputed, 2 * 4), (&mut half, 4 + 2)] {
        let p = Profiled::new(&CpuOps);
        step.step(&p).unwrap();
        let calls = |op: &str| p.times().iter().find(|t| t.op == op).map_or(0, |t| t.calls);
        assert_eq!(calls("attention_fwd"), forwards);
        assert_eq!(calls("attention_bwd"), 4);
    }
}

fn tuneloop(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tuneloop")).args(args).output().expect("runs")
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-300)
}

#[test]
fn full_steps_train_every_weight_and_count_six_flops_a_parameter() {
    let cfg = preset("tiny").unwrap();
    let batch = synthetic_batch(&cfg, 48, 2, false, 3).unwrap();
    let mut st = FullStep::new(&CpuOps, cfg.clone(), batch, 5).unwrap();
    let p = Profiled::new(&CpuOps);
    let first = st.step(&p).unwrap();
    let fresh = Model::random_master(&CpuOps, cfg.clone(), 5, 0.02).unwrap();
    for ((name, a), (_, b)) in fresh.named().iter().zip(st.params.named()) {
        assert!(bits(a) != bits(b), "{name} was not trained");
    }
    // the linear layers' model FLOPs: 2 a parameter and token forward, 4 backward (the
    // input gradient and the weight's own)
    let times = p.times();
    let flops = |op: &str| times.iter().find(|t| t.op == op).map_or(0.0, |t| t.flops);
    let n = linear_params(&cfg) as f64 * 96.0;
    assert!(close(flops("linear_fwd"), 2.0 * n, 1e-12), "linear_fwd {} vs {}", flops("linear_fwd"), 2.0 * n);
    assert!(close(flops("linear_bwd"), 4.0 * n, 1e-12), "linear_bwd {} vs {}", flops("linear_bwd"), 4.0 * n);
    assert!(st.step(&CpuOps).unwrap() < first, "a second step on the same batch lowers its loss");

    let out = tuneloop(&[
        "bench", "--preset", "tiny", "--seq", "64", "--batch", "2", "--steps", "1", "--full", "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(j["full"], true);
    assert!(j["lora_r"].is_null());
    let all: usize = fresh.named().iter().map(|(_, t)| t.data.len()).sum();
    assert_eq!(j["trainable_params"], all);
    assert_eq!(j["flops_per_token"].as_f64(), Some(step_flops_per_token(&cfg, 64, true)));
    // --kernels times a LoRA step's kernels; --lora-apart is about LoRA paths
    for extra in ["--kernels", "--lora-apart"] {
        let out = tuneloop(&["bench", "--preset", "tiny", "--seq", "64", "--full", extra]);
        assert!(!out.status.success(), "--full {extra} should be refused");
    }
}

#[test]
fn bench_json_is_one_consistent_line() {
    let out = tuneloop(&[
        "bench", "--preset", "tiny", "--seq", "64", "--batch", "2", "--steps", "2", "--warmup", "1", "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let j: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
    let f = |k: &str| j[k].as_f64().unwrap_or_else(|| panic!("{k} in {j}"));

    assert_eq!(j["backend"], "cpu");
    assert_eq!(j["tokens_per_step"], 128);
    assert_eq!(j["step_seconds"].as_array().map(Vec::len), Some(2));
    let (tok_s, step_s) = (f("tokens_per_s"), f("step_s"));
    assert!(tok_s > 0.0 && step_s > 0.0);
    assert!(close(tok_s * step_s, 64.0 * 2.0, 1e-9), "{tok_s} × {step_s}");
    let mean: f64 =
        j["step_seconds"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum::<f64>() / 2.0;
    assert!(close(step_s, mean, 1e-12));

    let fpt = f("flops_per_token");
    assert_eq!(fpt, step_flops_per_token(&preset("tiny").unwrap(), 64, false));
    assert!(close(f("tflops"), fpt * tok_s / 1e12, 1e-9));
    assert!(close(f("mfu"), f("tflops") / j["gemm"]["tflops"].as_f64().unwrap(), 1e-9));
    assert_eq!(j["gemm"]["n"], 1024);
    assert!(j["peak_memory_bytes"].as_u64().unwrap() > 0);
    assert_eq!(j["recompute"], "off");
    assert_eq!(j["lora_dropout"], 0.0);
    assert!(f("loss_first").is_finite() && f("loss_last").is_finite());
    let ops = j["profile"]["ops"].as_array().expect("profile");
    assert!(ops.iter().any(|o| o["op"] == "linear_fwd" && o["seconds"].as_f64().unwrap() > 0.0));
    assert!(j["anchors"].as_array().unwrap().is_empty());
}

#[test]
fn bench_reads_a_model_directory_config_only() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = r#"{"model_type": "qwen2", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false}"#;
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let d = dir.path().to_str().unwrap();
    let out = tuneloop(&[
        "bench",
        "--model",
        d,
        "--seq",
        "16",
        "--batch",
        "3",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--packing",
        "--no-profile",
        "--gemm-size",
        "64",
        "--recompute",
        "--backend",
        "cpu",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(j["model"], d);
    assert_eq!(j["packing"], true);
    assert_eq!(j["recompute"], "every layer");
    assert_eq!(j["tokens_per_step"], 48);
    assert!(j["documents"].as_u64().unwrap() > 3);
    assert!(j["profile"].is_null());
    assert_eq!(j["gemm"]["n"], 64);
}

fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(needle), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn bench_errors_name_what_is_wrong() {
    let out =
        tuneloop(&["bench", "--preset", "llama9-70b", "--seq", "8", "--batch", "1", "--backend", "cpu"]);
    assert_clean_error(&out, "unknown preset `llama9-70b`");
    let out = tuneloop(&["bench", "--preset", "tiny", "--seq", "1"]);
    assert_clean_error(&out, "--seq 1");
    let out = tuneloop(&["bench", "--preset", "tiny", "--seq", "8", "--lora-dropout", "1"]);
    assert_clean_error(&out, "--lora-dropout 1 is not in [0, 1)");
    let dir = tempfile::tempdir().unwrap();
    let out = tuneloop(&["bench", "--model", dir.path().to_str().unwrap(), "--backend", "cpu"]);
    assert_clean_error(&out, "config.json");
}

#[test]
fn bench_on_cuda_without_a_gpu_is_a_clean_error() {
    if tuneloop::ops::cuda::CudaOps::new(0, Default::default()).is_ok() {
        eprintln!("a GPU is here: nothing to check");
        return;
    }
    let out = tuneloop(&["bench", "--preset", "tiny", "--seq", "16", "--batch", "1", "--backend", "cuda"]);
    assert_clean_error(&out, "error: ");
}

#[test]
fn bench_kernels_times_every_kernel_against_its_floor() {
    let out = tuneloop(&[
        "bench",
        "--kernels",
        "--preset",
        "tiny",
        "--seq",
        "32",
        "--batch",
        "2",
        "--steps",
        "2",
        "--backend",
        "cpu",
        "--gemm-size",
        "128",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(v["tokens"], 64);
    let kernels = v["kernels"].as_array().expect("kernels");
    let names: Vec<&str> = kernels.iter().map(|k| k["kernel"].as_str().unwrap()).collect();
    for want in
        ["attention_fwd", "attention_bwd", "linear_fwd q_proj, LoRA folded", "linear_fwd q_proj, LoRA apart"]
            .into_iter()
            .chain(["rmsnorm_fwd", "swiglu_bwd", "adamw_step"])
    {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let (gemm, bw) = (v["gemm"]["tflops"].as_f64().unwrap() * 1e12, v["bandwidth"].as_f64().unwrap());
    assert!(gemm > 0.0 && bw > 0.0);
    for k in kernels {
        let f = |key: &str| k[key].as_f64().unwrap();
        assert!(f("seconds") > 0.0, "{k}");
        // the floor is the larger of the compute and the memory time
        assert!(close(f("floor_seconds"), (f("flops") / gemm).max(f("bytes") / bw), 1e-9), "{k}");
    }
    // two sequences of 32, 4 heads of 32: 4·128·(2·32·33/2) FLOPs forward, 2.5× backward
    let attn = |name: &str| kernels.iter().find(|k| k["kernel"] == name).unwrap()["flops"].as_f64().unwrap();
    assert_eq!(attn("attention_fwd"), 4.0 * 128.0 * 1056.0);
    assert_eq!(attn("attention_bwd"), 2.5 * 4.0 * 128.0 * 1056.0);
}

#[test]
fn lora_dropout_steps_draw_a_mask_and_train_otherwise() {
    let cfg = preset("tiny").unwrap();
    let batch = synthetic_batch(&cfg, 48, 2, false, 3).unwrap();
    let lora = LoraConfig::new(4, 8.0, Proj::ALL.to_vec());
    let run = |p: f32| {
        let mut st = LoraStep::new(&CpuOps, cfg.clone(), &lora, batch.clone(), 5).unwrap();
        st.lora_dropout = p;
        (0..3).map(|_| st.step(&CpuOps).unwrap()).collect::<Vec<f64>>()
    };
    let (plain, dropped) = (run(0.0), run(0.3));
    // B starts at zero, so the first forward is the base model's either way; the masks
    // change the gradients and so every later loss
    assert_eq!(plain[0].to_bits(), dropped[0].to_bits());
    assert!(plain[1] != dropped[1] && plain[2] != dropped[2], "{plain:?} vs {dropped:?}");
    assert_eq!(run(0.3), dropped, "the masks are drawn from the step's seed");
}
