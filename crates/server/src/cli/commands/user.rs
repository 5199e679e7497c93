//! `sluice user`: create, list and delete users; a password may come from standard input.

use std::io::BufRead;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::common::{Connection, Output, cell, client, print_json, print_list};
use crate::cli::client::{Failure, segment};

#[derive(Debug, Args)]
pub struct UserArgs {
    #[command(subcommand)]
    pub(super) command: UserCommand,
    #[command(flatten)]
    pub(super) connection: Connection,
}

#[derive(Debug, Subcommand)]
pub(super) enum UserCommand {
    /// List users with their tags and the virtual hosts they have permissions in.
    List,
    /// Create a user, or change an existing user's password and tags.
    Add {
        name: String,
        /// The new password. Without it, the first line of standard input (an existing user
        /// keeps its password if that is empty). Not `password`: that is the admin API's.
        #[arg(value_name = "PASSWORD")]
        new_password: Option<String>,
        /// A tag (`administrator`, `monitoring`, `management`); repeat for more.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Delete a user. Its open connections stay open.
    Delete { name: String },
}

pub(super) fn user(command: UserCommand, connection: &Connection) -> Result<(), Failure> {
    let api = client(connection);
    let json_out = connection.output == Output::Json;
    match command {
        UserCommand::List => {
            let users = api.get("/api/users")?;
            let joined = |value: &Value| {
                value
                    .as_array()
                    .map(|items| items.iter().map(cell).collect::<Vec<_>>().join(","))
                    .unwrap_or_default()
            };
            print_list(&users, json_out, &["name", "tags", "vhosts"], |u| {
                vec![cell(&u["name"]), joined(&u["tags"]), joined(&u["vhosts"])]
            });
        }
        UserCommand::Add {
            name,
            new_password,
            tags,
        } => {
            let password = match new_password {
                Some(password) => password,
                None => {
                    let mut line = String::new();
                    std::io::stdin()
                        .lock()
                        .read_line(&mut line)
                        .map_err(|error| {
                            Failure::Usage(format!(
                                "reading the password from standard input: {error}"
                            ))
                        })?;
                    line.trim_end_matches(['\r', '\n']).to_owned()
                }
            };
            let body = if password.is_empty() {
                json!({"tags": tags})
            } else {
                json!({"password": password, "tags": tags})
            };
            api.send(
                "PUT",
                &format!("/api/users/{}", segment(&name)),
                Some(&body),
            )?;
            if json_out {
                print_json(&json!({"user": name, "tags": tags}));
            } else {
                println!("set user {name}");
            }
        }
        UserCommand::Delete { name } => {
            api.send("DELETE", &format!("/api/users/{}", segment(&name)), None)?;
            if json_out {
                print_json(&json!({"deleted": name}));
            } else {
                println!("deleted user {name}");
            }
        }
    }
    Ok(())
}
