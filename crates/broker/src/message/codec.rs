//! How a queue stores a message: one record of a RecordBatch v2 batch per message.
//!
//! | record field | contents |
//! |---|---|
//! | timestamp | when the message entered the queue (ms) |
//! | key | the routing key |
//! | value | the body |
//! | header `x` | the exchange name |
//! | header `p` | the properties, encoded as below; absent when every property is unset |
//! | header `t` | when the message expires in this queue (ms since the epoch, i64 big-endian); absent if never |
//!
//! Properties: a u16 of presence flags (bit 15 content-type, 14 content-encoding, 13 headers,
//! 12 delivery-mode, 11 priority, 10 correlation-id, 9 reply-to, 8 expiration, 7 message-id,
//! 6 timestamp, 5 type, 4 user-id, 3 app-id, 2 cluster-id), then each present field in that
//! order: strings as a u32 length and bytes, delivery-mode and priority as one byte, timestamp
//! as a u64, headers as a table. A table is a u32 entry count, then per entry a u32-length key
//! and a value; a value is a one-byte tag and its payload, with the tags of AMQP 0-9-1 field
//! tables (`t b B s u I i l f d D S A T F x V`). All integers are big-endian.
//!
//! Decoding never trusts a length or count beyond the bytes present, and refuses tables nested
//! deeper than [`MAX_DEPTH`]: stored bytes are checksummed, but a decoder must not be able to
//! crash the broker whatever it is given.

use std::sync::Arc;

use bytes::{BufMut, Bytes};
use sluice_storage::record::{self, BatchBuilder, RecordHeader};

use super::value::{FieldTable, FieldValue};
use super::{Message, Properties};

/// Deepest nesting of tables and arrays accepted when decoding.
pub const MAX_DEPTH: usize = 64;

const EXCHANGE: &str = "x";
const PROPERTIES: &str = "p";
const EXPIRES: &str = "t";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("stored message at offset {offset} is malformed: {reason}")]
    Malformed { offset: i64, reason: &'static str },
    #[error(transparent)]
    Record(#[from] record::RecordError),
}

/// A message read back from a queue's log.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub offset: u64,
    /// When it entered the queue.
    pub timestamp_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub message: Arc<Message>,
}

/// Writes messages into batches, reusing one scratch buffer.
#[derive(Debug, Default)]
pub struct RecordEncoder {
    scratch: Vec<u8>,
}

impl RecordEncoder {
    pub fn push(
        &mut self,
        builder: &mut BatchBuilder,
        timestamp_ms: i64,
        expires_at_ms: Option<i64>,
        message: &Message,
    ) {
        self.scratch.clear();
        let has_properties = *message.properties != Properties::default();
        if has_properties {
            encode_properties(&message.properties, &mut self.scratch);
        }
        let expires = expires_at_ms.map(i64::to_be_bytes);
        let mut headers: [RecordHeader<'_>; 3] = [
            RecordHeader {
                key: EXCHANGE,
                value: Some(message.exchange.as_bytes()),
            },
            RecordHeader {
                key: PROPERTIES,
                value: Some(&self.scratch),
            },
            RecordHeader {
                key: EXPIRES,
                value: None,
            },
        ];
        let mut count = 1;
        if has_properties {
            count = 2;
        }
        if let Some(expires) = &expires {
            headers[count] = RecordHeader {
                key: EXPIRES,
                value: Some(expires),
            };
            count += 1;
        }
        builder.push(
            timestamp_ms,
            Some(message.routing_key.as_bytes()),
            Some(&message.body),
            &headers[..count],
        );
    }

    /// Bytes one message adds to a batch, roughly: to decide when to start a new batch.
    pub fn estimate_bytes(message: &Message) -> usize {
        64 + message.routing_key.len() + message.exchange.len() + message.body.len()
    }
}

