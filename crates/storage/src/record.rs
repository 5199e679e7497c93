//! Encoding and decoding of the records inside an uncompressed v2 batch.
//!
//! The log never calls this module: it stores batches as opaque bytes behind a parsed header.
//! These helpers exist for the broker's own writers (queues store their messages as batches),
//! for tests and for benchmarks. Compressed batches are the protocol front-end's business.
//!
//! Record layout (varints are zig-zag encoded, as in Kafka):
//! `length: varint, attributes: i8, timestamp_delta: varlong, offset_delta: varint,
//!  key_length: varint, key, value_length: varint, value, header_count: varint,
//!  [header_key_length: varint, header_key, header_value_length: varint, header_value]`.
//! A length of -1 stands for a null key, value or header value.

use bytes::{BufMut, Bytes, BytesMut};

use crate::batch::{self, BatchHeader, HEADER_BYTES, LOG_OVERHEAD_BYTES, MAGIC_V2};

/// Why the records of a batch could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("batch is compressed ({0:?}); only uncompressed batches can be decoded here")]
    Compressed(batch::Compression),
    #[error(transparent)]
    Decompress(#[from] crate::compression::DecompressError),
    #[error("record {index} is malformed: {reason}")]
    Malformed { index: i32, reason: &'static str },
    #[error(transparent)]
    Batch(#[from] batch::BatchError),
}

/// A header to attach to a record being built.
#[derive(Debug, Clone, Copy)]
pub struct RecordHeader<'a> {
    pub key: &'a str,
    pub value: Option<&'a [u8]>,
}

/// Builds one uncompressed v2 batch. The base offset is left at 0: the log assigns it.
#[derive(Debug)]
pub struct BatchBuilder {
    buf: BytesMut,
    base_timestamp: i64,
    max_timestamp: i64,
    record_count: i32,
    attributes: i16,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
    scratch: Vec<u8>,
}

impl BatchBuilder {
    /// Starts a batch whose timestamps are stored relative to `base_timestamp_ms`.
    pub fn new(base_timestamp_ms: i64) -> Self {
        let mut buf = BytesMut::with_capacity(256);
        buf.resize(HEADER_BYTES, 0);
        Self {
            buf,
            base_timestamp: base_timestamp_ms,
            max_timestamp: base_timestamp_ms,
            record_count: 0,
            attributes: 0,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            scratch: Vec::new(),
        }
    }

    /// Marks the batch as written by an idempotent producer.
    pub fn producer(mut self, producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Self {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.base_sequence = base_sequence;
        self
    }

    /// Sets the transactional attribute bit.
    pub fn transactional(mut self) -> Self {
        self.attributes |= 0x10;
        self
    }

    /// Sets the control attribute bit (transaction markers).
    pub fn control(mut self) -> Self {
        self.attributes |= 0x20;
        self
    }

    pub fn record_count(&self) -> i32 {
        self.record_count
    }

    /// Bytes the batch would take if finished now.
    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Appends one record.
    pub fn push(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[RecordHeader<'_>],
    ) {
        let body = &mut self.scratch;
        body.clear();
        body.push(0); // record attributes, unused in v2
        put_varlong(body, timestamp_ms - self.base_timestamp);
        put_varint(body, self.record_count);
        put_nullable(body, key);
        put_nullable(body, value);
        put_varint(body, headers.len() as i32);
        for header in headers {
            put_nullable(body, Some(header.key.as_bytes()));
            put_nullable(body, header.value);
        }
        let length = varint_bytes(body.len() as i32);
        self.buf.put_slice(length.as_slice());
        self.buf.put_slice(body);
        self.record_count += 1;
        self.max_timestamp = self.max_timestamp.max(timestamp_ms);
    }

    /// Fills in the header and CRC and returns the finished batch.
    pub fn finish(self) -> Bytes {
        let mut buf = self.buf;
        let batch_length = (buf.len() - LOG_OVERHEAD_BYTES) as i32;
        let mut header = Vec::with_capacity(HEADER_BYTES);
        header.put_i64(0);
        header.put_i32(batch_length);
        header.put_i32(batch::NO_PARTITION_LEADER_EPOCH);
        header.put_i8(MAGIC_V2);
        header.put_u32(0); // CRC, filled below
        header.put_i16(self.attributes);
        header.put_i32((self.record_count - 1).max(0));
        header.put_i64(self.base_timestamp);
        header.put_i64(self.max_timestamp);
        header.put_i64(self.producer_id);
        header.put_i16(self.producer_epoch);
        header.put_i32(self.base_sequence);
        header.put_i32(self.record_count);
        buf[..HEADER_BYTES].copy_from_slice(&header);
        let crc = batch::compute_crc(&buf);
        buf[17..21].copy_from_slice(&crc.to_be_bytes());
        buf.freeze()
    }
}

fn put_varint(out: &mut Vec<u8>, value: i32) {
    put_uvarint(out, ((value << 1) ^ (value >> 31)) as u32 as u64);
}

/// A zigzag varint in a buffer on the stack (at most 5 bytes for an i32).
struct VarintBytes {
    bytes: [u8; 5],
    len: usize,
}

impl VarintBytes {
    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn varint_bytes(value: i32) -> VarintBytes {
    let mut value = ((value << 1) ^ (value >> 31)) as u32;
    let mut out = VarintBytes {
        bytes: [0; 5],
        len: 0,
    };
    while value >= 0x80 {
        out.bytes[out.len] = (value as u8) | 0x80;
        out.len += 1;
        value >>= 7;
    }
    out.bytes[out.len] = value as u8;
    out.len += 1;
    out
}

fn put_varlong(out: &mut Vec<u8>, value: i64) {
    put_uvarint(out, ((value << 1) ^ (value >> 63)) as u64);
}

fn put_uvarint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_nullable(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => put_varint(out, -1),
        Some(bytes) => {
            put_varint(out, bytes.len() as i32);
            out.extend_from_slice(bytes);
        }
    }
}

/// One decoded record, borrowing from its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: Vec<(&'a [u8], Option<&'a [u8]>)>,
}

/// Decodes every record of one uncompressed batch.
pub fn decode(batch: &[u8]) -> Result<Vec<RecordView<'_>>, RecordError> {
    let header = batch::verify(batch)?;
    if header.compression() != batch::Compression::None {
        return Err(RecordError::Compressed(header.compression()));
    }
    decode_records(&header, &batch[HEADER_BYTES..header.total_bytes()])
}

/// Decodes the records that follow a header; `body` must already be decompressed.
pub fn decode_records<'a>(
    header: &BatchHeader,
    body: &'a [u8],
) -> Result<Vec<RecordView<'a>>, RecordError> {
    let count = header.record_count.max(0);
    // The count comes from the batch; bound the allocation by what the body can hold.
    let mut records = Vec::with_capacity((count as usize).min(body.len() / 7 + 1));
    let mut cursor = Cursor { buf: body, at: 0 };
    for index in 0..count {
        let malformed = |reason| RecordError::Malformed { index, reason };
        let length = cursor.varint().ok_or(malformed("bad length"))?;
        if length < 0 || length as usize > cursor.remaining() {
            return Err(malformed("length past the end of the batch"));
        }
        let end = cursor.at + length as usize;
        let mut record = Cursor {
            buf: &body[..end],
            at: cursor.at,
        };
        record.byte().ok_or(malformed("missing attributes"))?;
        let timestamp_delta = record.varlong().ok_or(malformed("bad timestamp"))?;
        let offset_delta = record.varint().ok_or(malformed("bad offset delta"))?;
        let key = record.nullable().ok_or(malformed("bad key"))?;
        let value = record.nullable().ok_or(malformed("bad value"))?;
        let header_count = record.varint().ok_or(malformed("bad header count"))?;
        if header_count < 0 || header_count as usize > record.remaining() {
            return Err(malformed("bad header count"));
        }
        let mut headers = Vec::with_capacity(header_count as usize);
        for _ in 0..header_count {
            let key = record
                .nullable()
                .flatten()
                .ok_or(malformed("bad header key"))?;
            let value = record.nullable().ok_or(malformed("bad header value"))?;
            headers.push((key, value));
        }
        if record.at != end {
            return Err(malformed("trailing bytes in record"));
        }
        cursor.at = end;
        records.push(RecordView {
            offset: header.base_offset + i64::from(offset_delta),
            timestamp_ms: if header.is_log_append_time() {
                header.max_timestamp
            } else {
                header.base_timestamp + timestamp_delta
            },
            key,
            value,
            headers,
        });
    }
    Ok(records)
}

