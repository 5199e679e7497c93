//! The admin subcommands of `sluice`: parsing and printing; the broker does the work.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::client::{Client, Failure, segment};
use super::table::Table;

/// Messages sent per publish request by `produce`.
const PRODUCE_CHUNK: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// How to reach the broker's admin API.
#[derive(Debug, Args)]
pub struct Connection {
    /// The admin API's address.
    #[arg(
        long,
        global = true,
        env = "SLUICE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    #[arg(long, global = true, env = "SLUICE_USER", default_value = "guest")]
    user: String,
    #[arg(
        long,
        global = true,
        env = "SLUICE_PASSWORD",
        default_value = "guest",
        hide_env_values = true
    )]
    password: String,
    /// `table` for people, `json` for scripts.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, Subcommand)]
pub enum Cli {
    /// Version, uptime, totals and current rates of a running broker.
    Status(Status),
    /// Create, list, inspect, change and delete topics.
    Topic(TopicArgs),
    /// Declare, list, purge and delete queues.
    Queue(QueueArgs),
    /// Declare, list and delete exchanges.
    Exchange(ExchangeArgs),
    /// Bind queues and exchanges to exchanges, list and remove bindings.
    Binding(BindingArgs),
    /// Inspect consumer groups and move their offsets.
    Group(GroupArgs),
    /// Create, list and delete virtual hosts.
    Vhost(VhostArgs),
    /// Create, list and delete users.
    User(UserArgs),
    /// Set, list and clear users' permissions in virtual hosts.
    Permission(PermissionArgs),
    /// Publish lines from standard input or a file to a topic.
    Produce(Produce),
    /// Read messages from a topic, or take them from a queue (--queue).
    Consume(Consume),
}

#[derive(Debug, Args)]
pub struct QueueArgs {
    #[command(subcommand)]
    command: QueueCommand,
    /// The virtual host.
    #[arg(long, global = true, default_value = "/")]
    vhost: String,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
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

#[derive(Debug, Args)]
pub struct ExchangeArgs {
    #[command(subcommand)]
    command: ExchangeCommand,
    /// The virtual host.
    #[arg(long, global = true, default_value = "/")]
    vhost: String,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Subcommand)]
enum ExchangeCommand {
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

#[derive(Debug, Args)]
pub struct BindingArgs {
    #[command(subcommand)]
    command: BindingCommand,
    /// The virtual host.
    #[arg(long, global = true, default_value = "/")]
    vhost: String,
    #[command(flatten)]
    connection: Connection,
}

/// One binding, as `binding add` and `binding remove` take it.
#[derive(Debug, Args)]
struct BindingSpec {
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
enum BindingCommand {
    /// Bind a queue or exchange to an exchange.
    Add(BindingSpec),
    /// List bindings.
    List,
    /// Remove a binding.
    Remove(BindingSpec),
}

#[derive(Debug, Args)]
pub struct Status {
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Args)]
pub struct TopicArgs {
    #[command(subcommand)]
    command: TopicCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, short = 'p')]
        partitions: Option<u32>,
        /// A config override, `key=value`; repeat for more.
        #[arg(long = "config", short = 'c', value_parser = key_value)]
        config: Vec<(String, String)>,
    },
    /// List topics.
    List,
    /// Show a topic's partitions and configuration.
    Describe { name: String },
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
    /// Delete a topic and its data.
    Delete { name: String },
}

#[derive(Debug, Args)]
pub struct VhostArgs {
    #[command(subcommand)]
    command: VhostCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Subcommand)]
enum VhostCommand {
    /// List virtual hosts with their counts.
    List,
    /// Create a virtual host (with its default exchanges); not an error if it exists.
    Add { name: String },
    /// Delete a virtual host with its exchanges, queues, messages, bindings and permissions;
    /// its AMQP connections are closed.
    Delete { name: String },
}

#[derive(Debug, Args)]
pub struct UserArgs {
    #[command(subcommand)]
    command: UserCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Subcommand)]
enum UserCommand {
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

#[derive(Debug, Args)]
pub struct PermissionArgs {
    #[command(subcommand)]
    command: PermissionCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Subcommand)]
