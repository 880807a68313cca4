//! What the benches share: their options from the positional arguments
//! (`cargo bench --bench NAME -- PRESET SEQ BATCH STEPS`).

use tuneloop::bench::{BenchOptions, ModelSource};

/// The preset (default smollm2-135m), seq (256), batch (2) and steps (3) given after
/// `--`, with one warm-up step.
pub fn options() -> anyhow::Result<BenchOptions> {
    // cargo's own flags (`--bench`) are left out
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let number = |i: usize, default: usize| -> anyhow::Result<usize> {
        match args.get(i) {
            Some(s) => s.parse().map_err(|e| anyhow::anyhow!("argument {}: {s:?}: {e}", i + 1)),
            None => Ok(default),
        }
    };
    let name = args.first().map(String::as_str).unwrap_or("smollm2-135m");
    Ok(BenchOptions {
        seq: number(1, 256)?,
        batch: number(2, 2)?,
        steps: number(3, 3)?,
        warmup: 1,
        ..BenchOptions::new(ModelSource::Preset(name.to_string()))
    })
}