/// One record, owning its bytes (from a batch that may have been compressed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(Bytes, Option<Bytes>)>,
}

/// Decodes every record of a stored batch, compressed or not. The decompressed body may be
/// at most `decompressed_max_bytes` long.
pub fn decode_owned(
    batch: &[u8],
    decompressed_max_bytes: usize,
) -> Result<(BatchHeader, Vec<Record>), RecordError> {
    let header = BatchHeader::parse(batch)?;
    let end = header.total_bytes().min(batch.len());
    let raw = &batch[HEADER_BYTES.min(end)..end];
    let body = Bytes::from(crate::compression::decompress(
        header.compression(),
        raw,
        decompressed_max_bytes,
    )?);
    let views = decode_records(&header, &body)?;
    let slice = |part: &[u8]| body.slice_ref(part);
    let records = views
        .iter()
        .map(|view| Record {
            offset: view.offset,
            timestamp_ms: view.timestamp_ms,
            key: view.key.map(slice),
            value: view.value.map(slice),
            headers: view
                .headers
                .iter()
                .map(|(k, v)| (slice(k), v.map(slice)))
                .collect(),
        })
        .collect();
    Ok((header, records))
}

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    fn byte(&mut self) -> Option<u8> {
        let byte = *self.buf.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    fn uvarint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn varint(&mut self) -> Option<i32> {
        let raw = self.uvarint()?;
        let raw = u32::try_from(raw).ok()?;
        Some(((raw >> 1) as i32) ^ -((raw & 1) as i32))
    }

    fn varlong(&mut self) -> Option<i64> {
        let raw = self.uvarint()?;
        Some(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }

    /// `Some(None)` for a null field, `None` for malformed input.
    fn nullable(&mut self) -> Option<Option<&'a [u8]>> {
        let length = self.varint()?;
        if length < 0 {
            return Some(None);
        }
        let length = length as usize;
        if length > self.remaining() {
            return None;
        }
        let bytes = &self.buf[self.at..self.at + length];
        self.at += length;
        Some(Some(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn varints_on_the_stack_are_the_ones_written_to_vectors() {
        for value in [0, 1, -1, 63, 64, -65, 8191, 8192, i32::MAX, i32::MIN] {
            let mut expected = Vec::new();
            put_varint(&mut expected, value);
            assert_eq!(varint_bytes(value).as_slice(), expected, "{value}");
        }
    }

    #[test]
    fn round_trip_with_nulls_and_headers() {
        let mut builder = BatchBuilder::new(10);
        builder.push(10, None, None, &[]);
        builder.push(
            7,
            Some(b"key"),
            Some(b""),
            &[RecordHeader {
                key: "a",
                value: None,
            }],
        );
        let batch = builder.finish();
        let records = decode(&batch).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].key, None);
        assert_eq!(records[0].value, None);
        assert_eq!(records[1].offset, 1);
        assert_eq!(records[1].timestamp_ms, 7);
        assert_eq!(records[1].key, Some(&b"key"[..]));
        assert_eq!(records[1].value, Some(&b""[..]));
        assert_eq!(records[1].headers, vec![(&b"a"[..], None)]);
    }

    proptest! {
        #[test]
        fn builder_round_trips(records in proptest::collection::vec(
            (any::<i32>(), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
             proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200))), 1..20)) {
            let mut builder = BatchBuilder::new(0);
            for (ts, key, value) in &records {
                builder.push(i64::from(*ts), key.as_deref(), value.as_deref(), &[]);
            }
            let batch = builder.finish();
            let decoded = decode(&batch).unwrap();
            prop_assert_eq!(decoded.len(), records.len());
            for (i, (record, (ts, key, value))) in decoded.iter().zip(&records).enumerate() {
                prop_assert_eq!(record.offset, i as i64);
                prop_assert_eq!(record.timestamp_ms, i64::from(*ts));
                prop_assert_eq!(record.key, key.as_deref());
                prop_assert_eq!(record.value, value.as_deref());
            }
        }

        #[test]
        fn decoding_garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300), count in 0i32..50) {
            let mut builder = BatchBuilder::new(0);
            builder.push(0, None, Some(b"x"), &[]);
            let batch = builder.finish();
            let mut header = BatchHeader::parse(&batch).unwrap();
            header.record_count = count;
            let _ = decode_records(&header, &body);
        }
    }
}
