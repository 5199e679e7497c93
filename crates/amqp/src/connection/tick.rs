//! Once a second: heartbeats (sent after half an interval of silence from us, the connection
//! closed after two of silence from the client), the close handshake's deadline, the consumer
//! acknowledgement timeout; and, when they change, resource alarms (`connection.blocked`).

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, connection};
use tokio::time::Instant;

use super::{Connection, State};
use crate::codec;
use crate::convert::short;
use crate::errors::{self, Exception};

/// What heartbeats call for at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Heartbeat {
    Quiet,
    /// We were silent for half the interval: send a heartbeat (only with nothing else queued,
    /// as any frame counts).
    Send,
    /// The client was silent for two intervals: close the socket.
    ClientGone,
}

/// Heartbeats with `interval_s` between them (0: none), given how long since we last wrote
/// and the client last sent anything.
pub(super) fn heartbeat(
    interval_s: u16,
    since_write: Duration,
    since_read: Duration,
    output_empty: bool,
) -> Heartbeat {
    if interval_s == 0 {
        return Heartbeat::Quiet;
    }
    let interval = Duration::from_secs(u64::from(interval_s));
    if since_read > interval * 2 {
        Heartbeat::ClientGone
    } else if since_write >= interval / 2 && output_empty {
        Heartbeat::Send
    } else {
        Heartbeat::Quiet
    }
}

impl Connection {
    pub(super) async fn on_tick(&mut self) {
        self.report_channels();
        self.flush_hot_timing();
        let now = Instant::now();
        if std::mem::take(&mut self.read_since_tick) {
            self.last_read = now;
        }
        if std::mem::take(&mut self.wrote_since_tick) {
            self.last_write = now;
        }
        if let Some(deadline) = self.close_deadline
            && now >= deadline
        {
            self.state = State::Closed;
            return;
        }
        if self.state == State::Running {
            match heartbeat(
                self.heartbeat_s,
                now.duration_since(self.last_write),
                now.duration_since(self.last_read),
                self.out.is_empty(),
            ) {
                Heartbeat::Quiet => {}
                Heartbeat::Send => codec::write_heartbeat(&mut self.out),
                Heartbeat::ClientGone => {
                    tracing::info!(peer = %self.peer, timeout_s = self.heartbeat_s, "missed heartbeats from client; closing the connection");
                    self.state = State::Closed;
                    return;
                }
            }
        }
        if self.state == State::Running
            && let Some(timeout) = self.ctx.settings.consumer_timeout
        {
            let now_ms = self.ctx.broker.clock().now_ms();
            let limit = timeout.as_millis() as i64;
            let expired: Vec<u16> = self
                .channels
                .iter()
                .filter(|(_, c)| !c.closing)
                .filter(|(_, c)| {
                    c.unacked
                        .values()
                        .next()
                        .is_some_and(|u| now_ms - u.delivered_ms > limit)
                })
                .map(|(id, _)| *id)
                .collect();
            for channel in expired {
                tracing::warn!(peer = %self.peer, channel, timeout_ms = limit, "consumer delivery acknowledgement timed out");
                self.raise(
                    Exception::new(
                        errors::PRECONDITION_FAILED,
                        format!(
                            "delivery acknowledgement on channel {channel} timed out. Timeout value used: {limit} ms. This timeout value can be configured, see consumers doc guide to learn more"
                        ),
                    ),
                    channel,
                )
                .await;
            }
        }
    }

    pub(super) fn on_alarms(&mut self) {
        if self.state != State::Running || !self.capabilities.connection_blocked {
            return;
        }
        if self.alarms.any() && self.published && !self.blocked_sent {
            self.blocked_sent = true;
            self.send(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
                    reason: short(self.alarms.reason()),
                })),
            );
        } else if !self.alarms.any() && self.blocked_sent {
            self.blocked_sent = false;
            self.send(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {})),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn heartbeats_go_out_after_half_an_interval_of_silence() {
        assert_eq!(heartbeat(60, S(29), S(0), true), Heartbeat::Quiet);
        assert_eq!(heartbeat(60, S(30), S(0), true), Heartbeat::Send);
        // Output waiting to be written is as good as a heartbeat.
        assert_eq!(heartbeat(60, S(45), S(0), false), Heartbeat::Quiet);
        assert_eq!(heartbeat(0, S(3600), S(3600), true), Heartbeat::Quiet);
    }

    #[test]
    fn a_client_silent_for_two_intervals_is_gone() {
        assert_eq!(heartbeat(10, S(0), S(20), true), Heartbeat::Quiet);
        assert_eq!(heartbeat(10, S(0), S(21), true), Heartbeat::ClientGone);
        assert_eq!(heartbeat(10, S(30), S(21), true), Heartbeat::ClientGone);
    }
}
