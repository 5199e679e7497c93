//! Rates over time: a task samples the broker's traffic counters once a second and keeps the
//! last [`HISTORY_LEN`] samples, for the overview and the console's live charts.
//!
//! Queues get their own publish / deliver / acknowledge rates, kept for the queues that exist.
//!
//! Bounds: the history is a ring of fixed length; per-queue rates are one entry per live queue.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use sluice_broker::Broker;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

/// Samples kept: five minutes at one per second.
pub const HISTORY_LEN: usize = 300;

/// Traffic totals at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub records_in: u64,
    pub records_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub messages_published: u64,
    pub messages_delivered: u64,
    pub messages_acked: u64,
}

/// A queue's counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct QueueTotals {
    published: u64,
    delivered: u64,
    acked: u64,
}

/// A queue's rates over the last sampling interval, per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, ToSchema)]
pub struct QueueRates {
    pub publish_per_s: f64,
    pub deliver_per_s: f64,
    pub ack_per_s: f64,
}

/// Every live queue's counters, by (virtual host, name).
fn queue_totals(broker: &Broker) -> HashMap<(String, String), QueueTotals> {
    let mut all = HashMap::new();
    for vhost in broker.vhost_names() {
        let Some(live) = broker.vhost(&vhost) else {
            continue;
        };
        for queue in live.routing().queues() {
            let counters = queue.counters();
            all.insert(
                (vhost.clone(), queue.name().to_owned()),
                QueueTotals {
                    published: counters.published.load(Ordering::Relaxed),
                    delivered: counters.delivered.load(Ordering::Relaxed),
                    acked: counters.acked.load(Ordering::Relaxed),
                },
            );
        }
    }
    all
}

impl Totals {
    pub fn of(broker: &Broker) -> Self {
        let mut totals = Self::default();
        for queue in queue_totals(broker).values() {
            totals.messages_published += queue.published;
            totals.messages_delivered += queue.delivered;
            totals.messages_acked += queue.acked;
        }
        for topic in broker.topics() {
            for partition in topic.served() {
                let stats = partition.stats();
                totals.records_in += stats.records_in.get();
                totals.records_out += stats.records_out.get();
                totals.bytes_in += stats.bytes_in.get();
                totals.bytes_out += stats.bytes_out.get();
            }
        }
        totals
    }
}

/// Per-second rates over one sampling interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, ToSchema)]
pub struct RateSample {
    /// When the interval ended, in ms since the Unix epoch.
    pub at_ms: i64,
    pub records_in_per_s: f64,
    pub records_out_per_s: f64,
    pub bytes_in_per_s: f64,
    pub bytes_out_per_s: f64,
    /// Messages queues accepted, delivered and had acknowledged (AMQP).
    pub messages_published_per_s: f64,
    pub messages_delivered_per_s: f64,
    pub messages_acked_per_s: f64,
}

#[derive(Debug, Default)]
pub struct Rates {
    history: Mutex<VecDeque<RateSample>>,
    queues: Mutex<HashMap<(String, String), QueueRates>>,
}

impl Rates {
    pub fn latest(&self) -> RateSample {
        self.history.lock().back().copied().unwrap_or_default()
    }

    pub fn history(&self) -> Vec<RateSample> {
        self.history.lock().iter().copied().collect()
    }

    /// A queue's latest rates (zero for a queue not sampled yet).
    pub fn queue(&self, vhost: &str, name: &str) -> QueueRates {
        self.queues
            .lock()
            .get(&(vhost.to_owned(), name.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    fn push(&self, sample: RateSample) {
        let mut history = self.history.lock();
        if history.len() == HISTORY_LEN {
            history.pop_front();
        }
        history.push_back(sample);
    }

    /// Samples every second until `shutdown`.
    pub async fn run(self: Arc<Self>, broker: Broker, shutdown: CancellationToken) {
        let mut previous = Totals::of(&broker);
        let mut previous_queues = queue_totals(&broker);
        let mut previous_at = std::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let now = std::time::Instant::now();
            let totals = Totals::of(&broker);
            let seconds = now.duration_since(previous_at).as_secs_f64().max(1e-3);
            let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds;
            self.push(RateSample {
                at_ms: broker.clock().now_ms(),
                records_in_per_s: rate(totals.records_in, previous.records_in),
                records_out_per_s: rate(totals.records_out, previous.records_out),
                bytes_in_per_s: rate(totals.bytes_in, previous.bytes_in),
                bytes_out_per_s: rate(totals.bytes_out, previous.bytes_out),
                messages_published_per_s: rate(
                    totals.messages_published,
                    previous.messages_published,
                ),
                messages_delivered_per_s: rate(
                    totals.messages_delivered,
                    previous.messages_delivered,
                ),
                messages_acked_per_s: rate(totals.messages_acked, previous.messages_acked),
            });
            let queues = queue_totals(&broker);
            let queue_rates = queues
                .iter()
                .map(|(key, now)| {
                    let then = previous_queues.get(key).copied().unwrap_or(*now);
                    let rates = QueueRates {
                        publish_per_s: rate(now.published, then.published),
                        deliver_per_s: rate(now.delivered, then.delivered),
                        ack_per_s: rate(now.acked, then.acked),
                    };
                    (key.clone(), rates)
                })
                .collect();
            *self.queues.lock() = queue_rates;
            previous_queues = queues;
            previous = totals;
            previous_at = now;
        }
    }
}
