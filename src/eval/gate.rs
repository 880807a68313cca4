//! The promotion gate: a candidate adapter goes to users only when its task metric
//! beats the version in service (or the base) by a margin, and its metric on a
//! general regression set stays within a tolerance of the base model's. The report
//! (JSON + Markdown) says why it passed or failed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::EvalReport;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    /// `tool_call_accuracy`, `exact_match`, `token_accuracy`, `loss` or `perplexity`.
    pub task_metric: String,
    /// How much the candidate must beat the current version by (in the metric's units;
    /// strictly more than this).
    pub margin: f64,
    pub regression_metric: String,
    /// How much worse than the base the candidate may be on the regression set.
    pub tolerance: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            task_metric: "token_accuracy".into(),
            margin: 0.0,
            regression_metric: "loss".into(),
            tolerance: 0.05,
        }
    }
}

/// Lower is better for losses; higher for rates.
pub fn lower_is_better(metric: &str) -> bool {
    matches!(metric, "loss" | "perplexity")
}

/// Whether a metric needs generated text (else the loss pass is enough).
pub fn needs_generation(metric: &str) -> bool {
    matches!(metric, "exact_match" | "tool_call_accuracy")
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub metric: String,
    pub candidate: Option<f64>,
    /// The version compared against: the one in service (task) or the base (regression).
    pub reference: Option<f64>,
    pub reference_label: String,
    /// Candidate better by this much (positive = better, whatever the metric's direction).
    pub improvement: Option<f64>,
    pub threshold: f64,
    pub passed: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    pub candidate: String,
    pub passed: bool,
    pub task: Comparison,
    pub regression: Comparison,
    pub reasons: Vec<String>,
}

fn compare(
    metric: &str,
    cand: Option<f64>,
    reference: Option<f64>,
    label: &str,
    threshold: f64,
    task: bool,
) -> Comparison {
    let improvement = match (cand, reference) {
        (Some(c), Some(r)) => Some(if lower_is_better(metric) { r - c } else { c - r }),
        _ => None,
    };
    // task: improvement > margin; regression: improvement >= −tolerance
    let passed = improvement.is_some_and(|i| if task { i > threshold } else { i >= -threshold });
    Comparison {
        metric: metric.into(),
        candidate: cand,
        reference,
        reference_label: label.into(),
        improvement,
        threshold,
        passed,
    }
}

/// Decides the gate from the four evaluations it needs.
pub fn decide(
    cfg: &GateConfig,
    candidate: &str,
    current_label: &str,
    cand_task: &EvalReport,
    current_task: &EvalReport,
    cand_regression: &EvalReport,
    base_regression: &EvalReport,
) -> GateReport {
    let tm = &cfg.task_metric;
    let rm = &cfg.regression_metric;
    let task = compare(tm, cand_task.metric(tm), current_task.metric(tm), current_label, cfg.margin, true);
    let regression =
        compare(rm, cand_regression.metric(rm), base_regression.metric(rm), "base", cfg.tolerance, false);
    let fmt = |x: Option<f64>| x.map_or("not measured".to_string(), |v| format!("{v:.4}"));
    let mut reasons = Vec::new();
    reasons.push(match (task.passed, task.improvement) {
        (_, None) => format!(
            "task {tm}: {} for the candidate, {} for {current_label}: cannot compare",
            fmt(task.candidate),
            fmt(task.reference)
        ),
        (true, Some(i)) => format!(
            "task {tm}: {} vs {} for {current_label}, better by {i:.4} > margin {}",
            fmt(task.candidate),
            fmt(task.reference),
            cfg.margin
        ),
        (false, Some(i)) => format!(
            "task {tm}: {} vs {} for {current_label}, better by {i:.4}, not more than margin {}",
            fmt(task.candidate),
            fmt(task.reference),
            cfg.margin
        ),
    });
    reasons.push(match (regression.passed, regression.improvement) {
        (_, None) => format!(
            "regression {rm}: {} for the candidate, {} for the base: cannot compare",
            fmt(regression.candidate),
            fmt(regression.reference)
        ),
        (true, Some(i)) if i >= 0.0 => format!(
            "regression {rm}: {} vs {} for the base, better by {i:.4}",
            fmt(regression.candidate),
            fmt(regression.reference),
        ),
        (true, Some(i)) => format!(
            "regression {rm}: {} vs {} for the base, worse by {:.4}, within tolerance {}",
            fmt(regression.candidate),
            fmt(regression.reference),
            -i,
            cfg.tolerance
        ),
        (false, Some(i)) => format!(
            "regression {rm}: {} vs {} for the base, worse by {:.4} > tolerance {}",
            fmt(regression.candidate),
            fmt(regression.reference),
            -i,
            cfg.tolerance
        ),
    });
    GateReport {
        candidate: candidate.into(),
        passed: task.passed && regression.passed,
        task,
        regression,
        reasons,
    }
}

