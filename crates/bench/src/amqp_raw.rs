//! A lean AMQP 0-9-1 client for the hot loops of the AMQP benchmark (`--client raw`).
//!
//! lapin, the default client, spends more CPU per message than the brokers it measures on a
//! small machine: a 16 B transient run on two CPUs gives it most of both. This client writes
//! and reads frames itself on one task per connection, batching many publishes or acks into
//! one socket write. Frames are encoded by the `amq-protocol` crate (the one lapin is built on),
//! the hot ones once: a publish's method and content-header frames are the same for every
//! message of a run ([`PublishTemplate`]), and an ack differs from the last only in its
//! delivery tag. The frames a run receives by the hundred thousand (basic.deliver, basic.ack
//! and basic.nack confirms, content headers) are read by hand for the few fields the benchmark
//! needs; everything else is parsed by `amq-protocol`. It does only what the benchmark needs: PLAIN login, one channel, publish with or
//! without confirms, consume with a prefetch and auto-ack or one ack per delivery. Queues and
//! exchanges are still declared and deleted through lapin; any method it does not expect ends
//! the run with an error naming it.

use std::str::FromStr;
use std::time::Duration;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, BasicProperties, basic, channel, confirm, connection};
use amq_protocol::types::{FieldTable, LongString, ShortString};
use amq_protocol::uri::AMQPUri;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::BenchError;

const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
const FRAME_OVERHEAD: usize = 8;
/// The frame size this client asks for (the broker may offer less).
const FRAME_MAX: u32 = 131_072;
/// The one channel each connection uses.
pub const CHANNEL: u16 = 1;
/// Bytes of frames gathered before they are written.
pub const WRITE_BATCH_BYTES: usize = 32 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One frame from the broker.
#[derive(Debug, PartialEq)]
pub enum Frame {
    Method(AMQPClass),
    /// A basic.deliver, by its delivery tag.
    Deliver(u64),
    /// A publisher confirm: basic.ack (`ack`) or basic.nack.
    Confirm {
        ack: bool,
        delivery_tag: u64,
        multiple: bool,
    },
    /// A content header, by its body size.
    Header(u64),
    Body(Bytes),
    Heartbeat,
}

/// The method and content-header frames of a publish to one exchange and routing key with
/// fixed properties and body size, encoded once.
#[derive(Debug, Clone)]
pub struct PublishTemplate {
    frames: Vec<u8>,
    body_size: usize,
}

impl PublishTemplate {
    pub fn new(
        exchange: &ShortString,
        routing_key: &ShortString,
        properties: &BasicProperties,
        body_size: usize,
    ) -> Result<Self, BenchError> {
        let mut frames = Vec::new();
        let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: exchange.clone(),
            routing_key: routing_key.clone(),
            mandatory: false,
            immediate: false,
        }));
        encode(&mut frames, &AMQPFrame::Method(CHANNEL, publish))?;
        let header = AMQPContentHeader {
            class_id: 60,
            body_size: body_size as u64,
            properties: properties.clone(),
        };
        encode(&mut frames, &AMQPFrame::Header(CHANNEL, header))?;
        Ok(Self { frames, body_size })
    }
}

/// A basic.ack frame on [`CHANNEL`]: class and method, delivery tag, the `multiple` bit.
fn ack_frame(delivery_tag: u64, multiple: bool) -> [u8; 21] {
    let mut frame = [
        FRAME_METHOD,
        0,
        1,
        0,
        0,
        0,
        13,
        0,
        60,
        0,
        80,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        FRAME_END,
    ];
    frame[11..19].copy_from_slice(&delivery_tag.to_be_bytes());
    frame[19] = u8::from(multiple);
    frame
}

fn encode(out: &mut Vec<u8>, frame: &AMQPFrame) -> Result<(), BenchError> {
    let buffer = std::mem::take(out);
    let context = gen_frame(frame)(WriteContext::from(buffer))
        .map_err(|error| protocol_error(format!("encoding a frame: {error}")))?;
    *out = context.write;
    Ok(())
}

