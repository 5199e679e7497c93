//! What a run does over time: for how long or how many messages, at what rate, and whether
//! consumers wait for a backlog to build up first.
//!
//! The [`Pacer`] keeps a producer to its share of a target rate by schedule, not by sleeping a
//! fixed gap after each send: when a send is late (the client blocked, the scheduler was busy),
//! the next ones go at once until the producer is back on schedule, so the offered load is the
//! one asked for.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::BenchError;

#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct LoadOptions {
    /// Seconds the producers send for (unless --count is given).
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,

    /// Messages to send in total across all producers, instead of a duration. With no
    /// producers, the number of messages the consumers expect to read.
    #[arg(long)]
    pub count: Option<u64>,

    /// Target send rate in messages per second across all producers (unlimited if absent).
    #[arg(long)]
    pub rate: Option<f64>,

    /// Publish everything first with no consumer running, then start the consumers and drain.
    #[arg(long)]
    pub backlog: bool,

    /// How long consumers keep waiting for outstanding messages once producers have stopped
    /// and nothing new arrives.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout_s: f64,

    /// With --count, producers stop after this many seconds even if the count is not reached
    /// (the report says how far they got).
    #[arg(long)]
    pub send_timeout_s: Option<f64>,

    /// Hard limit on the whole run, so a stuck broker cannot hang a suite.
    #[arg(long, default_value_t = 3600.0)]
    pub run_timeout_s: f64,

    /// Process id of the broker, to sample its resident memory while the run goes on.
    #[arg(long)]
    pub broker_pid: Option<u32>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            duration_s: 10.0,
            count: None,
            rate: None,
            backlog: false,
            send_timeout_s: None,
            drain_timeout_s: 30.0,
            run_timeout_s: 3600.0,
            broker_pid: None,
        }
    }
}

impl LoadOptions {
    pub fn validate(&self, producer_count: usize, consumer_count: usize) -> Result<(), BenchError> {
        let fail = |reason: String| Err(BenchError::Config(reason));
        if !(self.duration_s.is_finite() && self.duration_s > 0.0) {
            return fail(format!(
                "--duration-s must be positive, got {}",
                self.duration_s
            ));
        }
        if self.count == Some(0) {
            return fail("--count must be positive".into());
        }
        if let Some(rate) = self.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return fail(format!("--rate must be positive, got {rate}"));
        }
        if producer_count == 0 && consumer_count == 0 {
            return fail("a run needs at least one producer or one consumer".into());
        }
        if producer_count == 0 && self.count.is_none() {
            return fail(
                "a consume-only run (no producers) needs --count: how many messages to read".into(),
            );
        }
        if self.backlog && (producer_count == 0 || consumer_count == 0) {
            return fail("--backlog needs both producers and consumers".into());
        }
        if self
            .send_timeout_s
            .is_some_and(|s| !(s.is_finite() && s > 0.0))
        {
            return fail("--send-timeout-s must be positive".into());
        }
        if !(self.drain_timeout_s >= 0.0 && self.run_timeout_s > 0.0) {
            return fail("timeouts must not be negative".into());
        }
        Ok(())
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_s)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.drain_timeout_s)
    }

    pub fn run_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.run_timeout_s)
    }

    /// The rate one of `producer_count` producers must keep.
    pub fn rate_per_producer(&self, producer_count: usize) -> Option<f64> {
        self.rate.map(|rate| rate / producer_count.max(1) as f64)
    }
}

/// The part of `total` that producer `index` of `parts` sends: an even split, the remainder
/// going to the first ones.
pub fn share(total: u64, parts: usize, index: usize) -> u64 {
    let parts = parts.max(1) as u64;
    let index = index as u64;
    total / parts + u64::from(index < total % parts)
}

/// When a producer stops.
#[derive(Debug, Clone, Copy)]
pub enum Quota {
    Until(Instant),
    /// A number of messages, and a time by which to stop anyway.
    Count {
        limit: u64,
        deadline: Option<Instant>,
    },
}

