//! `sluice limit`: list, set and clear limits on virtual hosts (`max-connections`,
//! `max-queues`) and users (`max-connections`, `max-channels`).

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::common::{Connection, Output, cell, client, print_json, print_list};
use crate::cli::client::{Failure, segment};

#[derive(Debug, Args)]
pub struct LimitArgs {
    #[command(subcommand)]
    pub(super) command: LimitCommand,
    #[command(flatten)]
    pub(super) connection: Connection,
}

/// Whose limit: a virtual host's or a user's.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub(super) struct Owner {
    /// A virtual host's limit (max-connections, max-queues).
    #[arg(long)]
    vhost: Option<String>,
    /// A user's limit (max-connections, max-channels). (`--user` is the login for the API.)
    #[arg(long = "for-user", value_name = "USER")]
    for_user: Option<String>,
}

impl Owner {
    fn path(&self, name: &str) -> String {
        match (&self.vhost, &self.for_user) {
            (Some(vhost), _) => format!("/api/vhost-limits/{}/{}", segment(vhost), segment(name)),
            (_, Some(user)) => format!("/api/user-limits/{}/{}", segment(user), segment(name)),
            (None, None) => unreachable!("clap requires one of --vhost and --for-user"),
        }
    }

    fn describe(&self) -> String {
        match (&self.vhost, &self.for_user) {
            (Some(vhost), _) => format!("virtual host {vhost}"),
            (_, Some(user)) => format!("user {user}"),
            (None, None) => String::new(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum LimitCommand {
    /// List every limit set on virtual hosts and users.
    List,
    /// Set a limit; what is open already stays open, what would go past it is refused.
    Set {
        #[command(flatten)]
        owner: Owner,
        /// max-connections, max-queues (virtual hosts) or max-channels (users).
        name: String,
        value: u64,
    },
    /// Clear a limit.
    Clear {
        #[command(flatten)]
        owner: Owner,
        name: String,
    },
}

fn rows(list: &Value, kind: &str, key: &str, table: &mut Vec<Value>) {
    for entry in list.as_array().into_iter().flatten() {
        for (name, value) in entry["value"].as_object().into_iter().flatten() {
            table.push(json!({"kind": kind, "owner": entry[key], "limit": name, "value": value}));
        }
    }
}

pub(super) fn limit(command: LimitCommand, connection: &Connection) -> Result<(), Failure> {
    let api = client(connection);
    let json_out = connection.output == Output::Json;
    match command {
        LimitCommand::List => {
            let mut all = Vec::new();
            rows(&api.get("/api/vhost-limits")?, "vhost", "vhost", &mut all);
            rows(&api.get("/api/user-limits")?, "user", "user", &mut all);
            print_list(
                &Value::Array(all),
                json_out,
                &["kind", "owner", "limit", "value"],
                |row| {
                    ["kind", "owner", "limit", "value"]
                        .iter()
                        .map(|key| cell(&row[*key]))
                        .collect()
                },
            );
        }
        LimitCommand::Set { owner, name, value } => {
            api.send("PUT", &owner.path(&name), Some(&json!({"value": value})))?;
            if json_out {
                print_json(&json!({"limit": name, "value": value}));
            } else {
                println!("set {name} = {value} on {}", owner.describe());
            }
        }
        LimitCommand::Clear { owner, name } => {
            api.send("DELETE", &owner.path(&name), None)?;
            if json_out {
                print_json(&json!({"cleared": name}));
            } else {
                println!("cleared {name} on {}", owner.describe());
            }
        }
    }
    Ok(())
}
