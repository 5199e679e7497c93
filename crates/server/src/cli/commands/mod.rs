//! The admin subcommands of `sluice`: parsing and printing; the broker does the work.
//!
//! One file per subcommand, each holding its arguments and the function that runs it; the
//! connection flags and the printing helpers they share live in `common`.

use std::process::ExitCode;

use clap::Subcommand;

mod binding;
mod cluster;
mod common;
mod consume;
mod exchange;
mod group;
mod limit;
mod permission;
mod produce;
mod queue;
mod status;
mod topic;
mod user;
mod vhost;

use binding::{BindingArgs, binding};
use cluster::{ClusterArgs, cluster};
use consume::{Consume, consume, consume_queue};
use exchange::{ExchangeArgs, exchange};
use group::{GroupArgs, group};
use limit::{LimitArgs, limit};
use permission::{PermissionArgs, permission};
use produce::{Produce, produce};
use queue::{QueueArgs, queue};
use status::{Status, status};
use topic::{TopicArgs, topic};
use user::{UserArgs, user};
use vhost::{VhostArgs, vhost};

#[derive(Debug, Subcommand)]
pub enum Cli {
    /// Version, uptime, totals and current rates of a running broker.
    Status(Status),
    /// The cluster's nodes and controller; remove a node.
    Cluster(ClusterArgs),
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
    /// Set, list and clear limits on virtual hosts and users.
    Limit(LimitArgs),
    /// Publish lines from standard input or a file to a topic.
    Produce(Produce),
    /// Read messages from a topic, or take them from a queue (--queue).
    Consume(Consume),
}

/// Runs an admin subcommand; returns the process exit status.
pub fn run(command: Cli) -> ExitCode {
    let result = match command {
        Cli::Status(args) => status(&args.connection),
        Cli::Cluster(args) => cluster(args.command, &args.connection),
        Cli::Topic(args) => topic(args.command, &args.connection),
        Cli::Queue(args) => queue(args.command, &args.vhost, &args.connection),
        Cli::Exchange(args) => exchange(args.command, &args.vhost, &args.connection),
        Cli::Binding(args) => binding(args.command, &args.vhost, &args.connection),
        Cli::Group(args) => group(args.command, &args.connection),
        Cli::Vhost(args) => vhost(args.command, &args.connection),
        Cli::User(args) => user(args.command, &args.connection),
        Cli::Permission(args) => permission(args.command, &args.connection),
        Cli::Limit(args) => limit(args.command, &args.connection),
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
