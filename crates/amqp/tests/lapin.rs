//! lapin (a Rust AMQP 0-9-1 client) against the real `sluice` binary: publisher confirms and
//! consumption with acknowledgements.
//!
//! The binary is found through `SLUICE_BIN`, else `target/debug/sluice` (honouring
//! `CARGO_TARGET_DIR`). Each test starts it on port 0 with a data directory of its own and
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
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sluice_binary() -> PathBuf {
    if let Some(explicit) = std::env::var_os("SLUICE_BIN") {
        return PathBuf::from(explicit);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("debug").join("sluice")
}

fn start() -> anyhow::Result<Broker> {
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
        ])
        .arg("--ready-file")
        .arg(&ready)
        .env("SLUICE_LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", sluice_binary().display()))?;
    let mut broker = Broker {
        child,
        amqp: String::new(),
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            let addresses: serde_json::Value = serde_json::from_str(&text)?;
            broker.amqp = addresses["amqp"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("no amqp address in {text}"))?
                .to_owned();
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
