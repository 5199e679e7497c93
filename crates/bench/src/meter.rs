//! Counting what a run does while it runs: messages and bytes sent and received, errors,
//! end-to-end latency, a once-a-second timeline, the broker's resident memory, and the
//! progress line on the terminal.
//!
//! Producers and consumers update one shared [`Meter`] with relaxed atomics; each consumer
//! keeps its own [`Latency`] histogram (no sharing on the hot path) and hands it back at the
//! end to be merged. A [`Sampler`] thread reads the meter every tick to build the timeline and
//! the progress display.
//!
//! Bounds: at most [`ERROR_SAMPLES_MAX`] distinct error texts and [`TIMELINE_SAMPLES_MAX`]
//! timeline samples are kept; past that only the error count and the totals grow.

use std::fmt::Display;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::BenchError;
use crate::payload;

/// Distinct error texts kept for the report.
pub const ERROR_SAMPLES_MAX: usize = 10;
/// Timeline samples kept: two hours at one per second.
pub const TIMELINE_SAMPLES_MAX: usize = 7200;
/// Longest latency the histogram tells apart (an hour, in microseconds); longer ones count
/// as this value.
const LATENCY_US_MAX: u64 = 3_600_000_000;

const UNSET: u64 = u64::MAX;

/// Shared counters of one run.
#[derive(Debug)]
pub struct Meter {
    sent_count: AtomicU64,
    sent_bytes: AtomicU64,
    received_count: AtomicU64,
    received_bytes: AtomicU64,
    error_count: AtomicU64,
    /// Process-clock nanoseconds (see [`payload::now_ns`]) of the first and last receive.
    first_receive_ns: AtomicU64,
    last_receive_ns: AtomicU64,
    errors: Mutex<Vec<String>>,
    stop_producers: AtomicBool,
    stop_consumers: AtomicBool,
    /// Set while consumers are draining a backlog, so progress shows the drain.
    draining: AtomicBool,
}

impl Default for Meter {
    fn default() -> Self {
        Self {
            sent_count: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            received_count: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            error_count: AtomicU64::new(0),
            first_receive_ns: AtomicU64::new(UNSET),
            last_receive_ns: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            stop_producers: AtomicBool::new(false),
            stop_consumers: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }
}

/// The meter's totals at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub sent_count: u64,
    pub sent_bytes: u64,
    pub received_count: u64,
    pub received_bytes: u64,
    pub error_count: u64,
}

