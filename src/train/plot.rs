//! The loss curve as a PNG: training loss (blue line) and validation loss (red dots)
//! against the step, on a faint grid. No text is drawn: bitmap text needs system font
//! libraries, which tuneloop does not depend on; `metrics.jsonl` has the numbers.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::trainer::Metrics;

pub fn loss_curve_png(history: &[Metrics], path: &Path) -> Result<()> {
    let train: Vec<(f64, f64)> = history.iter().filter_map(|m| Some((m.step as f64, m.loss?))).collect();
    let val: Vec<(f64, f64)> = history.iter().filter_map(|m| Some((m.step as f64, m.val_loss?))).collect();
    let all = train.iter().chain(&val);
    let (mut y0, mut y1, mut x1) = (f64::INFINITY, f64::NEG_INFINITY, 1.0f64);
    for &(x, y) in all {
        if y.is_finite() {
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        x1 = x1.max(x);
    }
    if !y0.is_finite() {
        return Ok(()); // nothing to draw
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (800, 480)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e:?}", path.display());
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(20)
            .build_cartesian_2d(0.0..x1, (y0 - pad)..(y1 + pad))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_labels(10)
            .y_labels(8)
            .x_label_formatter(&|_| String::new())
            .y_label_formatter(&|_| String::new())
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(210, 210, 210))
            .draw()
            .map_err(err)?;
        chart.draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2))).map_err(err)?;
        chart.draw_series(val.iter().map(|&p| Circle::new(p, 4, RED.filled()))).map_err(err)?;
        root.present().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(|e| anyhow!("renaming into {}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let h: Vec<Metrics> = (1..=20)
            .map(|s| Metrics {
                step: s,
                loss: Some(5.0 / s as f64),
                val_loss: (s % 5 == 0).then(|| 5.5 / s as f64),
                ..Default::default()
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        loss_curve_png(&h, &p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(!dir.path().join("loss.tmp.png").exists());
    }
}
