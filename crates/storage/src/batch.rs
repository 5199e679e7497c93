//! The on-disk batch format: Kafka's RecordBatch v2, byte for byte.
//!
//! This module owns the layout of a batch header and the checks that decide whether a run of
//! bytes is a valid batch. It parses the 61-byte header only; records inside a batch are opaque
//! here (see [`crate::record`] for the helpers that encode and decode them). It never performs
//! I/O.
//!
//! Layout (all integers big-endian):
//!
//! | bytes  | field                  | covered by CRC |
//! |--------|------------------------|----------------|
//! | 0..8   | base offset            | no             |
//! | 8..12  | batch length (from 12) | no             |
//! | 12..16 | partition leader epoch | no             |
//! | 16     | magic (= 2)            | no             |
//! | 17..21 | CRC-32C                | —              |
//! | 21..23 | attributes             | yes            |
//! | 23..27 | last offset delta      | yes            |
//! | 27..35 | base timestamp         | yes            |
//! | 35..43 | max timestamp          | yes            |
//! | 43..51 | producer id            | yes            |
//! | 51..53 | producer epoch         | yes            |
//! | 53..57 | base sequence          | yes            |
//! | 57..61 | record count           | yes            |
//! | 61..   | records                | yes            |
//!
//! Because the base offset and the partition leader epoch sit outside the CRC, the log assigns
//! offsets and stamps epochs by patching those fields in place; the producer's CRC stays valid.

use std::fmt;

/// Bytes before the batch length field's coverage starts: base offset (8) and length (4).
pub const LOG_OVERHEAD_BYTES: usize = 12;
/// Size of a v2 batch header, up to and including the record count.
pub const HEADER_BYTES: usize = 61;
/// The only magic value this log stores.
pub const MAGIC_V2: i8 = 2;
/// A partition leader epoch of -1 means "not set" on the wire.
pub const NO_PARTITION_LEADER_EPOCH: i32 = -1;

const BASE_OFFSET_AT: usize = 0;
const LENGTH_AT: usize = 8;
const LEADER_EPOCH_AT: usize = 12;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const LAST_OFFSET_DELTA_AT: usize = 23;
const BASE_TIMESTAMP_AT: usize = 27;
const MAX_TIMESTAMP_AT: usize = 35;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;
const RECORD_COUNT_AT: usize = 57;

const COMPRESSION_MASK: i16 = 0x07;
const TIMESTAMP_TYPE_BIT: i16 = 0x08;
const TRANSACTIONAL_BIT: i16 = 0x10;
const CONTROL_BIT: i16 = 0x20;

/// Why a run of bytes is not a valid batch. The caller adds where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch is truncated: {needed} bytes needed, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("batch length {0} is smaller than a v2 header")]
    LengthTooSmall(i32),
    #[error("unsupported magic {0} (only RecordBatch v2 is stored)")]
    UnsupportedMagic(i8),
    #[error("CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("last offset delta {last_offset_delta} does not match record count {record_count}")]
    RecordCountMismatch {
        record_count: i32,
        last_offset_delta: i32,
    },
    #[error("batch has no records")]
    Empty,
    #[error("batch of {batch_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    TooLarge {
        batch_bytes: usize,
        limit_bytes: usize,
    },
}

/// Compression codec named by the low three attribute bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
    /// A codec id that Kafka does not define (5..=7).
    Unknown(u8),
}

impl Compression {
    pub fn from_attributes(attributes: i16) -> Self {
        match (attributes & COMPRESSION_MASK) as u8 {
            0 => Self::None,
            1 => Self::Gzip,
            2 => Self::Snappy,
            3 => Self::Lz4,
            4 => Self::Zstd,
            other => Self::Unknown(other),
        }
    }

    pub fn id(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Gzip => 1,
            Self::Snappy => 2,
            Self::Lz4 => 3,
            Self::Zstd => 4,
            Self::Unknown(id) => id,
        }
    }
}

/// The parsed fixed-size header of one v2 batch.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

impl fmt::Debug for BatchHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchHeader")
            .field("base_offset", &self.base_offset)
            .field("batch_length", &self.batch_length)
            .field("epoch", &self.partition_leader_epoch)
            .field("last_offset_delta", &self.last_offset_delta)
            .field("record_count", &self.record_count)
            .field("max_timestamp", &self.max_timestamp)
            .field("producer_id", &self.producer_id)
            .field("base_sequence", &self.base_sequence)
            .finish_non_exhaustive()
    }
}

fn be_i64(buf: &[u8], at: usize) -> i64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&buf[at..at + 8]);
    i64::from_be_bytes(raw)
}

fn be_i32(buf: &[u8], at: usize) -> i32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&buf[at..at + 4]);
    i32::from_be_bytes(raw)
}

fn be_i16(buf: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([buf[at], buf[at + 1]])
}

