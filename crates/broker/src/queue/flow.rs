//! Publisher flow control from a queue whose consumers fall behind.
//!
//! Publishing is cheaper than delivering and acknowledging, so a publisher that is as fast as
//! it can be outruns a consumer that almost keeps up, and the queue (and every message's
//! wait in it) grows for as long as that lasts. RabbitMQ bounds this with credit flow: a
//! busy queue stops granting its publishers credit, and their connections go into `flow`
//! until it catches up. A Sluice queue does the same from what it can see:
//!
//! - it *throttles* when more than `high` messages are ready while its consumers are taking
//!   at least [`STREAMING_PACE`] messages a second (they are streaming, not working through
//!   jobs one at a time);
//! - it *releases* once the backlog is down to `high / 2`, when no consumer has taken a
//!   message for [`STALL_MS`] (a stuck consumer must not hold publishers), or when the last
//!   consumer goes.
//!
//! A queue with slow consumers (jobs that take seconds each) never throttles: its publishers
//! enqueue at their own pace, as on RabbitMQ. Publishing connections read nothing while a
//! queue they published to is throttled; see the AMQP connection.

use std::sync::Arc;

use tokio::sync::watch;

/// A throttled queue releases its publishers when its consumers took nothing for this long.
pub const STALL_MS: i64 = 200;

/// Consumers taking at least this many messages a second are streaming: a backlog in front
/// of them is waiting time for every message, and publishers are held back to their pace.
pub const STREAMING_PACE: u64 = 1000;

/// Length of the window over which the consumers' pace is counted.
const WINDOW_MS: i64 = 1000;

/// A queue's flow state, kept by its owner task.
#[derive(Debug)]
pub struct Flow {
    /// Ready messages above which publishers wait; 0 turns flow control off.
    high: u64,
    state: Arc<watch::Sender<bool>>,
    window_start_ms: i64,
    window_delivered: u64,
    previous_window_delivered: u64,
    last_delivery_ms: i64,
}

impl Flow {
    pub fn new(high: u64) -> Self {
        let (state, _) = watch::channel(false);
        Self {
            high,
            state: Arc::new(state),
            window_start_ms: 0,
            window_delivered: 0,
            previous_window_delivered: 0,
            last_delivery_ms: i64::MIN / 2,
        }
    }

    /// What publishers watch: true while they must wait.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.state.subscribe()
    }

    pub fn is_throttled(&self) -> bool {
        *self.state.borrow()
    }

    /// Counts `count` deliveries made at `now_ms`.
    pub fn delivered(&mut self, count: u64, now_ms: i64) {
        if count == 0 {
            return;
        }
        self.roll(now_ms);
        self.window_delivered += count;
        self.last_delivery_ms = now_ms;
    }

    fn roll(&mut self, now_ms: i64) {
        if now_ms - self.window_start_ms >= WINDOW_MS {
            self.previous_window_delivered = if now_ms - self.window_start_ms < 2 * WINDOW_MS {
                self.window_delivered
            } else {
                0
            };
            self.window_delivered = 0;
            self.window_start_ms = now_ms;
        }
    }

    /// Re-evaluates the state after the queue changed. Returns when to look again if nothing
    /// else happens (a throttled queue must notice its consumers stalling).
    pub fn update(&mut self, ready: u64, consumers: usize, now_ms: i64) -> Option<i64> {
        if self.high == 0 {
            return None;
        }
        self.roll(now_ms);
        let pace = self.window_delivered.max(self.previous_window_delivered);
        let stalled = now_ms - self.last_delivery_ms >= STALL_MS;
        let throttled = if consumers == 0 || stalled {
            false
        } else if self.is_throttled() {
            ready > self.high / 2
        } else {
            ready > self.high && pace >= STREAMING_PACE
        };
        self.state.send_if_modified(|current| {
            let changed = *current != throttled;
            *current = throttled;
            changed
        });
        throttled.then_some(self.last_delivery_ms + STALL_MS)
    }

    /// Releases publishers for good (the queue is closing or failed).
    pub fn release(&mut self) {
        self.state
            .send_if_modified(|current| std::mem::replace(current, false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_consumers_behind_a_backlog_throttle_until_half_is_gone() {
        let mut flow = Flow::new(1000);
        let watcher = flow.subscribe();
        flow.delivered(1500, 10);
        assert_eq!(flow.update(900, 1, 10), None);
        assert!(!*watcher.borrow());
        assert_eq!(flow.update(1001, 1, 20), Some(10 + STALL_MS));
        assert!(*watcher.borrow());
        flow.delivered(100, 50);
        assert!(flow.update(600, 1, 50).is_some());
        assert!(flow.update(500, 1, 60).is_none());
        assert!(!*watcher.borrow());
    }

    #[test]
    fn slow_consumers_never_throttle() {
        let mut flow = Flow::new(1000);
        for second in 0..5 {
            flow.delivered(STREAMING_PACE - 1, second * 1000);
            assert_eq!(flow.update(50_000, 2, second * 1000), None);
        }
        assert!(!flow.is_throttled());
    }

    #[test]
    fn a_stalled_consumer_releases_publishers() {
        let mut flow = Flow::new(100);
        flow.delivered(STREAMING_PACE, 0);
        assert_eq!(flow.update(1000, 1, 0), Some(STALL_MS));
        assert!(flow.update(1000, 1, STALL_MS - 1).is_some());
        assert_eq!(flow.update(1000, 1, STALL_MS), None);
        assert!(!flow.is_throttled());
    }

    #[test]
    fn no_consumers_or_a_zero_limit_never_throttle() {
        let mut flow = Flow::new(100);
        flow.delivered(STREAMING_PACE, 0);
        assert_eq!(flow.update(1000, 0, 0), None);
        let mut off = Flow::new(0);
        off.delivered(STREAMING_PACE, 0);
        assert_eq!(off.update(1000, 1, 0), None);
        assert!(!off.is_throttled());
    }

    #[test]
    fn the_pace_is_forgotten_after_an_idle_window() {
        let mut flow = Flow::new(100);
        flow.delivered(STREAMING_PACE, 0);
        flow.delivered(1, 2500);
        assert_eq!(flow.update(1000, 1, 2500), None);
    }
}
