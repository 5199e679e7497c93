//! AMQP 0-9-1 framing: splitting bytes into frames and writing frames, without I/O.
//!
//! A frame is `type: u8, channel: u16, size: u32, payload, 0xCE`. The 7-byte header is read
//! first and the size checked against the negotiated `frame_max` before anything is buffered
//! for the payload. Method and content-header payloads are decoded, and encoded, by the
//! `amq-protocol` crate (its field-table parser is patched to bound nesting, see
//! `vendor/README.md`); body payloads are sliced out of the read buffer without copying.
//!
//! A publisher usually sends the same `basic.publish` method (exchange, routing key, flags)
//! again and again, and often the same properties; [`Decoder`] keeps the last method and the
//! last content header decoded with their payloads, and a payload identical to one (for a
//! header: but for the body size) gives the same decoded value without decoding it again.
//!
//! Deliveries go the other way: [`DeliverEncoder`] has `amq-protocol` encode a consumer's
//! `basic.deliver` once per exchange and routing key, and each delivery copies that frame and
//! sets its delivery tag and redelivered octet in place.
//!
//! Nothing here panics on any input: every decoder returns a [`FrameError`] that names the
//! AMQP error the connection closes with.

use std::sync::Arc;

use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, BasicProperties, basic, parse_class};
use amq_protocol::types::ShortString;
use bytes::{Buf, Bytes, BytesMut};

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;
/// Header and end marker around every payload.
pub const FRAME_OVERHEAD: usize = 8;
/// The smallest `frame_max` a peer may negotiate.
pub const FRAME_MIN_SIZE: u32 = 4096;
/// The protocol header a client sends first, and the one we answer a wrong one with.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// A frame that cannot be accepted; the connection closes with `code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text}")]
pub struct FrameError {
    /// 501 FRAME_ERROR, 502 SYNTAX_ERROR, 503 COMMAND_INVALID or 505 UNEXPECTED_FRAME.
    pub code: u16,
    pub text: String,
}

impl FrameError {
    fn frame(text: String) -> Self {
        Self { code: 501, text }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Any method but `basic.publish`.
    Method(u16, Box<AMQPClass>),
    /// `basic.publish`, shared with the [`Decoder`] that may give it again.
    Publish(u16, Arc<basic::Publish>),
    /// A content header, decoded, and its payload as received.
    Header(u16, ContentHeader, Bytes),
    Body(u16, Bytes),
    Heartbeat(u16),
}

impl Frame {
    pub fn channel(&self) -> u16 {
        match self {
            Self::Method(channel, _)
            | Self::Publish(channel, _)
            | Self::Header(channel, ..)
            | Self::Body(channel, _)
            | Self::Heartbeat(channel) => *channel,
        }
    }
}

fn snippet(payload: &[u8]) -> String {
    let shown = &payload[..payload.len().min(16)];
    let which = if payload.len() <= 16 {
        "all"
    } else {
        "first 16"
    };
    format!("{which} octets = {shown:?}")
}

/// A decoded content header: class, body size and the properties, which the [`Decoder`]
/// shares between headers that carry the same ones.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentHeader {
    pub class_id: u16,
    pub body_size: u64,
    pub properties: Arc<BasicProperties>,
}

/// A content header's payload: class (2 octets), weight (2), body size (8), then the
/// property flags and the properties.
const BODY_SIZE_AT: std::ops::Range<usize> = 4..12;

/// Decodes frame payloads, remembering the last `basic.publish` and the last content header.
#[derive(Debug, Default)]
pub struct Decoder {
    last_publish: Option<(Vec<u8>, Arc<basic::Publish>)>,
    last_header: Option<(Vec<u8>, ContentHeader)>,
}