impl GateReport {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        let _ = writeln!(s, "# Gate {verdict}: {}\n", self.candidate);
        let _ = writeln!(s, "| check | metric | candidate | reference | change | threshold | result |");
        let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
        for (name, c, thr) in [
            ("task", &self.task, format!("> {}", self.task.threshold)),
            ("regression", &self.regression, format!(">= -{}", self.regression.threshold)),
        ] {
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} ({}) | {} | {thr} | {} |",
                c.metric,
                f(c.candidate),
                f(c.reference),
                c.reference_label,
                c.improvement.map_or("-".to_string(), |v| format!("{v:+.4}")),
                if c.passed { "pass" } else { "fail" }
            );
        }
        let _ = writeln!(s, "\nWhy:");
        for r in &self.reasons {
            let _ = writeln!(s, "- {r}");
        }
        s
    }

    /// Writes `gate.json` and `gate.md` into `dir`, each atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::util::atomic_write(&dir.join("gate.json"), &serde_json::to_vec_pretty(self)?)?;
        crate::util::atomic_write(&dir.join("gate.md"), self.markdown().as_bytes())
    }
}

/// What a gate compares, and on which base.
pub struct GateInputs<'a> {
    /// The base model's directory (its weights, tokenizer and chat template).
    pub model_dir: &'a Path,
    pub candidate: &'a Path,
    /// The adapter in service; `None`: the base model alone.
    pub current: Option<&'a Path>,
    pub task: &'a [PathBuf],
    pub regression: &'a [PathBuf],
    pub cfg: &'a GateConfig,
    pub opts: &'a super::EvalOptions,
}

