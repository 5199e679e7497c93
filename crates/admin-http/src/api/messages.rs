//! Publishing a test message to a topic, and peeking at what a topic holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::Json;
use axum::extract::{Path, Query, State};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sluice_storage::record::{BatchBuilder, Record, RecordHeader};
use utoipa::{IntoParams, ToSchema};

use super::topics::find;
use crate::AdminState;
use crate::error::{ApiError, ApiResult};

/// Largest number of messages one peek returns.
const PEEK_MAX: usize = 1000;

#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Text, stored as its UTF-8 bytes.
    #[default]
    Utf8,
    /// Binary data in standard base64.
    Base64,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PublishMessage {
    /// Partition to write to; without it, keyed messages go where Kafka's default partitioner
    /// would put them (murmur2 of the key) and unkeyed ones rotate.
    pub partition: Option<u32>,
    pub key: Option<String>,
    pub value: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// How `key` and `value` are written.
    #[serde(default)]
    pub encoding: Encoding,
}

/// One message, or many published in order.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PublishBody {
    One(PublishMessage),
    Many(Vec<PublishMessage>),
}

/// Where one message, or each of many, landed.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PublishReply {
    One(Published),
    Many(Vec<Published>),
}

/// Messages one publish request may carry.
const PUBLISH_MAX: usize = 10_000;

#[derive(Debug, Serialize, ToSchema)]
pub struct Published {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct PeekQuery {
    /// Only this partition; every partition if absent.
    pub partition: Option<u32>,
    /// Start at this offset (with `partition`); otherwise show the newest messages.
    pub offset: Option<u64>,
    /// How many messages, at most 1000 (default 20).
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    pub partition: u32,
    pub offset: i64,
    pub timestamp_ms: i64,
    /// The key as text, if it is valid UTF-8.
    pub key: Option<String>,
    /// The key in base64, if it is not valid UTF-8.
    pub key_base64: Option<String>,
    pub value: Option<String>,
    pub value_base64: Option<String>,
    pub headers: BTreeMap<String, String>,
}

fn decode(text: &str, encoding: Encoding, what: &str) -> ApiResult<Vec<u8>> {
    match encoding {
        Encoding::Utf8 => Ok(text.as_bytes().to_vec()),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| ApiError::bad_request(format!("{what} is not valid base64: {e}"))),
    }
}

/// Kafka's murmur2, as its Java producer hashes keys to partitions.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

static ROTATION: AtomicU32 = AtomicU32::new(0);

#[utoipa::path(post, path = "/api/topics/{topic}/messages", tag = "topics", request_body = PublishBody,
    params(("topic" = String, Path, description = "Topic name")),
    responses(
        (status = 200, description = "Where the message (or each message of an array) landed", body = PublishReply),
        (status = 400, description = "Bad partition or encoding", body = crate::error::Problem),
        (status = 404, description = "No such topic", body = crate::error::Problem)))]
pub async fn publish(
    State(state): State<Arc<AdminState>>,
    Path(topic): Path<String>,
    Json(body): Json<PublishBody>,
) -> ApiResult<Json<PublishReply>> {
    let found = find(&state, &topic)?;
    match body {
        PublishBody::One(message) => Ok(Json(PublishReply::One(
            publish_one(&state, &found, &topic, message).await?,
        ))),
        PublishBody::Many(messages) => {
            if messages.len() > PUBLISH_MAX {
                return Err(ApiError::bad_request(format!(
                    "at most {PUBLISH_MAX} messages per request, not {}",
                    messages.len()
                )));
            }
            let mut out = Vec::with_capacity(messages.len());
            for message in messages {
                out.push(publish_one(&state, &found, &topic, message).await?);
            }
            Ok(Json(PublishReply::Many(out)))
        }
    }
}

