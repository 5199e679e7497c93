//! One client connection: read a size-prefixed frame, decode it, hand it to its API handler,
//! write the response, repeat.
//!
//! The size is checked before the frame is read: a negative size, or one above
//! `max_request_bytes`, closes the connection without allocating. A frame whose header or body
//! does not decode closes the connection too, as Kafka does; there is no way to answer a
//! request one cannot parse.
//!
//! Produce requests are pipelined: each one's writes take their places in their partitions
//! as soon as it is read, and its answer is awaited while the next requests are read and
//! submitted (at most [`PIPELINED_MAX`] waiting), so a producer with several requests in
//! flight has them all in the partition's write queue at once, where a replicated leader
//! combines them into one Raft entry. Answers are written in the order the requests came;
//! any other request first waits for the answers before it. Responses that are done together
//! share a write.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures::FutureExt;
use futures::stream::{FuturesOrdered, StreamExt};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

use crate::Context;
use crate::api::{self, Client};
use crate::observe::ConnectionEntry;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {0} bytes is too short for a request header")]
    TooShort(usize),
    #[error("unknown API key {0}")]
    UnknownApiKey(i16),
    #[error("{api:?} version {version} is not supported")]
    UnsupportedVersion { api: ApiKey, version: i16 },
    #[error("malformed {api:?} v{version} request: {reason}")]
    Malformed {
        api: ApiKey,
        version: i16,
        reason: String,
    },
}

/// A decoded frame.
#[derive(Debug)]
pub enum Decoded {
    Request {
        header: RequestHeader,
        // Boxed: a request is far larger than the other variant.
        request: Box<RequestKind>,
    },
    /// An ApiVersions request of a version newer than ours: answered in v0 with the error
    /// UNSUPPORTED_VERSION and our version list, so the client can pick one.
    ApiVersionsTooNew { correlation_id: i32 },
}

fn peek_i16(frame: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([frame[at], frame[at + 1]])
}

/// Decodes one request frame (without its size prefix). Never panics on any input.
pub fn decode_request(mut frame: Bytes) -> Result<Decoded, DecodeError> {
    if frame.len() < 8 {
        return Err(DecodeError::TooShort(frame.len()));
    }
    let raw_key = peek_i16(&frame, 0);
    let version = peek_i16(&frame, 2);
    let api = ApiKey::try_from(raw_key).map_err(|()| DecodeError::UnknownApiKey(raw_key))?;
    let Some(range) = api::supported_versions(api) else {
        return Err(DecodeError::UnknownApiKey(raw_key));
    };
    if version > range.1 && api == ApiKey::ApiVersions {
        let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
        return Ok(Decoded::ApiVersionsTooNew { correlation_id });
    }
    if version < range.0 || version > range.1 {
        return Err(DecodeError::UnsupportedVersion { api, version });
    }
    let malformed = |reason: String| DecodeError::Malformed {
        api,
        version,
        reason,
    };
    let header = RequestHeader::decode(&mut frame, api.request_header_version(version))
        .map_err(|e| malformed(format!("header: {e}")))?;
    let request =
        RequestKind::decode(api, &mut frame, version).map_err(|e| malformed(e.to_string()))?;
    Ok(Decoded::Request {
        header,
        request: Box::new(request),
    })
}

/// Encodes a response frame, size prefix included.
pub(crate) fn encode_response(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &ResponseKind,
) -> Result<BytesMut, String> {
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0);
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut buf, api.response_header_version(version))
        .map_err(|e| format!("encode {api:?} response header: {e}"))?;
    body.encode(&mut buf, version)
        .map_err(|e| format!("encode {api:?} v{version} response: {e}"))?;
    let size = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    Ok(buf)
}

fn api_versions_too_new(correlation_id: i32) -> Result<BytesMut, String> {
    let body = api::api_versions::response(
        kafka_protocol::error::ResponseError::UnsupportedVersion.code(),
    );
    encode_response(
        ApiKey::ApiVersions,
        0,
        correlation_id,
        &ResponseKind::ApiVersions(body),
    )
}

