//! Topic configuration: the Kafka topic config keys Sluice honours, their validation, and how
//! they map onto a log's settings.
//!
//! A topic stores only its overrides (key → string value, as Kafka does). The effective value
//! of a key is the override if there is one, else the broker-wide default. Unknown keys and
//! values Sluice cannot honour are refused rather than stored and ignored.

use std::collections::BTreeMap;

use sluice_storage::{FsyncPolicy, LogConfig};

use crate::BrokerConfig;
use crate::error::BrokerError;

/// How a batch's timestamps are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampType {
    /// The producer's timestamps are kept.
    CreateTime,
    /// The broker stamps its own clock at append.
    LogAppendTime,
}

/// Everything a partition needs to know from its topic's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveTopicConfig {
    pub log: LogConfig,
    pub timestamp_type: TimestampType,
    /// Replicas that must be in sync for an acks=all produce to a replicated partition.
    pub min_insync_replicas: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    Long,
    Int,
    String,
    Boolean,
}

/// One key as DescribeConfigs reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEntry {
    pub name: &'static str,
    pub value: String,
    /// True when the value is the broker default rather than a topic override.
    pub is_default: bool,
    pub kind: ConfigKind,
    pub documentation: &'static str,
}

struct ConfigDef {
    name: &'static str,
    kind: ConfigKind,
    documentation: &'static str,
}

const DEFS: &[ConfigDef] = &[
    ConfigDef {
        name: "cleanup.policy",
        kind: ConfigKind::String,
        documentation: "\"delete\": old segments are deleted by retention. Compaction is not offered.",
    },
    ConfigDef {
        name: "retention.ms",
        kind: ConfigKind::Long,
        documentation: "Delete segments whose newest record is older than this; -1 keeps them.",
    },
    ConfigDef {
        name: "retention.bytes",
        kind: ConfigKind::Long,
        documentation: "Delete the oldest segments while a partition is larger than this; -1 for no limit.",
    },
    ConfigDef {
        name: "segment.bytes",
        kind: ConfigKind::Int,
        documentation: "Roll to a new segment file when the active one would grow past this size.",
    },
    ConfigDef {
        name: "segment.ms",
        kind: ConfigKind::Long,
        documentation: "Roll to a new segment file when the active one is older than this.",
    },
    ConfigDef {
        name: "max.message.bytes",
        kind: ConfigKind::Int,
        documentation: "The largest record batch a producer may send.",
    },
    ConfigDef {
        name: "message.timestamp.type",
        kind: ConfigKind::String,
        documentation: "CreateTime keeps producers' timestamps; LogAppendTime stamps the broker's clock.",
    },
    ConfigDef {
        name: "index.interval.bytes",
        kind: ConfigKind::Int,
        documentation: "Bytes of log between two offset index entries.",
    },
    ConfigDef {
        name: "flush.messages",
        kind: ConfigKind::Long,
        documentation: "1 makes every produce wait for fsync (group commit); larger values defer to flush.ms.",
    },
    ConfigDef {
        name: "flush.ms",
        kind: ConfigKind::Long,
        documentation: "Fsync at most this long after an append.",
    },
    ConfigDef {
        name: "min.insync.replicas",
        kind: ConfigKind::Int,
        documentation: "In-sync replicas (the leader included) an acks=all produce needs, or it is refused with NOT_ENOUGH_REPLICAS before it is written.",
    },
    ConfigDef {
        name: "compression.type",
        kind: ConfigKind::String,
        documentation: "\"producer\": batches are stored as the producer compressed them.",
    },
];

fn def(key: &str) -> Result<&'static ConfigDef, BrokerError> {
    DEFS.iter()
        .find(|def| def.name == key)
        .ok_or_else(|| BrokerError::UnknownConfig(key.to_owned()))
}

fn parse_long(key: &str, value: &str, min: i64) -> Result<i64, BrokerError> {
    let parsed: i64 = value
        .trim()
        .parse()
        .map_err(|_| BrokerError::InvalidConfig {
            key: key.to_owned(),
            reason: format!("{value:?} is not a whole number"),
        })?;
    if parsed < min {
        return Err(BrokerError::InvalidConfig {
            key: key.to_owned(),
            reason: format!("{parsed} is below the minimum {min}"),
        });
    }
    Ok(parsed)
}

