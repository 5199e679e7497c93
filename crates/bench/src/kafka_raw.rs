//! A lean Kafka consumer for the consume side of the Kafka benchmark (`--client raw`).
//!
//! librdkafka's consumer, the default, spends more CPU per record than the broker it measures
//! on a small machine: draining a backlog of 100 B records on two CPUs, its own threads take
//! more than one of them while the broker takes about a tenth of one, so the drain rate is the
//! client's. This
//! consumer speaks the protocol itself, one connection and one thread per consumer: requests
//! are encoded and responses decoded by the `kafka-protocol` crate (the broker's codec), and
//! record batches are checked and read by the storage crate's RecordBatch v2 codec.
//!
//! What it does: Metadata to find the topic's partitions, of which consumer `i` of `n` takes
//! those whose index is `i` modulo `n` (as the librdkafka consumers do when they assign
//! themselves); ListOffsets when asked to start at the earliest offset; then Fetch of all its
//! partitions in one request. The next Fetch is sent as soon as the batch headers of a response
//! give the next offsets, before its records are read, so the broker works on it meanwhile.
//!
//! What it checks, as any consumer must: every batch's magic and CRC-32C, and every record
//! inside (length, attributes, timestamp delta, offset delta, key, value, headers); compressed
//! batches are decompressed, with a size limit. Records before the offset asked for (a fetch
//! returns whole batches) are skipped, and so are control batches (transaction markers). A
//! partition error ends the run naming the partition and the Kafka error code. A last batch
//! cut short by the response's size limit is not an error: it is fetched again, whole.
//!
//! Limits: it joins no consumer group and commits no offsets, and it reads every partition from
//! the bootstrap broker, so it refuses a cluster of more than one broker rather than follow
//! leaders. It speaks fixed versions without asking ApiVersions first: Metadata 12, ListOffsets
//! 7 and Fetch 12 (the newest Fetch that names topics rather than giving their ids), all of
//! which Sluice serves; a broker that does not closes the connection, which ends the run.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse,
    MetadataRequest, MetadataResponse, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use sluice_storage::batch::{BatchHeader, Batches, Compression, HEADER_BYTES};
use sluice_storage::compression::{DECOMPRESSED_MAX_BYTES, decompress};
use sluice_storage::record::{RecordError, decode_records};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::BenchError;
use crate::meter::{Latency, Meter};
use crate::payload;

const METADATA_VERSION: i16 = 12;
const LIST_OFFSETS_VERSION: i16 = 7;
const FETCH_VERSION: i16 = 12;
/// ListOffsets' timestamp that asks for the earliest offset.
const EARLIEST_TIMESTAMP: i64 = -2;

/// Bytes one fetch may return per partition: librdkafka's default
/// (`max.partition.fetch.bytes`).
const FETCH_PARTITION_BYTES_MAX: i32 = 1024 * 1024;
/// Bytes one fetch may return in all: librdkafka's default (`fetch.max.bytes`).
const FETCH_BYTES_MAX: i32 = 50 * 1024 * 1024;
/// How long the broker may hold a fetch that finds nothing new: librdkafka's default
/// (`fetch.wait.max.ms`).
const FETCH_WAIT_MS: i32 = 500;
/// The largest response frame accepted. A fetch returns at most `FETCH_BYTES_MAX`, except that
/// the first batch is returned whole however large (KIP-74); batches are far smaller than the
/// headroom left here.
const RESPONSE_BYTES_MAX: usize = 2 * FETCH_BYTES_MAX as usize;
/// How long Metadata and ListOffsets may take before the consumer gives up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a consumer waiting for a response looks at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Where a consumer starts reading each of its partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOffset {
    At(i64),
    /// The partition's log start offset, asked with ListOffsets.
    Earliest,
}

