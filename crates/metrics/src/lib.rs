//! Metric primitives and the Prometheus text exposition format.
//!
//! Counters, gauges and histograms are plain atomics, cheap enough for hot paths: recording a
//! value is one or two relaxed atomic operations, never a lock or an allocation. Each crate keeps
//! its own metrics next to the state they describe; the admin API walks them at scrape time and
//! writes them with [`TextEncoder`]. [`Registry`] holds live things operators list and close
//! (the front-ends' connections). This crate depends on nothing and knows no broker concept.

mod registry;

pub use registry::{Registered, Registry};

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// A value that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn increment(&self) {
        self.add(1);
    }

    pub fn add(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn increment(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn decrement(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// Adds `delta` (negative to subtract) atomically.
    pub fn add(&self, delta: i64) {
        self.0.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bucket upper bounds for latencies, in seconds: 50 µs to 10 s.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// A histogram with fixed bucket bounds (seconds). Observations are counted in the first
/// bucket whose bound is at or above them; the text format makes the counts cumulative.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus one for everything above the last bound.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(LATENCY_BUCKETS_SECONDS)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        self.observe_many(elapsed, 1);
    }

    /// Counts `times` observations of `elapsed`: one timed call standing for several
    /// that were not timed.
    pub fn observe_many(&self, elapsed: Duration, times: u64) {
        let seconds = elapsed.as_secs_f64();
        let bucket = self.bounds.partition_point(|bound| *bound < seconds);
        self.counts[bucket].fetch_add(times, Ordering::Relaxed);
        let nanos = elapsed.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.sum_nanos
            .fetch_add(nanos.saturating_mul(times), Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// (upper bound, cumulative count) pairs, ending with (+Inf, total).
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.counts.len());
        for (index, count) in self.counts.iter().enumerate() {
            total += count.load(Ordering::Relaxed);
            let bound = self.bounds.get(index).copied().unwrap_or(f64::INFINITY);
            out.push((bound, total));
        }
        out
    }
}

/// What kind of metric a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// Writes the Prometheus text format (version 0.0.4).
#[derive(Debug, Default)]
pub struct TextEncoder {
    out: String,
}

impl TextEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a metric family; its samples follow.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.name());
        self
    }

    /// One sample: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", format_value(value));
        self
    }

    /// The bucket, sum and count samples of one histogram.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        histogram: &Histogram,
    ) -> &mut Self {
        let bucket_name = format!("{name}_bucket");
        for (bound, count) in histogram.cumulative() {
            self.out.push_str(&bucket_name);
            let le = if bound.is_infinite() {
                "+Inf".to_owned()
            } else {
                format_value(bound)
            };
            write_labels(&mut self.out, labels, Some(&le));
            let _ = writeln!(self.out, " {count}");
        }
        self.sample(&format!("{name}_sum"), labels, histogram.sum_seconds());
        self.sample(&format!("{name}_count"), labels, histogram.count() as f64);
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (key, value) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(key);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = Histogram::new(&[0.001, 0.01]);
        histogram.observe(Duration::from_micros(500));
        histogram.observe(Duration::from_millis(5));
        histogram.observe(Duration::from_millis(5));
        histogram.observe(Duration::from_secs(1));
        assert_eq!(
            histogram.cumulative(),
            vec![(0.001, 1), (0.01, 3), (f64::INFINITY, 4)]
        );
        assert_eq!(histogram.count(), 4);
        assert!((histogram.sum_seconds() - 1.0105).abs() < 1e-9);
        histogram.observe_many(Duration::from_millis(2), 3);
        assert_eq!(
            histogram.cumulative(),
            vec![(0.001, 1), (0.01, 6), (f64::INFINITY, 7)]
        );
        assert!((histogram.sum_seconds() - 1.0165).abs() < 1e-9);
    }

    #[test]
    fn text_format_escapes_and_renders() {
        let histogram = Histogram::new(&[0.5]);
        histogram.observe(Duration::from_millis(100));
        let mut text = TextEncoder::new();
        text.family(
            "sluice_records_in_total",
            "Records appended.",
            Kind::Counter,
        )
        .sample("sluice_records_in_total", &[("topic", "a\"b\\c")], 42.0);
        text.family("sluice_latency_seconds", "Latency.", Kind::Histogram)
            .histogram("sluice_latency_seconds", &[("api", "Produce")], &histogram);
        let out = text.finish();
        assert!(out.contains("# TYPE sluice_records_in_total counter\n"));
        assert!(out.contains("sluice_records_in_total{topic=\"a\\\"b\\\\c\"} 42\n"));
        assert!(out.contains("sluice_latency_seconds_bucket{api=\"Produce\",le=\"0.5\"} 1\n"));
        assert!(out.contains("sluice_latency_seconds_bucket{api=\"Produce\",le=\"+Inf\"} 1\n"));
        assert!(out.contains("sluice_latency_seconds_count{api=\"Produce\"} 1\n"));
    }
}
