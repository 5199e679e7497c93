//! lapin (a Rust AMQP 0-9-1 client) against the real `sluice` binary: publisher confirms and
//! consumption with acknowledgements, and publisher flow control.
//!
//! The binary is this crate's own, which cargo builds before it runs these tests (so a stale
//! one can never pass them). Each test starts it on port 0 with a data directory of its own and
//! stops it at the end.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

struct Broker {
    child: Child,
    amqp: String,
    http: String,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sluice_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sluice"))
}

fn start() -> anyhow::Result<Broker> {
    start_with(&[])
}

/// Starts the broker with extra environment variables (configuration keys).
fn start_with(env: &[(&str, &str)]) -> anyhow::Result<Broker> {
    let dir = tempfile::tempdir()?;
    let ready = dir.path().join("ready.json");
    let child = Command::new(sluice_binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--kafka-listen",
            "127.0.0.1:0",
            "--amqp-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--ready-file")
        .arg(&ready)
        .env("SLUICE_LOG__LEVEL", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", sluice_binary().display()))?;
    let mut broker = Broker {
        child,
        amqp: String::new(),
        http: String::new(),
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            let addresses: serde_json::Value = serde_json::from_str(&text)?;
            let address = |name: &str| {
                addresses[name]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| anyhow::anyhow!("no {name} address in {text}"))
            };
            broker.amqp = address("amqp")?;
            broker.http = address("http")?;
            return Ok(broker);
        }
        if let Some(status) = broker.child.try_wait()? {
            anyhow::bail!("sluice exited with {status}");
        }
        if Instant::now() > deadline {
            anyhow::bail!("sluice did not become ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn confirms_then_consumption_with_acks() -> anyhow::Result<()> {
    let broker = start()?;
    let uri = format!("amqp://guest:guest@{}/%2f", broker.amqp);
    let connection = Connection::connect(&uri, ConnectionProperties::default()).await?;
    let publisher = connection.create_channel().await?;
    publisher
        .queue_declare(
            "lapin-jobs".into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut confirms = Vec::new();
    for i in 0..200u32 {
        let confirm = publisher
            .basic_publish(
                "".into(),
                "lapin-jobs".into(),
                BasicPublishOptions::default(),
                format!("job {i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        confirms.push(confirm);
    }
    for confirm in confirms {
        assert!(matches!(confirm.await?, Confirmation::Ack(_)));
    }
    // An unroutable message is confirmed too (nothing had to store it).
    let confirm = publisher
        .basic_publish(
            "".into(),
            "nowhere".into(),
            BasicPublishOptions::default(),
            b"lost",
            BasicProperties::default(),
        )
        .await?;
    assert!(matches!(confirm.await?, Confirmation::Ack(_)));

    let consumer_channel = connection.create_channel().await?;
    consumer_channel
        .basic_qos(10, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            "lapin-jobs".into(),
            "lapin-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut received = Vec::new();
    while received.len() < 200 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("consumer ended"))??;
        assert!(!delivery.redelivered);
        assert_eq!(delivery.properties.delivery_mode(), &Some(2));
        received.push(String::from_utf8(delivery.data.clone())?);
        delivery.ack(BasicAckOptions::default()).await?;
    }
    let expected: Vec<String> = (0..200).map(|i| format!("job {i}")).collect();
    assert_eq!(received, expected);
    let declared = publisher
        .queue_declare(
            "lapin-jobs".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    assert_eq!(declared.message_count(), 0);
    assert_eq!(declared.consumer_count(), 1);
    connection.close(200, "done".into()).await?;
    Ok(())
}

/// One sample from the broker's /metrics.
async fn metric(broker: &Broker, name: &str) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(&broker.http).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: sluice\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {name} in /metrics"))
}

/// Declares a transient `queue` and consumes from it with manual acks and `prefetch`.
async fn consume(
    uri: &str,
    queue: &str,
    prefetch: u16,
) -> anyhow::Result<(Connection, lapin::Channel, lapin::Consumer)> {
    let connection = Connection::connect(uri, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel, consumer))
}

/// Publishes `count` numbered messages to `queue` on a connection of its own, keeping 64
/// in flight; with `confirm`, waits for every confirm.
async fn publish_numbered(
    uri: &str,
    queue: &str,
    range: std::ops::Range<u64>,
    confirm: bool,
) -> anyhow::Result<()> {
    let connection = Connection::connect(uri, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    if confirm {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
    }
    let mut in_flight = std::collections::VecDeque::new();
    for n in range {
        let pending = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &n.to_be_bytes(),
                BasicProperties::default(),
            )
            .await?;
        in_flight.push_back(pending);
        if in_flight.len() >= 64
            && let Some(oldest) = in_flight.pop_front()
        {
            let confirmation = oldest.await?;
            assert!(!confirm || matches!(confirmation, Confirmation::Ack(_)));
        }
    }
    for pending in in_flight {
        let confirmation = pending.await?;
        assert!(!confirm || matches!(confirmation, Confirmation::Ack(_)));
    }
    connection.close(200, "done".into()).await?;
    Ok(())
}

/// A publisher faster than a streaming consumer is held back (the flow counter moves), and
/// every message still arrives once, in order.
#[tokio::test]
async fn a_publisher_ahead_of_a_streaming_consumer_is_held_back() -> anyhow::Result<()> {
    let broker = start_with(&[("SLUICE_AMQP__QUEUE_FLOW_READY_HIGH", "50")])?;
    let uri = format!("amqp://guest:guest@{}/%2f", broker.amqp);
    let (connection, _channel, mut consumer) = consume(&uri, "flow", 20).await?;
    const COUNT: u64 = 100_000;
    let publisher = tokio::spawn({
        let uri = uri.clone();
        async move { publish_numbered(&uri, "flow", 0..COUNT, false).await }
    });
    let mut expected = 0u64;
    while expected < COUNT {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("consumer ended"))??;
        let n = u64::from_be_bytes(delivery.data[..8].try_into()?);
        assert_eq!(n, expected, "deliveries out of order or missing");
        expected += 1;
        delivery.ack(BasicAckOptions::default()).await?;
    }
    publisher.await??;
    let holds = metric(&broker, "sluice_amqp_flow_holds_total").await?;
    assert!(holds > 0.0, "the publisher was never held back");
    connection.close(200, "done".into()).await?;
    Ok(())
}

/// A consumer that streams and then stops acknowledging (or never took much) must not hold
/// publishers: they finish, confirmed, while it sits on its prefetch.
#[tokio::test]
async fn a_stalled_consumer_does_not_hold_publishers() -> anyhow::Result<()> {
    let broker = start_with(&[("SLUICE_AMQP__QUEUE_FLOW_READY_HIGH", "50")])?;
    let uri = format!("amqp://guest:guest@{}/%2f", broker.amqp);
    let (connection, channel, mut consumer) = consume(&uri, "stall", 100).await?;
    // Stream 20,000 messages through, acknowledging each, then stop acknowledging.
    let publisher = tokio::spawn({
        let uri = uri.clone();
        async move { publish_numbered(&uri, "stall", 0..20_000, false).await }
    });
    for _ in 0..20_000 {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("consumer ended"))??;
        delivery.ack(BasicAckOptions::default()).await?;
    }
    publisher.await??;
    // The consumer now holds 100 unacknowledged deliveries and takes no more; a publisher
    // with confirms still gets every message in.
    tokio::time::timeout(
        Duration::from_secs(60),
        publish_numbered(&uri, "stall", 0..20_000, true),
    )
    .await??;
    let declared = channel
        .queue_declare(
            "stall".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    assert_eq!(declared.message_count(), 20_000 - 100);
    connection.close(200, "done".into()).await?;
    Ok(())
}
