//! PNG charts of benchmark results: throughput over time and latency by percentile for one
//! run, and bar charts that put brokers or settings side by side.
//!
//! Text is drawn with a TrueType font read from the system (DejaVu or Liberation, or the file
//! named by `SLUICE_BENCH_FONT`) and registered once per process; without one, charts cannot
//! be drawn and callers get an error saying so, while the numbers are still reported.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::error::BenchError;
use crate::report::RunReport;

const WIDTH_PX: u32 = 1000;
const HEIGHT_PX: u32 = 560;
const FONT_FAMILY: &str = "sans-serif";
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
];

static FONT: OnceLock<Result<(), String>> = OnceLock::new();

/// Registers a system font for chart text, once.
fn ensure_font() -> Result<(), String> {
    FONT.get_or_init(|| {
        let from_env = std::env::var_os("SLUICE_BENCH_FONT").map(PathBuf::from);
        let candidates = from_env
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(PathBuf::from));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // Fonts registered with plotters must live for the whole process; this one
                // is loaded once and never freed.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err("no TrueType font found (install fonts-dejavu-core or set SLUICE_BENCH_FONT)".into())
    })
    .clone()
}

fn chart_error(path: &Path, error: impl std::fmt::Display) -> BenchError {
    BenchError::Chart {
        path: path.to_owned(),
        reason: error.to_string(),
    }
}