/// Checks one key and value. Returns the value normalised for storage.
pub fn validate_entry(key: &str, value: &str) -> Result<String, BrokerError> {
    let def = def(key)?;
    let invalid = |reason: String| BrokerError::InvalidConfig {
        key: key.to_owned(),
        reason,
    };
    match key {
        "cleanup.policy" => match value.trim() {
            "delete" => {}
            other => {
                return Err(invalid(format!(
                    "{other:?} is not supported; only \"delete\" is"
                )));
            }
        },
        "message.timestamp.type" => match value.trim() {
            "CreateTime" | "LogAppendTime" => {}
            other => {
                return Err(invalid(format!(
                    "{other:?} must be CreateTime or LogAppendTime"
                )));
            }
        },
        "compression.type" => match value.trim() {
            "producer" => {}
            other => {
                return Err(invalid(format!(
                    "{other:?} is not supported; batches are stored as the producer sent them (\"producer\")"
                )));
            }
        },
        "retention.ms" | "retention.bytes" => {
            parse_long(key, value, -1)?;
        }
        "segment.bytes" => {
            let bytes = parse_long(key, value, 1024)?;
            if bytes > i64::from(i32::MAX) {
                return Err(invalid(format!("{bytes} is larger than {}", i32::MAX)));
            }
        }
        "max.message.bytes" => {
            let bytes = parse_long(key, value, 64)?;
            if bytes > i64::from(i32::MAX) {
                return Err(invalid(format!("{bytes} is larger than {}", i32::MAX)));
            }
        }
        "segment.ms" | "flush.messages" => {
            parse_long(key, value, 1)?;
        }
        "flush.ms" => {
            parse_long(key, value, 0)?;
        }
        "index.interval.bytes" | "min.insync.replicas" => {
            parse_long(key, value, 1)?;
        }
        _ => unreachable!("every key in DEFS is validated above: {}", def.name),
    }
    Ok(value.trim().to_owned())
}

