//! `sluice group`: list and describe consumer groups, reset their committed offsets.

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::common::{Connection, Output, cell, client, print_json, print_list};
use crate::cli::client::{Failure, segment};
use crate::cli::table::Table;

#[derive(Debug, Args)]
pub struct GroupArgs {
    #[command(subcommand)]
    pub(super) command: GroupCommand,
    #[command(flatten)]
    pub(super) connection: Connection,
}

#[derive(Debug, Subcommand)]
pub(super) enum GroupCommand {
    /// List consumer groups with their state and lag.
    List,
    /// Show a group's members, assignments, and lag per partition.
    Describe { group: String },
    /// Move a group's committed offsets (its consumers must be stopped).
    ResetOffsets(ResetOffsets),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to_earliest", "to_latest", "to_timestamp", "to_offset"])))]
pub(super) struct ResetOffsets {
    group: String,
    /// Only this topic (default: every topic the group has offsets for).
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    to_earliest: bool,
    #[arg(long)]
    to_latest: bool,
    /// The first offset at or after this time, in ms since the Unix epoch.
    #[arg(long, value_name = "MS")]
    to_timestamp: Option<i64>,
    #[arg(long, value_name = "OFFSET")]
    to_offset: Option<u64>,
    /// Show what would change without committing it.
    #[arg(long)]
    dry_run: bool,
}

pub(super) fn group(command: GroupCommand, connection: &Connection) -> Result<(), Failure> {
    let api = client(connection);
    let json_out = connection.output == Output::Json;
    match command {
        GroupCommand::List => {
            let groups = api.get("/api/groups")?;
            print_list(
                &groups,
                json_out,
                &["group", "state", "members", "lag"],
                |g| {
                    vec![
                        cell(&g["group_id"]),
                        cell(&g["state"]),
                        cell(&g["members"]),
                        cell(&g["lag"]),
                    ]
                },
            );
        }
        GroupCommand::Describe { group } => {
            let detail = api.get(&format!("/api/groups/{}", segment(&group)))?;
            if json_out {
                print_json(&detail);
            } else {
                println!(
                    "group {} state {} protocol {} generation {} lag {}",
                    cell(&detail["group_id"]),
                    cell(&detail["state"]),
                    cell(&detail["protocol"]),
                    cell(&detail["generation"]),
                    cell(&detail["lag"])
                );
                let mut members = Table::new(&["member", "client", "host", "assignment"]);
                for m in detail["members"].as_array().into_iter().flatten() {
                    let assignment: Vec<String> = m["assignment"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| format!("{}{}", cell(&a["topic"]), a["partitions"]))
                        .collect();
                    members.row(vec![
                        cell(&m["member_id"]),
                        cell(&m["client_id"]),
                        cell(&m["client_host"]),
                        assignment.join(" "),
                    ]);
                }
                print!("{}", members.render());
                println!();
                let mut offsets = Table::new(&[
                    "topic",
                    "partition",
                    "committed",
                    "high watermark",
                    "lag",
                    "member",
                ]);
                for o in detail["offsets"].as_array().into_iter().flatten() {
                    offsets.row(vec![
                        cell(&o["topic"]),
                        cell(&o["partition"]),
                        cell(&o["committed"]),
                        cell(&o["high_watermark"]),
                        cell(&o["lag"]),
                        cell(&o["member_id"]),
                    ]);
                }
                print!("{}", offsets.render());
            }
        }
        GroupCommand::ResetOffsets(args) => {
            let mut body = match (
                args.to_earliest,
                args.to_latest,
                args.to_timestamp,
                args.to_offset,
            ) {
                (true, ..) => json!({"to": "earliest"}),
                (_, true, ..) => json!({"to": "latest"}),
                (_, _, Some(ms), _) => json!({"to": "timestamp", "timestamp_ms": ms}),
                (_, _, _, Some(offset)) => json!({"to": "offset", "offset": offset}),
                _ => {
                    return Err(Failure::Usage(
                        "choose one of --to-earliest, --to-latest, --to-timestamp, --to-offset"
                            .into(),
                    ));
                }
            };
            body["dry_run"] = Value::Bool(args.dry_run);
            if let Some(topic) = &args.topic {
                body["topic"] = Value::String(topic.clone());
            }
            let resets = api.send(
                "POST",
                &format!("/api/groups/{}/reset-offsets", segment(&args.group)),
                Some(&body),
            )?;
            if json_out {
                print_json(&resets);
            } else {
                let mut table = Table::new(&["topic", "partition", "previous", "new"]);
                for r in resets.as_array().into_iter().flatten() {
                    table.row(vec![
                        cell(&r["topic"]),
                        cell(&r["partition"]),
                        cell(&r["previous"]),
                        cell(&r["new"]),
                    ]);
                }
                print!("{}", table.render());
                if args.dry_run {
                    println!("(dry run: nothing was committed)");
                }
            }
        }
    }
    Ok(())
}
