//! `sluice exchange`: declare, list and delete exchanges.

use clap::{Args, Subcommand};
use serde_json::json;

use super::common::{
    Connection, Output, arguments, cell, client, key_value, print_json, print_list,
};
use crate::cli::client::{Failure, segment};

#[derive(Debug, Args)]
pub struct ExchangeArgs {
    #[command(subcommand)]
    pub(super) command: ExchangeCommand,
    /// The virtual host.
    #[arg(long, global = true, default_value = "/")]
    pub(super) vhost: String,
    #[command(flatten)]
    pub(super) connection: Connection,
}

#[derive(Debug, Subcommand)]
pub(super) enum ExchangeCommand {
    /// Declare an exchange (durable unless --transient).
    Declare {
        name: String,
        /// direct, fanout, topic or headers.
        #[arg(long = "type", short = 't', default_value = "direct")]
        kind: String,
        #[arg(long)]
        transient: bool,
        #[arg(long)]
        auto_delete: bool,
        #[arg(long)]
        internal: bool,
        /// An exchange argument, `key=value`; repeat for more.
        #[arg(long = "argument", short = 'a', value_parser = key_value)]
        arguments: Vec<(String, String)>,
    },
    /// List exchanges.
    List,
    /// Delete an exchange.
    Delete {
        name: String,
        #[arg(long)]
        if_unused: bool,
    },
}

pub(super) fn exchange(
    command: ExchangeCommand,
    vhost: &str,
    connection: &Connection,
) -> Result<(), Failure> {
    let api = client(connection);
    let json_out = connection.output == Output::Json;
    let vhost_segment = segment(vhost);
    match command {
        ExchangeCommand::Declare {
            name,
            kind,
            transient,
            auto_delete,
            internal,
            arguments: args,
        } => {
            api.send(
                "PUT",
                &format!("/api/exchanges/{vhost_segment}/{}", segment(&name)),
                Some(&json!({
                    "type": kind,
                    "durable": !transient,
                    "auto_delete": auto_delete,
                    "internal": internal,
                    "arguments": arguments(&args),
                })),
            )?;
            if json_out {
                print_json(&json!({"declared": name, "type": kind, "vhost": vhost}));
            } else {
                println!("declared {kind} exchange {name} in {vhost}");
            }
        }
        ExchangeCommand::List => {
            let exchanges = api.get(&format!("/api/exchanges/{vhost_segment}"))?;
            print_list(
                &exchanges,
                json_out,
                &["name", "type", "durable", "internal", "bindings"],
                |x| {
                    let name = match x["name"].as_str() {
                        Some("") | None => "(default)".to_owned(),
                        Some(name) => name.to_owned(),
                    };
                    vec![
                        name,
                        cell(&x["type"]),
                        cell(&x["durable"]),
                        cell(&x["internal"]),
                        cell(&x["bindings"]),
                    ]
                },
            );
        }
        ExchangeCommand::Delete { name, if_unused } => {
            api.send(
                "DELETE",
                &format!(
                    "/api/exchanges/{vhost_segment}/{}?if_unused={if_unused}",
                    segment(&name)
                ),
                None,
            )?;
            if json_out {
                print_json(&json!({"deleted": name, "vhost": vhost}));
            } else {
                println!("deleted exchange {name}");
            }
        }
    }
    Ok(())
}