/// Reads the fields the benchmark needs from the methods it receives most: basic.deliver
/// (60.60), basic.ack (60.80) and basic.nack (60.120). None for any other method, and for
/// one of these that is malformed, which `amq-protocol` then parses and reports.
fn hot_method(payload: &[u8]) -> Option<Frame> {
    let (head, rest) = payload.split_first_chunk::<4>()?;
    match *head {
        [0, 60, 0, 60] => {
            // consumer-tag shortstr, delivery-tag u64, redelivered bit, exchange shortstr,
            // routing-key shortstr.
            let (&tag_len, rest) = rest.split_first()?;
            let rest = rest.get(tag_len as usize..)?;
            let (tag, rest) = rest.split_first_chunk::<8>()?;
            let (_redelivered, rest) = rest.split_first()?;
            let (&exchange_len, rest) = rest.split_first()?;
            let rest = rest.get(exchange_len as usize..)?;
            let (&key_len, rest) = rest.split_first()?;
            (rest.len() == key_len as usize).then(|| Frame::Deliver(u64::from_be_bytes(*tag)))
        }
        [0, 60, 0, 80] | [0, 60, 0, 120] => {
            let (tag, [flags]) = rest.split_first_chunk::<8>()? else {
                return None;
            };
            Some(Frame::Confirm {
                ack: head[3] == 80,
                delivery_tag: u64::from_be_bytes(*tag),
                multiple: flags & 1 != 0,
            })
        }
        _ => None,
    }
}

