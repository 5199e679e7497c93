//! `sluice-bench`: the command line of the benchmark tool.
//!
//! Each subcommand is a thin shell over the library: parse options, run, write the JSON and
//! Markdown results (and charts) where asked, print the Markdown table on stdout. Progress
//! goes to stderr so stdout stays clean for the results.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use sluice_bench::amqp::{self, AmqpOptions};
use sluice_bench::kafka::{self, KafkaOptions};
use sluice_bench::limits::{self, LimitsOptions};
use sluice_bench::report::{RunReport, write_json, write_text};
use sluice_bench::storage::{self, StorageOptions};
use sluice_bench::{chart, definitions, suite};

#[derive(Debug, Parser)]
#[command(
    name = "sluice-bench",
    version,
    about = "Measures Sluice and its peers: Kafka and AMQP 0-9-1 load, the storage engine, and the machine's limits."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Producers through librdkafka, consumers through librdkafka or a lean client of the
    /// tool's own (`--client raw`), against any Kafka-protocol broker.
    Kafka {
        #[command(flatten)]
        options: KafkaOptions,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Publishers and consumers through lapin against any AMQP 0-9-1 broker.
    Amqp {
        #[command(flatten)]
        options: AmqpOptions,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// The storage engine on its own: appends, reads, reopen.
    Storage {
        #[command(flatten)]
        options: StorageOptions,
        /// Write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the result as Markdown here.
        #[arg(long)]
        markdown: Option<PathBuf>,
        #[arg(long)]
        quiet: bool,
    },
    /// The machine's limits: fio (disk) and iperf3 (loopback).
    Limits {
        #[command(flatten)]
        options: LimitsOptions,
        /// Write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long)]
        quiet: bool,
    },
    /// Everything above against Sluice and RabbitMQ, gathered into one table.
    Suite(suite::SuiteOptions),
    /// Definition changes per second: topics created (Kafka admin API) and durable queues
    /// declared (AMQP), one change per request, by a few clients at once.
    Definitions {
        #[command(flatten)]
        options: definitions::DefinitionOptions,
        /// Write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct OutputArgs {
    /// Name of the run in reports and chart titles.
    #[arg(long)]
    name: Option<String>,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the result as a Markdown table here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Draw PNG charts (throughput over time, latency percentiles) into this folder.
    #[arg(long)]
    charts: Option<PathBuf>,
    /// No progress display.
    #[arg(long)]
    quiet: bool,
}

fn write_run(report: &RunReport, output: &OutputArgs) -> anyhow::Result<()> {
    if let Some(path) = &output.json {
        write_json(path, report)?;
    }
    let markdown = report.to_markdown();
    if let Some(path) = &output.markdown {
        write_text(path, &markdown)?;
    }
    if let Some(dir) = &output.charts {
        let stem = report
            .name
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_");
        for path in chart::draw_run(report, dir, &stem)? {
            eprintln!("chart: {}", path.display());
        }
    }
    print!("{markdown}");
    if report.missing_count() > 0 {
        eprintln!(
            "warning: {} of {} expected messages did not arrive",
            report.missing_count(),
            report.expected_receive_count
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Kafka { options, output } => {
            let name = output.name.clone().unwrap_or_else(|| "kafka".into());
            let report = kafka::run(&options, &name, output.quiet)
                .await
                .map_err(|error| anyhow::anyhow!(error.chain()))
                .context("kafka workload")?;
            write_run(&report, &output)?;
        }
        Command::Amqp { options, output } => {
            let name = output.name.clone().unwrap_or_else(|| "amqp".into());
            let report = amqp::run(&options, &name, output.quiet)
                .await
                .map_err(|error| anyhow::anyhow!(error.chain()))
                .context("amqp workload")?;
            write_run(&report, &output)?;
        }
        Command::Storage {
            options,
            json,
            markdown,
            quiet,
        } => {
            let report = storage::run(&options, quiet)
                .await
                .map_err(|error| anyhow::anyhow!(error.chain()))
                .context("storage benchmarks")?;
            storage::write(&report, json.as_deref(), markdown.as_deref())?;
            print!("{}", report.to_markdown());
        }
        Command::Limits {
            options,
            json,
            quiet,
        } => {
            let report = limits::run(&options, quiet).await;
            if let Some(path) = &json {
                write_json(path, &report)?;
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Definitions { options, json } => {
            let results = definitions::run(&options)
                .await
                .map_err(|error| anyhow::anyhow!(error.chain()))
                .context("definition changes")?;
            if let Some(path) = &json {
                write_json(path, &results)?;
            }
            print!("{}", definitions::to_markdown(&results));
        }
        Command::Suite(options) => {
            let report = suite::run(&options)
                .await
                .map_err(|error| anyhow::anyhow!(error.chain()))
                .context("benchmark suite")?;
            print!("{}", suite::summary_markdown(&report));
            eprintln!("results: {}", options.out.display());
        }
    }
    Ok(())
}
