//! Live counts behind the connection and channel limits: AMQP connections on the node, per
//! virtual host and per user, and channels per user. A connection takes a [`ConnectionSlot`]
//! at `connection.open` and each channel a [`ChannelSlot`] at `channel.open`; dropping a slot
//! gives its place back, so a connection that ends any way at all frees what it held.
//!
//! The texts of the refusals are RabbitMQ's, so operators and client logs read the same.

use std::sync::Arc;

use foldhash::HashMap;
use parking_lot::Mutex;
use sluice_broker::limits::Limit;

/// A limit reached: which one, and the text for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub limit: Limit,
    pub text: String,
}

#[derive(Debug, Default)]
struct Inner {
    connections: usize,
    by_vhost: HashMap<String, u64>,
    by_user: HashMap<String, u64>,
    user_channels: HashMap<String, u64>,
}

/// The limits a connection is checked against at `connection.open`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// `amqp.max_connections`.
    pub node: usize,
    /// The virtual host's `max-connections`.
    pub vhost: Option<u64>,
    /// The user's `max-connections`.
    pub user: Option<u64>,
}

/// Open connections and channels, by virtual host and user.
#[derive(Debug, Default)]
pub struct Counts {
    inner: Mutex<Inner>,
}

fn decrement(map: &mut HashMap<String, u64>, key: &str) {
    if let Some(count) = map.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            map.remove(key);
        }
    }
}

impl Counts {
    /// Counts a connection of `user` to `vhost` in, unless that would pass a limit. The
    /// virtual host's limit is checked first, then the user's, then the node's, as RabbitMQ
    /// does.
    pub fn admit(
        self: &Arc<Self>,
        user: &str,
        vhost: &str,
        limits: ConnectionLimits,
    ) -> Result<ConnectionSlot, Refusal> {
        let mut inner = self.inner.lock();
        let in_vhost = inner.by_vhost.get(vhost).copied().unwrap_or(0);
        if let Some(max) = limits.vhost
            && in_vhost >= max
        {
            return Err(Refusal {
                limit: Limit::VhostConnections,
                text: format!(
                    "access to vhost '{vhost}' refused for user '{user}': connection limit ({max}) is reached"
                ),
            });
        }
        let of_user = inner.by_user.get(user).copied().unwrap_or(0);
        if let Some(max) = limits.user
            && of_user >= max
        {
            return Err(Refusal {
                limit: Limit::UserConnections,
                text: format!(
                    "connection refused for user '{user}': user connection limit ({max}) is reached"
                ),
            });
        }
        if inner.connections >= limits.node {
            return Err(Refusal {
                limit: Limit::NodeConnections,
                text: format!(
                    "connection refused: node connection limit ({}) is reached",
                    limits.node
                ),
            });
        }
        inner.connections += 1;
        *inner.by_vhost.entry(vhost.to_owned()).or_default() += 1;
        *inner.by_user.entry(user.to_owned()).or_default() += 1;
        Ok(ConnectionSlot {
            counts: Arc::clone(self),
            user: user.to_owned(),
            vhost: vhost.to_owned(),
        })
    }

    /// Counts a channel of `user` in, unless the user's `max-channels` is reached.
    pub fn open_channel(
        self: &Arc<Self>,
        user: &str,
        max: Option<u64>,
    ) -> Result<ChannelSlot, Refusal> {
        let mut inner = self.inner.lock();
        let open = inner.user_channels.get(user).copied().unwrap_or(0);
        if let Some(max) = max
            && open >= max
        {
            return Err(Refusal {
                limit: Limit::UserChannels,
                text: format!(
                    "number of channels opened for user '{user}' has reached the maximum allowed user limit of ({max})"
                ),
            });
        }
        *inner.user_channels.entry(user.to_owned()).or_default() += 1;
        Ok(ChannelSlot {
            counts: Arc::clone(self),
            user: user.to_owned(),
        })
    }

    /// Open connections on the node.
    pub fn connections(&self) -> usize {
        self.inner.lock().connections
    }

    /// Open connections to `vhost`.
    pub fn vhost_connections(&self, vhost: &str) -> u64 {
        self.inner.lock().by_vhost.get(vhost).copied().unwrap_or(0)
    }
}

/// One counted connection; dropping it gives its place back.
#[derive(Debug)]
pub struct ConnectionSlot {
    counts: Arc<Counts>,
    user: String,
    vhost: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut inner = self.counts.inner.lock();
        inner.connections -= 1;
        decrement(&mut inner.by_vhost, &self.vhost);
        decrement(&mut inner.by_user, &self.user);
    }
}

/// One counted channel; dropping it gives its place back.
#[derive(Debug)]
pub struct ChannelSlot {
    counts: Arc<Counts>,
    user: String,
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        decrement(&mut self.counts.inner.lock().user_channels, &self.user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: ConnectionLimits = ConnectionLimits {
        node: 100,
        vhost: None,
        user: None,
    };

    #[test]
    fn the_vhost_limit_counts_every_user_and_frees_on_drop() {
        let counts = Arc::new(Counts::default());
        let limits = ConnectionLimits {
            vhost: Some(2),
            ..NONE
        };
        let a = counts.admit("a", "/", limits).unwrap();
        let _b = counts.admit("b", "/", limits).unwrap();
        let refused = counts.admit("c", "/", limits).unwrap_err();
        assert_eq!(refused.limit, Limit::VhostConnections);
        assert_eq!(
            refused.text,
            "access to vhost '/' refused for user 'c': connection limit (2) is reached"
        );
        // Another virtual host has its own count.
        let _other = counts.admit("c", "other", limits).unwrap();
        drop(a);
        assert_eq!(counts.vhost_connections("/"), 1);
        counts.admit("c", "/", limits).unwrap();
    }

    #[test]
    fn user_and_node_limits() {
        let counts = Arc::new(Counts::default());
        let user = ConnectionLimits {
            user: Some(1),
            ..NONE
        };
        let _first = counts.admit("u", "/", user).unwrap();
        let refused = counts.admit("u", "/", user).unwrap_err();
        assert_eq!(refused.limit, Limit::UserConnections);
        assert_eq!(
            refused.text,
            "connection refused for user 'u': user connection limit (1) is reached"
        );
        let node = ConnectionLimits { node: 1, ..NONE };
        let refused = counts.admit("v", "/", node).unwrap_err();
        assert_eq!(refused.limit, Limit::NodeConnections);
        assert_eq!(
            refused.text,
            "connection refused: node connection limit (1) is reached"
        );
        // Zero means none at all, as in RabbitMQ.
        let zero = ConnectionLimits {
            vhost: Some(0),
            ..NONE
        };
        assert!(counts.admit("w", "empty", zero).is_err());
    }

    #[test]
    fn channels_per_user_across_connections() {
        let counts = Arc::new(Counts::default());
        let one = counts.open_channel("u", Some(2)).unwrap();
        let _two = counts.open_channel("u", Some(2)).unwrap();
        let refused = counts.open_channel("u", Some(2)).unwrap_err();
        assert_eq!(refused.limit, Limit::UserChannels);
        counts.open_channel("someone else", Some(2)).unwrap();
        drop(one);
        counts.open_channel("u", Some(2)).unwrap();
        assert!(counts.open_channel("u", None).is_ok());
    }
}
