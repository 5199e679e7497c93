//! `sluice produce`: publishes lines from standard input or a file to a topic, in chunks.

use std::io::BufRead;

use clap::Args;
use serde_json::{Value, json};

use super::common::{Connection, Output, client, key_value, print_json};
use crate::cli::client::{Failure, segment};

/// Messages sent per publish request by `produce`.
const PRODUCE_CHUNK: usize = 500;

#[derive(Debug, Args)]
pub struct Produce {
    topic: String,
    /// Read lines from this file instead of standard input.
    #[arg(long, short = 'f')]
    file: Option<std::path::PathBuf>,
    /// Split each line into key and value at the first occurrence of this string.
    #[arg(long, short = 'k')]
    key_separator: Option<String>,
    /// Every message gets this key (when lines carry no key).
    #[arg(long)]
    key: Option<String>,
    #[arg(long, short = 'p')]
    partition: Option<u32>,
    /// A header for every message, `key=value`; repeat for more.
    #[arg(long = "header", short = 'H', value_parser = key_value)]
    headers: Vec<(String, String)>,
    #[command(flatten)]
    connection: Connection,
}

pub(super) fn produce(args: &Produce) -> Result<(), Failure> {
    let api = client(&args.connection);
    let reader: Box<dyn BufRead> = match &args.file {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path)
                .map_err(|e| Failure::Usage(format!("cannot open {}: {e}", path.display())))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let total_bytes = args
        .file
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.len());
    let progress = total_bytes
        .filter(|_| args.connection.output == Output::Table)
        .map(|bytes| {
            let bar = indicatif::ProgressBar::new(bytes);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
    let headers: serde_json::Map<String, Value> = args
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let path = format!("/api/topics/{}/messages", segment(&args.topic));
    let mut chunk: Vec<Value> = Vec::with_capacity(PRODUCE_CHUNK);
    let flush = |chunk: &mut Vec<Value>| -> Result<(), Failure> {
        if !chunk.is_empty() {
            api.send("POST", &path, Some(&Value::Array(std::mem::take(chunk))))?;
        }
        Ok(())
    };
    let mut count = 0usize;
    for line in reader.lines() {
        let line = line.map_err(|e| Failure::Usage(format!("reading input: {e}")))?;
        if let Some(bar) = &progress {
            bar.inc(line.len() as u64 + 1);
        }
        let (key, value) = match &args.key_separator {
            Some(separator) => match line.split_once(separator.as_str()) {
                Some((k, v)) => (Some(k.to_owned()), v.to_owned()),
                None => (args.key.clone(), line),
            },
            None => (args.key.clone(), line),
        };
        chunk.push(
            json!({"key": key, "value": value, "partition": args.partition, "headers": headers}),
        );
        count += 1;
        if chunk.len() == PRODUCE_CHUNK {
            flush(&mut chunk)?;
        }
    }
    flush(&mut chunk)?;
    if let Some(bar) = &progress {
        bar.finish_and_clear();
    }
    if args.connection.output == Output::Json {
        print_json(&json!({"topic": args.topic, "messages": count}));
    } else {
        println!("published {count} messages to {}", args.topic);
    }
    Ok(())
}