/// Decodes every message of one stored batch. `batch` must hold exactly one batch.
pub fn decode_batch(batch: &Bytes) -> Result<Vec<StoredMessage>, CodecError> {
    let records = record::decode(batch)?;
    let mut out = Vec::with_capacity(records.len());
    for view in records {
        let malformed = |reason| CodecError::Malformed {
            offset: view.offset,
            reason,
        };
        let mut exchange = None;
        let mut properties = Properties::default();
        let mut expires_at_ms = None;
        for (key, value) in &view.headers {
            match (*key, value) {
                (b"x", Some(value)) => {
                    exchange =
                        Some(std::str::from_utf8(value).map_err(|_| malformed("exchange name"))?)
                }
                (b"p", Some(value)) => {
                    properties = decode_properties(value).ok_or(malformed("properties"))?
                }
                (b"t", Some(value)) => {
                    let bytes: [u8; 8] = (*value).try_into().map_err(|_| malformed("expiry"))?;
                    expires_at_ms = Some(i64::from_be_bytes(bytes));
                }
                _ => {}
            }
        }
        let routing_key = view
            .key
            .map(std::str::from_utf8)
            .transpose()
            .map_err(|_| malformed("routing key"))?
            .unwrap_or("");
        let body = view.value.map_or_else(Bytes::new, |v| batch.slice_ref(v));
        out.push(StoredMessage {
            offset: u64::try_from(view.offset).map_err(|_| malformed("offset"))?,
            timestamp_ms: view.timestamp_ms,
            expires_at_ms,
            message: Arc::new(Message {
                exchange: Arc::from(exchange.unwrap_or("")),
                routing_key: Arc::from(routing_key),
                properties: properties.into(),
                body,
            }),
        });
    }
    Ok(out)
}

const FLAG_CONTENT_TYPE: u16 = 1 << 15;
const FLAG_CONTENT_ENCODING: u16 = 1 << 14;
const FLAG_HEADERS: u16 = 1 << 13;
const FLAG_DELIVERY_MODE: u16 = 1 << 12;
const FLAG_PRIORITY: u16 = 1 << 11;
const FLAG_CORRELATION_ID: u16 = 1 << 10;
const FLAG_REPLY_TO: u16 = 1 << 9;
const FLAG_EXPIRATION: u16 = 1 << 8;
const FLAG_MESSAGE_ID: u16 = 1 << 7;
const FLAG_TIMESTAMP: u16 = 1 << 6;
const FLAG_TYPE: u16 = 1 << 5;
const FLAG_USER_ID: u16 = 1 << 4;
const FLAG_APP_ID: u16 = 1 << 3;
const FLAG_CLUSTER_ID: u16 = 1 << 2;

fn encode_properties(p: &Properties, out: &mut Vec<u8>) {
    let mut flags = 0u16;
    let mut set = |present: bool, flag: u16| {
        if present {
            flags |= flag;
        }
    };
    set(p.content_type.is_some(), FLAG_CONTENT_TYPE);
    set(p.content_encoding.is_some(), FLAG_CONTENT_ENCODING);
    set(p.headers.is_some(), FLAG_HEADERS);
    set(p.delivery_mode.is_some(), FLAG_DELIVERY_MODE);
    set(p.priority.is_some(), FLAG_PRIORITY);
    set(p.correlation_id.is_some(), FLAG_CORRELATION_ID);
    set(p.reply_to.is_some(), FLAG_REPLY_TO);
    set(p.expiration.is_some(), FLAG_EXPIRATION);
    set(p.message_id.is_some(), FLAG_MESSAGE_ID);
    set(p.timestamp.is_some(), FLAG_TIMESTAMP);
    set(p.kind.is_some(), FLAG_TYPE);
    set(p.user_id.is_some(), FLAG_USER_ID);
    set(p.app_id.is_some(), FLAG_APP_ID);
    set(p.cluster_id.is_some(), FLAG_CLUSTER_ID);
    out.put_u16(flags);
    let put_str = |out: &mut Vec<u8>, s: &Option<String>| {
        if let Some(s) = s {
            put_bytes(out, s.as_bytes());
        }
    };
    put_str(out, &p.content_type);
    put_str(out, &p.content_encoding);
    if let Some(headers) = &p.headers {
        encode_table(headers, out);
    }
    if let Some(mode) = p.delivery_mode {
        out.put_u8(mode);
    }
    if let Some(priority) = p.priority {
        out.put_u8(priority);
    }
    put_str(out, &p.correlation_id);
    put_str(out, &p.reply_to);
    put_str(out, &p.expiration);
    put_str(out, &p.message_id);
    if let Some(timestamp) = p.timestamp {
        out.put_u64(timestamp);
    }
    put_str(out, &p.kind);
    put_str(out, &p.user_id);
    put_str(out, &p.app_id);
    put_str(out, &p.cluster_id);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
}

/// Encodes a table in the stored format (also used for persisted definitions' arguments).
pub fn encode_table(table: &FieldTable, out: &mut Vec<u8>) {
    out.put_u32(table.len() as u32);
    for (key, value) in table {
        put_bytes(out, key.as_bytes());
        encode_value(value, out);
    }
}