impl BatchHeader {
    /// Reads only the base offset and batch length, which is all that is needed to step from one
    /// batch to the next. Requires 12 bytes.
    pub fn peek_extent(buf: &[u8]) -> Result<(i64, usize), BatchError> {
        if buf.len() < LOG_OVERHEAD_BYTES {
            return Err(BatchError::Truncated {
                needed: LOG_OVERHEAD_BYTES,
                available: buf.len(),
            });
        }
        let length = be_i32(buf, LENGTH_AT);
        if length < (HEADER_BYTES - LOG_OVERHEAD_BYTES) as i32 {
            return Err(BatchError::LengthTooSmall(length));
        }
        Ok((
            be_i64(buf, BASE_OFFSET_AT),
            LOG_OVERHEAD_BYTES + length as usize,
        ))
    }

    /// Parses the 61-byte header at the start of `buf`. Checks the length field and the magic,
    /// not the CRC (see [`verify`]).
    pub fn parse(buf: &[u8]) -> Result<Self, BatchError> {
        if buf.len() < HEADER_BYTES {
            return Err(BatchError::Truncated {
                needed: HEADER_BYTES,
                available: buf.len(),
            });
        }
        let (base_offset, total) = Self::peek_extent(buf)?;
        let magic = buf[MAGIC_AT] as i8;
        if magic != MAGIC_V2 {
            return Err(BatchError::UnsupportedMagic(magic));
        }
        Ok(Self {
            base_offset,
            batch_length: (total - LOG_OVERHEAD_BYTES) as i32,
            partition_leader_epoch: be_i32(buf, LEADER_EPOCH_AT),
            magic,
            crc: u32::from_be_bytes([
                buf[CRC_AT],
                buf[CRC_AT + 1],
                buf[CRC_AT + 2],
                buf[CRC_AT + 3],
            ]),
            attributes: be_i16(buf, ATTRIBUTES_AT),
            last_offset_delta: be_i32(buf, LAST_OFFSET_DELTA_AT),
            base_timestamp: be_i64(buf, BASE_TIMESTAMP_AT),
            max_timestamp: be_i64(buf, MAX_TIMESTAMP_AT),
            producer_id: be_i64(buf, PRODUCER_ID_AT),
            producer_epoch: be_i16(buf, PRODUCER_EPOCH_AT),
            base_sequence: be_i32(buf, BASE_SEQUENCE_AT),
            record_count: be_i32(buf, RECORD_COUNT_AT),
        })
    }

    /// Total bytes of the batch on disk, header included.
    pub fn total_bytes(&self) -> usize {
        LOG_OVERHEAD_BYTES + self.batch_length as usize
    }

    /// Offset of the last record in the batch.
    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }

    /// The offset that follows this batch.
    pub fn next_offset(&self) -> i64 {
        self.last_offset() + 1
    }

    pub fn compression(&self) -> Compression {
        Compression::from_attributes(self.attributes)
    }

    /// True if the timestamps are the broker's append time rather than the producer's.
    pub fn is_log_append_time(&self) -> bool {
        self.attributes & TIMESTAMP_TYPE_BIT != 0
    }

    pub fn is_transactional(&self) -> bool {
        self.attributes & TRANSACTIONAL_BIT != 0
    }

    pub fn is_control(&self) -> bool {
        self.attributes & CONTROL_BIT != 0
    }

    /// Sequence number of the last record, wrapping at `i32::MAX` as Kafka does.
    pub fn last_sequence(&self) -> i32 {
        if self.base_sequence < 0 {
            return self.base_sequence;
        }
        let last = i64::from(self.base_sequence) + i64::from(self.last_offset_delta);
        if last > i64::from(i32::MAX) {
            (last - i64::from(i32::MAX) - 1) as i32
        } else {
            last as i32
        }
    }
}

/// Computes the CRC-32C of a whole batch, over the bytes from the attributes to the end.
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[ATTRIBUTES_AT..])
}

/// Checks one complete batch (exactly `header.total_bytes()` long): structure and CRC.
pub fn verify(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(batch)?;
    if batch.len() < header.total_bytes() {
        return Err(BatchError::Truncated {
            needed: header.total_bytes(),
            available: batch.len(),
        });
    }
    let computed = compute_crc(&batch[..header.total_bytes()]);
    if computed != header.crc {
        return Err(BatchError::CrcMismatch {
            stored: header.crc,
            computed,
        });
    }
    if header.last_offset_delta < 0 {
        return Err(BatchError::RecordCountMismatch {
            record_count: header.record_count,
            last_offset_delta: header.last_offset_delta,
        });
    }
    Ok(header)
}

/// Stricter checks for a batch arriving from a producer: it must hold at least one record and
/// its records must be numbered 0..count with no gaps.
pub fn verify_for_append(batch: &[u8], limit_bytes: usize) -> Result<BatchHeader, BatchError> {
    if let Ok((_, total)) = BatchHeader::peek_extent(batch)
        && total > limit_bytes
    {
        return Err(BatchError::TooLarge {
            batch_bytes: total,
            limit_bytes,
        });
    }
    let header = verify(batch)?;
    if header.record_count <= 0 {
        return Err(BatchError::Empty);
    }
    if i64::from(header.record_count) != i64::from(header.last_offset_delta) + 1 {
        return Err(BatchError::RecordCountMismatch {
            record_count: header.record_count,
            last_offset_delta: header.last_offset_delta,
        });
    }
    Ok(header)
}

