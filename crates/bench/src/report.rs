//! The result of one client run (Kafka or AMQP), as written to JSON and Markdown.
//!
//! Units are in the field names. MB means 10^6 bytes, as fio and most broker benchmarks
//! print it; MiB is spelled out where it is meant. Latencies are end-to-end, from the
//! producer stamping the payload to the consumer reading it, in microseconds.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::BenchError;
use crate::meter::{Latency, RssSummary, Sample};

/// Points kept for the latency-by-percentile curve: enough to draw, small enough to store.
const CURVE_POINTS_MAX: usize = 200;

/// Messages and bytes moved over a span of time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub count: u64,
    pub bytes: u64,
    pub elapsed_s: f64,
    pub msgs_per_s: f64,
    pub mb_per_s: f64,
}

impl Throughput {
    pub fn new(count: u64, bytes: u64, elapsed_s: f64) -> Self {
        // A single message has no span; count it over a microsecond rather than divide by 0.
        let span_s = elapsed_s.max(1e-6);
        Self {
            count,
            bytes,
            elapsed_s,
            msgs_per_s: count as f64 / span_s,
            mb_per_s: bytes as f64 / span_s / 1e6,
        }
    }
}

/// End-to-end latency percentiles, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    /// Messages whose payload was not one of ours; they have no latency.
    pub foreign_count: u64,
    /// `(percentile in 0..=100, latency µs)` points of the whole distribution, for charts.
    pub curve: Vec<(f64, u64)>,
}

impl LatencySummary {
    pub fn from_latency(latency: &Latency) -> Option<Self> {
        let histogram = latency.histogram();
        if histogram.is_empty() {
            return None;
        }
        let mut curve: Vec<(f64, u64)> = histogram
            .iter_quantiles(1)
            .map(|point| {
                (
                    point.quantile_iterated_to() * 100.0,
                    histogram.highest_equivalent(point.value_iterated_to()),
                )
            })
            .collect();
        if curve.len() > CURVE_POINTS_MAX {
            let step = curve.len().div_ceil(CURVE_POINTS_MAX);
            let last = curve.last().copied();
            curve = curve.into_iter().step_by(step).collect();
            if let Some(last) = last
                && curve.last() != Some(&last)
            {
                curve.push(last);
            }
        }
        Some(Self {
            count: histogram.len(),
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            mean_us: histogram.mean(),
            foreign_count: latency.foreign_count(),
            curve,
        })
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub name: String,
    /// `kafka` or `amqp`.
    pub protocol: String,
    /// The broker address or URI the run talked to.
    pub target: String,
    /// The options the run was started with, as given.
    pub settings: serde_json::Value,
    pub started_unix_ms: u64,
    /// Messages the broker accepted, from the first send to the last acknowledgement.
    pub send: Option<Throughput>,
    /// Messages consumers received, from the first to the last.
    pub receive: Option<Throughput>,
    /// Messages consumers should have received (sent × copies per message).
    pub expected_receive_count: u64,
    pub latency: Option<LatencySummary>,
    pub error_count: u64,
    pub errors: Vec<String>,
    pub broker_rss: Option<RssSummary>,
    pub timeline: Vec<Sample>,
    /// What a reader must know to read the figures, for example that a time cap stopped
    /// sending before the count was reached.
    #[serde(default)]
    pub notes: Vec<String>,
}

impl RunReport {
    /// Messages that should have arrived and did not.
    pub fn missing_count(&self) -> u64 {
        let received = self.receive.map_or(0, |r| r.count);
        self.expected_receive_count.saturating_sub(received)
    }

    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        write_json(path, self)
    }

    /// A two-column Markdown table of the run's figures.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "### {} ({} → {})\n",
            self.name, self.protocol, self.target
        );
        let _ = writeln!(out, "| figure | value |\n| --- | --- |");
        let mut row = |figure: &str, value: String| {
            let _ = writeln!(out, "| {figure} | {value} |");
        };
        if let Some(send) = &self.send {
            row("sent messages", send.count.to_string());
            row("send rate", format_rate(send));
        }
        if let Some(receive) = &self.receive {
            row("received messages", receive.count.to_string());
            row("receive rate", format_rate(receive));
        }
        if self.missing_count() > 0 {
            row("missing messages", self.missing_count().to_string());
        }
        if let Some(latency) = &self.latency {
            row(
                "latency p50 / p90 / p99 / p99.9 / max",
                format!(
                    "{} / {} / {} / {} / {} ms",
                    format_ms(latency.p50_us),
                    format_ms(latency.p90_us),
                    format_ms(latency.p99_us),
                    format_ms(latency.p999_us),
                    format_ms(latency.max_us)
                ),
            );
        }
        if let Some(rss) = &self.broker_rss {
            row(
                "broker RSS start / peak",
                format!(
                    "{:.0} / {:.0} MiB",
                    rss.start_bytes as f64 / 1048576.0,
                    rss.peak_bytes as f64 / 1048576.0
                ),
            );
        }
        row("errors", self.error_count.to_string());
        for note in &self.notes {
            row("note", note.replace('|', "\\|"));
        }
        for error in &self.errors {
            row("error sample", error.replace('|', "\\|"));
        }
        out
    }
}

