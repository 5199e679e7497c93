//! A lean AMQP 0-9-1 client for the hot loops of the AMQP benchmark (`--client raw`).
//!
//! lapin, the default client, spends more CPU per message than the brokers it measures on a
//! small machine: a 16 B transient run on two CPUs gives it most of both. This client writes
//! and reads frames itself (encoded and parsed by the `amq-protocol` crate, the one lapin is
//! built on) on one task per connection, batching many publishes or acks into one socket
//! write. It does only what the benchmark needs: PLAIN login, one channel, publish with or
//! without confirms, consume with a prefetch and auto-ack or one ack per delivery. Queues and
//! exchanges are still declared and deleted through lapin; any method it does not expect ends
//! the run with an error naming it.

use std::str::FromStr;
use std::time::Duration;

use amq_protocol::frame::parsing::parse_content_header;
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
#[derive(Debug)]
pub enum Frame {
    Method(AMQPClass),
    Header(u64),
    Body(Bytes),
    Heartbeat,
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

    /// Appends a basic.publish with its content header and body frames.
    pub fn publish(
        &mut self,
        exchange: &ShortString,
        routing_key: &ShortString,
        properties: &BasicProperties,
        body: &[u8],
    ) -> Result<(), BenchError> {
        self.method(AMQPClass::Basic(basic::AMQPMethod::Publish(
            basic::Publish {
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                mandatory: false,
                immediate: false,
            },
        )))?;
        self.generate(&AMQPFrame::Header(
            CHANNEL,
            AMQPContentHeader {
                class_id: 60,
                body_size: body.len() as u64,
                properties: properties.clone(),
            },
        ))?;
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
    pub fn ack(&mut self, delivery_tag: u64, multiple: bool) -> Result<(), BenchError> {
        self.method(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag,
            multiple,
        })))
    }

    fn generate(&mut self, frame: &AMQPFrame) -> Result<(), BenchError> {
        let buffer = std::mem::take(&mut self.out);
        let context = gen_frame(frame)(WriteContext::from(buffer))
            .map_err(|error| protocol_error(format!("encoding a frame: {error}")))?;
        self.out = context.write;
        Ok(())
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
        let input = &mut self.input;
        if input.len() < 7 {
            return Ok(None);
        }
        let kind = input[0];
        let size = u32::from_be_bytes([input[3], input[4], input[5], input[6]]) as usize;
        if size > self.frame_max as usize {
            return Err(protocol_error(format!(
                "a frame of {size} bytes, above frame_max {}",
                self.frame_max
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
            FRAME_METHOD => match amq_protocol::protocol::parse_class(&payload[..]) {
                Ok((_, method)) => Frame::Method(method),
                Err(error) => return Err(protocol_error(format!("a bad method frame: {error}"))),
            },
            FRAME_HEADER => match parse_content_header(&payload[..]) {
                Ok((_, header)) => Frame::Header(header.body_size),
                Err(error) => return Err(protocol_error(format!("a bad content header: {error}"))),
            },
            FRAME_BODY => Frame::Body(payload),
            FRAME_HEARTBEAT => Frame::Heartbeat,
            other => return Err(protocol_error(format!("a frame of unknown type {other}"))),
        };
        Ok(Some(frame))
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