/// What one lean consumer reads.
#[derive(Debug, Clone)]
pub struct ConsumerPlan {
    /// Bootstrap servers, comma separated; the first that accepts a connection is used.
    pub bootstrap: String,
    pub topic: String,
    /// This consumer's place among the `consumer_count` that share the topic's partitions.
    pub consumer_index: usize,
    pub consumer_count: usize,
    pub start: StartOffset,
    /// Sent as the Kafka client id; also the thread's name.
    pub client_id: String,
}

/// Starts a consumer on its own thread. It counts itself in `ready` once it knows its
/// partitions and offsets (or failed to learn them), and returns the latency of what it
/// received when the meter says stop.
pub fn spawn(
    plan: ConsumerPlan,
    ready: Arc<AtomicUsize>,
    meter: Arc<Meter>,
) -> Result<JoinHandle<Result<Latency, BenchError>>, BenchError> {
    std::thread::Builder::new()
        .name(plan.client_id.clone())
        .spawn(move || {
            // A runtime of its own on this thread: socket reads land straight in the
            // response buffer (no zeroing first) and can wait with a time limit.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|error| BenchError::Task(format!("cannot start a runtime: {error}")))?;
            runtime.block_on(consume(&plan, &ready, &meter))
        })
        .map_err(|error| BenchError::Task(format!("cannot start a consumer thread: {error}")))
}

async fn consume(
    plan: &ConsumerPlan,
    ready: &AtomicUsize,
    meter: &Meter,
) -> Result<Latency, BenchError> {
    let setup = async {
        let mut connection = Connection::open(&plan.bootstrap, &plan.client_id).await?;
        let partitions: Vec<i32> = connection
            .partitions(&plan.topic)
            .await?
            .into_iter()
            .filter(|partition| *partition as usize % plan.consumer_count == plan.consumer_index)
            .collect();
        let cursors = match plan.start {
            StartOffset::At(offset) => partitions
                .iter()
                .map(|&partition| Cursor { partition, offset })
                .collect(),
            StartOffset::Earliest => connection.earliest(&plan.topic, &partitions).await?,
        };
        Ok::<_, BenchError>((connection, cursors))
    };
    let setup = tokio::time::timeout(SETUP_TIMEOUT, setup).await;
    ready.fetch_add(1, Ordering::Release);
    let (mut connection, mut cursors) = setup.map_err(|_| {
        protocol_error(format!(
            "Metadata and ListOffsets took more than {SETUP_TIMEOUT:?}"
        ))
    })??;
    let mut latency = Latency::new()?;
    if cursors.is_empty() {
        // More consumers than partitions: this one has nothing to read. Like a librdkafka
        // consumer with an empty assignment it stays until told to stop, so it is not taken
        // for one that failed.
        while !meter.consumers_stopped() {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        return Ok(latency);
    }
    let topic = TopicName(StrBytes::from_string(plan.topic.clone()));
    connection.send_fetch(&topic, &cursors).await?;
    while !meter.consumers_stopped() {
        let Some(response) = connection
            .receive_within::<FetchResponse>(FETCH_VERSION, POLL_INTERVAL)
            .await?
        else {
            continue;
        };
        let fetched = take_fetched(&plan.topic, response, &mut cursors)?;
        // Offers the broker the next fetch before this one's records are read. Rotating the
        // partitions lets each be first in turn, the one whose first batch is returned whole
        // even when it is larger than the partition's limit (KIP-74).
        cursors.rotate_left(1);
        connection.send_fetch(&topic, &cursors).await?;
        for part in fetched {
            read_records(&part.batches, part.from_offset, |value, now_ns| {
                latency.record(value, now_ns);
                meter.received(value.len(), now_ns);
            })
            .map_err(|source| BenchError::Records {
                context: format!(
                    "topic {} partition {} fetched from offset {}",
                    plan.topic, part.partition, part.from_offset
                ),
                source,
            })?;
        }
    }
    Ok(latency)
}

/// The next offset to fetch of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    partition: i32,
    offset: i64,
}

/// The whole batches one response brought for one partition.
#[derive(Debug)]
struct Fetched {
    partition: i32,
    /// The offset that was asked for: records before it are not delivered.
    from_offset: i64,
    batches: Bytes,
}