pub(crate) async fn run(stream: TcpStream, peer: SocketAddr, context: Arc<Context>) {
    let frontend = Arc::clone(&context.frontend);
    let entry = frontend
        .connections
        .open(peer, context.broker.clock().now_ms(), &context.shutdown);
    frontend.metrics.connections_open.increment();
    frontend.metrics.connections_total.increment();
    serve_connection(stream, peer, &context, &entry).await;
    frontend.metrics.connections_open.decrement();
    frontend.connections.remove(entry.id);
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    context: &Context,
    entry: &ConnectionEntry,
) {
    let metrics = &context.frontend.metrics;
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
    }
    let (read_half, write_half) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, read_half);
    let mut writer = BufWriter::with_capacity(64 * 1024, write_half);
    let mut client = Client {
        peer,
        client_id: String::new(),
    };
    let max = context.settings.max_request_bytes;
    // Produce requests whose writes have their places in their partitions and whose answers
    // are awaited while the next requests are read; written in the order the requests came.
    let mut answers: FuturesOrdered<Pin<Box<dyn Future<Output = Answer> + Send + '_>>> =
        FuturesOrdered::new();
    loop {
        // Wait for the next request, writing answers as they come meanwhile.
        let more = loop {
            // Answers already done go out at once, also while requests keep arriving: the
            // client may hold back further writes until it has them.
            let mut produced = false;
            if let Some(Some(answer)) = answers.next().now_or_never() {
                if !write_answers(&mut writer, answer, &mut answers, context, entry).await {
                    break false;
                }
                produced = true;
            }
            // What is written goes out when no request is waiting to be read (its answer may
            // share the write; also after a request that is not answered, acks=0: answers
            // before it may still be in the buffer, and the client may send nothing more
            // until it has them), and at once for produce answers.
            if !writer.buffer().is_empty()
                && (produced || reader.buffer().is_empty())
                && writer.flush().await.is_err()
            {
                break false;
            }
            if !reader.buffer().is_empty() {
                break true;
            }
            tokio::select! {
                biased;
                Some(answer) = answers.next(), if !answers.is_empty() => {
                    if !write_answers(&mut writer, answer, &mut answers, context, entry).await {
                        break false;
                    }
                }
                filled = reader.fill_buf() => {
                    // Empty: closed by the client.
                    break matches!(filled, Ok(bytes) if !bytes.is_empty());
                }
                () = entry.closed().cancelled() => break false,
            }
        };
        if !more {
            break;
        }
        let Ok(size) = reader.read_i32().await else {
            break; // closed by the client
        };
        if size < 0 || size as usize > max {
            metrics.protocol_errors.increment();
            tracing::warn!(%peer, size, max, "closing a Kafka connection: frame size out of bounds");
            break;
        }
        // Read into spare capacity: zeroing the buffer first would cost a pass over every byte.
        let mut frame = BytesMut::with_capacity(size as usize);
        let mut complete = true;
        while frame.len() < size as usize {
            let wanted = (size as usize - frame.len()) as u64;
            match (&mut reader).take(wanted).read_buf(&mut frame).await {
                Ok(0) | Err(_) => {
                    complete = false;
                    break;
                }
                Ok(_) => {}
            }
        }
        if !complete {
            break;
        }
        let received = 4 + size as u64;
        metrics.bytes_in.add(received);
        entry.bytes_in.add(received);
        entry.requests.increment();
        let (header, request) = match decode_request(frame.freeze()) {
            Ok(Decoded::Request { header, request }) => (header, request),
            Ok(Decoded::ApiVersionsTooNew { correlation_id }) => {
                if !drain_answers(&mut writer, &mut answers, context, entry).await
                    || !write_answers(
                        &mut writer,
                        Some(api_versions_too_new(correlation_id)),
                        &mut answers,
                        context,
                        entry,
                    )
                    .await
                {
                    break;
                }
                continue;
            }
            Err(error) => {
                metrics.protocol_errors.increment();
                tracing::warn!(%peer, client_id = %client.client_id, %error, "closing a Kafka connection: undecodable request");
                break;
            }
        };
        if let Some(id) = &header.client_id
            && client.client_id.as_str() != id.as_str()
        {
            client.client_id = id.to_string();
            *entry.client_id.lock() = client.client_id.clone();
        }
        let api = ApiKey::try_from(header.request_api_key).unwrap_or(ApiKey::ApiVersions);
        let version = header.request_api_version;
        let correlation_id = header.correlation_id;
        let started = std::time::Instant::now();
        match *request {
            // A produce that is answered: its writes take their places now, its answer is
            // awaited behind the ones before it while the next request is read.
            RequestKind::Produce(request) if request.acks != 0 => {
                while answers.len() >= PIPELINED_MAX {
                    let Some(answer) = answers.next().await else {
                        break;
                    };
                    if !write_answers(&mut writer, answer, &mut answers, context, entry).await
                        || writer.flush().await.is_err()
                    {
                        return finish(writer).await;
                    }
                }
                let pending = api::produce::submit(context, request, version).await;
                answers.push_back(Box::pin(async move {
                    let response = pending.await;
                    if let Some(latency) = context.frontend.metrics.request_latency(api) {
                        latency.observe(started.elapsed());
                    }
                    response.map(|body| {
                        encode_response(api, version, correlation_id, &ResponseKind::Produce(body))
                    })
                }));
            }
            // Anything else waits for the answers before it, so responses keep their order and
            // a request sees the writes the connection made before it.
            request => {
                if !drain_answers(&mut writer, &mut answers, context, entry).await {
                    break;
                }
                let response = api::handle(context, &client, header, request).await;
                if let Some(latency) = metrics.request_latency(api) {
                    latency.observe(started.elapsed());
                }
                // None: an acks=0 produce, which gets no response at all.
                let answer =
                    response.map(|body| encode_response(api, version, correlation_id, &body));
                if !write_answers(&mut writer, answer, &mut answers, context, entry).await {
                    break;
                }
            }
        }
    }
    finish(writer).await;
}

