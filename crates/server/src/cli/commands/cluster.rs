//! `sluice cluster`: the cluster's nodes and controller, adding a node and removing one.

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::common::{Connection, Output, cell, client, print_json};
use crate::cli::client::Failure;
use crate::cli::table::Table;

#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub(super) command: ClusterCommand,
    #[command(flatten)]
    pub(super) connection: Connection,
}

#[derive(Debug, Subcommand)]
pub(super) enum ClusterCommand {
    /// The nodes with their addresses and roles, the controller's term and indexes, and each
    /// node's lag and last contact as the controller's leader sees them.
    Status,
    /// Add the node waiting at ADDRESS (started with --cluster-wait-for-invite and no seeds):
    /// it joins, catches up with the controller's log, and votes while there are fewer than
    /// five voters. Answers once it has joined.
    AddNode {
        /// The new node's cluster address, host:port.
        address: String,
    },
    /// Take a node out of the cluster for good: its id is retired, and a node with its data
    /// directory can never rejoin. Another node takes its controller vote if there is one.
    RemoveNode {
        /// The node's id, as `sluice cluster status` shows it.
        id: u64,
    },
}

pub(super) fn cluster(command: ClusterCommand, connection: &Connection) -> Result<(), Failure> {
    let api = client(connection);
    let json_out = connection.output == Output::Json;
    match command {
        ClusterCommand::Status => {
            let status = api.get("/api/cluster")?;
            if json_out {
                print_json(&status);
            } else {
                print!("{}", render(&status));
            }
        }
        ClusterCommand::AddNode { address } => {
            let added = api.send(
                "POST",
                "/api/cluster/nodes",
                Some(&json!({ "address": address })),
            )?;
            if json_out {
                print_json(&added);
            } else {
                println!(
                    "added node {} at {}",
                    cell(&added["id"]),
                    cell(&added["address"])
                );
            }
        }
        ClusterCommand::RemoveNode { id } => {
            api.send("DELETE", &format!("/api/cluster/nodes/{id}"), None)?;
            if json_out {
                print_json(&json!({"removed": id}));
            } else {
                println!("removed node {id} from the cluster");
            }
        }
    }
    Ok(())
}

/// The status as two tables: the controller, then one row per node.
fn render(status: &Value) -> String {
    let mut head = Table::new(&["field", "value"]);
    for (field, key) in [
        ("cluster", "cluster_id"),
        ("answered by node", "node_id"),
        ("view of node", "reported_by"),
        ("leader", "leader"),
        ("term", "term"),
        ("commit index", "commit_index"),
        ("applied index", "applied_index"),
    ] {
        head.row(vec![field.to_owned(), cell(&status[key])]);
    }
    if status["from_leader"] != Value::Bool(true) {
        head.row(vec![
            "note".to_owned(),
            "the leader did not answer: lag and last contact unknown".to_owned(),
        ]);
    }
    let mut nodes = Table::new(&[
        "id",
        "role",
        "cluster",
        "kafka",
        "amqp",
        "http",
        "lag",
        "last contact ms",
    ]);
    for node in status["nodes"].as_array().into_iter().flatten() {
        nodes.row(vec![
            cell(&node["id"]),
            cell(&node["role"]),
            cell(&node["cluster_addr"]),
            cell(&node["kafka_addr"]),
            cell(&node["amqp_addr"]),
            cell(&node["http_addr"]),
            cell(&node["lag"]),
            cell(&node["last_contact_ms"]),
        ]);
    }
    format!("{}\n{}", head.render(), nodes.render())
}