impl Decoder {
    /// Decodes one frame's payload, as [`decode_payload`] does.
    pub fn decode(&mut self, kind: u8, channel: u16, payload: Bytes) -> Result<Frame, FrameError> {
        match kind {
            FRAME_METHOD => {
                if let Some((last, publish)) = &self.last_publish
                    && last[..] == payload[..]
                {
                    return Ok(Frame::Publish(channel, Arc::clone(publish)));
                }
                let frame = decode_payload(kind, channel, payload.clone())?;
                if let Frame::Publish(_, publish) = &frame {
                    let last = remember(self.last_publish.take().map(|(bytes, _)| bytes), &payload);
                    self.last_publish = Some((last, Arc::clone(publish)));
                }
                Ok(frame)
            }
            FRAME_HEADER => {
                if let Some((last, header)) = &self.last_header
                    && last.len() == payload.len()
                    && last[..BODY_SIZE_AT.start] == payload[..BODY_SIZE_AT.start]
                    && last[BODY_SIZE_AT.end..] == payload[BODY_SIZE_AT.end..]
                    && let Some(body_size) = announced_body_size(&payload)
                {
                    let header = ContentHeader {
                        body_size,
                        ..header.clone()
                    };
                    return Ok(Frame::Header(channel, header, payload));
                }
                let frame = decode_payload(kind, channel, payload)?;
                if let Frame::Header(_, header, payload) = &frame {
                    let last = remember(self.last_header.take().map(|(bytes, _)| bytes), payload);
                    self.last_header = Some((last, header.clone()));
                }
                Ok(frame)
            }
            _ => decode_payload(kind, channel, payload),
        }
    }
}

/// The body size a content header's payload announces, if it is long enough to hold one.
fn announced_body_size(payload: &[u8]) -> Option<u64> {
    let size = payload.get(BODY_SIZE_AT)?;
    Some(u64::from_be_bytes(<[u8; 8]>::try_from(size).ok()?))
}

/// `payload` copied into the buffer of the payload remembered before, if any.
fn remember(buffer: Option<Vec<u8>>, payload: &[u8]) -> Vec<u8> {
    let mut last = buffer.unwrap_or_default();
    last.clear();
    last.extend_from_slice(payload);
    last
}

/// Takes the next whole frame from `buffer`, if one is there. A frame whose payload exceeds
/// `frame_max` is refused as soon as its header is seen.
pub fn next_frame(
    buffer: &mut BytesMut,
    frame_max: u32,
    decoder: &mut Decoder,
) -> Result<Option<Frame>, FrameError> {
    if buffer.len() < 7 {
        return Ok(None);
    }
    let kind = buffer[0];
    let channel = u16::from_be_bytes([buffer[1], buffer[2]]);
    let size = u32::from_be_bytes([buffer[3], buffer[4], buffer[5], buffer[6]]);
    // RabbitMQ tolerates payloads up to frame_max; many clients count the overhead wrongly.
    let limit = frame_max.max(FRAME_MIN_SIZE);
    if size > limit {
        return Err(FrameError::frame(format!(
            "type {kind}, all octets = <<>>: {{frame_too_large,{size},{}}}",
            limit as usize - FRAME_OVERHEAD
        )));
    }
    let total = size as usize + FRAME_OVERHEAD;
    if buffer.len() < total {
        buffer.reserve(total - buffer.len());
        return Ok(None);
    }
    if buffer[total - 1] != FRAME_END {
        return Err(FrameError::frame(format!(
            "type {kind}, {}: {{invalid_frame_end_marker,{}}}",
            snippet(&buffer[7..total - 1]),
            buffer[total - 1]
        )));
    }
    let mut frame = buffer.split_to(total);
    frame.advance(7);
    frame.truncate(size as usize);
    let payload = frame.freeze();
    decoder.decode(kind, channel, payload).map(Some)
}

