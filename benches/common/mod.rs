//! What the benches share: their positional arguments (`cargo bench --bench NAME -- A B`).

/// The positional arguments (cargo's own `--bench` flag and the like left out).
pub fn positional() -> Vec<String> {
    std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect()
}

/// Positional argument `i` as a number, `default` when absent.
pub fn number(args: &[String], i: usize, default: usize) -> anyhow::Result<usize> {
    match args.get(i) {
        Some(s) => s.parse().map_err(|e| anyhow::anyhow!("argument {}: {s:?}: {e}", i + 1)),
        None => Ok(default),
    }
}