/// A response ready to be written (`None`: the request gets none), or why it could not be
/// encoded.
type Answer = Option<Result<BytesMut, String>>;

/// Produce requests one connection may have awaiting their answers; the next one waits.
const PIPELINED_MAX: usize = 16;

/// Writes `answer` and every further one already done into the write buffer (flushed when
/// the connection is about to wait). False when the connection is to close.
async fn write_answers<W: AsyncWriteExt + Unpin>(
    writer: &mut BufWriter<W>,
    answer: Answer,
    answers: &mut FuturesOrdered<Pin<Box<dyn Future<Output = Answer> + Send + '_>>>,
    context: &Context,
    entry: &ConnectionEntry,
) -> bool {
    let mut next = Some(answer);
    while let Some(answer) = next.take() {
        match answer {
            Some(Ok(bytes)) => {
                context.frontend.metrics.bytes_out.add(bytes.len() as u64);
                entry.bytes_out.add(bytes.len() as u64);
                if writer.write_all(&bytes).await.is_err() {
                    return false;
                }
            }
            Some(Err(error)) => {
                // A response we built but cannot encode is a bug; the client cannot be answered.
                tracing::error!(%error, "cannot encode a Kafka response; closing the connection");
                return false;
            }
            None => {}
        }
        if let Some(Some(done)) = answers.next().now_or_never() {
            next = Some(done);
        }
    }
    true
}

/// Waits for every pending answer and writes it, in order.
async fn drain_answers<W: AsyncWriteExt + Unpin>(
    writer: &mut BufWriter<W>,
    answers: &mut FuturesOrdered<Pin<Box<dyn Future<Output = Answer> + Send + '_>>>,
    context: &Context,
    entry: &ConnectionEntry,
) -> bool {
    while let Some(answer) = answers.next().await {
        if !write_answers(writer, answer, answers, context, entry).await {
            return false;
        }
    }
    true
}

async fn finish<W: AsyncWriteExt + Unpin>(mut writer: BufWriter<W>) {
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_unknown_and_oversized_inputs_are_errors_not_panics() {
        assert!(matches!(
            decode_request(Bytes::from_static(b"\x00\x12")),
            Err(DecodeError::TooShort(2))
        ));
        assert!(matches!(
            decode_request(Bytes::from_static(b"\x7f\x00\x00\x00\x00\x00\x00\x01")),
            Err(DecodeError::UnknownApiKey(0x7f00))
        ));
        // Metadata v0 claiming 0x033c0c00 topics in a five-byte body.
        assert!(matches!(
            decode_request(Bytes::from_static(
                b"\x00\x03\x00\x00\x00\x00\x00\x07\x00\x00\x03\x3c\x0c\x00\xb6"
            )),
            Err(DecodeError::Malformed { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn random_frames_decode_or_fail_but_never_panic(frame in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode_request(Bytes::from(frame));
        }

        /// A valid header for every served API and version, followed by random bytes.
        #[test]
        fn random_bodies_behind_valid_headers_never_panic(
            api_index in 0usize..64,
            version_pick in 0i16..32,
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            let apis: Vec<(ApiKey, i16, i16)> = api::supported_apis().collect();
            let (api, min, max) = apis[api_index % apis.len()];
            let version = min + version_pick % (max - min + 1);
            let mut frame = BytesMut::new();
            frame.put_i16(api as i16);
            frame.put_i16(version);
            frame.put_i32(7);
            frame.put_slice(&body);
            let _ = decode_request(frame.freeze());
        }
    }

    #[test]
    fn too_new_api_versions_gets_the_v0_fallback() {
        let frame = Bytes::from_static(b"\x00\x12\x00\x63\x00\x00\x00\x2a\x00\x00");
        match decode_request(frame).unwrap() {
            Decoded::ApiVersionsTooNew { correlation_id } => assert_eq!(correlation_id, 42),
            other => panic!("unexpected {other:?}"),
        }
        let body = api::api_versions::response(35);
        assert_eq!(body.error_code, 35);
        assert!(
            body.api_keys
                .iter()
                .any(|k| k.api_key == ApiKey::Produce as i16)
        );
    }
}
