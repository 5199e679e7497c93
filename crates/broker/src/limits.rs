//! Limits on what clients may create, and the count of refusals they cause.
//!
//! Two kinds, as in RabbitMQ:
//! - Limits an operator sets on a virtual host (`max-connections`, `max-queues`) or a user
//!   (`max-connections`, `max-channels`). They are definitions: stored with the virtual host
//!   or user record, replicated with them, and checked where the definitions are (a queue
//!   beyond `max-queues` is refused by `Definitions::apply`, so the check is as deterministic
//!   as the rest of the state). Connection and channel limits are checked by the AMQP front-end
//!   against its live counts.
//! - Node settings (connections in total, channels per connection, consumers per channel,
//!   partitions per topic and in total, members per consumer group) from the configuration.
//!
//! Every refusal is counted by [`Limit`] in [`Refusals`], exported as
//! `sluice_limit_refusals_total{limit}`.

use serde::{Deserialize, Serialize};
use sluice_metrics::Counter;

/// Limits set on a virtual host; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queues: Option<u64>,
}

/// Limits set on a user; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_channels: Option<u64>,
}

impl VhostLimits {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The limits by RabbitMQ's names, set ones only.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        [
            ("max-connections", self.max_connections),
            ("max-queues", self.max_queues),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name, v)))
        .collect()
    }

    /// Sets (or with `None` clears) the limit RabbitMQ calls `name`.
    pub fn set(&mut self, name: &str, value: Option<u64>) -> Result<(), String> {
        match name {
            "max-connections" => self.max_connections = value,
            "max-queues" => self.max_queues = value,
            other => {
                return Err(format!(
                    "unknown virtual host limit '{other}': use max-connections or max-queues"
                ));
            }
        }
        Ok(())
    }
}

impl UserLimits {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The limits by RabbitMQ's names, set ones only.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        [
            ("max-connections", self.max_connections),
            ("max-channels", self.max_channels),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name, v)))
        .collect()
    }

    /// Sets (or with `None` clears) the limit RabbitMQ calls `name`.
    pub fn set(&mut self, name: &str, value: Option<u64>) -> Result<(), String> {
        match name {
            "max-connections" => self.max_connections = value,
            "max-channels" => self.max_channels = value,
            other => {
                return Err(format!(
                    "unknown user limit '{other}': use max-connections or max-channels"
                ));
            }
        }
        Ok(())
    }
}

/// A limit whose refusals are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Limit {
    /// AMQP connections on this node (`amqp.max_connections`).
    NodeConnections,
    /// A virtual host's `max-connections`.
    VhostConnections,
    /// A user's `max-connections`.
    UserConnections,
    /// The negotiated `channel_max` of a connection.
    ChannelsPerConnection,
    /// A user's `max-channels`.
    UserChannels,
    /// `amqp.consumer_max_per_channel`.
    ConsumersPerChannel,
    /// A virtual host's `max-queues`.
    VhostQueues,
    /// `kafka.max_partitions_per_topic`.
    PartitionsPerTopic,
    /// `kafka.max_partitions`.
    Partitions,
    /// `kafka.group_max_size`.
    GroupSize,
}

impl Limit {
    pub const ALL: [Limit; 10] = [
        Limit::NodeConnections,
        Limit::VhostConnections,
        Limit::UserConnections,
        Limit::ChannelsPerConnection,
        Limit::UserChannels,
        Limit::ConsumersPerChannel,
        Limit::VhostQueues,
        Limit::PartitionsPerTopic,
        Limit::Partitions,
        Limit::GroupSize,
    ];

    /// The `limit` label of the refusal metric.
    pub fn name(self) -> &'static str {
        match self {
            Limit::NodeConnections => "amqp_connections",
            Limit::VhostConnections => "vhost_max_connections",
            Limit::UserConnections => "user_max_connections",
            Limit::ChannelsPerConnection => "channel_max",
            Limit::UserChannels => "user_max_channels",
            Limit::ConsumersPerChannel => "consumers_per_channel",
            Limit::VhostQueues => "vhost_max_queues",
            Limit::PartitionsPerTopic => "partitions_per_topic",
            Limit::Partitions => "partitions",
            Limit::GroupSize => "group_max_size",
        }
    }
}

/// How many times each limit refused something since the broker started.
#[derive(Debug, Default)]
pub struct Refusals {
    counters: [Counter; Limit::ALL.len()],
}

impl Refusals {
    pub fn count(&self, limit: Limit) {
        self.counters[limit as usize].increment();
    }

    /// Every limit with its refusals, in [`Limit::ALL`] order.
    pub fn snapshot(&self) -> Vec<(Limit, u64)> {
        Limit::ALL
            .iter()
            .map(|&limit| (limit, self.counters[limit as usize].get()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_by_rabbitmq_names() {
        let mut vhost = VhostLimits::default();
        vhost.set("max-queues", Some(3)).unwrap();
        assert_eq!(vhost.named(), vec![("max-queues", 3)]);
        assert!(vhost.set("max-channels", Some(1)).is_err());
        vhost.set("max-queues", None).unwrap();
        assert!(vhost.is_empty());
        let mut user = UserLimits::default();
        user.set("max-channels", Some(0)).unwrap();
        assert_eq!(user.named(), vec![("max-channels", 0)]);
        assert!(user.set("max-queues", Some(1)).is_err());
    }

    #[test]
    fn refusals_are_counted_per_limit() {
        let refusals = Refusals::default();
        refusals.count(Limit::GroupSize);
        refusals.count(Limit::GroupSize);
        refusals.count(Limit::VhostQueues);
        let snapshot = refusals.snapshot();
        assert_eq!(snapshot.len(), Limit::ALL.len());
        assert!(snapshot.contains(&(Limit::GroupSize, 2)));
        assert!(snapshot.contains(&(Limit::VhostQueues, 1)));
        assert!(snapshot.contains(&(Limit::Partitions, 0)));
    }
}