fn encode_value(value: &FieldValue, out: &mut Vec<u8>) {
    match value {
        FieldValue::Bool(v) => {
            out.put_u8(b't');
            out.put_u8(u8::from(*v));
        }
        FieldValue::I8(v) => {
            out.put_u8(b'b');
            out.put_i8(*v);
        }
        FieldValue::U8(v) => {
            out.put_u8(b'B');
            out.put_u8(*v);
        }
        FieldValue::I16(v) => {
            out.put_u8(b's');
            out.put_i16(*v);
        }
        FieldValue::U16(v) => {
            out.put_u8(b'u');
            out.put_u16(*v);
        }
        FieldValue::I32(v) => {
            out.put_u8(b'I');
            out.put_i32(*v);
        }
        FieldValue::U32(v) => {
            out.put_u8(b'i');
            out.put_u32(*v);
        }
        FieldValue::I64(v) => {
            out.put_u8(b'l');
            out.put_i64(*v);
        }
        FieldValue::F32(v) => {
            out.put_u8(b'f');
            out.put_f32(*v);
        }
        FieldValue::F64(v) => {
            out.put_u8(b'd');
            out.put_f64(*v);
        }
        FieldValue::Decimal { scale, value } => {
            out.put_u8(b'D');
            out.put_u8(*scale);
            out.put_u32(*value);
        }
        FieldValue::LongString(bytes) => {
            out.put_u8(b'S');
            put_bytes(out, bytes);
        }
        FieldValue::Array(values) => {
            out.put_u8(b'A');
            out.put_u32(values.len() as u32);
            for value in values {
                encode_value(value, out);
            }
        }
        FieldValue::Timestamp(v) => {
            out.put_u8(b'T');
            out.put_u64(*v);
        }
        FieldValue::Table(table) => {
            out.put_u8(b'F');
            encode_table(table, out);
        }
        FieldValue::Bytes(bytes) => {
            out.put_u8(b'x');
            put_bytes(out, bytes);
        }
        FieldValue::Void => out.put_u8(b'V'),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let slice = self.buf.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Option<String> {
        std::str::from_utf8(self.bytes()?).ok().map(str::to_owned)
    }
}

/// Decodes stored properties; `None` if they are malformed.
pub fn decode_properties(bytes: &[u8]) -> Option<Properties> {
    let mut r = Reader { buf: bytes, at: 0 };
    let flags = r.u16()?;
    let has = |flag: u16| flags & flag != 0;
    let string = |r: &mut Reader<'_>, flag: u16| -> Option<Option<String>> {
        if has(flag) {
            r.string().map(Some)
        } else {
            Some(None)
        }
    };
    let content_type = string(&mut r, FLAG_CONTENT_TYPE)?;
    let content_encoding = string(&mut r, FLAG_CONTENT_ENCODING)?;
    let headers = if has(FLAG_HEADERS) {
        Some(decode_table_at(&mut r, 0)?)
    } else {
        None
    };
    let delivery_mode = if has(FLAG_DELIVERY_MODE) {
        Some(r.u8()?)
    } else {
        None
    };
    let priority = if has(FLAG_PRIORITY) {
        Some(r.u8()?)
    } else {
        None
    };
    let correlation_id = string(&mut r, FLAG_CORRELATION_ID)?;
    let reply_to = string(&mut r, FLAG_REPLY_TO)?;
    let expiration = string(&mut r, FLAG_EXPIRATION)?;
    let message_id = string(&mut r, FLAG_MESSAGE_ID)?;
    let timestamp = if has(FLAG_TIMESTAMP) {
        Some(r.u64()?)
    } else {
        None
    };
    let kind = string(&mut r, FLAG_TYPE)?;
    let user_id = string(&mut r, FLAG_USER_ID)?;
    let app_id = string(&mut r, FLAG_APP_ID)?;
    let cluster_id = string(&mut r, FLAG_CLUSTER_ID)?;
    if r.remaining() != 0 {
        return None;
    }
    Some(Properties {
        content_type,
        content_encoding,
        headers,
        delivery_mode,
        priority,
        correlation_id,
        reply_to,
        expiration,
        message_id,
        timestamp,
        kind,
        user_id,
        app_id,
        cluster_id,
    })
}