/// Overwrites the base offset of the batch at the start of `batch`. The CRC does not cover it.
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    batch[BASE_OFFSET_AT..BASE_OFFSET_AT + 8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Overwrites the partition leader epoch of the batch at the start of `batch`. The CRC does not
/// cover it.
pub fn set_partition_leader_epoch(batch: &mut [u8], epoch: i32) {
    batch[LEADER_EPOCH_AT..LEADER_EPOCH_AT + 4].copy_from_slice(&epoch.to_be_bytes());
}

/// Splits a buffer that holds zero or more complete batches, checking the structure and CRC of
/// each. Used on produce input and by tests; the log reads its own files with position context.
#[derive(Debug, Clone)]
pub struct Batches<'a> {
    buf: &'a [u8],
    position: usize,
}

impl<'a> Batches<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, position: 0 }
    }

    /// Position of the next batch in the buffer.
    pub fn position(&self) -> usize {
        self.position
    }
}

impl<'a> Iterator for Batches<'a> {
    /// The header and the whole batch, or the error and the position where it was found.
    type Item = Result<(BatchHeader, &'a [u8]), (usize, BatchError)>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.buf[self.position..];
        if rest.is_empty() {
            return None;
        }
        let at = self.position;
        match verify(rest) {
            Ok(header) => {
                let total = header.total_bytes();
                self.position += total;
                Some(Ok((header, &rest[..total])))
            }
            Err(error) => {
                // Stop iterating: nothing after a bad batch can be trusted.
                self.position = self.buf.len();
                Some(Err((at, error)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{BatchBuilder, RecordHeader};

    fn sample() -> Vec<u8> {
        let mut builder = BatchBuilder::new(1_000);
        builder.push(1_000, Some(b"k1"), Some(b"v1"), &[]);
        builder.push(
            1_005,
            None,
            Some(b"v2"),
            &[RecordHeader {
                key: "h",
                value: Some(b"x"),
            }],
        );
        builder.finish().to_vec()
    }

    #[test]
    fn parse_reads_every_field() {
        let batch = sample();
        let header = verify(&batch).unwrap();
        assert_eq!(header.base_offset, 0);
        assert_eq!(header.total_bytes(), batch.len());
        assert_eq!(header.magic, 2);
        assert_eq!(header.last_offset_delta, 1);
        assert_eq!(header.record_count, 2);
        assert_eq!(header.base_timestamp, 1_000);
        assert_eq!(header.max_timestamp, 1_005);
        assert_eq!(header.producer_id, -1);
        assert_eq!(header.compression(), Compression::None);
    }

    #[test]
    fn patching_offset_and_epoch_keeps_crc_valid() {
        let mut batch = sample();
        set_base_offset(&mut batch, 1 << 40);
        set_partition_leader_epoch(&mut batch, 7);
        let header = verify(&batch).unwrap();
        assert_eq!(header.base_offset, 1 << 40);
        assert_eq!(header.partition_leader_epoch, 7);
        assert_eq!(header.last_offset(), (1 << 40) + 1);
    }

    #[test]
    fn any_flipped_bit_in_crc_range_is_detected() {
        let batch = sample();
        for at in ATTRIBUTES_AT..batch.len() {
            let mut damaged = batch.clone();
            damaged[at] ^= 0x10;
            assert!(verify(&damaged).is_err(), "flip at {at} went unnoticed");
        }
    }

    #[test]
    fn short_and_oversized_input_is_rejected() {
        let batch = sample();
        assert!(matches!(
            verify(&batch[..30]),
            Err(BatchError::Truncated { .. })
        ));
        assert!(matches!(
            verify(&batch[..batch.len() - 1]),
            Err(BatchError::Truncated { .. })
        ));
        assert!(matches!(
            verify_for_append(&batch, 10),
            Err(BatchError::TooLarge { .. })
        ));
    }

    #[test]
    fn batches_iterator_stops_at_damage() {
        let mut buf = sample();
        buf.extend_from_slice(&sample());
        let mut bad = sample();
        bad[70] ^= 1;
        let good_len = buf.len();
        buf.extend_from_slice(&bad);
        let items: Vec<_> = Batches::new(&buf).collect();
        assert_eq!(items.len(), 3);
        assert!(items[0].is_ok() && items[1].is_ok());
        let (at, _) = items[2].as_ref().unwrap_err();
        assert_eq!(*at, good_len);
    }

    #[test]
    fn last_sequence_wraps() {
        let mut batch = sample();
        // Base sequence is covered by the CRC; parse without verifying.
        batch[BASE_SEQUENCE_AT..BASE_SEQUENCE_AT + 4].copy_from_slice(&i32::MAX.to_be_bytes());
        let header = BatchHeader::parse(&batch).unwrap();
        assert_eq!(header.last_sequence(), 0);
    }
}
