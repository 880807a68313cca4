//! Text output of `tuneloop registry`: pure functions from registry data to readable
//! tables, so the CLI stays a thin parser and the output can be tested without it.
//!
//! The planned command line (the registry root is `--root DIR`, else
//! `$TUNELOOP_REGISTRY`, else `./registry`; see [`default_root`]):
//!
//! ```text
//! tuneloop registry list     [AGENT]                     agents, or one agent's versions
//! tuneloop registry show     AGENT VERSION|ALIAS         lineage, metrics, files, recipe
//! tuneloop registry register AGENT RUN_DIR [--base-model DIR] [--parent vN] [--who NAME]
//!                                                        a finetune output dir -> next vN
//! tuneloop registry promote  AGENT VERSION [--why TEXT] [--who NAME]
//! tuneloop registry canary   AGENT VERSION --weight PCT [--why TEXT]
//! tuneloop registry rollback AGENT [--to VERSION] [--why TEXT]
//! tuneloop registry alias    AGENT ALIAS VERSION [--weight PCT] | AGENT ALIAS --remove
//! tuneloop registry history  AGENT                       every alias change
//! tuneloop registry diff     AGENT A B                   A, B: versions or aliases
//! tuneloop registry resolve  AGENT VERSION|ALIAS         prints the adapter directory
//! ```
//!
//! `list` renders with [`render_agents`] / [`render_list`], `show` with
//! [`render_show`], `diff` with [`render_diff`], `history` with [`render_history`],
//! and the alias-moving commands print [`render_aliases`] of the result.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::aliases::{Aliases, HistoryEntry};
use super::diff::VersionDiff;
use super::{VersionInfo, CANARY, PRODUCTION};

/// The environment variable naming the registry root when `--root` is not given.
pub const ROOT_ENV: &str = "TUNELOOP_REGISTRY";

/// `--root`, else `$TUNELOOP_REGISTRY`, else `./registry`.
pub fn default_root(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os(ROOT_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("registry"))
}

/// Left-aligned columns two spaces apart, a header row and a rule under it.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let pad = widths[i].saturating_sub(c.chars().count());
                s.push_str(c);
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    out +=
        &line(widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().iter().map(String::as_str).collect());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

fn num(x: Option<f64>) -> String {
    match x {
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{}", v as i64),
        Some(v) => format!("{v:.4}"),
        None => "-".to_string(),
    }
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".to_string())
}

fn short(hash: &str) -> String {
    hash.chars().take(12).collect()
}

/// `production (90%), canary (10%)`: the aliases pointing at `version`.
fn aliases_of(aliases: &Aliases, version: &str) -> String {
    let names: Vec<String> = aliases
        .iter()
        .filter(|(_, a)| a.version == version)
        .map(|(n, a)| match a.weight {
            Some(w) => format!("{n} ({w}%)"),
            None => n.clone(),
        })
        .collect();
    if names.is_empty() {
        "-".to_string()
    } else {
        names.join(", ")
    }
}

fn gate_of(v: &VersionInfo) -> String {
    match v.lineage.gate_report.as_ref().map(|g| g.get("passed").and_then(serde_json::Value::as_bool)) {
        Some(Some(true)) => "passed".into(),
        Some(Some(false)) => "failed".into(),
        Some(None) => "report".into(),
        None => "-".into(),
    }
}

fn train_examples(v: &VersionInfo) -> Option<usize> {
    v.lineage.data_manifest.as_ref()?.get("train")?.as_array().map(Vec::len)
}

/// `registry list` without an agent: each agent with its version count and what serves.
pub fn render_agents(agents: &[(String, usize, Aliases)]) -> String {
    if agents.is_empty() {
        return "no agents registered\n".to_string();
    }
    let serving = |a: &Aliases, name: &str| match a.get(name) {
        Some(x) => match x.weight {
            Some(w) => format!("{} ({w}%)", x.version),
            None => x.version.clone(),
        },
        None => "-".to_string(),
    };
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|(name, n, a)| vec![name.clone(), n.to_string(), serving(a, PRODUCTION), serving(a, CANARY)])
        .collect();
    table(&["AGENT", "VERSIONS", "PRODUCTION", "CANARY"], &rows)
}

/// `registry list AGENT`: one row per version, oldest first.
pub fn render_list(agent: &str, versions: &[VersionInfo], aliases: &Aliases) -> String {
    if versions.is_empty() {
        return format!("agent `{agent}` has no versions\n");
    }
    let rows: Vec<Vec<String>> = versions
        .iter()
        .map(|v| {
            let l = &v.lineage;
            vec![
                v.version.clone(),
                aliases_of(aliases, &v.version),
                l.created_at.clone(),
                l.created_by.clone(),
                opt(&l.parent),
                train_examples(v).map_or("-".into(), |n| n.to_string()),
                num(l.metrics.get("steps").copied()),
                num(l.metrics.get("final_val_loss").copied()),
                gate_of(v),
            ]
        })
        .collect();
    let mut out = format!("agent {agent}: {} version(s)\n\n", versions.len());
    out += &table(
        &["VERSION", "ALIASES", "CREATED", "BY", "PARENT", "TRAIN", "STEPS", "VAL_LOSS", "GATE"],
        &rows,
    );
    out
}