/// Notes on a run whose count or drain was cut short by a time cap.
pub fn cap_notes(
    load: &crate::load::LoadOptions,
    producer_count: usize,
    report: &RunReport,
) -> Vec<String> {
    let mut notes = Vec::new();
    let sent = report.send.map_or(0, |s| s.count);
    if let (Some(count), Some(seconds)) = (load.count, load.send_timeout_s)
        && producer_count > 0
        && sent < count
    {
        notes.push(format!(
            "sending stopped at the {seconds:.0} s cap after {sent} of {count} messages"
        ));
    }
    if report.missing_count() > 0 {
        notes.push(format!(
            "{} messages were not received before consumers stopped (no progress for {:.0} s, or the run's {:.0} s cap)",
            report.missing_count(),
            load.drain_timeout_s,
            load.run_timeout_s
        ));
    }
    notes
}

pub fn format_rate(throughput: &Throughput) -> String {
    format!(
        "{:.0} msg/s, {:.2} MB/s",
        throughput.msgs_per_s, throughput.mb_per_s
    )
}

/// Microseconds as milliseconds with three decimals.
pub fn format_ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), BenchError> {
    let text = serde_json::to_string_pretty(value).map_err(|source| BenchError::Json {
        action: "encode",
        what: path.display().to_string(),
        source,
    })?;
    write_text(path, &text)
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, BenchError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| BenchError::io("read", path, source))?;
    serde_json::from_str(&text).map_err(|source| BenchError::Json {
        action: "decode",
        what: path.display().to_string(),
        source,
    })
}

pub fn write_text(path: &Path, text: &str) -> Result<(), BenchError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|source| BenchError::io("create", parent, source))?;
    }
    std::fs::write(path, text).map_err(|source| BenchError::io("write", path, source))
}

pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload;

    #[test]
    fn throughput_is_per_second_in_decimal_megabytes() {
        let throughput = Throughput::new(2_000, 4_000_000, 2.0);
        assert_eq!(throughput.msgs_per_s, 1_000.0);
        assert_eq!(throughput.mb_per_s, 2.0);
    }

    #[test]
    fn latency_summary_orders_its_percentiles() {
        let mut latency = Latency::new().unwrap();
        let mut body = payload::template(16).unwrap();
        body[..8].copy_from_slice(&0u64.to_be_bytes());
        for us in 1..=10_000u64 {
            latency.record(&body, us * 1_000);
        }
        let summary = LatencySummary::from_latency(&latency).unwrap();
        assert_eq!(summary.count, 10_000);
        assert!(summary.p50_us <= summary.p90_us);
        assert!(summary.p90_us <= summary.p99_us);
        assert!(summary.p99_us <= summary.p999_us);
        assert!(summary.p999_us <= summary.max_us);
        assert!(
            (4_990..=5_010).contains(&summary.p50_us),
            "{}",
            summary.p50_us
        );
        assert!(summary.curve.len() <= CURVE_POINTS_MAX + 1);
        assert!(
            summary
                .curve
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
        );
    }

    #[test]
    fn an_empty_histogram_has_no_summary() {
        assert!(LatencySummary::from_latency(&Latency::new().unwrap()).is_none());
    }

    #[test]
    fn reports_round_trip_through_json() {
        let report = RunReport {
            name: "x".into(),
            protocol: "amqp".into(),
            target: "amqp://127.0.0.1".into(),
            settings: serde_json::json!({"body_bytes": 16}),
            started_unix_ms: 1,
            send: Some(Throughput::new(10, 160, 1.0)),
            receive: Some(Throughput::new(9, 144, 1.0)),
            expected_receive_count: 10,
            latency: None,
            error_count: 0,
            errors: vec![],
            broker_rss: None,
            timeline: vec![],
            notes: vec![],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/report.json");
        report.write_json(&path).unwrap();
        let back: RunReport = read_json(&path).unwrap();
        assert_eq!(back, report);
        assert_eq!(back.missing_count(), 1);
        assert!(report.to_markdown().contains("| missing messages | 1 |"));
    }
}