/// Decodes one frame's payload.
pub fn decode_payload(kind: u8, channel: u16, payload: Bytes) -> Result<Frame, FrameError> {
    match kind {
        FRAME_METHOD => match parse_class(&payload[..]) {
            Ok((&[], AMQPClass::Basic(basic::AMQPMethod::Publish(publish)))) => {
                Ok(Frame::Publish(channel, Arc::new(publish)))
            }
            Ok((&[], method)) => Ok(Frame::Method(channel, Box::new(method))),
            Ok(_) => Err(FrameError {
                code: 501,
                text: format!(
                    "type {kind}, {}: trailing bytes after method",
                    snippet(&payload)
                ),
            }),
            Err(_) => {
                let known = payload.len() >= 4;
                Err(FrameError {
                    code: if known { 501 } else { 502 },
                    text: format!(
                        "type {kind}, {}: cannot decode method{}",
                        snippet(&payload),
                        if known {
                            format!(
                                " {}.{}",
                                u16::from_be_bytes([payload[0], payload[1]]),
                                u16::from_be_bytes([payload[2], payload[3]])
                            )
                        } else {
                            String::new()
                        }
                    ),
                })
            }
        },
        FRAME_HEADER => match parse_content_header(&payload[..]) {
            Ok((&[], header)) => Ok(Frame::Header(
                channel,
                ContentHeader {
                    class_id: header.class_id,
                    body_size: header.body_size,
                    properties: Arc::new(header.properties),
                },
                payload,
            )),
            _ => Err(FrameError::frame(format!(
                "type {kind}, {}: cannot decode content header",
                snippet(&payload)
            ))),
        },
        FRAME_BODY => Ok(Frame::Body(channel, payload)),
        FRAME_HEARTBEAT => Ok(Frame::Heartbeat(channel)),
        other => Err(FrameError::frame(format!(
            "type {other}, {}: unknown_frame",
            snippet(&payload)
        ))),
    }
}

/// Decodes every frame in `data` (the fuzz target's entry point). Never panics.
pub fn decode_all(data: &[u8], frame_max: u32) -> Vec<Result<Frame, FrameError>> {
    let mut buffer = BytesMut::from(data);
    let mut decoder = Decoder::default();
    let mut out = Vec::new();
    loop {
        match next_frame(&mut buffer, frame_max, &mut decoder) {
            Ok(Some(frame)) => out.push(Ok(frame)),
            Ok(None) => break,
            Err(error) => {
                out.push(Err(error));
                break;
            }
        }
    }
    out
}

/// A bug while encoding our own frame: it can only come from a value we built.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode a frame: {0}")]
pub struct EncodeError(String);

fn generate(out: &mut Vec<u8>, frame: &AMQPFrame) -> Result<(), EncodeError> {
    // The generator takes the buffer by value; on failure it is lost with the connection.
    let buffer = std::mem::take(out);
    let context = gen_frame(frame)(WriteContext::from(buffer))
        .map_err(|error| EncodeError(error.to_string()))?;
    *out = context.write;
    Ok(())
}

/// The `basic.deliver` frames of one consumer.
///
/// The method is `class, method, consumer-tag (short string), delivery-tag (u64), redelivered
/// (one octet of bits), exchange, routing-key`. The frame `amq-protocol` encodes with delivery
/// tag 0 is kept while exchange and routing key stay the same; a delivery copies it and writes
/// its tag and flag where they sit, after the 7-byte frame header, the 4 octets of class and
/// method and the consumer tag.
#[derive(Debug)]
pub struct DeliverEncoder {
    channel: u16,
    consumer_tag: ShortString,
    exchange: ShortString,
    routing_key: ShortString,
    /// The frame with delivery tag 0 and redelivered unset; empty until the first delivery.
    frame: Vec<u8>,
}

impl DeliverEncoder {
    pub fn new(channel: u16, consumer_tag: &str) -> Self {
        Self {
            channel,
            consumer_tag: crate::convert::short(consumer_tag),
            exchange: ShortString::from(""),
            routing_key: ShortString::from(""),
            frame: Vec::new(),
        }
    }