/// Takes the next whole frame from `input`, if one is there.
fn next_frame(input: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, BenchError> {
    if input.len() < 7 {
        return Ok(None);
    }
    let kind = input[0];
    let size = u32::from_be_bytes([input[3], input[4], input[5], input[6]]) as usize;
    if size > frame_max as usize {
        return Err(protocol_error(format!(
            "a frame of {size} bytes, above frame_max {frame_max}"
        )));
    }
    let total = size + FRAME_OVERHEAD;
    if input.len() < total {
        return Ok(None);
    }
    if input[total - 1] != FRAME_END {
        return Err(protocol_error("a frame without its end marker"));
    }
    let mut frame = input.split_to(total);
    frame.advance(7);
    frame.truncate(size);
    let payload = frame.freeze();
    let frame = match kind {
        FRAME_METHOD => match hot_method(&payload) {
            Some(frame) => frame,
            None => match amq_protocol::protocol::parse_class(&payload[..]) {
                Ok((_, method)) => Frame::Method(method),
                Err(error) => return Err(protocol_error(format!("a bad method frame: {error}"))),
            },
        },
        // class-id 60, weight, body size; the properties after them are not looked at.
        FRAME_HEADER => match payload.get(..12) {
            Some([0, 60, _, _, size @ ..]) if payload.len() >= 14 => {
                Frame::Header(u64::from_be_bytes(size.try_into().unwrap_or_default()))
            }
            _ => return Err(protocol_error("a bad content header")),
        },
        FRAME_BODY => Frame::Body(payload),
        FRAME_HEARTBEAT => Frame::Heartbeat,
        other => return Err(protocol_error(format!("a frame of unknown type {other}"))),
    };
    Ok(Some(frame))
}

/// A connection with one open channel.
#[derive(Debug)]
pub struct RawConnection {
    stream: TcpStream,
    input: BytesMut,
    /// Frames not written yet.
    pub out: Vec<u8>,
    frame_max: u32,
}

fn protocol_error(what: impl std::fmt::Display) -> BenchError {
    BenchError::Invalid(format!("AMQP (raw client): {what}"))
}

fn io_error(what: &str, error: std::io::Error) -> BenchError {
    BenchError::Invalid(format!("AMQP (raw client): {what}: {error}"))
}

impl RawConnection {
    /// Connects, logs in with PLAIN, opens the URI's virtual host and channel 1.
    pub async fn open(uri: &str) -> Result<Self, BenchError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::handshake(uri))
            .await
            .map_err(|_| protocol_error("the broker did not finish the handshake in 10 s"))?
    }

    async fn handshake(uri: &str) -> Result<Self, BenchError> {
        let parsed = AMQPUri::from_str(uri).map_err(protocol_error)?;
        let authority = &parsed.authority;
        let stream = TcpStream::connect((authority.host.as_str(), authority.port))
            .await
            .map_err(|error| io_error("connecting", error))?;
        stream
            .set_nodelay(true)
            .map_err(|error| io_error("setting TCP_NODELAY", error))?;
        let mut conn = Self {
            stream,
            input: BytesMut::with_capacity(256 * 1024),
            out: Vec::with_capacity(WRITE_BATCH_BYTES * 2),
            frame_max: FRAME_MAX,
        };
        conn.out.extend_from_slice(PROTOCOL_HEADER);
        conn.flush().await?;
        match conn.next_method().await? {
            AMQPClass::Connection(connection::AMQPMethod::Start(_)) => {}
            other => return Err(unexpected("connection.start", &other)),
        }
        let user = &authority.userinfo;
        let response = format!("\0{}\0{}", user.username, user.password);
        conn.method(AMQPClass::Connection(connection::AMQPMethod::StartOk(
            connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: ShortString::from("PLAIN"),
                response: LongString::from(response.into_bytes()),
                locale: ShortString::from("en_US"),
            },
        )))?;
        conn.flush().await?;
        let tune = match conn.next_method().await? {
            AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) => tune,
            other => return Err(unexpected("connection.tune", &other)),
        };
        if tune.frame_max != 0 {
            conn.frame_max = conn.frame_max.min(tune.frame_max);
        }
        conn.method(AMQPClass::Connection(connection::AMQPMethod::TuneOk(
            connection::TuneOk {
                channel_max: 1,
                frame_max: conn.frame_max,
                heartbeat: 0,
            },
        )))?;
        conn.method(AMQPClass::Connection(connection::AMQPMethod::Open(
            connection::Open {
                virtual_host: ShortString::from(parsed.vhost.clone()),
            },
        )))?;
        conn.flush().await?;
        match conn.next_method().await? {
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) => {}
            other => return Err(unexpected("connection.open-ok", &other)),
        }
        conn.method(AMQPClass::Channel(channel::AMQPMethod::Open(
            channel::Open {},
        )))?;
        conn.flush().await?;
        match conn.next_method().await? {
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)) => {}
            other => return Err(unexpected("channel.open-ok", &other)),
        }
        Ok(conn)
    }

    /// Puts the channel in confirm mode.
    pub async fn confirm_select(&mut self) -> Result<(), BenchError> {
        self.method(AMQPClass::Confirm(confirm::AMQPMethod::Select(
            confirm::Select { nowait: false },
        )))?;
        self.flush().await?;
        match self.next_method().await? {
            AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)) => Ok(()),
            other => Err(unexpected("confirm.select-ok", &other)),
        }
    }

    /// Sets the prefetch and starts consuming `queue`.
    pub async fn consume(
        &mut self,
        queue: &str,
        tag: &str,
        prefetch: u16,
        no_ack: bool,
    ) -> Result<(), BenchError> {
        self.method(AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: prefetch,
            global: false,
        })))?;
        self.method(AMQPClass::Basic(basic::AMQPMethod::Consume(
            basic::Consume {
                queue: ShortString::from(queue),
                consumer_tag: ShortString::from(tag),
                no_local: false,
                no_ack,
                exclusive: false,
                nowait: false,
                arguments: FieldTable::default(),
            },
        )))?;
        self.flush().await?;
        match self.next_method().await? {
            AMQPClass::Basic(basic::AMQPMethod::QosOk(_)) => {}
            other => return Err(unexpected("basic.qos-ok", &other)),
        }
        match self.next_method().await? {
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)) => Ok(()),
            other => Err(unexpected("basic.consume-ok", &other)),
        }
    }

    /// Appends a method frame on the channel (connection methods go on channel 0).
    pub fn method(&mut self, method: AMQPClass) -> Result<(), BenchError> {
        let channel = match method {
            AMQPClass::Connection(_) => 0,
            _ => CHANNEL,
        };
        self.generate(&AMQPFrame::Method(channel, method))
    }

    /// Appends a basic.publish: the template's frames, then `body` split into body frames.
    pub fn publish(&mut self, template: &PublishTemplate, body: &[u8]) -> Result<(), BenchError> {
        if body.len() != template.body_size {
            return Err(protocol_error(format!(
                "a body of {} bytes for a publish template of {}",
                body.len(),
                template.body_size
            )));
        }
        self.out.extend_from_slice(&template.frames);
        let chunk = self.frame_max as usize - FRAME_OVERHEAD;
        for part in body.chunks(chunk) {
            self.out.push(FRAME_BODY);
            self.out.extend_from_slice(&CHANNEL.to_be_bytes());
            self.out
                .extend_from_slice(&(part.len() as u32).to_be_bytes());
            self.out.extend_from_slice(part);
            self.out.push(FRAME_END);
        }
        Ok(())
    }

    /// Appends a basic.ack.
    pub fn ack(&mut self, delivery_tag: u64, multiple: bool) {
        self.out
            .extend_from_slice(&ack_frame(delivery_tag, multiple));
    }

    fn generate(&mut self, frame: &AMQPFrame) -> Result<(), BenchError> {
        encode(&mut self.out, frame)
    }

    /// Writes every appended frame.
    pub async fn flush(&mut self) -> Result<(), BenchError> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.stream
            .write_all(&self.out)
            .await
            .map_err(|error| io_error("writing", error))?;
        self.out.clear();
        Ok(())
    }

    /// The next frame already read, if a whole one is buffered.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, BenchError> {
        next_frame(&mut self.input, self.frame_max)
    }

    /// Reads more bytes from the socket. False when the broker closed it.
    pub async fn fill(&mut self) -> Result<bool, BenchError> {
        if self.input.capacity() - self.input.len() < 16 * 1024 {
            self.input.reserve(128 * 1024);
        }
        let read = self
            .stream
            .read_buf(&mut self.input)
            .await
            .map_err(|error| io_error("reading", error))?;
        Ok(read > 0)
    }

    /// Reads more bytes, waiting at most `wait` (`Duration::ZERO`: only what the socket holds
    /// now); reading nothing is not an error, the broker closing the connection is.
    pub async fn fill_within(&mut self, wait: Duration) -> Result<(), BenchError> {
        let read = if wait.is_zero() {
            if self.input.capacity() - self.input.len() < 16 * 1024 {
                self.input.reserve(128 * 1024);
            }
            match self.stream.try_read_buf(&mut self.input) {
                Ok(read) => Ok(read > 0),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(true),
                Err(error) => Err(io_error("reading", error)),
            }
        } else {
            // Reading is cancel-safe: a read cut short by the timeout took nothing.
            tokio::time::timeout(wait, self.fill())
                .await
                .unwrap_or(Ok(true))
        };
        if read? {
            Ok(())
        } else {
            Err(protocol_error("the broker closed the connection"))
        }
    }

    /// The next frame, reading as needed.
    pub async fn next_frame(&mut self) -> Result<Frame, BenchError> {
        loop {
            if let Some(frame) = self.buffered_frame()? {
                return Ok(frame);
            }
            if !self.fill().await? {
                return Err(protocol_error("the broker closed the connection"));
            }
        }
    }

    /// The next method frame; heartbeats are skipped, a connection or channel close is an
    /// error with the broker's reason.
    pub async fn next_method(&mut self) -> Result<AMQPClass, BenchError> {
        loop {
            match self.next_frame().await? {
                Frame::Method(method) => return closed_by_broker(method),
                Frame::Heartbeat => {}
                other => return Err(protocol_error(format!("expected a method, got {other:?}"))),
            }
        }
    }

    /// Closes the connection politely, waiting a little for the broker's close-ok.
    pub async fn close(mut self) {
        let closing = AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: ShortString::from("done"),
            class_id: 0,
            method_id: 0,
        }));
        if self.method(closing).is_err() || self.flush().await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match self.next_frame().await {
                    Ok(Frame::Method(AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                        _,
                    ))))
                    | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// Turns a broker's connection.close or channel.close into an error with its reason.
