//! The one typed configuration of the `sluice` binary.
//!
//! Layers, each overriding the one before: built-in defaults → an optional TOML file
//! (`--config`) → environment variables (`SLUICE_DATA_DIR`, `SLUICE_KAFKA__LISTEN`, ...: the
//! prefix `SLUICE_`, sections separated by `__`) → command-line flags. The result is validated
//! as a whole before anything starts; an error names the key and says what is wrong.
//!
//! `sluice.example.toml` at the repository root documents every key; a test keeps it in step
//! with this file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use sluice_broker::{BrokerConfig, GroupLimits, ProducerLimits};
use sluice_storage::{FsyncPolicy, LogConfig};

pub use crate::amqp_config::AmqpSection;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where logs, metadata and the lock file live.
    pub data_dir: PathBuf,
    /// The earlier node id setting: ids are generated now; refused with a message saying so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u32>,
    /// How long connections may take to finish in-flight work on shutdown.
    pub shutdown_grace_ms: u64,
    /// Threads of the async runtime that runs every connection and owner task; 0 picks one
    /// less than the CPUs available, at least one (see [`Config::runtime_threads`]).
    pub worker_threads: usize,
    pub kafka: KafkaSection,
    pub amqp: AmqpSection,
    pub storage: StorageSection,
    pub log: LogSection,
    pub http: HttpSection,
    pub cluster: ClusterSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Where other nodes reach this one. Port 0 picks a free port (a node others join must
    /// have a fixed one).
    pub listen: String,
    /// The cluster address other nodes are told; defaults to the bound listen address (or the
    /// machine's hostname when listening on all interfaces).
    pub advertise: Option<String>,
    /// Other nodes' cluster addresses (`host:port`). Empty: this node forms a cluster of its
    /// own, which others may join by naming it as their seed.
    pub seeds: Vec<String>,
    /// Without seeds, wait for a member to add this node (`sluice cluster add-node`) instead
    /// of forming a cluster of one.
    pub wait_for_invite: bool,
    /// The AMQP and HTTP addresses the cluster shows for this node; default: their bound
    /// addresses. (Kafka's are `kafka.advertised_host` and `kafka.advertised_port`.)
    pub advertise_amqp: Option<String>,
    pub advertise_http: Option<String>,
    /// The controller takes a snapshot of its state every this many log entries, then keeps a
    /// fifth of that in its log for nodes that are only a little behind; a node further behind
    /// catches up from the snapshot.
    pub snapshot_entries: u64,
    /// How often a replicated partition's leader sends each follower a heartbeat (those of all
    /// partitions to one node go together). Idle partitions cost CPU in proportion to its
    /// inverse.
    pub partition_heartbeat_ms: u64,
    /// A follower that hears no leader for a time drawn from this to twice this campaigns: it
    /// bounds how long a dead leader goes unnoticed. At least three heartbeats.
    pub partition_election_timeout_ms: u64,
    /// Whether a replicated partition nobody writes to goes quiet: no heartbeats and no
    /// timers until a write, a campaign or its leader's silence wakes it.
    pub partition_quiesce: bool,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            advertise: None,
            seeds: Vec::new(),
            wait_for_invite: false,
            advertise_amqp: None,
            advertise_http: None,
            snapshot_entries: 5000,
            partition_heartbeat_ms: 100,
            partition_election_timeout_ms: 500,
            partition_quiesce: true,
        }
    }
}

