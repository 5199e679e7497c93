//! Helpers shared by the storage integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::BytesMut;
use sluice_storage::record::BatchBuilder;
use sluice_storage::{FsyncPolicy, LogConfig};

/// A batch of `records` records whose values are `value_bytes` long and derived from `seed`,
/// all stamped `timestamp_ms`.
pub fn batch(records: usize, value_bytes: usize, timestamp_ms: i64, seed: u64) -> BytesMut {
    let mut builder = BatchBuilder::new(timestamp_ms);
    for index in 0..records {
        let value = value_for(seed, index, value_bytes);
        let key = format!("key-{seed}-{index}");
        builder.push(timestamp_ms, Some(key.as_bytes()), Some(&value), &[]);
    }
    BytesMut::from(&builder.finish()[..])
}

/// Deterministic value bytes, so a reader can check what it got without keeping copies.
pub fn value_for(seed: u64, index: usize, len: usize) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index as u64 + 1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A config with small segments and a dense index, so tests cross every boundary.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 2_000,
        index_interval_bytes: 300,
        retention_ms: None,
        retention_bytes: None,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    }
}

/// Splits a read result into (base offset, batch bytes) pairs.
pub fn split(bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
    sluice_storage::batch::Batches::new(bytes)
        .map(|item| {
            let (header, raw) = item.expect("reads return valid batches");
            (header.base_offset as u64, raw.to_vec())
        })
        .collect()
}
