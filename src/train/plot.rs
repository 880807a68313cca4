//! The loss curve as a PNG: training loss (blue line) and validation loss (red dots)
//! against the step, on a faint grid at round values, with the values, the axis name
//! and a legend written in an 8×8 bitmap font (`font8x8`: no system font libraries).
//! `metrics.jsonl` has the numbers.

use std::path::Path;

use anyhow::{anyhow, Result};
use font8x8::UnicodeFonts as _;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::trainer::Metrics;

const SIZE: (u32, u32) = (800, 480);
/// Pixels a font pixel takes on each side.
const TEXT_SCALE: i32 = 2;
const GLYPH: i32 = 8 * TEXT_SCALE;

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
    let (y0, y1) = (y0 - pad, y1 + pad);
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e:?}", path.display());
        root.fill(&WHITE).map_err(err)?;
        let y_ticks = ticks(y0, y1, 8);
        let x_ticks = ticks(0.0, x1, 10);
        let y_label_width = y_ticks.iter().map(|(_, text)| text.len()).max().unwrap_or(1) as i32;
        let mut chart = ChartBuilder::on(&root)
            .margin(20)
            .margin_top(20 + GLYPH + 8) // the legend
            .margin_right(20 + 2 * GLYPH) // half the last step's value
            .x_label_area_size(2 * GLYPH + 16) // the values and the axis name
            .y_label_area_size(y_label_width * GLYPH + 12)
            .build_cartesian_2d(0.0..x1, y0..y1)
            .map_err(err)?;
        let grid = ShapeStyle::from(&RGBColor(225, 225, 225)).stroke_width(1);
        for &(x, _) in &x_ticks {
            chart.draw_series(std::iter::once(PathElement::new([(x, y0), (x, y1)], grid))).map_err(err)?;
        }
        for &(y, _) in &y_ticks {
            chart.draw_series(std::iter::once(PathElement::new([(0.0, y), (x1, y)], grid))).map_err(err)?;
        }
        let axes = ShapeStyle::from(&RGBColor(120, 120, 120)).stroke_width(1);
        chart
            .draw_series(std::iter::once(PathElement::new([(0.0, y1), (0.0, y0), (x1, y0)], axes)))
            .map_err(err)?;
        chart.draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2))).map_err(err)?;
        chart.draw_series(val.iter().map(|&p| Circle::new(p, 4, RED.filled()))).map_err(err)?;

        let ink = RGBColor(60, 60, 60);
        for (x, text) in &x_ticks {
            let (px, py) = chart.backend_coord(&(*x, y0));
            draw_text(&root, text, (px - width(text) / 2, py + 6), &ink).map_err(err)?;
        }
        for (y, text) in &y_ticks {
            let (px, py) = chart.backend_coord(&(0.0, *y));
            draw_text(&root, text, (px - 8 - width(text), py - GLYPH / 2), &ink).map_err(err)?;
        }
        let (left, bottom) = chart.backend_coord(&(0.0, y0));
        let (right, _) = chart.backend_coord(&(x1, y0));
        draw_text(&root, "step", ((left + right - width("step")) / 2, bottom + GLYPH + 12), &ink)
            .map_err(err)?;
        // legend, top right: a 24-pixel blue line and "train loss", a gap of one glyph, a
        // red dot and "val loss"
        let (top, mid) = (20, 20 + GLYPH / 2);
        let (train_text, val_text) = ("train loss", "val loss");
        let mut x = SIZE.0 as i32 - 20 - (32 + width(train_text) + GLYPH + 16 + width(val_text));
        root.draw(&PathElement::new([(x, mid), (x + 24, mid)], BLUE.stroke_width(2))).map_err(err)?;
        draw_text(&root, train_text, (x + 32, top), &ink).map_err(err)?;
        x += 32 + width(train_text) + GLYPH;
        root.draw(&Circle::new((x + 4, mid), 4, RED.filled())).map_err(err)?;
        draw_text(&root, val_text, (x + 16, top), &ink).map_err(err)?;
        root.present().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(|e| anyhow!("renaming into {}: {e}", path.display()))?;
    Ok(())
}

