//! Per-log settings: segment size and age, index density, retention, batch size limit, and
//! the fsync policy.

use std::fmt;
use std::str::FromStr;

use crate::error::StorageError;

/// When a log's data is forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every append is on disk before it is acknowledged. Appends that wait at the same time
    /// share one fsync (group commit).
    Always,
    /// Data is fsynced at most this long after it is appended; appends are acknowledged when
    /// written.
    Interval { interval_ms: u64 },
    /// The operating system decides when data reaches the disk.
    Never,
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Always => f.write_str("always"),
            Self::Never => f.write_str("never"),
            Self::Interval { interval_ms } => write!(f, "interval({interval_ms}ms)"),
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;

    /// Accepts `always`, `never`, `interval(5ms)`, `interval(5)` and `5ms`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        match text {
            "always" => return Ok(Self::Always),
            "never" => return Ok(Self::Never),
            _ => {}
        }
        let inner = text
            .strip_prefix("interval(")
            .and_then(|rest| rest.strip_suffix(')'))
            .unwrap_or(text);
        let digits = inner.trim().strip_suffix("ms").unwrap_or(inner).trim();
        match digits.parse::<u64>() {
            Ok(interval_ms) if interval_ms > 0 => Ok(Self::Interval { interval_ms }),
            _ => Err(format!(
                "invalid fsync policy {text:?}: expected \"always\", \"never\" or \"interval(<ms>ms)\""
            )),
        }
    }
}

/// Settings of one log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment rolls when the next append would take it past this size.
    pub segment_bytes: u64,
    /// A non-empty segment rolls when it is older than this.
    pub segment_ms: i64,
    /// Bytes of log between two offset index entries.
    pub index_interval_bytes: u64,
    /// Oldest segments are deleted while the log is larger than this.
    pub retention_bytes: Option<u64>,
    /// Segments whose newest batch is older than this are deleted.
    pub retention_ms: Option<i64>,
    /// Largest batch `append` accepts.
    pub max_batch_bytes: usize,
    pub fsync: FsyncPolicy,
}

/// Positions inside a segment are stored as u32.
const SEGMENT_BYTES_LIMIT: u64 = i32::MAX as u64;

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            index_interval_bytes: 4096,
            retention_bytes: None,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            // Kafka's message.max.bytes default: 1 MiB of records plus the log overhead.
            max_batch_bytes: 1_048_588,
            fsync: FsyncPolicy::Interval { interval_ms: 1000 },
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), StorageError> {
        let fail = |reason: String| Err(StorageError::Config(reason));
        if !(crate::batch::HEADER_BYTES as u64..=SEGMENT_BYTES_LIMIT).contains(&self.segment_bytes)
        {
            return fail(format!(
                "segment_bytes must be between {} and {SEGMENT_BYTES_LIMIT}, got {}",
                crate::batch::HEADER_BYTES,
                self.segment_bytes
            ));
        }
        if self.segment_ms <= 0 {
            return fail(format!(
                "segment_ms must be positive, got {}",
                self.segment_ms
            ));
        }
        if self.index_interval_bytes == 0 {
            return fail("index_interval_bytes must be positive".into());
        }
        if self.retention_ms.is_some_and(|ms| ms < 0) {
            return fail("retention_ms must not be negative".into());
        }
        if !(crate::batch::HEADER_BYTES..=SEGMENT_BYTES_LIMIT as usize)
            .contains(&self.max_batch_bytes)
        {
            return fail(format!(
                "max_batch_bytes must be between {} and {SEGMENT_BYTES_LIMIT}, got {}",
                crate::batch::HEADER_BYTES,
                self.max_batch_bytes
            ));
        }
        if let FsyncPolicy::Interval { interval_ms: 0 } = self.fsync {
            return fail("fsync interval must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses_every_spelling() {
        assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
        assert_eq!("never".parse(), Ok(FsyncPolicy::Never));
        for text in ["interval(5ms)", "interval(5)", "5ms", " 5 "] {
            assert_eq!(
                text.parse(),
                Ok(FsyncPolicy::Interval { interval_ms: 5 }),
                "{text}"
            );
        }
        assert!("interval(0ms)".parse::<FsyncPolicy>().is_err());
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
        let policy = FsyncPolicy::Interval { interval_ms: 7 };
        assert_eq!(policy.to_string().parse(), Ok(policy));
    }

    #[test]
    fn validation_rejects_nonsense() {
        assert!(LogConfig::default().validate().is_ok());
        let bad = LogConfig {
            segment_bytes: 1 << 40,
            ..LogConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = LogConfig {
            index_interval_bytes: 0,
            ..LogConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
