//! `sluice vhost`: create, list and delete virtual hosts.

use clap::{Args, Subcommand};
use serde_json::json;

use super::common::{Connection, Output, cell, client, print_json, print_list};
use crate::cli::client::{Failure, segment};

#[derive(Debug, Args)]
pub struct VhostArgs {
    #[command(subcommand)]
    pub(super) command: VhostCommand,
    #[command(flatten)]
    pub(super) connection: Connection,
}

#[derive(Debug, Subcommand)]
pub(super) enum VhostCommand {
    /// List virtual hosts with their counts.
    List,
    /// Create a virtual host (with its default exchanges); not an error if it exists.
    Add { name: String },
    /// Delete a virtual host with its exchanges, queues, messages, bindings and permissions;
    /// its AMQP connections are closed.
    Delete { name: String },
}

pub(super) fn vhost(command: VhostCommand, connection: &Connection) -> Result<(), Failure> {
    let api = client(connection);
    let json_out = connection.output == Output::Json;
    match command {
        VhostCommand::List => {
            let vhosts = api.get("/api/vhosts")?;
            print_list(
                &vhosts,
                json_out,
                &["name", "queues", "exchanges", "ready", "unacked"],
                |v| {
                    vec![
                        cell(&v["name"]),
                        cell(&v["queues"]),
                        cell(&v["exchanges"]),
                        cell(&v["messages_ready"]),
                        cell(&v["messages_unacknowledged"]),
                    ]
                },
            );
        }
        VhostCommand::Add { name } => {
            api.send("PUT", &format!("/api/vhosts/{}", segment(&name)), None)?;
            if json_out {
                print_json(&json!({"vhost": name}));
            } else {
                println!("created virtual host {name}");
            }
        }
        VhostCommand::Delete { name } => {
            api.send("DELETE", &format!("/api/vhosts/{}", segment(&name)), None)?;
            if json_out {
                print_json(&json!({"deleted": name}));
            } else {
                println!("deleted virtual host {name}");
            }
        }
    }
    Ok(())
}
