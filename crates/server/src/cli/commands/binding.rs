//! `sluice binding`: bind queues and exchanges to exchanges, list and remove bindings.

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::common::{
    Connection, Output, arguments, cell, client, key_value, print_json, print_list,
};
use crate::cli::client::{Failure, segment};

#[derive(Debug, Args)]
pub struct BindingArgs {
    #[command(subcommand)]
    pub(super) command: BindingCommand,
    /// The virtual host.
    #[arg(long, global = true, default_value = "/")]
    pub(super) vhost: String,
    #[command(flatten)]
    pub(super) connection: Connection,
}

/// One binding, as `binding add` and `binding remove` take it.
#[derive(Debug, Args)]
pub(super) struct BindingSpec {
    /// The source exchange.
    source: String,
    /// The queue (or with --to-exchange, the exchange) to bind.
    destination: String,
    #[arg(long, short = 'k', default_value = "")]
    routing_key: String,
    /// The destination is an exchange, not a queue.
    #[arg(long)]
    to_exchange: bool,
    /// A binding argument, `key=value`; repeat for more.
    #[arg(long = "argument", short = 'a', value_parser = key_value)]
    arguments: Vec<(String, String)>,
}

#[derive(Debug, Subcommand)]
pub(super) enum BindingCommand {
    /// Bind a queue or exchange to an exchange.
    Add(BindingSpec),
    /// List bindings.
    List,
    /// Remove a binding.
    Remove(BindingSpec),
}

fn binding_body(spec: &BindingSpec) -> Value {
    json!({
        "source": spec.source,
        "destination": spec.destination,
        "destination_type": if spec.to_exchange { "exchange" } else { "queue" },
        "routing_key": spec.routing_key,
        "arguments": arguments(&spec.arguments),
    })
}

pub(super) fn binding(
    command: BindingCommand,
    vhost: &str,
    connection: &Connection,
) -> Result<(), Failure> {
    let api = client(connection);
    let json_out = connection.output == Output::Json;
    let path = format!("/api/bindings/{}", segment(vhost));
    match command {
        BindingCommand::Add(spec) => {
            let added = api.send("POST", &path, Some(&binding_body(&spec)))?;
            if json_out {
                print_json(&added);
            } else {
                println!(
                    "bound {} to {} with routing key {:?}",
                    spec.destination, spec.source, spec.routing_key
                );
            }
        }
        BindingCommand::List => {
            let bindings = api.get(&path)?;
            print_list(
                &bindings,
                json_out,
                &["source", "destination", "type", "routing key", "arguments"],
                |b| {
                    vec![
                        cell(&b["source"]),
                        cell(&b["destination"]),
                        cell(&b["destination_type"]),
                        cell(&b["routing_key"]),
                        b["arguments"].to_string(),
                    ]
                },
            );
        }
        BindingCommand::Remove(spec) => {
            api.send("DELETE", &path, Some(&binding_body(&spec)))?;
            if json_out {
                print_json(&json!({"removed": binding_body(&spec)}));
            } else {
                println!(
                    "removed the binding of {} to {}",
                    spec.destination, spec.source
                );
            }
        }
    }
    Ok(())
}
