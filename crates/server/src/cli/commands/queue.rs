//! `sluice queue`: declare, list, purge and delete queues.

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::common::{
    Connection, Output, arguments, cell, client, key_value, print_json, print_list,
};
use crate::cli::client::{Failure, segment};

#[derive(Debug, Args)]
pub struct QueueArgs {
    #[command(subcommand)]
    pub(super) command: QueueCommand,
    /// The virtual host.
    #[arg(long, global = true, default_value = "/")]
    pub(super) vhost: String,
    #[command(flatten)]
    pub(super) connection: Connection,
}

#[derive(Debug, Subcommand)]
pub(super) enum QueueCommand {
    /// Declare a queue (durable unless --transient).
    Declare {
        name: String,
        #[arg(long)]
        transient: bool,
        #[arg(long)]
        auto_delete: bool,
        /// A queue argument, `key=value` (numbers and true/false are typed); repeat for more.
        #[arg(long = "argument", short = 'a', value_parser = key_value)]
        arguments: Vec<(String, String)>,
    },
    /// List queues with their counts.
    List,
    /// Drop every ready message of a queue.
    Purge { name: String },
    /// Delete a queue and its messages.
    Delete {
        name: String,
        #[arg(long)]
        if_unused: bool,
        #[arg(long)]
        if_empty: bool,
    },
}

pub(super) fn queue(
    command: QueueCommand,
    vhost: &str,
    connection: &Connection,
) -> Result<(), Failure> {
    let api = client(connection);
    let json_out = connection.output == Output::Json;
    let vhost_segment = segment(vhost);
    match command {
        QueueCommand::Declare {
            name,
            transient,
            auto_delete,
            arguments: args,
        } => {
            let declared = api.send(
                "PUT",
                &format!("/api/queues/{vhost_segment}/{}", segment(&name)),
                Some(&json!({
                    "durable": !transient,
                    "auto_delete": auto_delete,
                    "arguments": arguments(&args),
                })),
            )?;
            if json_out {
                print_json(&declared);
            } else {
                println!(
                    "declared queue {name} in {vhost} ({} messages)",
                    cell(&declared["messages"])
                );
            }
        }
        QueueCommand::List => {
            let queues = api.get(&format!("/api/queues/{vhost_segment}"))?;
            let rate =
                |q: &Value, key: &str| format!("{:.0}", q["rates"][key].as_f64().unwrap_or(0.0));
            print_list(
                &queues,
                json_out,
                &[
                    "name",
                    "durable",
                    "ready",
                    "unacked",
                    "consumers",
                    "publish/s",
                    "deliver/s",
                ],
                |q| {
                    vec![
                        cell(&q["name"]),
                        cell(&q["durable"]),
                        cell(&q["messages_ready"]),
                        cell(&q["messages_unacknowledged"]),
                        cell(&q["consumers"]),
                        rate(q, "publish_per_s"),
                        rate(q, "deliver_per_s"),
                    ]
                },
            );
        }
        QueueCommand::Purge { name } => {
            let purged = api.send(
                "DELETE",
                &format!("/api/queues/{vhost_segment}/{}/contents", segment(&name)),
                None,
            )?;
            if json_out {
                print_json(&purged);
            } else {
                println!(
                    "purged {} messages from queue {name}",
                    cell(&purged["messages"])
                );
            }
        }
        QueueCommand::Delete {
            name,
            if_unused,
            if_empty,
        } => {
            api.send(
                "DELETE",
                &format!(
                    "/api/queues/{vhost_segment}/{}?if_unused={if_unused}&if_empty={if_empty}",
                    segment(&name)
                ),
                None,
            )?;
            if json_out {
                print_json(&json!({"deleted": name, "vhost": vhost}));
            } else {
                println!("deleted queue {name}");
            }
        }
    }
    Ok(())
}