fn fetch_request(topic: &TopicName, cursors: &[Cursor]) -> FetchRequest {
    let partitions = cursors
        .iter()
        .map(|cursor| {
            FetchPartition::default()
                .with_partition(cursor.partition)
                .with_fetch_offset(cursor.offset)
                .with_partition_max_bytes(FETCH_PARTITION_BYTES_MAX)
        })
        .collect();
    FetchRequest::default()
        .with_max_wait_ms(FETCH_WAIT_MS)
        .with_min_bytes(1)
        .with_max_bytes(FETCH_BYTES_MAX)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(topic.clone())
                .with_partitions(partitions),
        ])
}

/// Takes the whole batches of every partition out of a fetch response and moves each
/// partition's cursor past them.
fn take_fetched(
    topic: &str,
    response: FetchResponse,
    cursors: &mut [Cursor],
) -> Result<Vec<Fetched>, BenchError> {
    if let Some(error) = ResponseError::try_from_code(response.error_code) {
        return Err(protocol_error(format!(
            "Fetch failed with Kafka error {} ({error})",
            response.error_code
        )));
    }
    let mut fetched = Vec::with_capacity(cursors.len());
    for partition in response
        .responses
        .into_iter()
        .flat_map(|topic| topic.partitions)
    {
        let index = partition.partition_index;
        if let Some(error) = ResponseError::try_from_code(partition.error_code) {
            return Err(protocol_error(format!(
                "topic {topic} partition {index}: Kafka error {} ({error})",
                partition.error_code
            )));
        }
        let cursor = cursors
            .iter_mut()
            .find(|cursor| cursor.partition == index)
            .ok_or_else(|| {
                protocol_error(format!(
                    "topic {topic}: the broker answered for partition {index}, never asked for"
                ))
            })?;
        let records = partition.records.unwrap_or_default();
        let whole = whole_batches(&records).map_err(|source| BenchError::Records {
            context: format!(
                "topic {topic} partition {index} fetched from offset {}",
                cursor.offset
            ),
            source,
        })?;
        if let Some(next_offset) = whole.next_offset {
            fetched.push(Fetched {
                partition: index,
                from_offset: cursor.offset,
                batches: records.slice(..whole.bytes),
            });
            // Never backwards: batches wholly before the offset asked for deliver nothing, and
            // fetching from where they end would deliver again what earlier fetches did.
            cursor.offset = next_offset.max(cursor.offset);
        }
    }
    Ok(fetched)
}

/// The leading run of whole batches in a partition's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WholeBatches {
    bytes: usize,
    /// The offset after the last whole batch; `None` if there is none.
    next_offset: Option<i64>,
}

/// Finds the whole batches at the start of `records` from their headers alone. A batch cut
/// short at the end is left out: a broker may cut the last batch of a response at the size
/// limit, and it will come whole in the next fetch.
fn whole_batches(records: &[u8]) -> Result<WholeBatches, RecordError> {
    let mut whole = WholeBatches {
        bytes: 0,
        next_offset: None,
    };
    loop {
        let rest = &records[whole.bytes..];
        if rest.len() < HEADER_BYTES {
            return Ok(whole);
        }
        let header = BatchHeader::parse(rest)?;
        if rest.len() < header.total_bytes() {
            return Ok(whole);
        }
        whole.bytes += header.total_bytes();
        whole.next_offset = Some(header.next_offset());
    }
}