    /// Appends the `basic.deliver` of one delivery.
    pub fn write(
        &mut self,
        out: &mut Vec<u8>,
        delivery_tag: u64,
        redelivered: bool,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), EncodeError> {
        if self.frame.is_empty()
            || self.exchange.as_str() != exchange
            || self.routing_key.as_str() != routing_key
        {
            self.exchange = crate::convert::short(exchange);
            self.routing_key = crate::convert::short(routing_key);
            let method = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: self.consumer_tag.clone(),
                delivery_tag: 0,
                redelivered: false,
                exchange: self.exchange.clone(),
                routing_key: self.routing_key.clone(),
            }));
            self.frame.clear();
            generate(&mut self.frame, &AMQPFrame::Method(self.channel, method))?;
        }
        let tag_at = 7 + 4 + 1 + self.consumer_tag.as_str().len();
        let start = out.len();
        out.extend_from_slice(&self.frame);
        let Some(fields) = out.get_mut(start + tag_at..start + tag_at + 9) else {
            out.truncate(start);
            return Err(EncodeError("basic.deliver shorter than its fields".into()));
        };
        fields[..8].copy_from_slice(&delivery_tag.to_be_bytes());
        fields[8] = u8::from(redelivered);
        Ok(())
    }
}

/// Appends a method frame.
pub fn write_method(out: &mut Vec<u8>, channel: u16, method: AMQPClass) -> Result<(), EncodeError> {
    generate(out, &AMQPFrame::Method(channel, method))
}