impl Meter {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A message the broker accepted (acknowledged, or written when nothing acknowledges).
    pub fn sent(&self, bytes: usize) {
        self.sent_count.fetch_add(1, Ordering::Relaxed);
        self.sent_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A message a consumer received, at process-clock time `now_ns`.
    pub fn received(&self, bytes: usize, now_ns: u64) {
        self.received_count.fetch_add(1, Ordering::Relaxed);
        self.received_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        if self.first_receive_ns.load(Ordering::Relaxed) == UNSET {
            self.first_receive_ns.fetch_min(now_ns, Ordering::Relaxed);
        }
        self.last_receive_ns.fetch_max(now_ns, Ordering::Relaxed);
    }

    /// An error the client reported. The text is kept if it is new and there is room.
    pub fn error(&self, error: impl Display) {
        self.error_count.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock();
        if errors.len() < ERROR_SAMPLES_MAX {
            let text = error.to_string();
            if !errors.contains(&text) {
                errors.push(text);
            }
        }
    }

    pub fn totals(&self) -> Totals {
        Totals {
            sent_count: self.sent_count.load(Ordering::Relaxed),
            sent_bytes: self.sent_bytes.load(Ordering::Relaxed),
            received_count: self.received_count.load(Ordering::Relaxed),
            received_bytes: self.received_bytes.load(Ordering::Relaxed),
            error_count: self.error_count.load(Ordering::Relaxed),
        }
    }

    /// The process-clock span from the first to the last message received, if any arrived.
    pub fn receive_window_ns(&self) -> Option<(u64, u64)> {
        let first = self.first_receive_ns.load(Ordering::Relaxed);
        let last = self.last_receive_ns.load(Ordering::Relaxed);
        (first != UNSET).then_some((first, last.max(first)))
    }

    pub fn error_samples(&self) -> Vec<String> {
        self.errors.lock().clone()
    }

    pub fn stop_producers(&self) {
        self.stop_producers.store(true, Ordering::Relaxed);
    }

    pub fn producers_stopped(&self) -> bool {
        self.stop_producers.load(Ordering::Relaxed)
    }

    pub fn stop_consumers(&self) {
        self.stop_consumers.store(true, Ordering::Relaxed);
    }

    pub fn consumers_stopped(&self) -> bool {
        self.stop_consumers.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Decides when consumers are done: every expected message arrived, or nothing new arrived for
/// the drain timeout, or the run's deadline passed.
#[derive(Debug)]
struct DrainWatch {
    expected: u64,
    drain_timeout: Duration,
    run_deadline: Instant,
    last_count: u64,
    last_progress: Instant,
}

impl DrainWatch {
    fn new(expected: u64, drain_timeout: Duration, run_deadline: Instant) -> Self {
        Self {
            expected,
            drain_timeout,
            run_deadline,
            last_count: 0,
            last_progress: Instant::now(),
        }
    }

    fn is_done(&mut self, meter: &Meter) -> bool {
        let received = meter.totals().received_count;
        let now = Instant::now();
        if received >= self.expected || now >= self.run_deadline {
            return true;
        }
        if received != self.last_count {
            self.last_count = received;
            self.last_progress = now;
            return false;
        }
        now - self.last_progress >= self.drain_timeout
    }
}

const DRAIN_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// Blocks until consumers are done (see [`DrainWatch`]).
pub fn wait_for_drain(
    meter: &Meter,
    expected: u64,
    drain_timeout: Duration,
    run_deadline: Instant,
) {
    let mut watch = DrainWatch::new(expected, drain_timeout, run_deadline);
    while !watch.is_done(meter) {
        std::thread::sleep(DRAIN_CHECK_INTERVAL);
    }
}

/// Waits, without blocking the runtime, until consumers are done (see [`DrainWatch`]).
pub async fn wait_for_drain_async(
    meter: &Meter,
    expected: u64,
    drain_timeout: Duration,
    run_deadline: Instant,
) {
    let mut watch = DrainWatch::new(expected, drain_timeout, run_deadline);
    while !watch.is_done(meter) {
        tokio::time::sleep(DRAIN_CHECK_INTERVAL).await;
    }
}

/// End-to-end latency of the messages one consumer received, in microseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
    /// Messages whose payload carried no usable send time.
    foreign_count: u64,
}

impl Latency {
    pub fn new() -> Result<Self, BenchError> {
        let histogram = Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
            .map_err(|error| BenchError::Invalid(format!("latency histogram: {error}")))?;
        Ok(Self {
            histogram,
            foreign_count: 0,
        })
    }

    /// Records the latency of the message with `body`, received at `now_ns`.
    pub fn record(&mut self, body: &[u8], now_ns: u64) {
        match payload::latency_us(body, now_ns) {
            // Zero cannot be stored in a histogram that starts at 1 µs; it means "under 1 µs".
            Some(us) => self
                .histogram
                .saturating_record(us.clamp(1, LATENCY_US_MAX)),
            None => self.foreign_count += 1,
        }
    }

    pub fn merge(&mut self, other: &Self) -> Result<(), BenchError> {
        self.histogram
            .add(&other.histogram)
            .map_err(|error| BenchError::Invalid(format!("merging latency histograms: {error}")))?;
        self.foreign_count += other.foreign_count;
        Ok(())
    }

    pub fn histogram(&self) -> &Histogram<u64> {
        &self.histogram
    }

    pub fn foreign_count(&self) -> u64 {
        self.foreign_count
    }
}

/// One timeline point: rates over the second that ended at `t_s`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub t_s: f64,
    pub sent_per_s: f64,
    pub received_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub broker_rss_bytes: Option<u64>,
}

/// The broker's resident memory during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RssSummary {
    pub pid: u32,
    pub start_bytes: u64,
    /// The largest value seen, sampled every [`RSS_SAMPLE_INTERVAL`].
    pub peak_bytes: u64,
}