enum PermissionCommand {
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

#[derive(Debug, Args)]
pub struct GroupArgs {
    #[command(subcommand)]
    command: GroupCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// List consumer groups with their state and lag.
    List,
    /// Show a group's members, assignments, and lag per partition.
    Describe { group: String },
    /// Move a group's committed offsets (its consumers must be stopped).
    ResetOffsets(ResetOffsets),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to_earliest", "to_latest", "to_timestamp", "to_offset"])))]
struct ResetOffsets {
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

#[derive(Debug, Args)]
pub struct Produce {
    topic: String,
    /// Read lines from this file instead of standard input.
    #[arg(long, short = 'f')]
    file: Option<std::path::PathBuf>,
    /// Split each line into key and value at the first occurrence of this string.
    #[arg(long, short = 'k')]
    key_separator: Option<String>,
    /// Every message gets this key (when lines carry no key).
    #[arg(long)]
    key: Option<String>,
    #[arg(long, short = 'p')]
    partition: Option<u32>,
    /// A header for every message, `key=value`; repeat for more.
    #[arg(long = "header", short = 'H', value_parser = key_value)]
    headers: Vec<(String, String)>,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Args)]
pub struct Consume {
    /// The topic to read (or, with --queue, the queue to take messages from).
    topic: String,
    /// Take messages from this queue instead: they leave the queue unless --requeue.
    #[arg(long, conflicts_with_all = ["partition", "from_beginning", "offset", "follow"])]
    queue: bool,
    /// With --queue: put the messages back (peek).
    #[arg(long, requires = "queue")]
    requeue: bool,
    /// With --queue: the virtual host.
    #[arg(long, default_value = "/")]
    vhost: String,
    #[arg(long, short = 'p')]
    partition: Option<u32>,
    /// Start at each partition's first offset.
    #[arg(long, conflicts_with = "offset")]
    from_beginning: bool,
    /// Start at this offset (needs --partition).
    #[arg(long, requires = "partition")]
    offset: Option<u64>,
    /// Stop after this many messages.
    #[arg(long, short = 'n', default_value_t = 10)]
    count: usize,
    /// Keep waiting for new messages until --count have arrived.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    connection: Connection,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {text:?}"))
}

fn client(connection: &Connection) -> Client {
    Client::new(&connection.url, &connection.user, &connection.password)
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// Prints a listing: as JSON for scripts, else one table row per element made by `row`.
fn print_list(list: &Value, json_out: bool, headers: &[&str], row: impl Fn(&Value) -> Vec<String>) {
    if json_out {
        print_json(list);
        return;
    }
    let mut table = Table::new(headers);
    for item in list.as_array().into_iter().flatten() {
        table.row(row(item));
    }
    print!("{}", table.render());
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Runs an admin subcommand; returns the process exit status.
pub fn run(command: Cli) -> ExitCode {
    let result = match command {
        Cli::Status(args) => status(&args.connection),
        Cli::Topic(args) => topic(args.command, &args.connection),
        Cli::Queue(args) => queue(args.command, &args.vhost, &args.connection),
        Cli::Exchange(args) => exchange(args.command, &args.vhost, &args.connection),
        Cli::Binding(args) => binding(args.command, &args.vhost, &args.connection),
        Cli::Group(args) => group(args.command, &args.connection),
        Cli::Vhost(args) => vhost(args.command, &args.connection),
        Cli::User(args) => user(args.command, &args.connection),
        Cli::Permission(args) => permission(args.command, &args.connection),
        Cli::Produce(args) => produce(&args),
        Cli::Consume(args) if args.queue => consume_queue(&args),
        Cli::Consume(args) => consume(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message());
            ExitCode::from(failure.exit_code())
        }
    }
}

fn status(connection: &Connection) -> Result<(), Failure> {
    let overview = client(connection).get("/api/overview")?;
    if connection.output == Output::Json {
        print_json(&overview);
        return Ok(());
    }
    let totals = &overview["totals"];
    let rates = &overview["rates"];
    let mut table = Table::new(&["field", "value"]);
    let rows = [
        ("version", cell(&overview["version"])),
        ("node", cell(&overview["node_id"])),
        ("cluster", cell(&overview["cluster_id"])),
        (
            "uptime",
            format!("{}s", overview["uptime_ms"].as_u64().unwrap_or(0) / 1000),
        ),
        ("topics", cell(&totals["topics"])),
        ("partitions", cell(&totals["partitions"])),
        ("records", cell(&totals["records"])),
        ("log bytes", cell(&totals["log_bytes"])),
        ("consumer groups", cell(&totals["consumer_groups"])),
        ("queues", cell(&totals["queues"])),
        ("messages ready", cell(&totals["messages_ready"])),
        ("messages unacked", cell(&totals["messages_unacknowledged"])),
        ("connections", cell(&totals["connections"])),
        ("channels", cell(&totals["channels"])),
        (
            "records in/s",
            format!("{:.0}", rates["records_in_per_s"].as_f64().unwrap_or(0.0)),
        ),
        (
            "records out/s",
            format!("{:.0}", rates["records_out_per_s"].as_f64().unwrap_or(0.0)),
        ),
        (
            "messages published/s",
            format!(
                "{:.0}",
                rates["messages_published_per_s"].as_f64().unwrap_or(0.0)
            ),
        ),
        (
            "messages delivered/s",
            format!(
                "{:.0}",
                rates["messages_delivered_per_s"].as_f64().unwrap_or(0.0)
            ),
        ),
        (
            "alarms",
            match totals["alarms"].as_array() {
                Some(list) if !list.is_empty() => {
                    list.iter().map(cell).collect::<Vec<_>>().join(", ")
                }
                _ => "none".to_owned(),
            },
        ),
    ];
    for (field, value) in rows {
        table.row(vec![field.to_owned(), value]);
    }
    for (protocol, address) in overview["listeners"].as_object().into_iter().flatten() {
        table.row(vec![format!("{protocol} listener"), cell(address)]);
    }
    print!("{}", table.render());
    Ok(())
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
        "start offset",
        "high watermark",
        "size bytes",
        "segments",
    ]);
    for p in detail["partitions"].as_array().into_iter().flatten() {
        partitions.row(vec![
            cell(&p["partition"]),
            cell(&p["leader"]),
            cell(&p["log_start_offset"]),
            cell(&p["high_watermark"]),
            cell(&p["size_bytes"]),
            cell(&p["segments"]),
        ]);
    }
    print!("{}", partitions.render());
    println!();
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

fn topic(command: TopicCommand, connection: &Connection) -> Result<(), Failure> {
    let api = client(connection);
    let json_out = connection.output == Output::Json;
    match command {
        TopicCommand::Create {
            name,
            partitions,
            config,
        } => {
            let config: serde_json::Map<String, Value> = config
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            let created = api.send(
                "POST",
                "/api/topics",
                Some(&json!({"name": name, "partitions": partitions, "config": config})),
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

fn group(command: GroupCommand, connection: &Connection) -> Result<(), Failure> {
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

fn produce(args: &Produce) -> Result<(), Failure> {
    let api = client(&args.connection);
    let reader: Box<dyn BufRead> = match &args.file {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path)
                .map_err(|e| Failure::Usage(format!("cannot open {}: {e}", path.display())))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let total_bytes = args
        .file
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.len());
    let progress = total_bytes
        .filter(|_| args.connection.output == Output::Table)
        .map(|bytes| {
            let bar = indicatif::ProgressBar::new(bytes);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
    let headers: serde_json::Map<String, Value> = args
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let path = format!("/api/topics/{}/messages", segment(&args.topic));
    let mut chunk: Vec<Value> = Vec::with_capacity(PRODUCE_CHUNK);
    let flush = |chunk: &mut Vec<Value>| -> Result<(), Failure> {
        if !chunk.is_empty() {
            api.send("POST", &path, Some(&Value::Array(std::mem::take(chunk))))?;
        }
        Ok(())
    };
    let mut count = 0usize;
    for line in reader.lines() {
        let line = line.map_err(|e| Failure::Usage(format!("reading input: {e}")))?;
        if let Some(bar) = &progress {
            bar.inc(line.len() as u64 + 1);
        }
        let (key, value) = match &args.key_separator {
            Some(separator) => match line.split_once(separator.as_str()) {
                Some((k, v)) => (Some(k.to_owned()), v.to_owned()),
                None => (args.key.clone(), line),
            },
            None => (args.key.clone(), line),
        };
        chunk.push(
            json!({"key": key, "value": value, "partition": args.partition, "headers": headers}),
        );
        count += 1;
        if chunk.len() == PRODUCE_CHUNK {
            flush(&mut chunk)?;
        }
    }
    flush(&mut chunk)?;
    if let Some(bar) = &progress {
        bar.finish_and_clear();
    }
    if args.connection.output == Output::Json {
        print_json(&json!({"topic": args.topic, "messages": count}));
    } else {
        println!("published {count} messages to {}", args.topic);
    }
    Ok(())
}

fn consume(args: &Consume) -> Result<(), Failure> {
    let api = client(&args.connection);
    let topic = segment(&args.topic);
    let detail = api.get(&format!("/api/topics/{topic}"))?;
    let partitions: Vec<(u64, u64, u64)> = detail["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            args.partition
                .is_none_or(|wanted| p["partition"].as_u64() == Some(u64::from(wanted)))
        })
        .map(|p| {
            (
                p["partition"].as_u64().unwrap_or(0),
                p["log_start_offset"].as_u64().unwrap_or(0),
                p["high_watermark"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    if partitions.is_empty() {
        return Err(Failure::Refused(format!(
            "topic {} has no partition {:?}",
            args.topic, args.partition
        )));
    }
    // Next offset to read in each partition.
    let mut positions: Vec<(u64, u64)> = partitions
        .iter()
        .map(|(p, start, end)| {
            let from = match (args.offset, args.from_beginning) {
                (Some(offset), _) => offset,
                (None, true) => *start,
                (None, false) if args.follow => *end,
                (None, false) => end.saturating_sub(args.count as u64).max(*start),
            };
            (*p, from)
        })
        .collect();
    let json_out = args.connection.output == Output::Json;
    let mut table = Table::new(&["partition", "offset", "key", "value"]);
    let mut shown = 0usize;
    loop {
        let mut progressed = false;
        for (partition, next) in &mut positions {
            if shown >= args.count {
                break;
            }
            let wanted = args.count - shown;
            let batch = api.get(&format!(
                "/api/topics/{topic}/messages?partition={partition}&offset={next}&limit={wanted}"
            ))?;
            for message in batch.as_array().into_iter().flatten() {
                *next = message["offset"].as_u64().unwrap_or(*next) + 1;
                shown += 1;
                progressed = true;
                if json_out {
                    println!("{message}");
                    let _ = std::io::stdout().flush();
                } else if args.follow {
                    println!(
                        "{}\t{}\t{}\t{}",
                        cell(&message["partition"]),
                        cell(&message["offset"]),
                        cell(&message["key"]),
                        cell(&message["value"])
                    );
                } else {
                    table.row(vec![
                        cell(&message["partition"]),
                        cell(&message["offset"]),
                        cell(&message["key"]),
                        cell(&message["value"]),
                    ]);
                }
            }
        }
        if shown >= args.count || (!args.follow && !progressed) {
            break;
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    if !json_out && !args.follow {
        print!("{}", table.render());
    }
    Ok(())
}

/// A typed argument value: integers, floats and booleans as such, anything else as text.
fn typed(value: &str) -> Value {
    if let Ok(i) = value.parse::<i64>() {
        return json!(i);
    }
    if let Ok(f) = value.parse::<f64>() {
        return json!(f);
    }
    match value {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::String(value.to_owned()),
    }
}

fn arguments(pairs: &[(String, String)]) -> Value {
    Value::Object(pairs.iter().map(|(k, v)| (k.clone(), typed(v))).collect())
}

fn queue(command: QueueCommand, vhost: &str, connection: &Connection) -> Result<(), Failure> {
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

fn vhost(command: VhostCommand, connection: &Connection) -> Result<(), Failure> {
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

fn user(command: UserCommand, connection: &Connection) -> Result<(), Failure> {
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

fn permission(command: PermissionCommand, connection: &Connection) -> Result<(), Failure> {
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

fn exchange(command: ExchangeCommand, vhost: &str, connection: &Connection) -> Result<(), Failure> {
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

fn binding_body(spec: &BindingSpec) -> Value {
    json!({
        "source": spec.source,
        "destination": spec.destination,
        "destination_type": if spec.to_exchange { "exchange" } else { "queue" },
        "routing_key": spec.routing_key,
        "arguments": arguments(&spec.arguments),
    })
}

fn binding(command: BindingCommand, vhost: &str, connection: &Connection) -> Result<(), Failure> {
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

/// `consume --queue`: takes up to `count` messages from a queue through the admin API.
fn consume_queue(args: &Consume) -> Result<(), Failure> {
    let api = client(&args.connection);
    let path = format!(
        "/api/queues/{}/{}/get",
        segment(&args.vhost),
        segment(&args.topic)
    );
    let json_out = args.connection.output == Output::Json;
    let mut table = Table::new(&["exchange", "routing key", "redelivered", "payload"]);
    let mut remaining = args.count;
    while remaining > 0 {
        let wanted = remaining.min(100);
        let batch = api.send(
            "POST",
            &path,
            Some(&json!({"count": wanted, "requeue": args.requeue})),
        )?;
        let messages = batch.as_array().cloned().unwrap_or_default();
        for message in &messages {
            if json_out {
                println!("{message}");
            } else {
                let payload = match &message["payload"] {
                    Value::String(text) => text.clone(),
                    _ => format!("(base64) {}", cell(&message["payload_base64"])),
                };
                table.row(vec![
                    cell(&message["exchange"]),
                    cell(&message["routing_key"]),
                    cell(&message["redelivered"]),
                    payload,
                ]);
            }
        }
        // Requeued messages come back first: one round is all a peek can show.
        if messages.len() < wanted || args.requeue {
            break;
        }
        remaining -= messages.len();
    }
    if !json_out {
        print!("{}", table.render());
    }
    Ok(())
}