/// Appends a heartbeat frame.
pub fn write_heartbeat(out: &mut Vec<u8>) {
    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// Appends a content header whose payload was received from a publisher and is sent back
/// unchanged (class id, weight, body size, property flags and list), and the body. The payload
/// must announce `body.len()` bytes; if it does not, the properties are encoded again instead.
pub fn write_received_content(
    out: &mut Vec<u8>,
    channel: u16,
    header: &[u8],
    properties: impl FnOnce() -> BasicProperties,
    body: &[u8],
    frame_max: u32,
) -> Result<(), EncodeError> {
    if announced_body_size(header) != Some(body.len() as u64) {
        return write_content(out, channel, properties(), body, frame_max);
    }
    write_raw_frame(out, FRAME_HEADER, channel, header);
    write_body(out, channel, body, frame_max);
    Ok(())
}

/// Appends a content header and the body split into frames of at most `frame_max` bytes.
pub fn write_content(
    out: &mut Vec<u8>,
    channel: u16,
    properties: BasicProperties,
    body: &[u8],
    frame_max: u32,
) -> Result<(), EncodeError> {
    let header = AMQPContentHeader {
        class_id: 60,
        body_size: body.len() as u64,
        properties,
    };
    generate(out, &AMQPFrame::Header(channel, header))?;
    write_body(out, channel, body, frame_max);
    Ok(())
}

/// Appends `body` in body frames of at most `frame_max` bytes.
fn write_body(out: &mut Vec<u8>, channel: u16, body: &[u8], frame_max: u32) {
    let chunk = (frame_max.max(FRAME_MIN_SIZE) as usize) - FRAME_OVERHEAD;
    for part in body.chunks(chunk) {
        write_raw_frame(out, FRAME_BODY, channel, part);
    }
}

/// Appends a frame around a payload that needs no encoding.
fn write_raw_frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
    out.reserve(payload.len() + FRAME_OVERHEAD);
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::{basic, queue};
    use proptest::prelude::*;

    fn encoded(frame: AMQPFrame) -> Vec<u8> {
        let mut out = Vec::new();
        generate(&mut out, &frame).unwrap();
        out
    }

    #[test]
    fn frames_split_on_boundaries_and_bodies_are_sliced() {
        let declare = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "q".into(),
            durable: true,
            ..Default::default()
        }));
        let mut bytes = encoded(AMQPFrame::Method(1, declare.clone()));
        let mut content = Vec::new();
        write_content(&mut content, 1, BasicProperties::default(), b"hello", 4096).unwrap();
        bytes.extend_from_slice(&content);
        // Feed a byte at a time: frames appear only once whole.
        let mut buffer = BytesMut::new();
        let mut frames = Vec::new();
        for byte in bytes {
            buffer.extend_from_slice(&[byte]);
            while let Some(frame) = next_frame(&mut buffer, 4096, &mut Decoder::default()).unwrap()
            {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0], Frame::Method(1, Box::new(declare)));
        assert!(matches!(&frames[1], Frame::Header(1, h, _) if h.body_size == 5));
        assert_eq!(frames[2], Frame::Body(1, Bytes::from_static(b"hello")));
    }

    #[test]
    fn a_repeated_publish_is_decoded_once_and_any_difference_is_seen() {
        let publish = |key: &str, mandatory: bool| {
            encoded(AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                    exchange: "x".into(),
                    routing_key: key.into(),
                    mandatory,
                    immediate: false,
                })),
            ))
        };
        let ack = encoded(AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 1,
                multiple: false,
            })),
        ));
        let mut bytes = publish("k", false);
        bytes.extend(publish("k", false));
        bytes.extend(ack);
        bytes.extend(publish("k", false));
        bytes.extend(publish("k", true));
        bytes.extend(publish("j", true));
        let mut buffer = BytesMut::from(&bytes[..]);
        let mut decoder = Decoder::default();
        let mut publishes = Vec::new();
        while let Some(frame) = next_frame(&mut buffer, 4096, &mut decoder).unwrap() {
            if let Frame::Publish(1, publish) = frame {
                publishes.push(publish);
            }
        }
        let seen: Vec<(&str, bool)> = publishes
            .iter()
            .map(|p| (p.routing_key.as_str(), p.mandatory))
            .collect();
        assert_eq!(
            seen,
            [
                ("k", false),
                ("k", false),
                ("k", false),
                ("k", true),
                ("j", true)
            ]
        );
        assert!(Arc::ptr_eq(&publishes[0], &publishes[1]));
        assert!(
            Arc::ptr_eq(&publishes[0], &publishes[2]),
            "other methods leave it"
        );
        assert!(!Arc::ptr_eq(&publishes[2], &publishes[3]));
    }

    #[test]
    fn a_repeated_content_header_is_decoded_once_but_for_its_body_size() {
        let header = |body_size: u64, properties: BasicProperties| {
            encoded(AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: 60,
                    body_size,
                    properties,
                },
            ))
        };
        let persistent = BasicProperties::default().with_delivery_mode(2);
        let with_id = |id: &str| persistent.clone().with_message_id(id.into());
        let sent = [
            (5, persistent.clone()),
            (1 << 40, persistent.clone()),
            (5, with_id("a")),
            (5, with_id("b")),
            (5, with_id("b")),
            (0, BasicProperties::default()),
        ];
        let mut bytes = Vec::new();
        for (size, properties) in &sent {
            bytes.extend(header(*size, properties.clone()));
        }
        let mut buffer = BytesMut::from(&bytes[..]);
        let mut decoder = Decoder::default();
        let mut headers = Vec::new();
        while let Some(frame) = next_frame(&mut buffer, 4096, &mut decoder).unwrap() {
            let Frame::Header(1, header, payload) = frame else {
                panic!("not a header: {frame:?}");
            };
            headers.push((header, payload));
        }
        assert_eq!(headers.len(), sent.len());
        for ((header, payload), (size, properties)) in headers.iter().zip(&sent) {
            assert_eq!(header.class_id, 60);
            assert_eq!(header.body_size, *size);
            assert_eq!(*header.properties, *properties);
            let (_, fresh) = parse_content_header(&payload[..]).unwrap();
            assert_eq!(*header.properties, fresh.properties);
        }
        assert!(Arc::ptr_eq(
            &headers[0].0.properties,
            &headers[1].0.properties
        ));
        assert!(!Arc::ptr_eq(
            &headers[2].0.properties,
            &headers[3].0.properties
        ));
        assert!(Arc::ptr_eq(
            &headers[3].0.properties,
            &headers[4].0.properties
        ));
    }

    #[test]
    fn deliveries_are_the_frames_amq_protocol_encodes() {
        let mut encoder = DeliverEncoder::new(3, "amq.ctag-1");
        let mut empty_tag = DeliverEncoder::new(1, "");
        for (tag, redelivered, exchange, key) in [
            (1, false, "", "q"),
            (2, true, "", "q"),
            (u64::MAX, false, "amq.topic", "a.b"),
            (1 << 33, true, "amq.topic", "a.b"),
            (7, false, "x", &"k".repeat(255)[..]),
        ] {
            for (encoder, channel, consumer_tag) in
                [(&mut encoder, 3, "amq.ctag-1"), (&mut empty_tag, 1, "")]
            {
                let mut out = vec![0xAA];
                encoder
                    .write(&mut out, tag, redelivered, exchange, key)
                    .unwrap();
                let mut expected = vec![0xAA];
                expected.extend(encoded(AMQPFrame::Method(
                    channel,
                    AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                        consumer_tag: consumer_tag.into(),
                        delivery_tag: tag,
                        redelivered,
                        exchange: exchange.into(),
                        routing_key: key.into(),
                    })),
                )));
                assert_eq!(out, expected);
            }
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_their_header() {
        let mut buffer = BytesMut::from(&[1u8, 0, 1, 0x7f, 0xff, 0xff, 0xff][..]);
        let error = next_frame(&mut buffer, 131_072, &mut Decoder::default()).unwrap_err();
        assert_eq!(error.code, 501);
        assert!(
            buffer.capacity() < 1 << 20,
            "nothing was allocated for the payload"
        );
    }

    #[test]
    fn bad_end_markers_and_unknown_types_are_frame_errors() {
        let mut buffer = BytesMut::from(&[8u8, 0, 0, 0, 0, 0, 0, 0xCD][..]);
        assert_eq!(
            next_frame(&mut buffer, 4096, &mut Decoder::default())
                .unwrap_err()
                .code,
            501
        );
        let mut buffer = BytesMut::from(&[9u8, 0, 0, 0, 0, 0, 0, 0xCE][..]);
        assert_eq!(
            next_frame(&mut buffer, 4096, &mut Decoder::default())
                .unwrap_err()
                .code,
            501
        );
    }

    #[test]
    fn deeply_nested_tables_are_a_decode_error_not_a_crash() {
        // basic.consume whose arguments nest 20,000 tables deep (about 120 KiB).
        let mut table: Vec<u8> = 0u32.to_be_bytes().to_vec();
        for _ in 0..20_000 {
            let mut entry = vec![1u8, b'a', b'F'];
            entry.extend_from_slice(&table);
            table = (entry.len() as u32).to_be_bytes().to_vec();
            table.extend_from_slice(&entry);
        }
        let mut payload = vec![0, 60, 0, 20, 0, 0, 1, b'q', 0, 0];
        payload.extend_from_slice(&table);
        let mut frame = vec![FRAME_METHOD, 0, 1];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.push(FRAME_END);
        // Parse on a thread with a small stack, as a runtime worker would.
        let result = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || decode_all(&frame, 1 << 20))
            .unwrap()
            .join()
            .unwrap();
        assert!(matches!(result.as_slice(), [Err(_)]));
        // A legitimate consume still decodes.
        let consume = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "q".into(),
            ..Default::default()
        }));
        let bytes = encoded(AMQPFrame::Method(1, consume));
        assert!(matches!(
            decode_all(&bytes, 4096).as_slice(),
            [Ok(Frame::Method(1, _))]
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_all(&data, 4096);
        }

        #[test]
        fn random_payloads_never_panic(kind in 1u8..4, payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_payload(kind, 1, Bytes::from(payload));
        }

        #[test]
        fn random_methods_after_a_valid_class_id_never_panic(class in prop::sample::select(vec![10u16, 20, 40, 50, 60, 85, 90]), method in 0u16..130, rest in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut payload = class.to_be_bytes().to_vec();
            payload.extend_from_slice(&method.to_be_bytes());
            payload.extend_from_slice(&rest);
            let _ = decode_payload(FRAME_METHOD, 1, Bytes::from(payload));
        }
    }
}
