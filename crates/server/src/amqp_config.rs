//! The `[amqp]` section of the configuration: the AMQP 0-9-1 listener, its limits, resource
//! watermarks, and the virtual hosts and users created at start-up.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sluice_broker::users::Permission;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSection {
    pub enabled: bool,
    pub listen: String,
    /// Largest frame proposed to clients (bytes).
    pub frame_max: u32,
    /// Most channels per connection proposed to clients.
    pub channel_max: u16,
    /// Heartbeat interval proposed to clients (seconds, 0 for none).
    pub heartbeat_s: u16,
    /// Largest message body accepted.
    pub max_message_bytes: usize,
    /// Open AMQP connections on this node; a further one is refused at `connection.open`
    /// (530, as RabbitMQ's `connection_max`).
    pub max_connections: usize,
    /// Consumers on one channel; a further `basic.consume` is refused (530, as RabbitMQ's
    /// `consumer_max_per_channel`).
    pub consumer_max_per_channel: usize,
    /// A consumer holding a delivery unacknowledged this long has its channel closed; 0 for
    /// no limit.
    pub consumer_timeout_ms: u64,
    /// Resident memory, as a fraction of the machine's, above which publishers are blocked.
    pub memory_high_watermark: f64,
    /// The same limit in bytes; when above 0 it replaces the fraction.
    pub memory_high_watermark_bytes: u64,
    /// Free disk space below which publishers are blocked; 0 disables the check.
    pub disk_free_limit_bytes: u64,
    /// Segment size of queue logs.
    pub queue_segment_bytes: u64,
    /// Ready messages in a queue above which its publishers wait while its consumers stream
    /// through it; 0 disables publisher flow control.
    pub queue_flow_ready_high: u64,
    /// Users that may connect from the loopback interface only.
    pub loopback_users: Vec<String>,
    /// Virtual hosts created at start-up.
    pub vhosts: Vec<String>,
    /// Users created (or updated) at start-up.
    pub users: Vec<UserSection>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserSection {
    pub name: String,
    pub password: String,
    pub tags: Vec<String>,
    /// Virtual host → permissions there.
    pub permissions: BTreeMap<String, PermissionSection>,
}

/// Regular expressions matched against resource names, as in RabbitMQ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PermissionSection {
    pub configure: String,
    pub write: String,
    pub read: String,
}

impl Default for PermissionSection {
    fn default() -> Self {
        Self {
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        }
    }
}

impl Default for UserSection {
    fn default() -> Self {
        Self {
            name: "guest".into(),
            password: "guest".into(),
            tags: vec!["administrator".into()],
            permissions: [("/".to_owned(), PermissionSection::default())].into(),
        }
    }
}

impl Default for AmqpSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "0.0.0.0:5672".into(),
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat_s: 60,
            max_message_bytes: 16 * 1024 * 1024,
            max_connections: 10_000,
            consumer_max_per_channel: 1_000,
            consumer_timeout_ms: 1_800_000,
            memory_high_watermark: 0.4,
            memory_high_watermark_bytes: 0,
            disk_free_limit_bytes: 50_000_000,
            queue_segment_bytes: 64 * 1024 * 1024,
            queue_flow_ready_high: 100,
            loopback_users: vec!["guest".into()],
            vhosts: vec!["/".into()],
            users: vec![UserSection::default()],
        }
    }
}

impl AmqpSection {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.enabled {
            self.listen_address()?;
        }
        if self.frame_max < 4096 {
            bail!(
                "amqp.frame_max must be at least 4096, got {}",
                self.frame_max
            );
        }
        if self.channel_max == 0 {
            bail!("amqp.channel_max must be positive");
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > 512 * 1024 * 1024 {
            bail!(
                "amqp.max_message_bytes must be between 1 and 512 MiB, got {}",
                self.max_message_bytes
            );
        }
        if self.max_connections == 0 {
            bail!("amqp.max_connections must be positive");
        }
        if self.consumer_max_per_channel == 0 {
            bail!("amqp.consumer_max_per_channel must be positive");
        }
        if !(0.0..=1.0).contains(&self.memory_high_watermark) {
            bail!(
                "amqp.memory_high_watermark must be a fraction between 0 and 1, got {}",
                self.memory_high_watermark
            );
        }
        if self.queue_segment_bytes < 64 * 1024 || self.queue_segment_bytes > i32::MAX as u64 {
            bail!("amqp.queue_segment_bytes must be between 64 KiB and 2 GiB");
        }
        for user in &self.users {
            if user.name.is_empty() {
                bail!("amqp.users: a user needs a name");
            }
            for (vhost, permission) in &user.permissions {
                for (what, pattern) in [
                    ("configure", &permission.configure),
                    ("write", &permission.write),
                    ("read", &permission.read),
                ] {
                    regex_check(pattern).with_context(|| {
                        format!(
                            "amqp.users: {what} permission of user {:?} in vhost {vhost:?}",
                            user.name
                        )
                    })?;
                }
            }
        }
        Ok(())
    }

    pub fn listen_address(&self) -> anyhow::Result<std::net::SocketAddr> {
        self.listen.parse().with_context(|| {
            format!(
                "amqp.listen {:?} is not an address like 127.0.0.1:5672",
                self.listen
            )
        })
    }

    /// The memory limit in bytes, if any.
    pub fn memory_limit_bytes(&self) -> Option<u64> {
        if self.memory_high_watermark_bytes > 0 {
            return Some(self.memory_high_watermark_bytes);
        }
        if self.memory_high_watermark <= 0.0 {
            return None;
        }
        sluice_broker::alarms::total_memory_bytes()
            .map(|total| (total as f64 * self.memory_high_watermark) as u64)
    }

    pub fn settings(&self) -> sluice_amqp::AmqpSettings {
        sluice_amqp::AmqpSettings {
            frame_max: self.frame_max,
            channel_max: self.channel_max,
            heartbeat_s: self.heartbeat_s,
            max_message_bytes: self.max_message_bytes,
            max_connections: self.max_connections,
            consumer_max_per_channel: self.consumer_max_per_channel,
            loopback_users: self.loopback_users.clone(),
            consumer_timeout: (self.consumer_timeout_ms > 0)
                .then(|| Duration::from_millis(self.consumer_timeout_ms)),
        }
    }

    /// Creates the configured virtual hosts and users (updating users whose settings changed).
    pub async fn apply(&self, broker: &sluice_broker::Broker) -> anyhow::Result<()> {
        for vhost in &self.vhosts {
            broker
                .ensure_vhost(vhost)
                .await
                .with_context(|| format!("cannot create virtual host {vhost:?}"))?;
        }
        for user in &self.users {
            let permissions = user
                .permissions
                .iter()
                .map(|(vhost, p)| {
                    (
                        vhost.clone(),
                        Permission {
                            configure: p.configure.clone(),
                            write: p.write.clone(),
                            read: p.read.clone(),
                        },
                    )
                })
                .collect();
            broker
                .ensure_user(&user.name, &user.password, user.tags.clone(), permissions)
                .await
                .with_context(|| format!("cannot create user {:?}", user.name))?;
        }
        Ok(())
    }
}

fn regex_check(pattern: &str) -> anyhow::Result<()> {
    sluice_broker::users::validate_pattern(pattern)
        .map_err(|reason| anyhow::anyhow!("invalid pattern {pattern:?}: {reason}"))
}