impl GateInputs<'_> {
    /// Loads the base, the candidate and the current adapter, runs the four evaluations
    /// the gate needs (generating only when a metric needs it) and decides.
    pub fn run<O: crate::ops::Ops>(&self, ops: &O) -> Result<GateReport> {
        let mut model = crate::model::Model::load(ops, self.model_dir)?;
        self.run_on(ops, &mut model)
    }

    /// [`run`](Self::run) on the base model already loaded on `ops` (`tuneloop loop`
    /// loads it once for all its agents), which gets room for the adapters' low-rank
    /// updates; its weights stay as they are.
    pub fn run_on<O: crate::ops::Ops>(
        &self,
        ops: &O,
        model: &mut crate::model::Model<O::Tensor>,
    ) -> Result<GateReport> {
        use crate::model::Adapter;
        let Self { model_dir, candidate, current, task, regression, cfg, opts } = *self;
        let chat = crate::data::ChatModel::load(model_dir)?;
        let cand = Adapter::load(ops, candidate, &model.cfg)?;
        let cur = current.map(|c| Adapter::load(ops, c, &model.cfg)).transpose()?;
        for a in std::iter::once(&cand).chain(&cur) {
            model.reserve_lora_tails(ops, a)?;
        }
        let task_set = super::load_set(task)?;
        let reg_set = super::load_set(regression)?;
        let task_opts = super::EvalOptions { generate: needs_generation(&cfg.task_metric), ..opts.clone() };
        let reg_opts =
            super::EvalOptions { generate: needs_generation(&cfg.regression_metric), ..opts.clone() };
        let model = &*model;
        let eval = |a: Option<&Adapter<O::Tensor>>, set, o| super::evaluate(ops, model, a, &chat, set, o);
        let cand_task = eval(Some(&cand), &task_set, &task_opts)?;
        let cur_task = eval(cur.as_ref(), &task_set, &task_opts)?;
        let cand_reg = eval(Some(&cand), &reg_set, &reg_opts)?;
        let base_reg = eval(None, &reg_set, &reg_opts)?;
        let label = current.map_or("base".to_string(), |c| c.display().to_string());
        Ok(decide(cfg, &candidate.display().to_string(), &label, &cand_task, &cur_task, &cand_reg, &base_reg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(loss: f64, tool: Option<f64>) -> EvalReport {
        EvalReport { loss: Some(loss), tool_call_accuracy: tool, ..Default::default() }
    }

    fn cfg(metric: &str, margin: f64, tol: f64) -> GateConfig {
        GateConfig { task_metric: metric.into(), margin, regression_metric: "loss".into(), tolerance: tol }
    }

    /// Candidate "v2" against "v1": the task set's reports, then the regression set's
    /// (candidate first in each).
    fn vs_v1(cfg: &GateConfig, task: [EvalReport; 2], regression: [EvalReport; 2]) -> GateReport {
        decide(cfg, "v2", "v1", &task[0], &task[1], &regression[0], &regression[1])
    }

    #[test]
    fn passes_when_better_by_the_margin_and_no_regression() {
        let r = vs_v1(
            &cfg("tool_call_accuracy", 0.05, 0.1),
            [rep(1.0, Some(0.8)), rep(1.2, Some(0.7))],
            [rep(2.05, None), rep(2.0, None)],
        );
        assert!(r.passed, "{}", r.markdown());
        assert!(r.markdown().contains("PASSED"));
        // the regression loss rose within the tolerance: said as worse, not as a change
        assert!(r.reasons[1].contains("worse by 0.0500, within tolerance 0.1"), "{:?}", r.reasons);
        let lower = vs_v1(
            &cfg("tool_call_accuracy", 0.05, 0.1),
            [rep(1.0, Some(0.8)), rep(1.2, Some(0.7))],
            [rep(1.5, None), rep(2.0, None)],
        );
        assert!(lower.passed && lower.reasons[1].contains("1.5000 vs 2.0000 for the base, better by 0.5000"));
    }

    #[test]
    fn fails_below_margin_on_regression_or_when_unmeasured() {
        let too_small = vs_v1(
            &cfg("tool_call_accuracy", 0.15, 0.1),
            [rep(1.0, Some(0.8)), rep(1.2, Some(0.7))],
            [rep(2.0, None), rep(2.0, None)],
        );
        assert!(!too_small.passed && !too_small.task.passed && too_small.regression.passed);
        assert!(too_small.reasons[0].contains("not more than margin"));
        let regressed = vs_v1(
            &cfg("tool_call_accuracy", 0.0, 0.1),
            [rep(1.0, Some(0.9)), rep(1.2, Some(0.7))],
            [rep(2.3, None), rep(2.0, None)],
        );
        assert!(!regressed.passed && regressed.task.passed && !regressed.regression.passed);
        assert!(regressed.reasons[1].contains("worse by 0.3000"), "{:?}", regressed.reasons);
        let unmeasured = decide(
            &cfg("tool_call_accuracy", 0.0, 0.1),
            "v2",
            "base",
            &rep(1.0, None),
            &rep(1.2, None),
            &rep(2.0, None),
            &rep(2.0, None),
        );
        assert!(!unmeasured.passed && unmeasured.reasons[0].contains("cannot compare"));
    }

    #[test]
    fn loss_as_task_metric_means_lower_is_better() {
        let r =
            vs_v1(&cfg("loss", 0.1, 0.1), [rep(1.0, None), rep(1.2, None)], [rep(2.0, None), rep(2.0, None)]);
        assert!(r.passed);
        let r =
            vs_v1(&cfg("loss", 0.0, 0.1), [rep(1.3, None), rep(1.2, None)], [rep(2.0, None), rep(2.0, None)]);
        assert!(!r.passed);
    }
}
