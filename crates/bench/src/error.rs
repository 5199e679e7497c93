//! The one error type of the benchmark library.
//!
//! Every variant keeps the cause as its `#[source]` and says what was being done, so a failed
//! workload in a long suite run names its reason in the report rather than a bare "error".

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A setting that cannot work, found before any traffic is sent.
    #[error("invalid setting: {0}")]
    Config(String),

    /// Nothing accepts connections at the address: the broker is down or lacks that listener.
    #[error("nothing listens on {address}: {source}")]
    Unreachable {
        address: String,
        #[source]
        source: std::io::Error,
    },

    #[error("kafka client failed while {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },

    #[error("amqp client failed while {context}: {source}")]
    Amqp {
        context: String,
        #[source]
        source: lapin::Error,
    },

    #[error("storage failed while {context}: {source}")]
    Storage {
        context: String,
        #[source]
        source: sluice_storage::StorageError,
    },

    /// A record batch a broker sent that a consumer must refuse: a bad CRC, another magic,
    /// malformed records.
    #[error("bad record batch in {context}: {source}")]
    Records {
        context: String,
        #[source]
        source: sluice_storage::record::RecordError,
    },

    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot {action} JSON {what}: {source}")]
    Json {
        action: &'static str,
        what: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("cannot draw chart {path}: {reason}")]
    Chart { path: PathBuf, reason: String },

    /// An external measuring tool (fio, iperf3) failed or printed something unexpected.
    #[error("{tool} failed: {reason}")]
    Tool { tool: &'static str, reason: String },

    /// The broker process the suite manages did not start or stop as it should.
    #[error("broker process: {0}")]
    Process(String),

    /// A client task or thread died instead of returning its result.
    #[error("a benchmark task died: {0}")]
    Task(String),

    /// The run finished but broke one of its own expectations (for example no message came
    /// back), so its figures would mean nothing.
    #[error("the run is not usable: {0}")]
    Invalid(String),
}

impl BenchError {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        Self::Kafka {
            context: context.into(),
            source,
        }
    }

    pub fn amqp(context: impl Into<String>, source: lapin::Error) -> Self {
        Self::Amqp {
            context: context.into(),
            source,
        }
    }

    pub fn storage(context: impl Into<String>, source: sluice_storage::StorageError) -> Self {
        Self::Storage {
            context: context.into(),
            source,
        }
    }

    /// The full chain of causes on one line, for reports and skip reasons.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            // Variants already print their direct source; avoid saying it twice.
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        text
    }
}