pub fn closed_by_broker(method: AMQPClass) -> Result<AMQPClass, BenchError> {
    match method {
        AMQPClass::Connection(connection::AMQPMethod::Close(close)) => {
            Err(protocol_error(format!(
                "the broker closed the connection: {} {}",
                close.reply_code, close.reply_text
            )))
        }
        AMQPClass::Channel(channel::AMQPMethod::Close(close)) => Err(protocol_error(format!(
            "the broker closed the channel: {} {}",
            close.reply_code, close.reply_text
        ))),
        other => Ok(other),
    }
}

fn unexpected(wanted: &str, got: &AMQPClass) -> BenchError {
    protocol_error(format!(
        "expected {wanted}, got {}.{}",
        got.get_amqp_class_id(),
        got.get_amqp_method_id()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(frame: AMQPFrame) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, &frame).unwrap();
        out
    }

    fn read_all(bytes: &[u8]) -> Vec<Frame> {
        let mut input = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = next_frame(&mut input, FRAME_MAX).unwrap() {
            frames.push(frame);
        }
        assert!(input.is_empty(), "every byte was read");
        frames
    }

    #[test]
    fn hot_frames_read_by_hand_agree_with_amq_protocol() {
        for (tag, consumer, exchange, key) in [
            (1, "c", "", "q"),
            (u64::MAX, "amq.ctag-x", "amq.topic", "a.b.c"),
            (300, "", "x", ""),
        ] {
            let deliver = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: consumer.into(),
                delivery_tag: tag,
                redelivered: tag % 2 == 0,
                exchange: exchange.into(),
                routing_key: key.into(),
            }));
            let header = AMQPContentHeader {
                class_id: 60,
                body_size: tag,
                properties: BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_correlation_id(key.into()),
            };
            let mut bytes = encoded(AMQPFrame::Method(CHANNEL, deliver));
            bytes.extend(encoded(AMQPFrame::Header(CHANNEL, header)));
            assert_eq!(
                read_all(&bytes),
                vec![Frame::Deliver(tag), Frame::Header(tag)]
            );
        }
        for (tag, multiple) in [(7, false), (1 << 40, true)] {
            let ack = AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: tag,
                multiple,
            }));
            let nack = AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: tag,
                multiple,
                requeue: true,
            }));
            let mut bytes = encoded(AMQPFrame::Method(CHANNEL, ack));
            bytes.extend(encoded(AMQPFrame::Method(CHANNEL, nack)));
            assert_eq!(
                read_all(&bytes),
                vec![
                    Frame::Confirm {
                        ack: true,
                        delivery_tag: tag,
                        multiple
                    },
                    Frame::Confirm {
                        ack: false,
                        delivery_tag: tag,
                        multiple
                    },
                ]
            );
        }
    }

    #[test]
    fn a_malformed_hot_method_is_reported_not_misread() {
        // A basic.deliver whose consumer tag runs past the payload.
        let payload = [0u8, 60, 0, 60, 200, b'c'];
        let mut bytes = vec![FRAME_METHOD, 0, 1, 0, 0, 0, payload.len() as u8];
        bytes.extend_from_slice(&payload);
        bytes.push(FRAME_END);
        let mut input = BytesMut::from(&bytes[..]);
        assert!(next_frame(&mut input, FRAME_MAX).is_err());
        // Other methods still go through amq-protocol.
        let qos_ok = AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {}));
        assert_eq!(
            read_all(&encoded(AMQPFrame::Method(CHANNEL, qos_ok.clone()))),
            vec![Frame::Method(qos_ok)]
        );
    }

    #[test]
    fn templates_and_acks_encode_what_amq_protocol_encodes() {
        let exchange = ShortString::from("amq.direct");
        let key = ShortString::from("bench");
        let properties = BasicProperties::default().with_delivery_mode(2);
        let template = PublishTemplate::new(&exchange, &key, &properties, 5).unwrap();
        let mut expected = encoded(AMQPFrame::Method(
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange,
                routing_key: key,
                mandatory: false,
                immediate: false,
            })),
        ));
        expected.extend(encoded(AMQPFrame::Header(
            CHANNEL,
            AMQPContentHeader {
                class_id: 60,
                body_size: 5,
                properties,
            },
        )));
        assert_eq!(template.frames, expected);
        for (tag, multiple) in [(0, false), (42, true), (u64::MAX, false)] {
            let method = AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: tag,
                multiple,
            }));
            assert_eq!(
                ack_frame(tag, multiple).to_vec(),
                encoded(AMQPFrame::Method(CHANNEL, method))
            );
        }
    }
}
