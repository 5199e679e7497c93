//! The `sluice` binary: wires the broker core to its front-ends and hosts the command line.
//!
//! It owns process concerns only: configuration, logging, signals, exit codes. Shutdown order:
//! stop accepting connections → let connections finish within the grace period → close every
//! partition (flush and fsync) → exit 0. If a core task dies, the process exits with status 70
//! rather than serve half-dead.

mod amqp_config;
mod cli;
mod config;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Overrides};

/// mimalloc instead of the C library's allocator: see docs/benchmarks.md for what it saved.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status when the configuration is invalid (EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "A message broker with embedded durable storage that speaks Kafka and AMQP 0-9-1"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    #[command(flatten)]
    Admin(cli::AdminCommand),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// A TOML configuration file (see sluice.example.toml).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Where data is kept [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Kafka listener address, for example 127.0.0.1:9092 (port 0 picks a free port).
    #[arg(long)]
    kafka_listen: Option<String>,
    /// AMQP 0-9-1 listener address, for example 127.0.0.1:5672 (port 0 picks a free port).
    #[arg(long)]
    amqp_listen: Option<String>,
    /// Admin API, metrics and console address, for example 127.0.0.1:8080.
    #[arg(long)]
    http_listen: Option<String>,
    /// fsync policy: always, never or interval(<ms>ms).
    #[arg(long)]
    fsync: Option<String>,
    /// Log filter, for example info or sluice_storage=debug,info.
    #[arg(long)]
    log_level: Option<String>,
    /// Cluster listener address, for example 127.0.0.1:7946.
    #[arg(long)]
    cluster_listen: Option<String>,
    /// The cluster address other nodes are told (default: the listen address).
    #[arg(long)]
    cluster_advertise: Option<String>,
    /// Other nodes' cluster addresses, comma-separated: host:port,host:port.
    #[arg(long)]
    cluster_seeds: Option<String>,
    /// Without seeds: wait until a node of a cluster adds this one (`sluice cluster add-node
    /// ADDRESS`) instead of forming a cluster of one.
    #[arg(long)]
    cluster_wait_for_invite: bool,
    /// Once every listener is bound, write their addresses here as JSON.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let overrides = Overrides {
                data_dir: args.data_dir,
                kafka_listen: args.kafka_listen,
                amqp_listen: args.amqp_listen,
                fsync: args.fsync,
                log_level: args.log_level,
                http_listen: args.http_listen,
                cluster_listen: args.cluster_listen,
                cluster_advertise: args.cluster_advertise,
                cluster_seeds: args.cluster_seeds,
                cluster_wait_for_invite: args.cluster_wait_for_invite,
            };
            let config = match Config::load(args.config.as_deref(), &overrides) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("sluice: {error:#}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            serve::run(config, args.ready_file)
        }
        Command::Admin(command) => cli::run(command),
    }
}