/// Round values from `lo` to `hi` at a step of 1, 2 or 5 times a power of ten, about
/// `n` of them, each with its label: as many decimals as the step needs.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<(f64, String)> {
    let span = hi - lo;
    if span.is_nan() || span <= 0.0 || span.is_infinite() {
        return vec![(lo, format!("{lo}"))];
    }
    let rough = span / n.max(1) as f64;
    let pow = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * pow).find(|&s| s >= rough).unwrap_or(10.0 * pow);
    // (log10 of 0.1 may come out a hair above or below -1)
    let decimals = if step >= 1.0 { 0 } else { (-step.log10() - 1e-9).ceil() as usize };
    let (first, last) = ((lo / step).ceil() as i64, (hi / step).floor() as i64);
    (first..=last)
        .map(|i| {
            let v = i as f64 * step;
            (v, format!("{v:.decimals$}"))
        })
        .collect()
}

/// Pixels `text` takes across.
fn width(text: &str) -> i32 {
    text.chars().count() as i32 * GLYPH
}

/// Writes `text` with its top-left corner at `at`, each font pixel a [`TEXT_SCALE`]-wide
/// square. A character the font lacks is left blank.
fn draw_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    at: (i32, i32),
    color: &RGBColor,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    for (i, c) in text.chars().enumerate() {
        let Some(rows) = font8x8::BASIC_FONTS.get(c) else { continue };
        let x0 = at.0 + i as i32 * GLYPH;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..8 {
                // bit 0 is the leftmost pixel of the row
                if bits & (1 << col) != 0 {
                    let (x, y) = (x0 + col * TEXT_SCALE, at.1 + r as i32 * TEXT_SCALE);
                    for (dx, dy) in (0..TEXT_SCALE).flat_map(|dx| (0..TEXT_SCALE).map(move |dy| (dx, dy))) {
                        area.draw_pixel((x + dx, y + dy), color)?;
                    }
                }
            }
        }
    }
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

    #[test]
    fn ticks_are_round_values_inside_the_range() {
        let labels = |t: Vec<(f64, String)>| t.into_iter().map(|(_, s)| s).collect::<Vec<_>>();
        let values = |t: Vec<(f64, String)>| t.into_iter().map(|(v, _)| v).collect::<Vec<_>>();
        assert_eq!(values(ticks(0.0, 100.0, 10)), (0..=10).map(|i| 10.0 * i as f64).collect::<Vec<_>>());
        assert_eq!(values(ticks(1.93, 9.83, 8)), vec![2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
        assert_eq!(
            labels(ticks(2.031, 2.069, 8)),
            ["2.035", "2.040", "2.045", "2.050", "2.055", "2.060", "2.065"]
        );
        assert_eq!(labels(ticks(0.0, 3.0, 10))[..3], ["0.0", "0.5", "1.0"]);
        assert_eq!(labels(ticks(6.33, 6.93, 8)), ["6.4", "6.5", "6.6", "6.7", "6.8", "6.9"]);
        assert_eq!(values(ticks(4.0, 4.0, 8)), vec![4.0]);
        // a range through zero: "0.0", never "-0.0"
        assert_eq!(labels(ticks(-0.27, 0.26, 5)), ["-0.2", "0.0", "0.2"]);
    }

    #[test]
    fn text_is_the_fonts_pixels() {
        let (w, h) = (3 * GLYPH as u32, GLYPH as u32);
        let mut buf = vec![255u8; (w * h * 3) as usize];
        {
            let area = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
            draw_text(&area, "1.5", (0, 0), &BLACK).unwrap();
            area.present().unwrap();
        }
        for (i, c) in "1.5".chars().enumerate() {
            let rows = font8x8::BASIC_FONTS.get(c).unwrap();
            assert!(rows.iter().any(|&r| r != 0), "{c} has pixels");
            for y in 0..h as usize {
                for x in 0..GLYPH as usize {
                    let bit = rows[y / TEXT_SCALE as usize] & (1 << (x / TEXT_SCALE as usize)) != 0;
                    let px = buf[3 * (y * w as usize + i * GLYPH as usize + x)];
                    assert_eq!(px == 0, bit, "{c}: pixel ({x}, {y})");
                }
            }
        }
    }
}
