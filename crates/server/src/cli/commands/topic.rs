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
    /// Show a topic's partitions (leader, replicas, each follower's lag where this node
    /// leads) and configuration.
    Describe { name: String },
    /// A CRC-32C of this node's copy of a partition's log, to compare replicas (ask each
    /// node with the same --to).
    Checksum {
        name: String,
        #[arg(long, short = 'p', default_value_t = 0)]
        partition: u32,
        /// Cover the log up to this offset (default: this copy's high watermark).
        #[arg(long)]
        to: Option<u64>,
    },
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
    /// Move a replicated partition to other nodes (a Raft membership change: the new ones
    /// catch up from the log, then vote; the removed ones leave), or cancel the move.
    Reassign {
        name: String,
        #[arg(long, short = 'p', default_value_t = 0)]
        partition: u32,
        /// The nodes to move it to, comma-separated, the preferred leader first.
        #[arg(long, value_delimiter = ',', required_unless_present = "cancel")]
        replicas: Vec<u32>,
        /// Cancel the move in progress (the partition stays on its current nodes).
        #[arg(long, conflicts_with = "replicas")]
        cancel: bool,
    },
    /// Delete a topic and its data.
    Delete { name: String },
}

/// A partition's reassignment in progress as `+added -removed`, or `-`.
fn moving(partition: &Value) -> String {
    let nodes = |key: &str| -> Vec<String> {
        partition[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(cell)
            .collect()
    };
    let (adding, removing) = (nodes("adding"), nodes("removing"));
    if partition["adding"].is_null() {
        return "-".to_owned();
    }
    let mut parts = Vec::new();
    if !adding.is_empty() {
        parts.push(format!("+{}", adding.join(",")));
    }
    if !removing.is_empty() {
        parts.push(format!("-{}", removing.join(",")));
    }
    parts.join(" ")
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
        "epoch",
        "replicas",
        "moving",
        "start offset",
        "high watermark",
        "size bytes",
        "segments",
    ]);
    let mut followers = Table::new(&[
        "partition",
        "follower",
        "in sync",
        "voter",
        "lag (records)",
        "last contact ms",
    ]);
    let mut any_follower = false;
    for p in detail["partitions"].as_array().into_iter().flatten() {
        let replicas: Vec<String> = p["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .map(cell)
            .collect();
        partitions.row(vec![
            cell(&p["partition"]),
            cell(&p["leader"]),
            cell(&p["epoch"]),
            replicas.join(","),
            moving(p),
            cell(&p["log_start_offset"]),
            cell(&p["high_watermark"]),
            cell(&p["size_bytes"]),
            cell(&p["segments"]),
        ]);
        for f in p["followers"].as_array().into_iter().flatten() {
            any_follower = true;
            followers.row(vec![
                cell(&p["partition"]),
                cell(&f["node"]),
                cell(&f["in_sync"]),
                cell(&f["voter"]),
                cell(&f["lag"]),
                cell(&f["last_contact_ms"]),
            ]);
        }
    }
    print!("{}", partitions.render());
    println!();
    if any_follower {
        print!("{}", followers.render());
        println!();
    }
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
        TopicCommand::Reassign {
            name,
            partition,
            replicas,
            cancel,
        } => {
            let body = serde_json::json!({
                "replicas": if cancel { Value::Null } else { serde_json::json!(replicas) },
            });
            let detail = api.send(
                "PUT",
                &format!(
                    "/api/topics/{}/partitions/{partition}/reassignment",
                    segment(&name)
                ),
                Some(&body),
            )?;
            if json_out {
                print_json(&detail)
            } else {
                print_topic(&detail)
            }
        }
        TopicCommand::Checksum {
            name,
            partition,
            to,
        } => {
            let mut path = format!(
                "/api/topics/{}/partitions/{partition}/checksum",
                segment(&name)
            );
            if let Some(to) = to {
                path.push_str(&format!("?to={to}"));
            }
            let summed = api.get(&path)?;
            if json_out {
                print_json(&summed)
            } else {
                println!(
                    "node {} partition {}: offsets {}..{} ({} bytes) crc32c {}",
                    cell(&summed["node"]),
                    cell(&summed["partition"]),
                    cell(&summed["log_start_offset"]),
                    cell(&summed["end_offset"]),
                    cell(&summed["bytes"]),
                    cell(&summed["crc32c"]),
                );
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