/// Checks every batch in `batches` (whole ones only) and hands the value of each record at or
/// after `from_offset` to `on_value`, with the time it was read (one clock read per batch: its
/// records arrived together). Returns how many records were handed over.
fn read_records(
    batches: &[u8],
    from_offset: i64,
    mut on_value: impl FnMut(&[u8], u64),
) -> Result<u64, RecordError> {
    let mut delivered_count = 0;
    for batch in Batches::new(batches) {
        let (header, batch) = batch.map_err(|(_, error)| error)?;
        if header.is_control() {
            continue;
        }
        let body = &batch[HEADER_BYTES..];
        let body = match header.compression() {
            Compression::None => Cow::Borrowed(body),
            codec => Cow::Owned(decompress(codec, body, DECOMPRESSED_MAX_BYTES)?),
        };
        let now_ns = payload::now_ns();
        for record in decode_records(&header, &body)? {
            if record.offset >= from_offset {
                on_value(record.value.unwrap_or_default(), now_ns);
                delivered_count += 1;
            }
        }
    }
    Ok(delivered_count)
}

fn protocol_error(what: impl std::fmt::Display) -> BenchError {
    BenchError::Invalid(format!("Kafka (raw client): {what}"))
}

fn io_error(what: &str, error: std::io::Error) -> BenchError {
    protocol_error(format!("{what}: {error}"))
}

/// One connection to the broker, with at most one request awaiting its response.
#[derive(Debug)]
struct Connection {
    stream: TcpStream,
    input: BytesMut,
    output: BytesMut,
    client_id: StrBytes,
    /// The correlation id of the last request sent.
    correlation_id: i32,
}

impl Connection {
    /// Asks for every partition's records from its cursor on.
    async fn send_fetch(
        &mut self,
        topic: &TopicName,
        cursors: &[Cursor],
    ) -> Result<(), BenchError> {
        self.send(ApiKey::Fetch, &fetch_request(topic, cursors), FETCH_VERSION)
            .await
    }

    async fn open(bootstrap: &str, client_id: &str) -> Result<Self, BenchError> {
        let mut last_error = None;
        for address in bootstrap.split(',').map(str::trim) {
            match TcpStream::connect(address).await {
                Ok(stream) => {
                    stream
                        .set_nodelay(true)
                        .map_err(|error| io_error("setting TCP_NODELAY", error))?;
                    return Ok(Self {
                        stream,
                        input: BytesMut::with_capacity(64 * 1024),
                        output: BytesMut::with_capacity(1024),
                        client_id: StrBytes::from_string(client_id.to_owned()),
                        correlation_id: 0,
                    });
                }
                Err(error) => last_error = Some(format!("connecting to {address}: {error}")),
            }
        }
        Err(protocol_error(
            last_error.unwrap_or_else(|| format!("no address in {bootstrap:?}")),
        ))
    }