/// Decodes a table written by [`encode_table`]; `None` if malformed.
pub fn decode_table(bytes: &[u8]) -> Option<FieldTable> {
    let mut r = Reader { buf: bytes, at: 0 };
    let table = decode_table_at(&mut r, 0)?;
    (r.remaining() == 0).then_some(table)
}

fn decode_table_at(r: &mut Reader<'_>, depth: usize) -> Option<FieldTable> {
    if depth >= MAX_DEPTH {
        return None;
    }
    let count = r.u32()? as usize;
    // Every entry takes at least five bytes (key length, tag).
    if count > r.remaining() / 5 {
        return None;
    }
    let mut table = Vec::with_capacity(count);
    for _ in 0..count {
        let key = r.string()?;
        let value = decode_value(r, depth + 1)?;
        table.push((key, value));
    }
    Some(table)
}

fn decode_value(r: &mut Reader<'_>, depth: usize) -> Option<FieldValue> {
    if depth >= MAX_DEPTH {
        return None;
    }
    Some(match r.u8()? {
        b't' => FieldValue::Bool(r.u8()? != 0),
        b'b' => FieldValue::I8(i8::from_be_bytes(r.array()?)),
        b'B' => FieldValue::U8(r.u8()?),
        b's' => FieldValue::I16(i16::from_be_bytes(r.array()?)),
        b'u' => FieldValue::U16(r.u16()?),
        b'I' => FieldValue::I32(i32::from_be_bytes(r.array()?)),
        b'i' => FieldValue::U32(r.u32()?),
        b'l' => FieldValue::I64(i64::from_be_bytes(r.array()?)),
        b'f' => FieldValue::F32(f32::from_be_bytes(r.array()?)),
        b'd' => FieldValue::F64(f64::from_be_bytes(r.array()?)),
        b'D' => FieldValue::Decimal {
            scale: r.u8()?,
            value: r.u32()?,
        },
        b'S' => FieldValue::LongString(r.bytes()?.to_vec()),
        b'A' => {
            let count = r.u32()? as usize;
            if count > r.remaining() {
                return None;
            }
            let mut values = Vec::with_capacity(count);
            for _ in 0..count {
                values.push(decode_value(r, depth + 1)?);
            }
            FieldValue::Array(values)
        }
        b'T' => FieldValue::Timestamp(r.u64()?),
        b'F' => FieldValue::Table(decode_table_at(r, depth)?),
        b'x' => FieldValue::Bytes(r.bytes()?.to_vec()),
        b'V' => FieldValue::Void,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Message {
        Message {
            exchange: "amq.direct".into(),
            routing_key: "k".into(),
            properties: Properties {
                content_type: Some("text/plain".into()),
                headers: Some(vec![
                    ("n".into(), FieldValue::I64(-3)),
                    (
                        "nested".into(),
                        FieldValue::Table(vec![(
                            "a".into(),
                            FieldValue::Array(vec![FieldValue::string("x"), FieldValue::Void]),
                        )]),
                    ),
                    ("f".into(), FieldValue::F64(1.5)),
                ]),
                delivery_mode: Some(2),
                priority: Some(7),
                expiration: Some("100".into()),
                timestamp: Some(123),
                cluster_id: Some("c".into()),
                ..Properties::default()
            }
            .into(),
            body: Bytes::from_static(b"hello"),
        }
    }

    #[test]
    fn messages_round_trip_through_a_batch() {
        let mut builder = BatchBuilder::new(1000);
        let mut encoder = RecordEncoder::default();
        let first = sample();
        let second = Message {
            properties: Properties::default().into(),
            ..sample()
        };
        encoder.push(&mut builder, 1000, Some(2000), &first);
        encoder.push(&mut builder, 1001, None, &second);
        let batch = builder.finish();
        let decoded = decode_batch(&batch).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(*decoded[0].message, first);
        assert_eq!(decoded[0].expires_at_ms, Some(2000));
        assert_eq!(decoded[0].timestamp_ms, 1000);
        assert_eq!(*decoded[1].message, second);
        assert_eq!(decoded[1].offset, 1);
        assert_eq!(decoded[1].expires_at_ms, None);
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        // A table holding a table holding a table..., built by hand.
        let mut bytes = Vec::new();
        for _ in 0..10_000 {
            bytes.extend_from_slice(&1u32.to_be_bytes());
            bytes.extend_from_slice(&0u32.to_be_bytes());
            bytes.push(b'F');
        }
        bytes.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(decode_table(&bytes), None);
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_properties(&bytes);
            let _ = decode_table(&bytes);
        }
    }
}
