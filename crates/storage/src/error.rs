//! The storage crate's one error type. Every variant names what it was doing and where, and
//! keeps the underlying cause.

use std::io;
use std::path::{Path, PathBuf};

use crate::batch::BatchError;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system call failed on a file the log owns.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Stored bytes are not what the log wrote. Raised for damage the log must not repair
    /// silently (anywhere but the tail) and for damage found while reading.
    #[error("corrupt log data in {} at byte {position}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    /// Input handed to `append` is not a valid batch; `position` is its byte position in the
    /// input. Nothing was appended.
    #[error("invalid batch at byte {position} of the input: {source}")]
    InvalidBatch {
        position: usize,
        #[source]
        source: BatchError,
    },
    #[error("offset {offset} is outside the log's range [{log_start_offset}, {log_end_offset}]")]
    OffsetOutOfRange {
        offset: u64,
        log_start_offset: u64,
        log_end_offset: u64,
    },
    /// A write or fsync failed earlier; the log accepts no more writes until it is reopened.
    #[error("log {} stopped accepting writes: {reason}", dir.display())]
    Failed { dir: PathBuf, reason: String },
    #[error("invalid log configuration: {0}")]
    Config(String),
    /// The task that owns the log is gone (the broker is shutting down or the task failed).
    #[error("the log's owner task has stopped")]
    OwnerGone,
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}
