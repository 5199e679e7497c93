//! `sluice permission`: set, list and clear users' permissions in virtual hosts.

use clap::{Args, Subcommand};
use serde_json::json;

use super::common::{Connection, Output, cell, client, print_json, print_list};
use crate::cli::client::{Failure, segment};

#[derive(Debug, Args)]
pub struct PermissionArgs {
    #[command(subcommand)]
    pub(super) command: PermissionCommand,
    #[command(flatten)]
    pub(super) connection: Connection,
}

#[derive(Debug, Subcommand)]
pub(super) enum PermissionCommand {
    /// List every user's permissions in every virtual host.
    List,
    /// Let a user into a virtual host: regular expressions over the names of the resources it
    /// may configure (declare, delete), write (publish to) and read (consume from, bind).
    Set {
        /// The user (not `--user`: that is who talks to the admin API).
        #[arg(value_name = "USER")]
        username: String,
        #[arg(long, default_value = "/")]
        vhost: String,
        #[arg(long, default_value = ".*")]
        configure: String,
        #[arg(long, default_value = ".*")]
        write: String,
        #[arg(long, default_value = ".*")]
        read: String,
    },
    /// Take a user's permissions in a virtual host away.
    Clear {
        /// The user (not `--user`: that is who talks to the admin API).
        #[arg(value_name = "USER")]
        username: String,
        #[arg(long, default_value = "/")]
        vhost: String,
    },
}

pub(super) fn permission(
    command: PermissionCommand,
    connection: &Connection,
) -> Result<(), Failure> {
    let api = client(connection);
    let json_out = connection.output == Output::Json;
    match command {
        PermissionCommand::List => {
            let permissions = api.get("/api/permissions")?;
            print_list(
                &permissions,
                json_out,
                &["user", "vhost", "configure", "write", "read"],
                |p| {
                    ["user", "vhost", "configure", "write", "read"]
                        .iter()
                        .map(|key| cell(&p[*key]))
                        .collect()
                },
            );
        }
        PermissionCommand::Set {
            username: user,
            vhost,
            configure,
            write,
            read,
        } => {
            let body = json!({"configure": configure, "write": write, "read": read});
            api.send(
                "PUT",
                &format!("/api/permissions/{}/{}", segment(&vhost), segment(&user)),
                Some(&body),
            )?;
            if json_out {
                print_json(
                    &json!({"user": user, "vhost": vhost, "configure": configure, "write": write, "read": read}),
                );
            } else {
                println!("set permissions of {user} in {vhost}");
            }
        }
        PermissionCommand::Clear {
            username: user,
            vhost,
        } => {
            api.send(
                "DELETE",
                &format!("/api/permissions/{}/{}", segment(&vhost), segment(&user)),
                None,
            )?;
            if json_out {
                print_json(&json!({"cleared": user, "vhost": vhost}));
            } else {
                println!("cleared permissions of {user} in {vhost}");
            }
        }
    }
    Ok(())
}