impl Quota {
    pub fn for_producer(load: &LoadOptions, start: Instant, parts: usize, index: usize) -> Self {
        match load.count {
            Some(total) => Self::Count {
                limit: share(total, parts, index),
                deadline: load
                    .send_timeout_s
                    .map(|seconds| start + Duration::from_secs_f64(seconds)),
            },
            None => Self::Until(start + load.duration()),
        }
    }

    /// True once `sent` messages fulfil the quota. Checks the clock only every 64 messages:
    /// reading it per message costs more than the send itself for small messages.
    pub fn done(&self, sent: u64) -> bool {
        let past = |deadline: Instant| sent.is_multiple_of(64) && Instant::now() >= deadline;
        match *self {
            Self::Count { limit, deadline } => sent >= limit || deadline.is_some_and(past),
            Self::Until(deadline) => past(deadline),
        }
    }
}

/// Keeps one producer on the schedule of a target rate.
#[derive(Debug)]
pub struct Pacer {
    start: Instant,
    interval_s: Option<f64>,
    scheduled_count: u64,
}

impl Pacer {
    pub fn new(rate_per_s: Option<f64>) -> Self {
        Self {
            start: Instant::now(),
            interval_s: rate_per_s.map(|rate| 1.0 / rate),
            scheduled_count: 0,
        }
    }

    /// How long to wait before the next message is due (zero if it is due already), and counts
    /// that message as scheduled.
    pub fn next_delay(&mut self) -> Duration {
        let Some(interval_s) = self.interval_s else {
            return Duration::ZERO;
        };
        let due = self.start + Duration::from_secs_f64(interval_s * self.scheduled_count as f64);
        self.scheduled_count += 1;
        due.saturating_duration_since(Instant::now())
    }
}

/// A name no earlier run of this process or any other used: prefix, process id, clock, and a
/// counter. Workloads use fresh topics and queues so that leftovers never mix into a result.
pub fn fresh_name(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "{prefix}-{}-{}-{count}",
        std::process::id(),
        crate::report::unix_ms_now()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_total() {
        for total in [0u64, 1, 7, 100, 1_000_003] {
            for parts in 1..9 {
                let sum: u64 = (0..parts).map(|index| share(total, parts, index)).sum();
                assert_eq!(sum, total, "total {total} parts {parts}");
            }
        }
    }

    #[test]
    fn an_unpaced_producer_never_waits() {
        let mut pacer = Pacer::new(None);
        for _ in 0..1000 {
            assert_eq!(pacer.next_delay(), Duration::ZERO);
        }
    }

    #[test]
    fn a_paced_producer_waits_for_its_schedule() {
        let mut pacer = Pacer::new(Some(10.0));
        assert_eq!(pacer.next_delay(), Duration::ZERO);
        let second = pacer.next_delay();
        assert!(second > Duration::from_millis(50), "{second:?}");
        assert!(second <= Duration::from_millis(100), "{second:?}");
    }

    #[test]
    fn a_count_quota_also_stops_at_its_deadline() {
        let past = Instant::now() - Duration::from_secs(1);
        let quota = Quota::Count {
            limit: 1_000,
            deadline: Some(past),
        };
        assert!(quota.done(64));
        assert!(!quota.done(65), "the clock is read every 64 messages only");
        let quota = Quota::Count {
            limit: 1_000,
            deadline: None,
        };
        assert!(!quota.done(64));
        assert!(quota.done(1_000));
    }

    #[test]
    fn fresh_names_differ() {
        assert_ne!(fresh_name("q"), fresh_name("q"));
    }

    #[test]
    fn consume_only_runs_need_a_count() {
        let load = LoadOptions::default();
        assert!(load.validate(0, 1).is_err());
        let load = LoadOptions {
            count: Some(10),
            ..LoadOptions::default()
        };
        assert!(load.validate(0, 1).is_ok());
        assert!(load.validate(0, 0).is_err());
    }
}