/// Checks that `address` looks like `host:port`.
fn check_host_port(key: &str, address: &str) -> anyhow::Result<()> {
    let valid = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !valid {
        bail!("{key}: {address:?} is not an address like node1.example.com:7946");
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Serve the admin API, /metrics and the console.
    pub enabled: bool,
    pub listen: String,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "0.0.0.0:8080".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSection {
    pub enabled: bool,
    pub listen: String,
    /// Host clients are told to connect to; defaults to the listen address (or the machine's
    /// hostname when listening on all interfaces).
    pub advertised_host: Option<String>,
    /// Port clients are told to connect to; defaults to the bound port.
    pub advertised_port: Option<u16>,
    pub auto_create_topics: bool,
    /// Partitions of a topic created without a count (Kafka's num.partitions).
    pub num_partitions: u32,
    /// The earlier name of `num_partitions`: refused with a message that names the new one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_partitions: Option<u32>,
    /// Largest request frame accepted; larger frames close the connection before allocation.
    pub max_request_bytes: usize,
    /// Concurrent Kafka connections; further ones wait to be accepted (Kafka's
    /// max.connections).
    pub max_connections: usize,
    /// Most partitions one topic may have; more is refused with INVALID_PARTITIONS.
    pub max_partitions_per_topic: u32,
    /// Most partitions of all topics together; more is refused with POLICY_VIOLATION.
    pub max_partitions: u32,
    /// Most members of one consumer group, counting those given an id that have not joined
    /// with it yet (Kafka's group.max.size); a further one gets GROUP_MAX_SIZE_REACHED.
    pub group_max_size: usize,
    /// Most record bytes in one Fetch response, whatever the client asks (Kafka's
    /// fetch.max.bytes).
    pub fetch_max_bytes: usize,
    /// The same for fetches between replicas (Kafka's replica.fetch.max.bytes).
    pub replica_fetch_max_bytes: usize,
    /// How long a consumer group that was empty waits for more members before its first
    /// rebalance (Kafka's group.initial.rebalance.delay.ms).
    pub group_initial_rebalance_delay_ms: i64,
    /// Bounds on the session timeouts consumers may ask for.
    pub group_min_session_timeout_ms: i32,
    pub group_max_session_timeout_ms: i32,
    /// Replicas of a topic created without a factor (Kafka's default.replication.factor);
    /// unset: the smaller of 3 and the cluster's nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_replication_factor: Option<u16>,
    /// In-sync replicas an acks=all produce needs unless the topic sets its own
    /// (min.insync.replicas).
    pub min_insync_replicas: u32,
    /// A follower that has not answered its leader for this long is out of sync
    /// (replica.lag.time.max.ms).
    pub replica_lag_time_max_ms: u64,
    /// Partitions of `__consumer_offsets`, the topic a cluster keeps committed offsets in
    /// (Kafka's `offsets.topic.num.partitions`); used when the topic is created.
    pub offsets_topic_partitions: u32,
    /// Whether replicated partitions' leaders go back to their preferred replicas by
    /// themselves (auto.leader.rebalance.enable); otherwise only ElectLeaders moves them.
    pub auto_leader_rebalance_enable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// `always`, `never` or `interval(<ms>ms)`.
    pub fsync: String,
    pub segment_bytes: u64,
    pub segment_ms: i64,
    /// -1 keeps data forever.
    pub retention_ms: i64,
    /// -1 for no size limit.
    pub retention_bytes: i64,
    pub index_interval_bytes: u64,
    pub max_batch_bytes: usize,
    /// How often partitions run retention and save producer state.
    pub housekeeping_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// A `tracing` filter: `info`, `debug`, `sluice_storage=debug,info`, ...
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            node_id: None,
            shutdown_grace_ms: 10_000,
            worker_threads: 0,
            kafka: KafkaSection::default(),
            amqp: AmqpSection::default(),
            storage: StorageSection::default(),
            log: LogSection::default(),
            http: HttpSection::default(),
            cluster: ClusterSection::default(),
        }
    }
}