/// Draws `<dir>/<stem>-throughput.png` and, if the run measured latency,
/// `<dir>/<stem>-latency.png`. Returns the files written.
pub fn draw_run(report: &RunReport, dir: &Path, stem: &str) -> Result<Vec<PathBuf>, BenchError> {
    ensure_font().map_err(|reason| chart_error(dir, reason))?;
    std::fs::create_dir_all(dir).map_err(|source| BenchError::io("create", dir, source))?;
    let mut written = Vec::new();
    if !report.timeline.is_empty() {
        let path = dir.join(format!("{stem}-throughput.png"));
        draw_throughput(report, &path).map_err(|error| chart_error(&path, error))?;
        written.push(path);
    }
    if let Some(latency) = &report.latency
        && latency.curve.len() > 1
    {
        let path = dir.join(format!("{stem}-latency.png"));
        draw_latency(&report.name, &latency.curve, &path)
            .map_err(|error| chart_error(&path, error))?;
        written.push(path);
    }
    Ok(written)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw_throughput(report: &RunReport, path: &Path) -> DrawResult {
    let root = BitMapBackend::new(path, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
    root.fill(&WHITE)?;
    let t_max = report.timeline.last().map_or(1.0, |s| s.t_s).max(1.0);
    let y_max = report
        .timeline
        .iter()
        .map(|s| s.sent_per_s.max(s.received_per_s))
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: messages per second", report.name),
            (FONT_FAMILY, 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("msg/s")
        .y_label_formatter(&|v| crate::meter::human_count(*v))
        .label_style((FONT_FAMILY, 14))
        .draw()?;
    let sent: Vec<(f64, f64)> = report
        .timeline
        .iter()
        .map(|s| (s.t_s, s.sent_per_s))
        .collect();
    let received: Vec<(f64, f64)> = report
        .timeline
        .iter()
        .map(|s| (s.t_s, s.received_per_s))
        .collect();
    chart
        .draw_series(LineSeries::new(sent, BLUE.stroke_width(2)))?
        .label("sent")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(received, RED.stroke_width(2)))?
        .label("received")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FONT_FAMILY, 14))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Latency by percentile, with the percentile axis stretched so the tail is visible: x is
/// `1 / (1 - p)`, on a log scale (50% → 2, 99% → 100, 99.9% → 1000).
fn draw_latency(name: &str, curve: &[(f64, u64)], path: &Path) -> DrawResult {
    let root = BitMapBackend::new(path, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
    root.fill(&WHITE)?;
    let points: Vec<(f64, f64)> = curve
        .iter()
        .filter(|(percentile, _)| *percentile < 100.0)
        .map(|(percentile, us)| (1.0 / (1.0 - percentile / 100.0), *us as f64 / 1000.0))
        .collect();
    let x_max = points.last().map_or(10.0, |p| p.0).max(10.0);
    let y_max = curve
        .iter()
        .map(|(_, us)| *us as f64 / 1000.0)
        .fold(0.001, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{name}: end-to-end latency by percentile"),
            (FONT_FAMILY, 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d((1.0..x_max).log_scale(), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .x_label_formatter(&|x| percentile_label(*x))
        .label_style((FONT_FAMILY, 14))
        .draw()?;
    chart.draw_series(LineSeries::new(points, BLUE.stroke_width(2)))?;
    root.present()?;
    Ok(())
}

/// The percentile at `x = 1 / (1 - p)`, as `99.9%`.
fn percentile_label(x: f64) -> String {
    let percentile = format!("{:.4}", 100.0 * (1.0 - 1.0 / x));
    let trimmed = percentile.trim_end_matches('0').trim_end_matches('.');
    format!("{trimmed}%")
}

/// One group of bars: a label under the group and one value per series.
#[derive(Debug, Clone)]
pub struct BarGroup {
    pub label: String,
    pub values: Vec<Option<f64>>,
}

const SERIES_COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// A grouped bar chart: `series` names the bars inside each group (for example Sluice and
/// RabbitMQ), `groups` the workloads. Missing values leave a gap.
pub fn draw_bars(
    title: &str,
    y_desc: &str,
    series: &[&str],
    groups: &[BarGroup],
    path: &Path,
) -> Result<(), BenchError> {
    ensure_font().map_err(|reason| chart_error(path, reason))?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|source| BenchError::io("create", parent, source))?;
    }
    draw_bars_inner(title, y_desc, series, groups, path).map_err(|error| chart_error(path, error))
}

fn draw_bars_inner(
    title: &str,
    y_desc: &str,
    series: &[&str],
    groups: &[BarGroup],
    path: &Path,
) -> DrawResult {
    let root = BitMapBackend::new(path, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
    root.fill(&WHITE)?;
    let y_max = groups
        .iter()
        .flat_map(|g| g.values.iter().flatten().copied())
        .fold(1e-9, f64::max)
        * 1.15;
    let group_count = groups.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT_FAMILY, 22))
        .margin(16)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..group_count as f64, 0.0..y_max)?;
    let labels: Vec<String> = groups.iter().map(|g| g.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(group_count * 2 + 1)
        .x_label_formatter(&|x| {
            let index = x.floor() as usize;
            if (x - index as f64 - 0.5).abs() < 0.01 {
                labels.get(index).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .y_label_formatter(&|v| crate::meter::human_count(*v))
        .label_style((FONT_FAMILY, 13))
        .draw()?;
    let width = 0.8 / series.len().max(1) as f64;
    for (index, name) in series.iter().enumerate() {
        let colour = SERIES_COLOURS[index % SERIES_COLOURS.len()];
        let bars = groups.iter().enumerate().filter_map(move |(group, g)| {
            let value = g.values.get(index).copied().flatten()?;
            let left = group as f64 + 0.1 + width * index as f64;
            Some(Rectangle::new(
                [(left, 0.0), (left + width * 0.95, value)],
                colour.filled(),
            ))
        });
        chart
            .draw_series(bars)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FONT_FAMILY, 14))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::Sample;
    use crate::report::{LatencySummary, Throughput};

    fn report() -> RunReport {
        RunReport {
            name: "chart test".into(),
            protocol: "amqp".into(),
            target: "x".into(),
            settings: serde_json::Value::Null,
            started_unix_ms: 0,
            send: Some(Throughput::new(3, 48, 3.0)),
            receive: Some(Throughput::new(3, 48, 3.0)),
            expected_receive_count: 3,
            latency: Some(LatencySummary {
                count: 3,
                p50_us: 100,
                p90_us: 200,
                p99_us: 300,
                p999_us: 300,
                max_us: 300,
                mean_us: 200.0,
                foreign_count: 0,
                curve: vec![(50.0, 100), (90.0, 200), (99.0, 300), (100.0, 300)],
            }),
            error_count: 0,
            errors: vec![],
            broker_rss: None,
            notes: vec![],
            timeline: (1..4)
                .map(|t| Sample {
                    t_s: f64::from(t),
                    sent_per_s: 1.0,
                    received_per_s: 1.0,
                    broker_rss_bytes: None,
                })
                .collect(),
        }
    }

    #[test]
    fn percentile_labels_read_naturally() {
        assert_eq!(percentile_label(2.0), "50%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(1.0), "0%");
    }

    #[test]
    fn charts_are_written_as_png() {
        if ensure_font().is_err() {
            eprintln!("skipped: no font on this machine");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let written = draw_run(&report(), dir.path(), "run").unwrap();
        assert_eq!(written.len(), 2);
        for path in &written {
            let bytes = std::fs::read(path).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{}", path.display());
        }
        let bars = dir.path().join("bars.png");
        draw_bars(
            "t",
            "msg/s",
            &["a", "b"],
            &[
                BarGroup {
                    label: "one".into(),
                    values: vec![Some(1.0), Some(2.0)],
                },
                BarGroup {
                    label: "two".into(),
                    values: vec![None, Some(3.0)],
                },
            ],
            &bars,
        )
        .unwrap();
        assert!(std::fs::metadata(&bars).unwrap().len() > 1000);
    }
}