async fn publish_one(
    state: &AdminState,
    found: &sluice_broker::Topic,
    topic: &str,
    message: PublishMessage,
) -> ApiResult<Published> {
    let count = found.partition_count() as u32;
    let key = message
        .key
        .as_deref()
        .map(|k| decode(k, message.encoding, "key"))
        .transpose()?;
    let value = decode(&message.value, message.encoding, "value")?;
    let partition = match (message.partition, &key) {
        (Some(p), _) if p >= count => {
            return Err(ApiError::bad_request(format!(
                "topic {topic:?} has partitions 0 to {}",
                count - 1
            )));
        }
        (Some(p), _) => p,
        (None, Some(key)) => (murmur2(key) & 0x7fff_ffff) % count,
        (None, None) => ROTATION.fetch_add(1, Ordering::Relaxed) % count,
    };
    let now_ms = state.broker.clock().now_ms();
    let headers: Vec<RecordHeader<'_>> = message
        .headers
        .iter()
        .map(|(k, v)| RecordHeader {
            key: k,
            value: Some(v.as_bytes()),
        })
        .collect();
    let mut builder = BatchBuilder::new(now_ms);
    builder.push(now_ms, key.as_deref(), Some(&value), &headers);
    let batch = builder.finish();
    let target = found.get(partition as i32)?;
    let outcome = target.produce(batch).await?;
    Ok(Published {
        topic: topic.to_owned(),
        partition,
        offset: outcome.base_offset,
    })
}

fn text_or_base64(bytes: Option<&[u8]>) -> (Option<String>, Option<String>) {
    match bytes {
        None => (None, None),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            ),
        },
    }
}

fn view(partition: u32, record: &Record) -> MessageView {
    let (key, key_base64) = text_or_base64(record.key.as_deref());
    let (value, value_base64) = text_or_base64(record.value.as_deref());
    MessageView {
        partition,
        offset: record.offset,
        timestamp_ms: record.timestamp_ms,
        key,
        key_base64,
        value,
        value_base64,
        headers: record
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    v.as_deref()
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default(),
                )
            })
            .collect(),
    }
}

#[utoipa::path(get, path = "/api/topics/{topic}/messages", tag = "topics",
    params(("topic" = String, Path, description = "Topic name"), PeekQuery),
    responses(
        (status = 200, description = "Messages, oldest first; newest ones unless an offset is given", body = [MessageView]),
        (status = 404, description = "No such topic or partition", body = crate::error::Problem)))]
pub async fn peek(
    State(state): State<Arc<AdminState>>,
    Path(topic): Path<String>,
    Query(query): Query<PeekQuery>,
) -> ApiResult<Json<Vec<MessageView>>> {
    let found = find(&state, &topic)?;
    let limit = query.limit.unwrap_or(20).clamp(1, PEEK_MAX);
    let partitions: Vec<_> = match query.partition {
        Some(p) if p as usize >= found.partition_count() => {
            return Err(ApiError::not_found(format!(
                "topic {topic:?} has no partition {p}"
            )));
        }
        Some(p) => vec![found.get(p as i32)?.clone()],
        None => found.served().cloned().collect(),
    };
    let mut messages = Vec::new();
    for partition in partitions {
        let start = partition.log_start_offset();
        let from = match query.offset {
            Some(offset) => offset.max(start),
            None => partition
                .high_watermark()
                .saturating_sub(limit as u64)
                .max(start),
        };
        if from >= partition.high_watermark() {
            continue;
        }
        let records = partition.read_records(from, limit, 1 << 20)?;
        messages.extend(records.iter().map(|r| view(partition.index(), r)));
    }
    if query.offset.is_none() {
        // The newest `limit` across partitions, shown oldest first.
        messages.sort_by_key(|m| (m.timestamp_ms, m.partition, m.offset));
        let skip = messages.len().saturating_sub(limit);
        messages.drain(..skip);
    } else {
        messages.truncate(limit);
    }
    Ok(Json(messages))
}

#[cfg(test)]
mod tests {
    use super::murmur2;

    #[test]
    fn murmur2_matches_kafka() {
        // Values from Kafka's own partitioner tests (Utils.murmur2).
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }
}
