//! `sluice topic`: create, list, describe, alter and delete topics.

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::common::{Connection, Output, cell, client, key_value, print_json, print_list};
use crate::cli::client::{Failure, segment};
use crate::cli::table::Table;

#[derive(Debug, Args)]
pub struct TopicArgs {
    #[command(subcommand)]
    pub(super) command: TopicCommand,
    #[command(flatten)]
    pub(super) connection: Connection,
}

#[derive(Debug, Subcommand)]
pub(super) enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, short = 'p')]
        partitions: Option<u32>,
        /// Copies of each partition (on that many nodes of the cluster); default the broker's
        /// `kafka.default_replication_factor` (unset: the smaller of 3 and the nodes).
        #[arg(long, short = 'r')]
        replication_factor: Option<i16>,
        /// A config override, `key=value`; repeat for more.
        #[arg(long = "config", short = 'c', value_parser = key_value)]
        config: Vec<(String, String)>,
    },
    /// List topics.
    List,
    /// Show a topic's partitions and configuration.
    Describe { name: String },
    /// Change a topic's configuration or grow it.
    Alter {
        name: String,
        /// Set an override, `key=value`; repeat for more.
        #[arg(long = "set", value_parser = key_value)]
        set: Vec<(String, String)>,
        /// Remove an override, back to the broker default.
        #[arg(long = "delete")]
        delete: Vec<String>,
        /// Grow to this many partitions.
        #[arg(long)]
        partitions: Option<u32>,
    },
    /// Delete a topic and its data.
    Delete { name: String },
}

fn print_topic(detail: &Value) {
    println!(
        "topic {} (id {})",
        cell(&detail["name"]),
        cell(&detail["id"])
    );
    let mut partitions = Table::new(&[
        "partition",
        "leader",
        "start offset",
        "high watermark",
        "size bytes",
        "segments",
    ]);
    for p in detail["partitions"].as_array().into_iter().flatten() {
        partitions.row(vec![
            cell(&p["partition"]),
            cell(&p["leader"]),
            cell(&p["log_start_offset"]),
            cell(&p["high_watermark"]),
            cell(&p["size_bytes"]),
            cell(&p["segments"]),
        ]);
    }
    print!("{}", partitions.render());
    println!();
    let mut config = Table::new(&["config", "value", "source"]);
    for c in detail["config"].as_array().into_iter().flatten() {
        let source = if c["is_default"].as_bool().unwrap_or(true) {
            "default"
        } else {
            "topic"
        };
        config.row(vec![cell(&c["name"]), cell(&c["value"]), source.to_owned()]);
    }
    print!("{}", config.render());
}

pub(super) fn topic(command: TopicCommand, connection: &Connection) -> Result<(), Failure> {
    let api = client(connection);
    let json_out = connection.output == Output::Json;
    match command {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            config,
        } => {
            let config: serde_json::Map<String, Value> = config
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            let created = api.send(
                "POST",
                "/api/topics",
                Some(&json!({
                    "name": name,
                    "partitions": partitions,
                    "replication_factor": replication_factor,
                    "config": config,
                })),
            )?;
            if json_out {
                print_json(&created)
            } else {
                println!(
                    "created topic {name} with {} partitions",
                    created["partitions"].as_array().map_or(0, Vec::len)
                )
            }
        }
        TopicCommand::List => {
            let topics = api.get("/api/topics")?;
            print_list(
                &topics,
                json_out,
                &["name", "partitions", "records", "size bytes"],
                |t| {
                    vec![
                        cell(&t["name"]),
                        cell(&t["partitions"]),
                        cell(&t["records"]),
                        cell(&t["size_bytes"]),
                    ]
                },
            );
        }
        TopicCommand::Describe { name } => {
            let detail = api.get(&format!("/api/topics/{}", segment(&name)))?;
            if json_out {
                print_json(&detail)
            } else {
                print_topic(&detail)
            }
        }
        TopicCommand::Alter {
            name,
            set,
            delete,
            partitions,
        } => {
            if set.is_empty() && delete.is_empty() && partitions.is_none() {
                return Err(Failure::Usage(
                    "nothing to change: give --set, --delete or --partitions".into(),
                ));
            }
            let path = format!("/api/topics/{}", segment(&name));
            let mut detail = Value::Null;
            if !set.is_empty() || !delete.is_empty() {
                let mut changes = serde_json::Map::new();
                for (k, v) in set {
                    changes.insert(k, Value::String(v));
                }
                for k in delete {
                    changes.insert(k, Value::Null);
                }
                detail = api.send(
                    "PATCH",
                    &format!("{path}/config"),
                    Some(&Value::Object(changes)),
                )?;
            }
            if let Some(count) = partitions {
                detail = api.send(
                    "POST",
                    &format!("{path}/partitions"),
                    Some(&json!({"count": count})),
                )?;
            }
            if json_out {
                print_json(&detail)
            } else {
                print_topic(&detail)
            }
        }
        TopicCommand::Delete { name } => {
            api.send("DELETE", &format!("/api/topics/{}", segment(&name)), None)?;
            if json_out {
                print_json(&json!({"deleted": name}))
            } else {
                println!("deleted topic {name}")
            }
        }
    }
    Ok(())
}
