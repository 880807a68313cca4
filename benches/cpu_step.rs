//! LoRA training step on the CPU backend, random weights of real small-model shapes.
//! Prints tokens/s, model GFLOP/s and peak memory. `cargo bench --bench cpu_step`
//! (optionally `-- PRESET SEQ BATCH STEPS`).

use std::time::Instant;

use tuneloop::model::presets::{lora_step_flops_per_token, preset};
use tuneloop::model::{Adapter, Decoder, LoraConfig, Model, Proj};
use tuneloop::ops::{cpu::CpuOps, AdamWParams};
use tuneloop::train::{forward_backward, AdamW, TokenBatch};

fn peak_rss_gib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / (1024.0 * 1024.0))
        .unwrap_or(f64::NAN)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let name = args.first().map(String::as_str).unwrap_or("smollm2-135m");
    let seq: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let batch: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let steps: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let ops = CpuOps;
    let cfg = preset(name)?;
    let model = Model::random(&ops, cfg.clone(), 0, 0.02)?;
    let mut adapter = Adapter::init(&ops, &LoraConfig::new(16, 32.0, Proj::ALL.to_vec()), &cfg, 0)?;
    let hp = AdamWParams { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut opt = AdamW::new(&ops, &adapter, hp)?;
    let mut tb = TokenBatch::default();
    for b in 0..batch {
        let ids: Vec<u32> = (0..seq).map(|t| ((t * 7919 + b * 104729) % cfg.vocab_size) as u32).collect();
        let labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        tb.push(&ids, &labels);
    }
    let mut times = vec![];
    for step in 0..=steps {
        let t0 = Instant::now();
        let mut grads = adapter.zeros_like(&ops, &cfg)?;
        let r = forward_backward(&Decoder::new(&ops, &model, Some(&adapter)), &tb, Some(&mut grads), None)?;
        opt.update(&ops, &mut adapter, &grads, hp.lr)?;
        if step > 0 {
            times.push(t0.elapsed().as_secs_f64()); // step 0 is warm-up
        }
        eprintln!("step {step}: loss {:.4} in {:.2}s", r.mean_loss(), t0.elapsed().as_secs_f64());
    }
    let t = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let tokens = (seq * batch) as f64;
    let gflops = lora_step_flops_per_token(&cfg, seq) * tokens / t / 1e9;
    println!("| shape | backend | threads | seq x batch | step s | tokens/s | model GFLOP/s | peak GiB |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {name} | cpu f32 | {} | {seq} x {batch} | {t:.2} | {:.0} | {gflops:.1} | {:.2} |",
        rayon::current_num_threads(),
        tokens / t,
        peak_rss_gib()
    );
    Ok(())
}