impl Default for KafkaSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "0.0.0.0:9092".into(),
            advertised_host: None,
            advertised_port: None,
            auto_create_topics: true,
            num_partitions: 1,
            default_partitions: None,
            max_request_bytes: 100 * 1024 * 1024,
            max_connections: 10_000,
            max_partitions_per_topic: sluice_broker::MAX_PARTITIONS_PER_TOPIC,
            max_partitions: sluice_broker::MAX_PARTITIONS,
            group_max_size: 1_000,
            default_replication_factor: None,
            min_insync_replicas: 1,
            replica_lag_time_max_ms: 30_000,
            offsets_topic_partitions: 10,
            auto_leader_rebalance_enable: true,
            fetch_max_bytes: 55 * 1024 * 1024,
            replica_fetch_max_bytes: 1024 * 1024,
            group_initial_rebalance_delay_ms: 3_000,
            group_min_session_timeout_ms: 6_000,
            group_max_session_timeout_ms: 1_800_000,
        }
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        let log = LogConfig::default();
        Self {
            fsync: log.fsync.to_string(),
            segment_bytes: log.segment_bytes,
            segment_ms: log.segment_ms,
            retention_ms: log.retention_ms.unwrap_or(-1),
            retention_bytes: log.retention_bytes.map_or(-1, |b| b as i64),
            index_interval_bytes: log.index_interval_bytes,
            max_batch_bytes: log.max_batch_bytes,
            housekeeping_interval_ms: 5_000,
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Values given on the command line; `None` means "not given".
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub kafka_listen: Option<String>,
    pub amqp_listen: Option<String>,
    pub fsync: Option<String>,
    pub log_level: Option<String>,
    pub http_listen: Option<String>,
    pub cluster_listen: Option<String>,
    pub cluster_advertise: Option<String>,
    /// Comma-separated `host:port` list.
    pub cluster_seeds: Option<String>,
    /// `--cluster-wait-for-invite` (only `true` is given on the command line).
    pub cluster_wait_for_invite: bool,
}

/// The most runtime threads `worker_threads` may ask for.
const MAX_WORKER_THREADS: usize = 1024;

/// Top-level keys that environment variables may set; anything else under `SLUICE_` (such as
/// variables meant for other tools) is ignored rather than refused.
const ENV_SECTIONS: &[&str] = &[
    "data_dir",
    "node_id",
    "shutdown_grace_ms",
    "worker_threads",
    "kafka",
    "amqp",
    "storage",
    "log",
    "http",
    "cluster",
];