pub const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Resident memory of process `pid` from `/proc`, or `None` if it cannot be read.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time process `pid` has used (user and system), in clock ticks, from `/proc`.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat)
}

/// `utime` and `stime`, the 14th and 15th fields of `/proc/PID/stat`; the second field, the
/// command in parentheses, may itself hold spaces and parentheses.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_command = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_command.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// What the sampler saw.
#[derive(Debug, Clone, Default)]
pub struct Sampled {
    pub timeline: Vec<Sample>,
    pub rss: Option<RssSummary>,
}

/// How the run's progress is shown.
#[derive(Debug, Clone)]
pub struct ProgressPlan {
    pub title: String,
    /// The planned length: seconds of sending, or a message count.
    pub length: ProgressLength,
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum ProgressLength {
    Seconds(f64),
    Messages(u64),
}

/// A thread that samples the meter every [`RSS_SAMPLE_INTERVAL`] until stopped.
#[derive(Debug)]
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Sampled>,
}

impl Sampler {
    pub fn start(
        meter: Arc<Meter>,
        broker_pid: Option<u32>,
        plan: ProgressPlan,
    ) -> Result<Self, BenchError> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("bench-sampler".into())
            .spawn(move || sample_loop(&meter, broker_pid, &plan, &thread_stop))
            .map_err(|error| BenchError::Task(format!("cannot start the sampler: {error}")))?;
        Ok(Self { stop, thread })
    }

    pub fn finish(self) -> Result<Sampled, BenchError> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| BenchError::Task("the sampler thread panicked".into()))
    }
}

fn sample_loop(
    meter: &Meter,
    broker_pid: Option<u32>,
    plan: &ProgressPlan,
    stop: &AtomicBool,
) -> Sampled {
    let start = Instant::now();
    let mut sampled = Sampled::default();
    if let Some(pid) = broker_pid
        && let Some(bytes) = rss_bytes(pid)
    {
        sampled.rss = Some(RssSummary {
            pid,
            start_bytes: bytes,
            peak_bytes: bytes,
        });
    }
    let progress = Progress::new(plan);
    let mut previous = meter.totals();
    let mut previous_at = start;
    let mut next_sample = start + Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(RSS_SAMPLE_INTERVAL);
        let rss_now = broker_pid.and_then(rss_bytes);
        if let (Some(summary), Some(bytes)) = (sampled.rss.as_mut(), rss_now) {
            summary.peak_bytes = summary.peak_bytes.max(bytes);
        }
        let now = Instant::now();
        if now < next_sample {
            continue;
        }
        next_sample += Duration::from_secs(1);
        let totals = meter.totals();
        let span_s = (now - previous_at).as_secs_f64().max(1e-9);
        let sample = Sample {
            t_s: (now - start).as_secs_f64(),
            sent_per_s: (totals.sent_count - previous.sent_count) as f64 / span_s,
            received_per_s: (totals.received_count - previous.received_count) as f64 / span_s,
            broker_rss_bytes: rss_now,
        };
        progress.update(meter, &totals, &sample, now - start);
        if sampled.timeline.len() < TIMELINE_SAMPLES_MAX {
            sampled.timeline.push(sample);
        }
        previous = totals;
        previous_at = now;
    }
    progress.finish();
    sampled
}

/// A progress bar on a terminal, or a plain line every few seconds when stderr is a file.
struct Progress {
    bar: Option<ProgressBar>,
    plan: ProgressPlan,
    lines: bool,
}

impl Progress {
    fn new(plan: &ProgressPlan) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = (!plan.quiet && terminal).then(|| {
            let length = match plan.length {
                ProgressLength::Seconds(seconds) => seconds.ceil() as u64,
                ProgressLength::Messages(count) => count,
            };
            let bar = ProgressBar::with_draw_target(Some(length), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(plan.title.clone());
            bar
        });
        Self {
            bar,
            plan: plan.clone(),
            lines: !plan.quiet && !terminal,
        }
    }

