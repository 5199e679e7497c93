//! Definition changes per second: topics created through the Kafka admin API and durable queues
//! declared over AMQP, each change on its own request, by a few clients at once. On a cluster
//! every change is committed through the controller group, so this measures the controller's
//! write path (a Raft commit and every node's `meta.redb` write) as a client sees it.

use std::time::{Duration, Instant};

use clap::Args;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde::Serialize;

use crate::error::BenchError;

#[derive(Debug, Clone, Args)]
pub struct DefinitionOptions {
    /// Kafka bootstrap address (`host:port`); topic creation is skipped without it.
    #[arg(long)]
    pub kafka: Option<String>,
    /// AMQP URI; queue declaration is skipped without it.
    #[arg(long)]
    pub amqp_uri: Option<String>,
    /// Changes of each kind.
    #[arg(long, default_value_t = 300)]
    pub count: usize,
    /// Clients making changes at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Prefix of the names made (a run's names must be new to the broker).
    #[arg(long, default_value = "defs")]
    pub prefix: String,
}

/// One kind of change: how many, how fast, how long each took.
#[derive(Debug, Clone, Serialize)]
pub struct DefinitionResult {
    pub kind: &'static str,
    pub count: usize,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn summarize(
    kind: &'static str,
    mut latencies: Vec<Duration>,
    elapsed: Duration,
) -> DefinitionResult {
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    DefinitionResult {
        kind,
        count: latencies.len(),
        per_second: latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    }
}

/// Runs every kind of change the options name.
pub async fn run(options: &DefinitionOptions) -> Result<Vec<DefinitionResult>, BenchError> {
    if options.concurrency == 0 || options.count == 0 {
        return Err(BenchError::Config(
            "--count and --concurrency must be positive".into(),
        ));
    }
    let mut results = Vec::new();
    if let Some(bootstrap) = &options.kafka {
        results.push(create_topics(options, bootstrap).await?);
    }
    if let Some(uri) = &options.amqp_uri {
        results.push(declare_queues(options, uri).await?);
    }
    Ok(results)
}

async fn create_topics(
    options: &DefinitionOptions,
    bootstrap: &str,
) -> Result<DefinitionResult, BenchError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", "sluice-bench-definitions")
        .create()
        .map_err(|error| BenchError::kafka("creating the admin client", error))?;
    let admin = std::sync::Arc::new(admin);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..options.concurrency {
        let admin = std::sync::Arc::clone(&admin);
        let names: Vec<String> = (worker..options.count)
            .step_by(options.concurrency)
            .map(|i| format!("{}-t{i}", options.prefix))
            .collect();
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(names.len());
            let admin_options =
                AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
            for name in names {
                let topic = NewTopic::new(&name, 1, TopicReplication::Fixed(1));
                let began = Instant::now();
                let results = admin
                    .create_topics([&topic], &admin_options)
                    .await
                    .map_err(|error| BenchError::kafka(format!("creating topic {name}"), error))?;
                for result in results {
                    if let Err((name, code)) = result {
                        return Err(BenchError::kafka(
                            format!("creating topic {name}"),
                            rdkafka::error::KafkaError::AdminOp(code),
                        ));
                    }
                }
                latencies.push(began.elapsed());
            }
            Ok::<_, BenchError>(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(options.count);
    while let Some(done) = workers.join_next().await {
        latencies.extend(done.map_err(|e| BenchError::Task(e.to_string()))??);
    }
    Ok(summarize("topic create", latencies, started.elapsed()))
}

async fn declare_queues(
    options: &DefinitionOptions,
    uri: &str,
) -> Result<DefinitionResult, BenchError> {
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..options.concurrency {
        let uri = uri.to_owned();
        let names: Vec<String> = (worker..options.count)
            .step_by(options.concurrency)
            .map(|i| format!("{}-q{i}", options.prefix))
            .collect();
        workers.spawn(async move {
            let connection = Connection::connect(&uri, ConnectionProperties::default())
                .await
                .map_err(|error| BenchError::amqp(format!("connecting to {uri}"), error))?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|error| BenchError::amqp("opening a channel", error))?;
            let mut latencies = Vec::with_capacity(names.len());
            let declare = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            for name in names {
                let began = Instant::now();
                channel
                    .queue_declare(name.as_str().into(), declare, FieldTable::default())
                    .await
                    .map_err(|error| BenchError::amqp(format!("declaring queue {name}"), error))?;
                latencies.push(began.elapsed());
            }
            let _ = connection.close(200, "done".into()).await;
            Ok::<_, BenchError>(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(options.count);
    while let Some(done) = workers.join_next().await {
        latencies.extend(done.map_err(|e| BenchError::Task(e.to_string()))??);
    }
    Ok(summarize(
        "durable queue declare",
        latencies,
        started.elapsed(),
    ))
}

/// The results as a Markdown table.
pub fn to_markdown(results: &[DefinitionResult]) -> String {
    let mut out = String::from(
        "| change | count | per second | p50 ms | p99 ms |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} |\n",
            r.kind, r.count, r.per_second, r.p50_ms, r.p99_ms
        ));
    }
    out
}