impl Config {
    /// Builds the configuration from every layer and validates it.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                bail!("config file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed("SLUICE_").split("__").filter(|key| {
            // The filter runs after the split and before lowercasing: it sees KAFKA.LISTEN.
            let key = key.as_str().to_ascii_lowercase();
            ENV_SECTIONS
                .iter()
                .any(|section| key == *section || key.starts_with(&format!("{section}.")))
        }));
        let mut flags = serde_json::Map::new();
        if let Some(dir) = &overrides.data_dir {
            flags.insert("data_dir".into(), dir.to_string_lossy().into_owned().into());
        }
        let mut kafka = serde_json::Map::new();
        if let Some(listen) = &overrides.kafka_listen {
            kafka.insert("listen".into(), listen.clone().into());
        }
        if !kafka.is_empty() {
            flags.insert("kafka".into(), kafka.into());
        }
        if let Some(listen) = &overrides.amqp_listen {
            let mut amqp = serde_json::Map::new();
            amqp.insert("listen".into(), listen.clone().into());
            flags.insert("amqp".into(), amqp.into());
        }
        let mut storage = serde_json::Map::new();
        if let Some(fsync) = &overrides.fsync {
            storage.insert("fsync".into(), fsync.clone().into());
        }
        if !storage.is_empty() {
            flags.insert("storage".into(), storage.into());
        }
        let mut log = serde_json::Map::new();
        if let Some(level) = &overrides.log_level {
            log.insert("level".into(), level.clone().into());
        }
        if !log.is_empty() {
            flags.insert("log".into(), log.into());
        }
        if let Some(listen) = &overrides.http_listen {
            flags.insert("http".into(), serde_json::json!({ "listen": listen }));
        }
        let mut cluster = serde_json::Map::new();
        if let Some(listen) = &overrides.cluster_listen {
            cluster.insert("listen".into(), listen.clone().into());
        }
        if let Some(advertise) = &overrides.cluster_advertise {
            cluster.insert("advertise".into(), advertise.clone().into());
        }
        if let Some(seeds) = &overrides.cluster_seeds {
            let seeds: Vec<serde_json::Value> = seeds
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.to_owned().into())
                .collect();
            cluster.insert("seeds".into(), seeds.into());
        }
        if overrides.cluster_wait_for_invite {
            cluster.insert("wait_for_invite".into(), true.into());
        }
        if !cluster.is_empty() {
            flags.insert("cluster".into(), cluster.into());
        }
        figment = figment.merge(Serialized::defaults(serde_json::Value::Object(flags)));
        let config: Config = figment.extract().map_err(|error| {
            let mut message = String::from("invalid configuration");
            for e in error {
                message.push_str(&format!("\n  - {e}"));
            }
            anyhow::anyhow!(message)
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Threads for the async runtime: `worker_threads`, or when it is 0, one less than the
    /// CPUs this process may use, at least one. A message passes from the publisher's
    /// connection task to its queue's owner task to the consumer's connection task; on two
    /// CPUs, one worker runs that chain without waking another thread at each step and leaves
    /// the other CPU to the kernel's network and disk work (docs/benchmarks.md measures it).
    pub fn runtime_threads(&self) -> usize {
        if self.worker_threads > 0 {
            return self.worker_threads;
        }
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        cpus.saturating_sub(1).max(1)
    }

    /// Checks everything serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.data_dir.as_os_str().is_empty() {
            bail!("data_dir must not be empty");
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            bail!(
                "worker_threads is {}; at most {MAX_WORKER_THREADS} (0 picks from the CPUs available)",
                self.worker_threads
            );
        }
        if self.kafka.enabled {
            self.kafka_listen()?;
        }
        if self.http.enabled {
            self.http_listen()?;
        }
        if self.node_id.is_some() {
            bail!(
                "node_id is no longer set: a node's id is generated at its first start and kept \
                 in the data directory (cluster/node.json); remove the key"
            );
        }
        self.cluster_listen()?;
        if let Some(advertise) = &self.cluster.advertise {
            check_host_port("cluster.advertise", advertise)?;
        }
        if !(10..=10_000_000).contains(&self.cluster.snapshot_entries) {
            bail!(
                "cluster.snapshot_entries must be between 10 and 10000000, got {}",
                self.cluster.snapshot_entries
            );
        }
        let heartbeat = self.cluster.partition_heartbeat_ms;
        if !(20..=10_000).contains(&heartbeat) {
            bail!("cluster.partition_heartbeat_ms must be between 20 and 10000, got {heartbeat}");
        }
        let election = self.cluster.partition_election_timeout_ms;
        if election < 3 * heartbeat || election > 60_000 {
            bail!(
                "cluster.partition_election_timeout_ms must be at least three heartbeats ({}) and at most 60000, got {election}",
                3 * heartbeat
            );
        }
        for seed in &self.cluster.seeds {
            check_host_port("cluster.seeds", seed)?;
        }
        if self.cluster.wait_for_invite && !self.cluster.seeds.is_empty() {
            bail!(
                "cluster.wait_for_invite and cluster.seeds exclude each other: a node either \
                 finds the cluster through its seeds or waits to be added by one of its nodes"
            );
        }
        for (key, value) in [
            ("cluster.advertise_amqp", &self.cluster.advertise_amqp),
            ("cluster.advertise_http", &self.cluster.advertise_http),
        ] {
            if let Some(value) = value {
                check_host_port(key, value)?;
            }
        }
        if self.kafka.default_partitions.is_some() {
            bail!("kafka.default_partitions is now called kafka.num_partitions (Kafka's name)");
        }
        if self.kafka.max_partitions_per_topic == 0 || self.kafka.max_partitions == 0 {
            bail!("kafka.max_partitions_per_topic and kafka.max_partitions must be positive");
        }
        if self.kafka.num_partitions == 0
            || self.kafka.num_partitions > self.kafka.max_partitions_per_topic
        {
            bail!(
                "kafka.num_partitions must be between 1 and kafka.max_partitions_per_topic ({})",
                self.kafka.max_partitions_per_topic
            );
        }
        if self.kafka.default_replication_factor == Some(0) {
            bail!("kafka.default_replication_factor must be at least 1");
        }
        if self.kafka.min_insync_replicas == 0 {
            bail!("kafka.min_insync_replicas must be at least 1");
        }
        if self.kafka.offsets_topic_partitions == 0 {
            bail!("kafka.offsets_topic_partitions must be at least 1");
        }
        if self.kafka.replica_lag_time_max_ms == 0 {
            bail!("kafka.replica_lag_time_max_ms must be positive");
        }
        if self.kafka.group_max_size == 0 {
            bail!("kafka.group_max_size must be positive");
        }
        if self.kafka.max_request_bytes < 1024 || self.kafka.max_request_bytes > 1 << 30 {
            bail!(
                "kafka.max_request_bytes must be between 1 KiB and 1 GiB, got {}",
                self.kafka.max_request_bytes
            );
        }
        for (key, value) in [
            ("kafka.fetch_max_bytes", self.kafka.fetch_max_bytes),
            (
                "kafka.replica_fetch_max_bytes",
                self.kafka.replica_fetch_max_bytes,
            ),
        ] {
            if !(1024..=1 << 30).contains(&value) {
                bail!("{key} must be between 1 KiB and 1 GiB, got {value}");
            }
        }
        if self.kafka.max_connections == 0 {
            bail!("kafka.max_connections must be positive");
        }
        if self.kafka.group_initial_rebalance_delay_ms < 0 {
            bail!("kafka.group_initial_rebalance_delay_ms must not be negative");
        }
        if self.kafka.group_min_session_timeout_ms <= 0
            || self.kafka.group_min_session_timeout_ms > self.kafka.group_max_session_timeout_ms
        {
            bail!(
                "kafka.group_min_session_timeout_ms must be positive and at most kafka.group_max_session_timeout_ms"
            );
        }
        self.amqp.validate()?;
        if self.storage.housekeeping_interval_ms == 0 {
            bail!("storage.housekeeping_interval_ms must be positive");
        }
        self.log_config().context("invalid [storage] settings")?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .with_context(|| format!("log.level {:?} is not a valid filter", self.log.level))?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bail!(
                "log.format must be \"text\" or \"json\", got {:?}",
                self.log.format
            );
        }
        Ok(())
    }

    pub fn http_listen(&self) -> anyhow::Result<SocketAddr> {
        self.http.listen.parse().with_context(|| {
            format!(
                "http.listen {:?} is not an address like 127.0.0.1:8080",
                self.http.listen
            )
        })
    }

    pub fn cluster_listen(&self) -> anyhow::Result<SocketAddr> {
        self.cluster.listen.parse().with_context(|| {
            format!(
                "cluster.listen {:?} is not an address like 127.0.0.1:7946",
                self.cluster.listen
            )
        })
    }

    pub fn kafka_listen(&self) -> anyhow::Result<SocketAddr> {
        self.kafka.listen.parse().with_context(|| {
            format!(
                "kafka.listen {:?} is not an address like 127.0.0.1:9092",
                self.kafka.listen
            )
        })
    }

    /// The storage settings of a topic with no overrides.
    pub fn log_config(&self) -> anyhow::Result<LogConfig> {
        let storage = &self.storage;
        let fsync: FsyncPolicy = storage
            .fsync
            .parse()
            .map_err(|error: String| anyhow::anyhow!("storage.fsync: {error}"))?;
        if storage.retention_ms < -1 {
            bail!("storage.retention_ms must be -1 (forever) or a duration in ms");
        }
        if storage.retention_bytes < -1 {
            bail!("storage.retention_bytes must be -1 (no limit) or a size in bytes");
        }
        let log = LogConfig {
            segment_bytes: storage.segment_bytes,
            segment_ms: storage.segment_ms,
            index_interval_bytes: storage.index_interval_bytes,
            retention_bytes: (storage.retention_bytes >= 0)
                .then_some(storage.retention_bytes as u64),
            retention_ms: (storage.retention_ms >= 0).then_some(storage.retention_ms),
            max_batch_bytes: storage.max_batch_bytes,
            fsync,
        };
        log.validate().map_err(|error| anyhow::anyhow!("{error}"))?;
        Ok(log)
    }

    pub fn broker_config(&self) -> anyhow::Result<BrokerConfig> {
        let mut broker = BrokerConfig::new(&self.data_dir);
        broker.log_defaults = self.log_config()?;
        broker.auto_create_topics = self.kafka.auto_create_topics;
        broker.default_partition_count = self.kafka.num_partitions;
        broker.producer_limits = ProducerLimits {
            expiration_ms: 24 * 3600 * 1000,
            max_producer_count: 100_000,
        };
        broker.housekeeping_interval = Duration::from_millis(self.storage.housekeeping_interval_ms);
        broker.group_limits = GroupLimits {
            min_session_timeout_ms: self.kafka.group_min_session_timeout_ms,
            max_session_timeout_ms: self.kafka.group_max_session_timeout_ms,
            initial_rebalance_delay_ms: self.kafka.group_initial_rebalance_delay_ms,
            max_group_size: self.kafka.group_max_size,
        };
        broker.max_partitions_per_topic = self.kafka.max_partitions_per_topic;
        broker.max_partitions = self.kafka.max_partitions;
        broker.default_replication_factor = self.kafka.default_replication_factor;
        broker.min_insync_replicas = self.kafka.min_insync_replicas;
        broker.replica_lag_time_max = Duration::from_millis(self.kafka.replica_lag_time_max_ms);
        broker.offsets_topic_partitions = self.kafka.offsets_topic_partitions;
        broker.auto_leader_rebalance = self.kafka.auto_leader_rebalance_enable;
        broker.queue_segment_bytes = self.amqp.queue_segment_bytes;
        broker.queue_flow_ready_high = self.amqp.queue_flow_ready_high;
        broker.max_message_bytes = self.amqp.max_message_bytes;
        broker.memory_high_watermark_bytes = self.amqp.memory_limit_bytes();
        broker.disk_free_limit_bytes = self.amqp.disk_free_limit_bytes;
        Ok(broker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `test` while no other test changes the process environment: the environment
    /// test sets SLUICE_* variables inside a figment::Jail, which holds a lock every test
    /// that loads a configuration must hold too, or it may read them.
    // The error type is figment's own; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    fn isolated(test: impl FnOnce()) {
        figment::Jail::expect_with(|_| {
            test();
            Ok(())
        });
    }

    #[test]
    fn runtime_threads_leave_a_cpu_unless_told() {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let automatic = Config::default().runtime_threads();
        assert!(automatic >= 1 && automatic <= cpus, "{automatic} of {cpus}");
        if cpus > 1 {
            assert_eq!(automatic, cpus - 1);
        }
        let told = Config {
            worker_threads: 3,
            ..Config::default()
        };
        assert_eq!(told.runtime_threads(), 3);
        let error = Config {
            worker_threads: 5000,
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert!(
            error.to_string().contains("worker_threads is 5000"),
            "{error}"
        );
    }

    #[test]
    fn layers_override_in_order() {
        isolated(|| {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("sluice.toml");
            std::fs::write(
                &file,
                "data_dir = \"/from/file\"\n[kafka]\nlisten = \"127.0.0.1:1111\"\nnum_partitions = 3\n",
            )
            .unwrap();
            let config = Config::load(Some(&file), &Overrides::default()).unwrap();
            assert_eq!(config.data_dir, PathBuf::from("/from/file"));
            assert_eq!(config.kafka.num_partitions, 3);
            let flags = Overrides {
                kafka_listen: Some("127.0.0.1:2222".into()),
                ..Overrides::default()
            };
            let config = Config::load(Some(&file), &flags).unwrap();
            assert_eq!(config.kafka.listen, "127.0.0.1:2222");
            assert_eq!(config.kafka.num_partitions, 3);
        });
    }

    #[test]
    // The error type is figment's own; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    fn environment_variables_set_nested_keys_and_ignore_strangers() {
        // figment::Jail isolates the process environment for the closure.
        figment::Jail::expect_with(|jail| {
            jail.set_env("SLUICE_LOG__LEVEL", "debug");
            jail.set_env("SLUICE_KAFKA__NUM_PARTITIONS", "4");
            jail.set_env("SLUICE_DATA_DIR", "/from/env");
            jail.set_env("SLUICE_BIN", "/not/a/config/key");
            let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.log.level, "debug");
            assert_eq!(config.kafka.num_partitions, 4);
            assert_eq!(config.data_dir, PathBuf::from("/from/env"));
            let flags = Overrides {
                log_level: Some("warn".into()),
                ..Overrides::default()
            };
            assert_eq!(
                Config::load(None, &flags)
                    .map_err(|e| e.to_string())?
                    .log
                    .level,
                "warn"
            );
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_key() {
        isolated(|| {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("bad.toml");
            std::fs::write(&file, "[kafka]\nlisten = \"nowhere\"\n").unwrap();
            let error = Config::load(Some(&file), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(error.contains("kafka.listen"), "{error}");
            std::fs::write(&file, "[storage]\nfsync = \"sometimes\"\n").unwrap();
            let error = format!(
                "{:#}",
                Config::load(Some(&file), &Overrides::default()).unwrap_err()
            );
            assert!(error.contains("fsync"), "{error}");
            std::fs::write(&file, "[kafka]\nlisten_typo = \"x\"\n").unwrap();
            let error = Config::load(Some(&file), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(error.contains("listen_typo"), "{error}");
            // Partition Raft timing: an election timeout under three heartbeats is refused.
            std::fs::write(
                &file,
                "[cluster]\npartition_heartbeat_ms = 200\npartition_election_timeout_ms = 500\n",
            )
            .unwrap();
            let error = Config::load(Some(&file), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("cluster.partition_election_timeout_ms"),
                "{error}"
            );
            std::fs::write(
                &file,
                "[cluster]\npartition_heartbeat_ms = 200\npartition_election_timeout_ms = 1000\n",
            )
            .unwrap();
            let config = Config::load(Some(&file), &Overrides::default()).unwrap();
            assert_eq!(config.cluster.partition_heartbeat_ms, 200);
            assert!(
                Config::load(Some(Path::new("/no/such/file.toml")), &Overrides::default()).is_err()
            );
        });
    }

    #[test]
    fn the_example_file_is_complete_and_valid() {
        isolated(|| {
            let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sluice.example.toml");
            let config = Config::load(Some(&example), &Overrides::default()).unwrap();
            // Every key of the defaults appears in the example, so the example documents them all.
            let text = std::fs::read_to_string(&example).unwrap();
            let defaults = toml::to_string(&Config::default()).unwrap();
            for line in defaults.lines() {
                if let Some((key, _)) = line.split_once(" = ") {
                    assert!(
                        text.contains(&format!("{key} =")),
                        "sluice.example.toml lacks {key}"
                    );
                }
            }
            assert_eq!(config.kafka.listen, KafkaSection::default().listen);
        });
    }
}