/// Validates every override of a topic.
pub fn validate(
    overrides: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, BrokerError> {
    overrides
        .iter()
        .map(|(key, value)| Ok((key.clone(), validate_entry(key, value)?)))
        .collect()
}

fn optional(value: i64) -> Option<i64> {
    (value >= 0).then_some(value)
}

/// The settings a topic's partitions run with: the broker's defaults overlaid with the
/// topic's overrides. Overrides must have been validated.
pub fn effective(
    broker: &BrokerConfig,
    overrides: &BTreeMap<String, String>,
) -> EffectiveTopicConfig {
    let mut log = broker.log_defaults.clone();
    let long = |key: &str| overrides.get(key).and_then(|v| v.parse::<i64>().ok());
    if let Some(ms) = long("retention.ms") {
        log.retention_ms = optional(ms);
    }
    if let Some(bytes) = long("retention.bytes") {
        log.retention_bytes = optional(bytes).map(|b| b as u64);
    }
    if let Some(bytes) = long("segment.bytes") {
        log.segment_bytes = bytes as u64;
    }
    if let Some(ms) = long("segment.ms") {
        log.segment_ms = ms;
    }
    if let Some(bytes) = long("max.message.bytes") {
        log.max_batch_bytes = bytes as usize;
    }
    if let Some(bytes) = long("index.interval.bytes") {
        log.index_interval_bytes = bytes as u64;
    }
    match (long("flush.messages"), long("flush.ms")) {
        (Some(1), _) | (_, Some(0)) => log.fsync = FsyncPolicy::Always,
        (_, Some(ms)) => {
            log.fsync = FsyncPolicy::Interval {
                interval_ms: ms as u64,
            }
        }
        _ => {}
    }
    let timestamp_type = match overrides.get("message.timestamp.type").map(String::as_str) {
        Some("LogAppendTime") => TimestampType::LogAppendTime,
        _ => TimestampType::CreateTime,
    };
    let min_insync_replicas = long("min.insync.replicas")
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(broker.min_insync_replicas);
    EffectiveTopicConfig {
        log,
        timestamp_type,
        min_insync_replicas,
    }
}

/// Every key with its effective value, for DescribeConfigs and the admin API.
pub fn describe(broker: &BrokerConfig, overrides: &BTreeMap<String, String>) -> Vec<ConfigEntry> {
    let effective = effective(broker, overrides);
    let log = &effective.log;
    DEFS.iter()
        .map(|def| {
            let derived = match def.name {
                "cleanup.policy" => "delete".to_owned(),
                "retention.ms" => log.retention_ms.unwrap_or(-1).to_string(),
                "retention.bytes" => log.retention_bytes.map_or(-1, |b| b as i64).to_string(),
                "segment.bytes" => log.segment_bytes.to_string(),
                "segment.ms" => log.segment_ms.to_string(),
                "max.message.bytes" => log.max_batch_bytes.to_string(),
                "message.timestamp.type" => match effective.timestamp_type {
                    TimestampType::CreateTime => "CreateTime".to_owned(),
                    TimestampType::LogAppendTime => "LogAppendTime".to_owned(),
                },
                "index.interval.bytes" => log.index_interval_bytes.to_string(),
                "flush.messages" => match log.fsync {
                    FsyncPolicy::Always => "1".to_owned(),
                    _ => i64::MAX.to_string(),
                },
                "flush.ms" => match log.fsync {
                    FsyncPolicy::Always => "0".to_owned(),
                    FsyncPolicy::Interval { interval_ms } => interval_ms.to_string(),
                    FsyncPolicy::Never => i64::MAX.to_string(),
                },
                "min.insync.replicas" => effective.min_insync_replicas.to_string(),
                "compression.type" => "producer".to_owned(),
                other => unreachable!("DEFS and this match list the same keys: {other}"),
            };
            let value = overrides.get(def.name).cloned().unwrap_or(derived);
            ConfigEntry {
                name: def.name,
                value,
                is_default: !overrides.contains_key(def.name),
                kind: def.kind,
                documentation: def.documentation,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn overrides_map_onto_the_log() {
        let defaults = BrokerConfig::new("/unused");
        let config = effective(
            &defaults,
            &overrides(&[
                ("retention.ms", "-1"),
                ("retention.bytes", "1000"),
                ("segment.bytes", "4096"),
                ("flush.messages", "1"),
                ("message.timestamp.type", "LogAppendTime"),
            ]),
        );
        assert_eq!(config.log.retention_ms, None);
        assert_eq!(config.log.retention_bytes, Some(1000));
        assert_eq!(config.log.segment_bytes, 4096);
        assert_eq!(config.log.fsync, FsyncPolicy::Always);
        assert_eq!(config.timestamp_type, TimestampType::LogAppendTime);
        assert!(config.log.validate().is_ok());
        assert_eq!(config.min_insync_replicas, 1);
        let two = effective(&defaults, &overrides(&[("min.insync.replicas", "2")]));
        assert_eq!(two.min_insync_replicas, 2);
    }

    #[test]
    fn bad_values_and_unknown_keys_are_refused() {
        assert!(matches!(
            validate_entry("retention.ms", "soon"),
            Err(BrokerError::InvalidConfig { .. })
        ));
        assert!(matches!(
            validate_entry("segment.bytes", "12"),
            Err(BrokerError::InvalidConfig { .. })
        ));
        assert!(matches!(
            validate_entry("cleanup.policy", "compact"),
            Err(BrokerError::InvalidConfig { .. })
        ));
        assert!(matches!(
            validate_entry("no.such.key", "1"),
            Err(BrokerError::UnknownConfig(_))
        ));
        assert_eq!(validate_entry("retention.ms", " 5 ").unwrap(), "5");
    }

    #[test]
    fn describe_marks_overrides() {
        let entries = describe(
            &BrokerConfig::new("/unused"),
            &overrides(&[("retention.ms", "5")]),
        );
        let retention = entries.iter().find(|e| e.name == "retention.ms").unwrap();
        assert_eq!(retention.value, "5");
        assert!(!retention.is_default);
        let segment = entries.iter().find(|e| e.name == "segment.bytes").unwrap();
        assert!(segment.is_default);
        assert_eq!(segment.value, (1u64 << 30).to_string());
    }
}