    fn update(&self, meter: &Meter, totals: &Totals, sample: &Sample, elapsed: Duration) {
        let phase = if meter.is_draining() {
            "draining"
        } else {
            "running"
        };
        let message = format!(
            "{phase}: sent {} ({}/s), received {} ({}/s), errors {}",
            human_count(totals.sent_count as f64),
            human_count(sample.sent_per_s),
            human_count(totals.received_count as f64),
            human_count(sample.received_per_s),
            totals.error_count
        );
        if let Some(bar) = &self.bar {
            let position = match self.plan.length {
                ProgressLength::Seconds(_) => elapsed.as_secs(),
                ProgressLength::Messages(_) if meter.is_draining() => totals.received_count,
                ProgressLength::Messages(_) => totals.sent_count,
            };
            bar.set_position(position);
            bar.set_message(message);
        } else if self.lines && elapsed.as_secs().is_multiple_of(5) {
            eprintln!("{} [{:>4}s] {message}", self.plan.title, elapsed.as_secs());
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `1234567.0` → `1.23M`: short enough for a progress line.
pub fn human_count(value: f64) -> String {
    match value {
        v if v >= 1e9 => format!("{:.2}G", v / 1e9),
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_samples_are_distinct_and_bounded() {
        let meter = Meter::default();
        for index in 0..100 {
            meter.error(format!("error {}", index % 20));
        }
        meter.error("error 0");
        assert_eq!(meter.totals().error_count, 101);
        let samples = meter.error_samples();
        assert_eq!(samples.len(), ERROR_SAMPLES_MAX);
        assert_eq!(samples[0], "error 0");
    }

    #[test]
    fn the_receive_window_spans_first_to_last() {
        let meter = Meter::default();
        assert_eq!(meter.receive_window_ns(), None);
        meter.received(10, 500);
        meter.received(10, 900);
        meter.received(10, 700);
        assert_eq!(meter.receive_window_ns(), Some((500, 900)));
        assert_eq!(meter.totals().received_bytes, 30);
    }

    #[test]
    fn latencies_merge_and_foreign_messages_are_counted_apart() {
        let mut one = Latency::new().unwrap();
        let mut two = Latency::new().unwrap();
        let mut body = payload::template(16).unwrap();
        body[..8].copy_from_slice(&1_000u64.to_be_bytes());
        one.record(&body, 2_001_000);
        two.record(&body, 4_001_000);
        two.record(b"not ours", 5_000_000);
        one.merge(&two).unwrap();
        assert_eq!(one.histogram().len(), 2);
        assert_eq!(one.foreign_count(), 1);
        assert!(one.histogram().max() >= 3_999);
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t 100 kB\nVmRSS:\t    2048 kB\nThreads: 1\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert!(rss_bytes(std::process::id()).is_some_and(|bytes| bytes > 0));
    }

    #[test]
    fn cpu_ticks_are_user_plus_system_time() {
        let stat = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 5 0 0 0 17 25 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(stat), Some(42));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
        assert!(cpu_ticks(std::process::id()).is_some());
    }

    #[test]
    fn draining_stops_when_everything_arrived_or_nothing_moves() {
        let meter = Meter::default();
        let far = Instant::now() + Duration::from_secs(3600);
        let mut watch = DrainWatch::new(2, Duration::from_millis(50), far);
        assert!(!watch.is_done(&meter));
        meter.received(1, 1);
        assert!(!watch.is_done(&meter));
        std::thread::sleep(Duration::from_millis(60));
        assert!(watch.is_done(&meter), "no progress for the drain timeout");
        let mut watch = DrainWatch::new(2, Duration::from_secs(60), far);
        meter.received(1, 2);
        assert!(watch.is_done(&meter), "everything arrived");
    }

    #[test]
    fn counts_are_shortened_for_humans() {
        assert_eq!(human_count(999.0), "999");
        assert_eq!(human_count(12_345.0), "12.3k");
        assert_eq!(human_count(1_234_567.0), "1.23M");
    }
}
