//! Sluice's embedded storage engine.
//!
//! It owns durable, ordered logs of Kafka RecordBatch v2 batches: segment files, their sparse
//! offset and time indexes, recovery after a crash, retention, truncation, the fsync policy
//! with group commit, and the owner task that serialises writes to each log.
//!
//! It knows offsets, batches and bytes. It must never know about topics, queues, consumers or
//! any wire protocol; those live in the broker and the front-ends above it.
//!
//! Invariants it keeps for its callers:
//! - An append is all or nothing, and gets consecutive offsets after the previous one.
//! - A read returns whole, checksummed batches that were appended, and nothing past the log end.
//! - Under `fsync = always`, an append is acknowledged only once it is on disk.
//! - Opening a log after a crash keeps every batch that was fully written, cuts a torn tail, and
//!   refuses (naming file and byte) to open over damage anywhere else.
//! - Memory per log is bounded by the sparse indexes; no per-record state is kept.

pub mod batch;
pub mod checkpoint;
pub mod clock;
pub mod compression;
pub mod config;
mod epoch;
pub mod error;
mod index;
pub mod log;
pub mod owner;
pub mod record;
pub mod repair;
mod segment;
pub mod sync;

pub use batch::{BatchError, BatchHeader, Compression};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{FsyncPolicy, LogConfig};
pub use error::StorageError;
pub use log::{
    AppendInfo, CheckedBatches, FlushJob, Log, LogReader, OpenReport, ReadBatches,
    RetentionOutcome, SegmentInfo, TimestampHit,
};
pub use owner::{
    BasicHandler, Handled, LogHandle, LogHandler, LogRequest, LogResponse, OwnerHandle,
    OwnerOptions, OwnerTask,
};