    /// The partition indexes of `topic`.
    async fn partitions(&mut self, topic: &str) -> Result<Vec<i32>, BenchError> {
        let request = MetadataRequest::default()
            .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
                TopicName(StrBytes::from_string(topic.to_owned())),
            ))]));
        self.send(ApiKey::Metadata, &request, METADATA_VERSION)
            .await?;
        let response = self.receive::<MetadataResponse>(METADATA_VERSION).await?;
        if response.brokers.len() != 1 {
            return Err(protocol_error(format!(
                "the cluster has {} brokers; this consumer reads every partition from the \
                 bootstrap broker, so it needs a single one",
                response.brokers.len()
            )));
        }
        let found = response
            .topics
            .into_iter()
            .find(|found| {
                found
                    .name
                    .as_ref()
                    .is_some_and(|name| name.as_str() == topic)
            })
            .ok_or_else(|| protocol_error(format!("topic {topic} is missing from the metadata")))?;
        if let Some(error) = ResponseError::try_from_code(found.error_code) {
            return Err(protocol_error(format!(
                "metadata of topic {topic}: Kafka error {} ({error})",
                found.error_code
            )));
        }
        let mut partitions = Vec::with_capacity(found.partitions.len());
        for partition in found.partitions {
            if let Some(error) = ResponseError::try_from_code(partition.error_code) {
                return Err(protocol_error(format!(
                    "metadata of topic {topic} partition {}: Kafka error {} ({error})",
                    partition.partition_index, partition.error_code
                )));
            }
            partitions.push(partition.partition_index);
        }
        partitions.sort_unstable();
        Ok(partitions)
    }

    /// The earliest offset of each of `partitions`.
    async fn earliest(
        &mut self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<Cursor>, BenchError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let request = ListOffsetsRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_topics(vec![
                ListOffsetsTopic::default()
                    .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
                    .with_partitions(
                        partitions
                            .iter()
                            .map(|&partition| {
                                ListOffsetsPartition::default()
                                    .with_partition_index(partition)
                                    .with_timestamp(EARLIEST_TIMESTAMP)
                            })
                            .collect(),
                    ),
            ]);
        self.send(ApiKey::ListOffsets, &request, LIST_OFFSETS_VERSION)
            .await?;
        let response = self
            .receive::<ListOffsetsResponse>(LIST_OFFSETS_VERSION)
            .await?;
        let mut cursors = Vec::with_capacity(partitions.len());
        for partition in response
            .topics
            .into_iter()
            .flat_map(|topic| topic.partitions)
        {
            if let Some(error) = ResponseError::try_from_code(partition.error_code) {
                return Err(protocol_error(format!(
                    "earliest offset of topic {topic} partition {}: Kafka error {} ({error})",
                    partition.partition_index, partition.error_code
                )));
            }
            cursors.push(Cursor {
                partition: partition.partition_index,
                offset: partition.offset,
            });
        }
        if let Some(missing) = partitions
            .iter()
            .find(|&&partition| !cursors.iter().any(|c| c.partition == partition))
        {
            return Err(protocol_error(format!(
                "ListOffsets gave no offset for topic {topic} partition {missing}"
            )));
        }
        Ok(cursors)
    }

    /// Writes one request of `api`.
    async fn send<R: Encodable + HeaderVersion>(
        &mut self,
        api: ApiKey,
        request: &R,
        version: i16,
    ) -> Result<(), BenchError> {
        self.correlation_id = self.correlation_id.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation_id)
            .with_client_id(Some(self.client_id.clone()));
        let output = &mut self.output;
        output.clear();
        output.put_i32(0);
        header
            .encode(output, R::header_version(version))
            .and_then(|()| request.encode(output, version))
            .map_err(|error| {
                protocol_error(format!("encoding a {api:?} v{version} request: {error}"))
            })?;
        let size = (output.len() - 4) as i32;
        output[..4].copy_from_slice(&size.to_be_bytes());
        self.stream
            .write_all(output)
            .await
            .map_err(|error| io_error("writing", error))
    }

    /// Waits for the response to the last request.
    async fn receive<R: Decodable + HeaderVersion>(
        &mut self,
        version: i16,
    ) -> Result<R, BenchError> {
        let frame = self.frame().await?;
        self.decode::<R>(frame, version)
    }

    /// Waits at most `wait` for the response to the last request.
    async fn receive_within<R: Decodable + HeaderVersion>(
        &mut self,
        version: i16,
        wait: Duration,
    ) -> Result<Option<R>, BenchError> {
        // Cancelling is safe: `frame` keeps what it read in `input` until a frame is whole.
        match tokio::time::timeout(wait, self.frame()).await {
            Err(_) => Ok(None),
            Ok(frame) => self.decode::<R>(frame?, version).map(Some),
        }
    }

    /// Decodes the response to the last request from its frame.
    fn decode<R: Decodable + HeaderVersion>(
        &self,
        mut frame: Bytes,
        version: i16,
    ) -> Result<R, BenchError> {
        let header = ResponseHeader::decode(&mut frame, R::header_version(version))
            .map_err(|error| protocol_error(format!("a bad response header: {error}")))?;
        if header.correlation_id != self.correlation_id {
            return Err(protocol_error(format!(
                "a response with correlation id {}, expected {}",
                header.correlation_id, self.correlation_id
            )));
        }
        R::decode(&mut frame, version).map_err(|error| {
            let name = std::any::type_name::<R>().rsplit("::").next();
            protocol_error(format!(
                "a bad {} v{version}: {error}",
                name.unwrap_or("response")
            ))
        })
    }

    /// The next whole response frame, without its size prefix.
    async fn frame(&mut self) -> Result<Bytes, BenchError> {
        loop {
            if self.input.len() >= 4 {
                let size = i32::from_be_bytes([
                    self.input[0],
                    self.input[1],
                    self.input[2],
                    self.input[3],
                ]);
                let size = usize::try_from(size)
                    .ok()
                    .filter(|size| *size <= RESPONSE_BYTES_MAX)
                    .ok_or_else(|| {
                        protocol_error(format!(
                            "a response frame of {size} bytes (at most {RESPONSE_BYTES_MAX})"
                        ))
                    })?;
                if self.input.len() >= 4 + size {
                    let mut frame = self.input.split_to(4 + size);
                    let _ = frame.split_to(4);
                    return Ok(frame.freeze());
                }
                // Room for the whole frame at once, rather than growing in steps.
                self.input.reserve(4 + size - self.input.len());
            } else {
                self.input.reserve(64 * 1024);
            }
            let read = self
                .stream
                .read_buf(&mut self.input)
                .await
                .map_err(|error| io_error("reading", error))?;
            if read == 0 {
                return Err(protocol_error("the broker closed the connection"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_storage::batch::{BatchError, set_base_offset};
    use sluice_storage::record::BatchBuilder;

    use super::*;
    use crate::storage::build_batch;

    /// A batch of `count` records whose values are their sequence numbers, at `base_offset`.
    fn numbered_batch(base_offset: i64, count: u64) -> Vec<u8> {
        let mut builder = BatchBuilder::new(0);
        for sequence in 0..count {
            builder.push(0, None, Some(&sequence.to_be_bytes()), &[]);
        }
        let mut batch = builder.finish().to_vec();
        set_base_offset(&mut batch, base_offset);
        batch
    }

    fn values(batches: &[u8], from_offset: i64) -> Result<Vec<u64>, RecordError> {
        let mut values = Vec::new();
        read_records(batches, from_offset, |value, _| {
            let raw: [u8; 8] = value.try_into().expect("values are 8 bytes");
            values.push(u64::from_be_bytes(raw));
        })?;
        Ok(values)
    }

    #[test]
    fn every_record_of_a_batch_is_read() {
        let batch = build_batch(4096, 100);
        let header = BatchHeader::parse(&batch).unwrap();
        assert!(header.record_count > 1);
        let mut sizes = Vec::new();
        let count = read_records(&batch, 0, |value, _| sizes.push(value.len())).unwrap();
        assert_eq!(count, header.record_count as u64);
        assert_eq!(sizes, vec![100; header.record_count as usize]);
        assert_eq!(
            whole_batches(&batch).unwrap(),
            WholeBatches {
                bytes: batch.len(),
                next_offset: Some(i64::from(header.record_count)),
            }
        );
    }

    #[test]
    fn a_flipped_byte_is_a_crc_error() {
        let mut batch = numbered_batch(0, 5);
        let last = batch.len() - 1;
        batch[last] ^= 0x01;
        let error = values(&batch, 0).unwrap_err();
        assert!(
            matches!(error, RecordError::Batch(BatchError::CrcMismatch { .. })),
            "{error}"
        );
    }

    #[test]
    fn another_magic_is_refused() {
        let mut batch = numbered_batch(0, 5);
        batch[16] = 1;
        assert_eq!(
            whole_batches(&batch).unwrap_err(),
            RecordError::Batch(BatchError::UnsupportedMagic(1))
        );
    }

    #[test]
    fn a_truncated_last_batch_is_left_for_the_next_fetch() {
        let first = numbered_batch(0, 3);
        let second = numbered_batch(3, 4);
        let mut records = [first.clone(), second.clone()].concat();
        for cut in [1, HEADER_BYTES - 1, HEADER_BYTES + 2, second.len() - 1] {
            records.truncate(first.len() + cut);
            assert_eq!(
                whole_batches(&records).unwrap(),
                WholeBatches {
                    bytes: first.len(),
                    next_offset: Some(3),
                },
                "cut {cut} bytes into the second batch"
            );
        }
        assert_eq!(
            whole_batches(&second[..second.len() - 1]).unwrap(),
            WholeBatches {
                bytes: 0,
                next_offset: None,
            }
        );
        let both = [first.clone(), second].concat();
        assert_eq!(whole_batches(&both).unwrap().next_offset, Some(7));
        assert_eq!(values(&both, 0).unwrap(), vec![0, 1, 2, 0, 1, 2, 3]);
    }

    #[test]
    fn records_before_the_start_offset_are_skipped() {
        let records = [numbered_batch(100, 10), numbered_batch(110, 2)].concat();
        assert_eq!(values(&records, 105).unwrap(), vec![5, 6, 7, 8, 9, 0, 1]);
        assert_eq!(values(&records, 111).unwrap(), vec![1]);
        assert_eq!(values(&records, 100).unwrap().len(), 12);
    }

    #[test]
    fn control_batches_hold_no_records_for_the_application() {
        let mut builder = BatchBuilder::new(0).control();
        builder.push(0, Some(&[0, 0, 0, 0]), Some(&[0; 6]), &[]);
        let records = [builder.finish().to_vec(), numbered_batch(1, 1)].concat();
        assert_eq!(values(&records, 0).unwrap(), vec![0]);
    }

    #[test]
    fn partition_errors_name_the_partition_and_the_code() {
        use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
        let response = FetchResponse::default().with_responses(vec![
            FetchableTopicResponse::default().with_partitions(vec![
                PartitionData::default()
                    .with_partition_index(3)
                    .with_error_code(ResponseError::OffsetOutOfRange.code()),
            ]),
        ]);
        let mut cursors = [Cursor {
            partition: 3,
            offset: 0,
        }];
        let error = take_fetched("t1", response, &mut cursors).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("topic t1 partition 3: Kafka error 1 (OffsetOutOfRange)"),
            "{error}"
        );
    }

    #[test]
    fn cursors_move_past_whole_batches_only() {
        use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
        let first = numbered_batch(10, 3);
        let second = numbered_batch(13, 3);
        let records = Bytes::from([first.clone(), second[..20].to_vec()].concat());
        let response = FetchResponse::default().with_responses(vec![
            FetchableTopicResponse::default().with_partitions(vec![
                PartitionData::default()
                    .with_partition_index(0)
                    .with_records(Some(records)),
                PartitionData::default()
                    .with_partition_index(1)
                    .with_records(Some(Bytes::new())),
            ]),
        ]);
        let mut cursors = [
            Cursor {
                partition: 0,
                offset: 11,
            },
            Cursor {
                partition: 1,
                offset: 5,
            },
        ];
        let fetched = take_fetched("t1", response, &mut cursors).unwrap();
        assert_eq!(fetched.len(), 1);
        assert_eq!(fetched[0].partition, 0);
        assert_eq!(fetched[0].from_offset, 11);
        assert_eq!(&fetched[0].batches[..], &first[..]);
        assert_eq!(cursors[0].offset, 13);
        assert_eq!(cursors[1].offset, 5);
    }

    #[test]
    fn batches_before_the_fetch_offset_move_no_cursor_back() {
        use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
        let old = numbered_batch(10, 3);
        let response = FetchResponse::default().with_responses(vec![
            FetchableTopicResponse::default().with_partitions(vec![
                PartitionData::default()
                    .with_partition_index(0)
                    .with_records(Some(Bytes::from(old))),
            ]),
        ]);
        let mut cursors = [Cursor {
            partition: 0,
            offset: 20,
        }];
        let fetched = take_fetched("t1", response, &mut cursors).unwrap();
        assert_eq!(cursors[0].offset, 20);
        let delivered = values(&fetched[0].batches, fetched[0].from_offset).unwrap();
        assert!(delivered.is_empty(), "{delivered:?}");
    }
}
