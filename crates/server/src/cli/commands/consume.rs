//! `sluice consume`: reads messages from a topic, or with `--queue` takes them from a queue.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use super::common::{Connection, Output, cell, client};
use crate::cli::client::{Failure, segment};
use crate::cli::table::Table;

#[derive(Debug, Args)]
pub struct Consume {
    /// The topic to read (or, with --queue, the queue to take messages from).
    topic: String,
    /// Take messages from this queue instead: they leave the queue unless --requeue.
    #[arg(long, conflicts_with_all = ["partition", "from_beginning", "offset", "follow"])]
    pub(super) queue: bool,
    /// With --queue: put the messages back (peek).
    #[arg(long, requires = "queue")]
    requeue: bool,
    /// With --queue: the virtual host.
    #[arg(long, default_value = "/")]
    vhost: String,
    #[arg(long, short = 'p')]
    partition: Option<u32>,
    /// Start at each partition's first offset.
    #[arg(long, conflicts_with = "offset")]
    from_beginning: bool,
    /// Start at this offset (needs --partition).
    #[arg(long, requires = "partition")]
    offset: Option<u64>,
    /// Stop after this many messages.
    #[arg(long, short = 'n', default_value_t = 10)]
    count: usize,
    /// Keep waiting for new messages until --count have arrived.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    connection: Connection,
}

pub(super) fn consume(args: &Consume) -> Result<(), Failure> {
    let api = client(&args.connection);
    let topic = segment(&args.topic);
    let detail = api.get(&format!("/api/topics/{topic}"))?;
    let partitions: Vec<(u64, u64, u64)> = detail["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            args.partition
                .is_none_or(|wanted| p["partition"].as_u64() == Some(u64::from(wanted)))
        })
        .map(|p| {
            (
                p["partition"].as_u64().unwrap_or(0),
                p["log_start_offset"].as_u64().unwrap_or(0),
                p["high_watermark"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    if partitions.is_empty() {
        return Err(Failure::Refused(format!(
            "topic {} has no partition {:?}",
            args.topic, args.partition
        )));
    }
    // Next offset to read in each partition.
    let mut positions: Vec<(u64, u64)> = partitions
        .iter()
        .map(|(p, start, end)| {
            let from = match (args.offset, args.from_beginning) {
                (Some(offset), _) => offset,
                (None, true) => *start,
                (None, false) if args.follow => *end,
                (None, false) => end.saturating_sub(args.count as u64).max(*start),
            };
            (*p, from)
        })
        .collect();
    let json_out = args.connection.output == Output::Json;
    let mut table = Table::new(&["partition", "offset", "key", "value"]);
    let mut shown = 0usize;
    loop {
        let mut progressed = false;
        for (partition, next) in &mut positions {
            if shown >= args.count {
                break;
            }
            let wanted = args.count - shown;
            let batch = api.get(&format!(
                "/api/topics/{topic}/messages?partition={partition}&offset={next}&limit={wanted}"
            ))?;
            for message in batch.as_array().into_iter().flatten() {
                *next = message["offset"].as_u64().unwrap_or(*next) + 1;
                shown += 1;
                progressed = true;
                if json_out {
                    println!("{message}");
                    let _ = std::io::stdout().flush();
                } else if args.follow {
                    println!(
                        "{}\t{}\t{}\t{}",
                        cell(&message["partition"]),
                        cell(&message["offset"]),
                        cell(&message["key"]),
                        cell(&message["value"])
                    );
                } else {
                    table.row(vec![
                        cell(&message["partition"]),
                        cell(&message["offset"]),
                        cell(&message["key"]),
                        cell(&message["value"]),
                    ]);
                }
            }
        }
        if shown >= args.count || (!args.follow && !progressed) {
            break;
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    if !json_out && !args.follow {
        print!("{}", table.render());
    }
    Ok(())
}

/// `consume --queue`: takes up to `count` messages from a queue through the admin API.
pub(super) fn consume_queue(args: &Consume) -> Result<(), Failure> {
    let api = client(&args.connection);
    let path = format!(
        "/api/queues/{}/{}/get",
        segment(&args.vhost),
        segment(&args.topic)
    );
    let json_out = args.connection.output == Output::Json;
    let mut table = Table::new(&["exchange", "routing key", "redelivered", "payload"]);
    let mut remaining = args.count;
    while remaining > 0 {
        let wanted = remaining.min(100);
        let batch = api.send(
            "POST",
            &path,
            Some(&json!({"count": wanted, "requeue": args.requeue})),
        )?;
        let messages = batch.as_array().cloned().unwrap_or_default();
        for message in &messages {
            if json_out {
                println!("{message}");
            } else {
                let payload = match &message["payload"] {
                    Value::String(text) => text.clone(),
                    _ => format!("(base64) {}", cell(&message["payload_base64"])),
                };
                table.row(vec![
                    cell(&message["exchange"]),
                    cell(&message["routing_key"]),
                    cell(&message["redelivered"]),
                    payload,
                ]);
            }
        }
        // Requeued messages come back first: one round is all a peek can show.
        if messages.len() < wanted || args.requeue {
            break;
        }
        remaining -= messages.len();
    }
    if !json_out {
        print!("{}", table.render());
    }
    Ok(())
}