/// `registry show AGENT VERSION`: the whole lineage, readable.
pub fn render_show(v: &VersionInfo, aliases: &Aliases) -> String {
    let l = &v.lineage;
    let b = &l.base_model;
    let mut rows = vec![
        vec!["agent".into(), l.agent.clone()],
        vec!["version".into(), v.version.clone()],
        vec!["aliases".into(), aliases_of(aliases, &v.version)],
        vec!["parent".into(), opt(&l.parent)],
        vec!["created".into(), format!("{} by {}", l.created_at, l.created_by)],
        vec!["adapter".into(), v.adapter_dir.display().to_string()],
        vec!["base model".into(), b.path.clone()],
        vec!["  config sha256".into(), b.config_sha256.clone()],
        vec![format!("  weights sha256 ({})", b.weights_hashed_from), b.weights_sha256.clone()],
        vec!["tokenizer sha256".into(), opt(&l.tokenizer_sha256)],
        vec!["gate".into(), gate_of(v)],
    ];
    if let Some(m) = &l.data_manifest {
        if let Some(n) = train_examples(v) {
            rows.push(vec!["train examples".into(), n.to_string()]);
        }
        if let Some(n) = m.get("validation").and_then(|x| x.as_array()).map(Vec::len) {
            rows.push(vec!["validation examples".into(), n.to_string()]);
        }
        if let Some(files) = m.get("train_files") {
            rows.push(vec!["train files".into(), files.to_string()]);
        }
    }
    let mut out = table(&["FIELD", "VALUE"], &rows);
    if !l.metrics.is_empty() {
        let rows: Vec<Vec<String>> = l.metrics.iter().map(|(k, x)| vec![k.clone(), num(Some(*x))]).collect();
        out += "\n";
        out += &table(&["METRIC", "VALUE"], &rows);
    }
    let rows: Vec<Vec<String>> =
        l.adapter_files.iter().map(|(f, h)| vec![f.clone(), h.bytes.to_string(), short(&h.sha256)]).collect();
    out += "\n";
    out += &table(&["ADAPTER FILE", "BYTES", "SHA256"], &rows);
    if let Some(g) = &l.gate_report {
        if let Some(reasons) = g.get("reasons").and_then(|r| r.as_array()) {
            out += "\ngate:\n";
            for r in reasons.iter().filter_map(|r| r.as_str()) {
                let _ = writeln!(out, "  - {r}");
            }
        }
    }
    if let Some(r) = &l.recipe {
        out += "\nrecipe:\n";
        for line in r.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// `aliases.json` as a table.
pub fn render_aliases(aliases: &Aliases) -> String {
    if aliases.is_empty() {
        return "no aliases set\n".to_string();
    }
    let rows: Vec<Vec<String>> = aliases
        .iter()
        .map(|(n, a)| vec![n.clone(), a.version.clone(), a.weight.map_or("-".into(), |w| format!("{w}%"))])
        .collect();
    table(&["ALIAS", "VERSION", "WEIGHT"], &rows)
}

/// `history.jsonl` as a table, oldest first.
pub fn render_history(history: &[HistoryEntry]) -> String {
    if history.is_empty() {
        return "no alias changes yet\n".to_string();
    }
    let rows: Vec<Vec<String>> = history
        .iter()
        .map(|e| {
            let action = serde_json::to_value(e.action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            vec![
                e.time.clone(),
                e.who.clone(),
                action,
                e.alias.clone(),
                format!("{} -> {}", opt(&e.from), e.to.clone().unwrap_or_else(|| "(removed)".into())),
                e.weight.map_or("-".into(), |w| format!("{w}%")),
                e.why.clone(),
            ]
        })
        .collect();
    table(&["TIME", "WHO", "ACTION", "ALIAS", "CHANGE", "WEIGHT", "WHY"], &rows)
}

fn same_or(a: &Option<String>, b: &Option<String>) -> String {
    if a == b {
        format!("same ({})", a.as_deref().map_or("-".to_string(), short))
    } else {
        format!(
            "differ: {} vs {}",
            a.as_deref().map_or("-".to_string(), short),
            b.as_deref().map_or("-".to_string(), short)
        )
    }
}

/// `registry diff AGENT A B`.
pub fn render_diff(d: &VersionDiff) -> String {
    let mut out = format!("agent {}: {} -> {}\n\n", d.agent, d.a, d.b);
    let base = if d.base_a.same_as(&d.base_b) {
        format!(
            "same (config {}, weights {})",
            short(&d.base_a.config_sha256),
            short(&d.base_a.weights_sha256)
        )
    } else {
        format!(
            "DIFFER: {} (config {}, weights {}) vs {} (config {}, weights {})",
            d.base_a.path,
            short(&d.base_a.config_sha256),
            short(&d.base_a.weights_sha256),
            d.base_b.path,
            short(&d.base_b.config_sha256),
            short(&d.base_b.weights_sha256)
        )
    };
    let rows = vec![
        vec!["parent".to_string(), format!("{} vs {}", opt(&d.parents.0), opt(&d.parents.1))],
        vec!["base model".to_string(), base],
        vec!["tokenizer".to_string(), same_or(&d.tokenizer.0, &d.tokenizer.1)],
        vec![
            "gate".to_string(),
            format!(
                "{} vs {}",
                d.gate.0.map_or("-", |p| if p { "passed" } else { "failed" }),
                d.gate.1.map_or("-", |p| if p { "passed" } else { "failed" })
            ),
        ],
    ];
    out += &table(&["FIELD", &format!("{} vs {}", d.a, d.b)], &rows);

    out += "\nrecipe:\n";
    if d.recipe.is_empty() {
        out += "  unchanged\n";
    }
    for (sign, line, ctx) in &d.recipe {
        let ctx = if ctx.is_empty() { String::new() } else { format!("  [{ctx}]") };
        let _ = writeln!(out, "  {sign} {}{ctx}", line.trim());
    }

    if !d.metrics.is_empty() {
        out += "\nmetrics:\n";
        let rows: Vec<Vec<String>> = d
            .metrics
            .iter()
            .map(|(k, a, b)| {
                let delta = match (a, b) {
                    (Some(a), Some(b)) if a != b => format!("{:+.4}", b - a),
                    (Some(_), Some(_)) => "=".to_string(),
                    _ => "-".to_string(),
                };
                vec![k.clone(), num(*a), num(*b), delta]
            })
            .collect();
        out += &indent(&table(&["METRIC", &d.a, &d.b, "CHANGE"], &rows));
    }

    out += "\ndata:\n";
    if d.data_examples.is_empty() && d.data_fields.is_empty() {
        out += "  no data manifest differences\n";
    }
    for e in &d.data_examples {
        let (n_add, n_rm) = (e.added.len(), e.removed.len());
        let _ = writeln!(
            out,
            "  {}: {} -> {} examples, {n_add} added, {n_rm} removed",
            e.split, e.count_a, e.count_b
        );
        for (sign, list) in [('+', &e.added), ('-', &e.removed)] {
            for h in list.iter().take(5) {
                let _ = writeln!(out, "    {sign} {}", short(h));
            }
            if list.len() > 5 {
                let _ = writeln!(out, "    {sign} ... {} more", list.len() - 5);
            }
        }
    }
    if !d.data_fields.is_empty() {
        let rows: Vec<Vec<String>> =
            d.data_fields.iter().map(|f| vec![f.field.clone(), opt(&f.a), opt(&f.b)]).collect();
        out += &indent(&table(&["FIELD", &d.a, &d.b], &rows));
    }

    out += "\nadapter:\n";
    if !d.adapter_config.is_empty() {
        let rows: Vec<Vec<String>> =
            d.adapter_config.iter().map(|f| vec![f.field.clone(), opt(&f.a), opt(&f.b)]).collect();
        out += &indent(&table(&["adapter_config.json", &d.a, &d.b], &rows));
    }
    if d.adapter_identical {
        out += "  files identical (same sha256)\n";
    }
    let only: Vec<&str> =
        d.tensors.iter().filter(|t| t.max_abs_diff.is_none()).map(|t| t.name.as_str()).collect();
    match d.max_abs_diff() {
        Some((name, m)) => {
            let n = d.tensors.iter().filter(|t| t.max_abs_diff.is_some()).count();
            if m == 0.0 {
                let _ = writeln!(out, "  tensors: {n} compared, all values equal");
            } else {
                let _ = writeln!(out, "  tensors: {n} compared, max abs difference {m:.3e} (in {name})");
            }
        }
        None => out += "  tensors: none in common to compare\n",
    }
    if !only.is_empty() {
        let _ = writeln!(out, "  {} tensor(s) only in one version or with different shapes:", only.len());
        for t in d.tensors.iter().filter(|t| t.max_abs_diff.is_none()).take(10) {
            let shape =
                |s: &Option<Vec<usize>>| s.as_ref().map_or("absent".to_string(), |s| format!("{s:?}"));
            let _ = writeln!(out, "    {}: {} vs {}", t.name, shape(&t.shape_a), shape(&t.shape_b));
        }
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}
