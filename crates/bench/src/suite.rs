//! The suite behind `bench/compare`: the same workloads against Sluice and RabbitMQ in one
//! run, the storage engine on its own, and the machine's limits, gathered into one table of
//! figures and ratios.
//!
//! It owns the list of workloads and their sizes in each mode (full, quick, smoke), the order
//! they run in, and the results folder. It starts the Sluice broker itself when given a
//! binary (and always stops it); RabbitMQ is started by the script and only given here as a
//! URI.
//!
//! Rules it keeps:
//! - A workload that cannot run (no Sluice, a listener the broker does not have yet) is
//!   reported as skipped with the reason; one that fails is reported as failed with the
//!   reason. Neither stops the suite.
//! - Each AMQP workload runs against Sluice and then RabbitMQ back to back, so both see the
//!   machine in the same state; ratios are only taken between figures of the same run.
//! - Nothing here asserts a speed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::amqp::{self, AmqpOptions, ClientChoice, ExchangeChoice};
use crate::chart::{self, BarGroup};
use crate::error::BenchError;
use crate::kafka::{self, ConsumerClient, KafkaOptions};
use crate::limits::{self, LimitsOptions, LimitsReport};
use crate::load::LoadOptions;
use crate::machine::Machine;
use crate::meter;
use crate::report::{RunReport, unix_ms_now, write_json, write_text};
use crate::sluice::{Listeners, SluiceProcess};
use crate::storage::{self, StorageOptions, StorageReport, human_bytes};
use crate::table::{self, Cell, Row};
use sluice_storage::FsyncPolicy;

const SLUICE_START_TIMEOUT: Duration = Duration::from_secs(60);
const SLUICE_STOP_GRACE: Duration = Duration::from_secs(30);
/// Id of the Kafka workload whose send rate sets the load of the latency workload when the
/// end-to-end peak was not measured.
const KAFKA_PEAK_ID: &str = "kafka-produce-100b-acks1";
/// Id of the Kafka workload whose drain rate caps that load then.
const KAFKA_CONSUME_PEAK_ID: &str = "kafka-consume-backlog";
/// Id of the Kafka workload that produces and consumes together as fast as it can: its rate
/// is the peak the latency workload offers half of.
const KAFKA_TOGETHER_PEAK_ID: &str = "kafka-end-to-end-peak";

#[derive(Debug, Clone, clap::Args)]
pub struct SuiteOptions {
    /// The sluice binary to start, with a fresh data directory and loopback ports.
    #[arg(long)]
    pub sluice_bin: Option<PathBuf>,

    /// Use an already running Sluice instead: its Kafka bootstrap address.
    #[arg(long)]
    pub sluice_kafka: Option<String>,

    /// Use an already running Sluice instead: its AMQP URI.
    #[arg(long)]
    pub sluice_amqp: Option<String>,

    /// Process id of an already running Sluice, to sample its memory.
    #[arg(long)]
    pub sluice_pid: Option<u32>,

    /// RabbitMQ to compare with, as an AMQP URI. Without it only Sluice runs.
    #[arg(long)]
    pub rabbitmq_uri: Option<String>,

    /// RabbitMQ's process id (its Erlang VM), to sample its memory.
    #[arg(long)]
    pub rabbitmq_pid: Option<u32>,

    /// Short runs: the whole suite in under three minutes.
    #[arg(long)]
    pub quick: bool,

    /// The smallest runs that still move messages, for CI: seconds, not minutes.
    #[arg(long, conflicts_with = "quick")]
    pub smoke: bool,

    /// Seconds each timed workload runs, instead of the mode's default.
    #[arg(long)]
    pub duration_s: Option<f64>,

    /// The results folder.
    #[arg(long)]
    pub out: PathBuf,

    /// Directory for the storage benchmarks' logs, fio's files and Sluice's data directory
    /// (default: the system's temporary directory). It decides which disk is measured.
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,

    /// Groups to leave out, comma separated: storage, limits, kafka, amqp.
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,

    /// Run only the workloads whose id contains one of these, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,

    #[arg(long)]
    pub no_charts: bool,

    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Full,
    Quick,
    Smoke,
}

/// How big everything is in a mode.
#[derive(Debug, Clone)]
struct Scale {
    duration_s: f64,
    /// Rounds of the paired fio / fsync=never measurement per configuration (the median
    /// round is reported).
    pair_rounds: usize,
    amqp_backlog_count: u64,
    kafka_backlog_count: u64,
    /// Seconds a backlog may take to fill, and the whole backlog workload.
    backlog_send_cap_s: f64,
    backlog_run_cap_s: f64,
    drain_timeout_s: f64,
    storage: StorageOptions,
    limits: LimitsOptions,
}

impl Scale {
    fn new(mode: Mode, scratch: &Path, duration_s: Option<f64>) -> Self {
        let storage = |append_duration_s: f64, bytes: u64, reopen: u64| StorageOptions {
            dir: Some(scratch.to_owned()),
            append_duration_s,
            append_bytes_max: bytes,
            reopen_log_bytes: reopen,
            ..StorageOptions::default()
        };
        let limits = |bytes: u64, seconds: u64| LimitsOptions {
            dir: Some(scratch.to_owned()),
            write_bytes: bytes,
            seconds,
            ..LimitsOptions::default()
        };
        let mut scale = match mode {
            Mode::Full => Self {
                duration_s: 10.0,
                pair_rounds: 3,
                amqp_backlog_count: 5_000_000,
                kafka_backlog_count: 10_000_000,
                backlog_send_cap_s: 200.0,
                backlog_run_cap_s: 380.0,
                drain_timeout_s: 30.0,
                // 1 GiB per append run (and fio run beside it) keeps the paired rounds
                // within the full run's budget; the reopen log stays at the target's 2 GiB.
                storage: storage(3.0, 1 << 30, 2 << 30),
                limits: limits(1 << 30, 10),
            },
            Mode::Quick => Self {
                duration_s: 4.0,
                pair_rounds: 1,
                amqp_backlog_count: 200_000,
                kafka_backlog_count: 500_000,
                backlog_send_cap_s: 40.0,
                backlog_run_cap_s: 70.0,
                drain_timeout_s: 15.0,
                storage: storage(1.0, 256 << 20, 256 << 20),
                limits: limits(256 << 20, 3),
            },
            Mode::Smoke => Self {
                duration_s: 1.0,
                pair_rounds: 1,
                amqp_backlog_count: 5_000,
                kafka_backlog_count: 10_000,
                backlog_send_cap_s: 30.0,
                backlog_run_cap_s: 60.0,
                drain_timeout_s: 10.0,
                storage: StorageOptions {
                    appenders: vec![1, 8],
                    ..storage(0.2, 8 << 20, 16 << 20)
                },
                limits: limits(16 << 20, 1),
            },
        };
        if let Some(duration_s) = duration_s {
            scale.duration_s = duration_s;
        }
        scale
    }

    fn timed(&self) -> LoadOptions {
        LoadOptions {
            duration_s: self.duration_s,
            drain_timeout_s: self.drain_timeout_s,
            ..LoadOptions::default()
        }
    }

    /// A backlog of `count` messages, with time caps on filling it and on the whole run so
    /// that a slow broker cannot stretch the suite past its budget.
    fn backlog(&self, count: u64) -> LoadOptions {
        LoadOptions {
            count: Some(count),
            backlog: true,
            drain_timeout_s: self.drain_timeout_s,
            send_timeout_s: Some(self.backlog_send_cap_s),
            run_timeout_s: self.backlog_run_cap_s,
            ..LoadOptions::default()
        }
    }
}

/// One AMQP workload: the same options go to every broker, with its URI filled in.
#[derive(Debug, Clone)]
pub struct AmqpWorkload {
    pub id: &'static str,
    pub title: &'static str,
    pub options: AmqpOptions,
}

/// One Kafka workload. With `half_of_peak` the target rate is set at run time to half the
/// end-to-end peak measured before it (`kafka-end-to-end-peak`).
#[derive(Debug, Clone)]
pub struct KafkaWorkload {
    pub id: &'static str,
    pub title: &'static str,
    pub options: KafkaOptions,
    pub half_of_peak: bool,
}

fn amqp_workloads(scale: &Scale) -> Vec<AmqpWorkload> {
    let transient = |body_bytes| AmqpOptions {
        body_bytes,
        load: scale.timed(),
        ..AmqpOptions::default()
    };
    let persistent = |body_bytes| AmqpOptions {
        body_bytes,
        persistent: true,
        durable: true,
        confirm: true,
        confirm_window: 256,
        manual_ack: true,
        load: scale.timed(),
        ..AmqpOptions::default()
    };
    vec![
        AmqpWorkload {
            id: "amqp-16b-transient",
            title: "AMQP 1→1, 16 B, transient, auto-ack",
            options: transient(16),
        },
        AmqpWorkload {
            id: "amqp-1k-transient",
            title: "AMQP 1→1, 1 KiB, transient, auto-ack",
            options: transient(1024),
        },
        AmqpWorkload {
            id: "amqp-16b-persistent",
            title: "AMQP 1→1, 16 B, persistent, confirms, manual ack",
            options: persistent(16),
        },
        AmqpWorkload {
            id: "amqp-1k-persistent",
            title: "AMQP 1→1, 1 KiB, persistent, confirms, manual ack",
            options: persistent(1024),
        },
        // The same two 16 B workloads through the tool's lean client: lapin takes most of the
        // two CPUs in the ones above, so these show more of what the brokers themselves do.
        AmqpWorkload {
            id: "amqp-16b-transient-raw",
            title: "AMQP 1→1, 16 B, transient, auto-ack, lean client",
            options: AmqpOptions {
                client: ClientChoice::Raw,
                ..transient(16)
            },
        },
        AmqpWorkload {
            id: "amqp-16b-persistent-raw",
            title: "AMQP 1→1, 16 B, persistent, confirms, manual ack, lean client",
            options: AmqpOptions {
                client: ClientChoice::Raw,
                ..persistent(16)
            },
        },
        AmqpWorkload {
            id: "amqp-fanout4",
            title: "AMQP fan-out 1→4 queues, 1 KiB, transient",
            options: AmqpOptions {
                exchange: ExchangeChoice::Fanout,
                queue_count: 4,
                ..transient(1024)
            },
        },
        AmqpWorkload {
            id: "amqp-backlog",
            title: "AMQP backlog: publish, then drain, 100 B",
            options: AmqpOptions {
                body_bytes: 100,
                // Four publishers fill the backlog in a time the full run can afford; one
                // consumer drains it, so the drain rate is one queue's.
                producers: 4,
                confirm: true,
                confirm_window: 512,
                load: scale.backlog(scale.amqp_backlog_count),
                ..AmqpOptions::default()
            },
        },
    ]
}

fn kafka_workloads(scale: &Scale) -> Vec<KafkaWorkload> {
    let produce = |record_bytes, acks: &str| KafkaOptions {
        record_bytes,
        acks: acks.into(),
        consumers: 0,
        load: scale.timed(),
        ..KafkaOptions::default()
    };
    let consume_backlog = KafkaOptions {
        record_bytes: 100,
        load: scale.backlog(scale.kafka_backlog_count),
        ..KafkaOptions::default()
    };
    vec![
        KafkaWorkload {
            id: KAFKA_PEAK_ID,
            title: "Kafka produce, 100 B, acks=1",
            options: produce(100, "1"),
            half_of_peak: false,
        },
        KafkaWorkload {
            id: "kafka-produce-100b-acks-all",
            title: "Kafka produce, 100 B, acks=-1",
            options: produce(100, "-1"),
            half_of_peak: false,
        },
        KafkaWorkload {
            id: "kafka-produce-1k-acks1",
            title: "Kafka produce, 1 KiB, acks=1",
            options: produce(1024, "1"),
            half_of_peak: false,
        },
        KafkaWorkload {
            id: "kafka-produce-1k-acks-all",
            title: "Kafka produce, 1 KiB, acks=-1",
            options: produce(1024, "-1"),
            half_of_peak: false,
        },
        KafkaWorkload {
            id: "kafka-produce-16k-acks1",
            title: "Kafka produce, 16 KiB, acks=1",
            options: produce(16 * 1024, "1"),
            half_of_peak: false,
        },
        KafkaWorkload {
            id: KAFKA_CONSUME_PEAK_ID,
            title: "Kafka consume from a backlog, 100 B",
            options: consume_backlog.clone(),
            half_of_peak: false,
        },
        // The same drain through the tool's lean consumer: librdkafka's takes most of the two
        // CPUs in the one above, so this shows more of what the broker itself serves.
        KafkaWorkload {
            id: "kafka-consume-backlog-raw",
            title: "Kafka consume from a backlog, 100 B, lean client",
            options: KafkaOptions {
                client: ConsumerClient::Raw,
                ..consume_backlog
            },
            half_of_peak: false,
        },
        // One producer and one consumer at once, unthrottled: what the two together sustain,
        // which is less than either alone when they share two CPUs with the broker.
        KafkaWorkload {
            id: KAFKA_TOGETHER_PEAK_ID,
            title: "Kafka produce and consume at once, 100 B, acks=1",
            options: KafkaOptions {
                record_bytes: 100,
                load: scale.timed(),
                ..KafkaOptions::default()
            },
            half_of_peak: false,
        },
        KafkaWorkload {
            id: "kafka-latency-half-peak",
            title: "Kafka end-to-end latency at half of peak, 100 B, acks=1",
            // Runs after the workloads above: its rate is half of what the one before it
            // sustained.
            options: KafkaOptions {
                record_bytes: 100,
                load: scale.timed(),
                ..KafkaOptions::default()
            },
            half_of_peak: true,
        },
    ]
}

/// What happened to one workload on one broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Ran { report: Box<RunReport> },
    Skipped { reason: String },
    Failed { reason: String },
}

impl Outcome {
    pub fn report(&self) -> Option<&RunReport> {
        match self {
            Self::Ran { report } => Some(report),
            _ => None,
        }
    }

    fn cell(&self, value: impl Fn(&RunReport) -> Option<f64>) -> Cell {
        match self {
            Self::Ran { report } => value(report).map_or_else(Cell::na, Cell::Value),
            Self::Skipped { .. } => Cell::Missing("skipped".into()),
            Self::Failed { .. } => Cell::Missing("failed".into()),
        }
    }

    fn from_result(result: Result<RunReport, BenchError>) -> Self {
        match result {
            Ok(report) => Self::Ran {
                report: Box::new(report),
            },
            // Nothing listening means the broker lacks this listener: not a failure of the
            // workload.
            Err(error @ BenchError::Unreachable { .. }) => Self::Skipped {
                reason: error.chain(),
            },
            Err(error) => Self::Failed {
                reason: error.chain(),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadResult {
    pub id: String,
    pub title: String,
    /// `sluice` or `rabbitmq`.
    pub broker: String,
    pub outcome: Outcome,
    /// JSON, Markdown and charts written for it, relative to the results folder.
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SluiceInfo {
    pub binary: Option<PathBuf>,
    pub pid: Option<u32>,
    pub listeners: Listeners,
    pub refused_flags: Vec<(String, String)>,
    pub exit: Option<String>,
}

/// One round of an fsync=never append run and the fio buffered write run next to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeverPair {
    pub batch_bytes: u64,
    pub appender_count: usize,
    pub append_mb_per_s: f64,
    pub fio_mb_per_s: f64,
    /// Whether fio ran before the append run (else right after it).
    #[serde(default)]
    pub fio_first: bool,
}

/// One round of fsync=always append runs (one per appender count) and the fio write +
/// fdatasync run just before them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlwaysRound {
    pub batch_bytes: u64,
    pub fio_fdatasync_per_s: f64,
    /// `(appenders, batches/s)`.
    pub batches_per_s: Vec<(usize, f64)>,
}

impl AlwaysRound {
    fn rate(&self, appenders: usize) -> Option<f64> {
        self.batches_per_s
            .iter()
            .find(|(count, _)| *count == appenders)
            .map(|(_, rate)| *rate)
    }
}

/// A target the storage issue states, and whether this run met it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteReport {
    pub started_unix_ms: u64,
    pub elapsed_s: f64,
    pub mode: Mode,
    pub machine: Machine,
    pub sluice: Option<SluiceInfo>,
    /// Why Sluice could not be run against, if it could not.
    pub sluice_unavailable: Option<String>,
    pub rabbitmq_uri: Option<String>,
    pub workloads: Vec<WorkloadResult>,
    pub storage: Option<StorageReport>,
    pub storage_error: Option<String>,
    /// Every round of the paired fio / fsync=never measurement.
    #[serde(default)]
    pub never_pairs: Vec<NeverPair>,
    /// Every round of the paired fio / fsync=always measurement.
    #[serde(default)]
    pub always_rounds: Vec<AlwaysRound>,
    pub limits: Option<LimitsReport>,
    pub rows: Vec<Row>,
    pub storage_targets: Vec<TargetCheck>,
}

impl SuiteReport {
    pub fn workload(&self, id: &str, broker: &str) -> Option<&WorkloadResult> {
        self.workloads
            .iter()
            .find(|w| w.id == id && w.broker == broker)
    }
}

/// Where the Sluice workloads go, or why they cannot.
#[derive(Debug)]
struct SluiceTargets {
    kafka: Result<String, String>,
    amqp: Result<String, String>,
    pid: Option<u32>,
}

/// Runs the suite and writes everything into `options.out`.
pub async fn run(options: &SuiteOptions) -> Result<SuiteReport, BenchError> {
    let started = Instant::now();
    let started_unix_ms = unix_ms_now();
    let mode = match (options.quick, options.smoke) {
        (_, true) => Mode::Smoke,
        (true, false) => Mode::Quick,
        (false, false) => Mode::Full,
    };
    let out = options.out.clone();
    std::fs::create_dir_all(&out).map_err(|source| BenchError::io("create", &out, source))?;
    let scratch = options
        .scratch_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&scratch)
        .map_err(|source| BenchError::io("create", &scratch, source))?;
    let scale = Scale::new(mode, &scratch, options.duration_s);
    let skip = |group: &str| options.skip.iter().any(|s| s == group);
    let wanted =
        |id: &str| options.only.is_empty() || options.only.iter().any(|o| id.contains(o.as_str()));

    let mut report = SuiteReport {
        started_unix_ms,
        elapsed_s: 0.0,
        mode,
        machine: Machine::describe(&scratch),
        sluice: None,
        sluice_unavailable: None,
        rabbitmq_uri: options.rabbitmq_uri.clone(),
        workloads: Vec::new(),
        storage: None,
        storage_error: None,
        never_pairs: Vec::new(),
        always_rounds: Vec::new(),
        limits: None,
        rows: Vec::new(),
        storage_targets: Vec::new(),
    };

    let needs_sluice = !(skip("kafka") && skip("amqp"));
    let mut process = None;
    if needs_sluice && let Some(binary) = &options.sluice_bin {
        say(options, &format!("starting {}", binary.display()));
        match SluiceProcess::start(
            binary,
            &scratch,
            &out.join("sluice.log"),
            SLUICE_START_TIMEOUT,
        )
        .await
        {
            Ok(started) => {
                report.sluice = Some(SluiceInfo {
                    binary: Some(binary.clone()),
                    pid: Some(started.pid()),
                    listeners: started.listeners.clone(),
                    refused_flags: started.refused_flags.clone(),
                    exit: None,
                });
                process = Some(started);
            }
            Err(error) => {
                report.sluice_unavailable =
                    Some(format!("sluice did not start: {}", error.chain()));
            }
        }
    }
    let targets = sluice_targets(options, &report);

    // Everything that can fail below is caught per workload, so the broker is always stopped.
    run_groups(options, &scale, &targets, &skip, &wanted, &mut report).await;

    if let Some(process) = process {
        let exit = match process.stop(SLUICE_STOP_GRACE).await {
            Ok(status) => status.to_string(),
            Err(error) => error.chain(),
        };
        if let Some(info) = report.sluice.as_mut() {
            info.exit = Some(exit);
        }
    }

    report.rows = rows(&report);
    report.storage_targets = storage_targets(&report);
    report.elapsed_s = started.elapsed().as_secs_f64();
    if !options.no_charts
        && let Err(error) = summary_charts(&report, &out)
    {
        say(options, &format!("charts not drawn: {}", error.chain()));
    }
    write_json(&out.join("summary.json"), &report)?;
    write_text(&out.join("summary.md"), &summary_markdown(&report))?;
    Ok(report)
}

fn say(options: &SuiteOptions, text: &str) {
    if !options.quiet {
        eprintln!("suite: {text}");
    }
}

fn sluice_targets(options: &SuiteOptions, report: &SuiteReport) -> SluiceTargets {
    let missing = |protocol: &str, flag: &str| -> String {
        if let Some(reason) = &report.sluice_unavailable {
            return reason.clone();
        }
        match &report.sluice {
            None => format!("no Sluice to run against (give --sluice-bin or --sluice-{protocol})"),
            Some(info) => match info.refused_flags.iter().find(|(f, _)| f == flag) {
                Some(_) => format!("sluice does not accept {flag} yet: no {protocol} listener"),
                None => format!("sluice's ready file lists no {protocol} listener"),
            },
        }
    };
    let listeners = report.sluice.as_ref().map(|info| info.listeners.clone());
    let kafka = options
        .sluice_kafka
        .clone()
        .or_else(|| listeners.as_ref().and_then(|l| l.kafka.clone()))
        .ok_or_else(|| missing("kafka", "--kafka-listen"));
    let amqp = options
        .sluice_amqp
        .clone()
        .or_else(|| listeners.as_ref().and_then(Listeners::amqp_uri))
        .ok_or_else(|| missing("amqp", "--amqp-listen"));
    SluiceTargets {
        kafka,
        amqp,
        pid: options
            .sluice_pid
            .or_else(|| report.sluice.as_ref().and_then(|info| info.pid)),
    }
}

async fn run_groups(
    options: &SuiteOptions,
    scale: &Scale,
    targets: &SluiceTargets,
    skip: &dyn Fn(&str) -> bool,
    wanted: &dyn Fn(&str) -> bool,
    report: &mut SuiteReport,
) {
    let out = options.out.clone();
    if !skip("limits") && wanted("limits") {
        say(options, "machine limits (fio, iperf3)");
        let limits_report = limits::run(&scale.limits, options.quiet).await;
        if let Err(error) = write_json(&out.join("limits.json"), &limits_report) {
            say(options, &error.chain());
        }
        report.limits = Some(limits_report);
    }
    if !skip("kafka") {
        for workload in kafka_workloads(scale) {
            if !wanted(workload.id) {
                continue;
            }
            let outcome = run_kafka(options, &workload, targets, report).await;
            record(
                options,
                report,
                workload.id,
                workload.title,
                "sluice",
                outcome,
            );
        }
    }
    if !skip("amqp") {
        for workload in amqp_workloads(scale) {
            if !wanted(workload.id) {
                continue;
            }
            let brokers: Vec<u32> = [targets.pid, options.rabbitmq_pid]
                .into_iter()
                .flatten()
                .collect();
            settle(options, &brokers).await;
            let sluice = match &targets.amqp {
                Ok(uri) => run_amqp(options, &workload, uri, targets.pid).await,
                Err(reason) => Outcome::Skipped {
                    reason: reason.clone(),
                },
            };
            record(
                options,
                report,
                workload.id,
                workload.title,
                "sluice",
                sluice,
            );
            if let Some(uri) = &options.rabbitmq_uri {
                settle(options, &brokers).await;
                let rabbitmq = run_amqp(options, &workload, uri, options.rabbitmq_pid).await;
                record(
                    options,
                    report,
                    workload.id,
                    workload.title,
                    "rabbitmq",
                    rabbitmq,
                );
            }
        }
    }
    // The storage benchmarks come last: they write tens of gigabytes, and network workloads
    // run right after them (whose brokers write what they receive too) measured far below
    // the same workloads on the idle machine.
    if !skip("storage") && wanted("storage") {
        say(options, "storage engine benchmarks");
        let pair = !skip("limits") && limits::fio_available().await;
        match run_storage(options, scale, pair, report).await {
            Ok(storage_report) => {
                if let Err(error) = storage::write(
                    &storage_report,
                    Some(&out.join("storage.json")),
                    Some(&out.join("storage.md")),
                ) {
                    say(options, &error.chain());
                }
                report.storage = Some(storage_report);
            }
            Err(error) => report.storage_error = Some(error.chain()),
        }
    }
}

/// The storage benchmarks. With `pair`, the runs the targets are judged on are taken side by
/// side with fio, in rounds, and the median round is reported: page cache bandwidth and
/// fdatasync latency on a shared machine swing several times over from one minute to the
/// next, so only figures taken next to each other compare.
/// - Each fsync=never run follows a fio buffered write of the same size in the same directory.
/// - Each round of fsync=always runs (every appender count) follows a fio write + fdatasync
///   run with blocks of the batch size.
async fn run_storage(
    options: &SuiteOptions,
    scale: &Scale,
    pair: bool,
    report: &mut SuiteReport,
) -> Result<StorageReport, BenchError> {
    let asked = scale.storage.clone();
    let mut unpaired = asked.clone();
    if pair {
        unpaired.fsync.retain(|f| f != "never" && f != "always");
    }
    let mut storage_report = storage::run(&unpaired, options.quiet).await?;
    storage_report.settings = asked.clone();
    if !pair {
        return Ok(storage_report);
    }
    let base = asked.dir.clone().unwrap_or_else(std::env::temp_dir);
    let rounds_count = scale.pair_rounds.max(1);
    let sync_seconds = asked.append_duration_s.ceil().max(1.0) as u64;
    for &batch_bytes in &asked.batch_bytes {
        let batch = storage::build_batch(batch_bytes as usize, asked.record_bytes as usize);
        if asked.fsync.iter().any(|f| f == "never") {
            for &appenders in &asked.appenders {
                let mut rounds = Vec::with_capacity(rounds_count);
                for round in 0..rounds_count {
                    // Whichever runs second inherits what the first left behind; alternating
                    // the order keeps that from favouring one side.
                    let fio_first = round % 2 == 0;
                    let mut fio_mb_per_s = None;
                    if fio_first {
                        fio_mb_per_s = Some(
                            limits::buffered_write_mb_per_s(&base, asked.append_bytes_max).await?,
                        );
                    }
                    let mut run = storage::append_run(
                        &base,
                        batch_bytes,
                        &batch,
                        FsyncPolicy::Never,
                        appenders,
                        &asked,
                    )
                    .await?;
                    let fio_mb_per_s = match fio_mb_per_s {
                        Some(measured) => measured,
                        None => {
                            limits::buffered_write_mb_per_s(&base, asked.append_bytes_max).await?
                        }
                    };
                    run.paired_fio_mb_per_s = Some(fio_mb_per_s);
                    report.never_pairs.push(NeverPair {
                        batch_bytes,
                        appender_count: appenders,
                        append_mb_per_s: run.mb_per_s,
                        fio_mb_per_s,
                        fio_first,
                    });
                    say(
                        options,
                        &format!(
                            "storage: {} batches, fsync=never, {appenders} appenders: {:.0} MB/s; fio {}: {fio_mb_per_s:.0} MB/s",
                            human_bytes(batch_bytes),
                            run.mb_per_s,
                            if fio_first {
                                "just before"
                            } else {
                                "just after"
                            }
                        ),
                    );
                    rounds.push(run);
                }
                rounds.sort_by(|a, b| paired_ratio(a).total_cmp(&paired_ratio(b)));
                storage_report.appends.push(take_median(rounds));
            }
        }
        if asked.fsync.iter().any(|f| f == "always") {
            let mut by_appenders: Vec<Vec<storage::AppendResult>> =
                vec![Vec::with_capacity(rounds_count); asked.appenders.len()];
            for _ in 0..rounds_count {
                let (fdatasync_per_s, _) =
                    limits::fdatasync_per_s(&base, batch_bytes, sync_seconds).await?;
                let mut round = AlwaysRound {
                    batch_bytes,
                    fio_fdatasync_per_s: fdatasync_per_s,
                    batches_per_s: Vec::new(),
                };
                for (index, &appenders) in asked.appenders.iter().enumerate() {
                    let mut run = storage::append_run(
                        &base,
                        batch_bytes,
                        &batch,
                        FsyncPolicy::Always,
                        appenders,
                        &asked,
                    )
                    .await?;
                    run.paired_fdatasync_per_s = Some(fdatasync_per_s);
                    round.batches_per_s.push((appenders, run.batches_per_s));
                    by_appenders[index].push(run);
                }
                let rates: Vec<String> = round
                    .batches_per_s
                    .iter()
                    .map(|(appenders, rate)| format!("x{appenders} {rate:.0}"))
                    .collect();
                say(
                    options,
                    &format!(
                        "storage: {} batches, fsync=always: batches/s {}; fio write+fdatasync just before: {fdatasync_per_s:.0}/s",
                        human_bytes(batch_bytes),
                        rates.join(", ")
                    ),
                );
                report.always_rounds.push(round);
            }
            for mut runs in by_appenders {
                runs.sort_by(|a, b| a.batches_per_s.total_cmp(&b.batches_per_s));
                storage_report.appends.push(take_median(runs));
            }
        }
    }
    let order = |fsync: &str| {
        asked
            .fsync
            .iter()
            .position(|f| {
                f.parse::<FsyncPolicy>()
                    .is_ok_and(|p| p.to_string() == fsync)
            })
            .unwrap_or(usize::MAX)
    };
    storage_report
        .appends
        .sort_by_key(|a| (a.batch_bytes_asked, order(&a.fsync), a.appender_count));
    Ok(storage_report)
}

/// The middle element of sorted, non-empty `runs`; of two, the lower.
fn take_median(mut runs: Vec<storage::AppendResult>) -> storage::AppendResult {
    let middle = (runs.len().max(1) - 1) / 2;
    runs.swap_remove(middle)
}

fn paired_ratio(run: &storage::AppendResult) -> f64 {
    run.paired_fio_mb_per_s
        .filter(|fio| *fio > 0.0)
        .map_or(0.0, |fio| run.mb_per_s / fio)
}

async fn run_kafka(
    options: &SuiteOptions,
    workload: &KafkaWorkload,
    targets: &SluiceTargets,
    report: &SuiteReport,
) -> Outcome {
    let bootstrap = match &targets.kafka {
        Ok(bootstrap) => bootstrap.clone(),
        Err(reason) => {
            return Outcome::Skipped {
                reason: reason.clone(),
            };
        }
    };
    let mut kafka_options = workload.options.clone();
    kafka_options.bootstrap = bootstrap;
    kafka_options.load.broker_pid = targets.pid;
    if workload.half_of_peak {
        let peak_outcome = report.workload(KAFKA_PEAK_ID, "sluice").map(|w| &w.outcome);
        let peak = peak_outcome
            .and_then(Outcome::report)
            .and_then(|r| r.send)
            .map(|send| send.msgs_per_s)
            .filter(|rate| *rate > 0.0);
        // The end-to-end peak is the lower of what one producer and one consumer managed on
        // their own; offering half of the producer's alone would already overrun a consumer
        // slower than it, and measure a growing queue instead of latency.
        let consume_peak = report
            .workload(KAFKA_CONSUME_PEAK_ID, "sluice")
            .and_then(|w| w.outcome.report())
            .and_then(|r| r.receive)
            .map(|receive| receive.msgs_per_s)
            .filter(|rate| *rate > 0.0);
        // Better still, what a producer and a consumer sustained running at once.
        let together_peak = report
            .workload(KAFKA_TOGETHER_PEAK_ID, "sluice")
            .and_then(|w| w.outcome.report())
            .and_then(|r| Some(r.send?.msgs_per_s.min(r.receive?.msgs_per_s)))
            .filter(|rate| *rate > 0.0);
        let peak = match (together_peak, peak, consume_peak) {
            (Some(together), _, _) => Some(together),
            (None, Some(produce), Some(consume)) => Some(produce.min(consume)),
            (None, peak, _) => peak,
        };
        match (peak, peak_outcome) {
            (Some(peak), _) => kafka_options.load.rate = Some(peak / 2.0),
            (None, Some(Outcome::Skipped { reason } | Outcome::Failed { reason })) => {
                return Outcome::Skipped {
                    reason: format!("needs the peak send rate of {KAFKA_PEAK_ID}: {reason}"),
                };
            }
            (None, _) => {
                return Outcome::Skipped {
                    reason: format!(
                        "needs the peak send rate of {KAFKA_PEAK_ID}, which measured none"
                    ),
                };
            }
        }
    }
    say(options, &format!("{} against sluice", workload.id));
    Outcome::from_result(kafka::run(&kafka_options, workload.id, options.quiet).await)
}

/// Longest wait for the brokers to go quiet before an AMQP run.
const SETTLE_MAX: Duration = Duration::from_secs(30);
/// How long each look at the brokers' CPU use lasts.
const SETTLE_WINDOW: Duration = Duration::from_millis(500);
/// A broker is quiet while it uses less than this share of one CPU.
const SETTLE_BUSY: f64 = 0.05;

/// Waits until every broker in `pids` is quiet, for at most [`SETTLE_MAX`]. Both brokers run
/// side by side, and one still finishing the last run's work (deleting its queues, collecting
/// garbage, writing its store) would take CPU from the next run on a two-CPU machine,
/// whichever broker that run measures.
async fn settle(options: &SuiteOptions, pids: &[u32]) {
    let per_second = rustix::param::clock_ticks_per_second() as f64;
    let started = Instant::now();
    loop {
        let before: Vec<Option<u64>> = pids.iter().map(|pid| meter::cpu_ticks(*pid)).collect();
        tokio::time::sleep(SETTLE_WINDOW).await;
        let busiest = pids
            .iter()
            .zip(&before)
            .filter_map(|(pid, before)| meter::cpu_ticks(*pid)?.checked_sub((*before)?))
            .map(|ticks| ticks as f64 / per_second / SETTLE_WINDOW.as_secs_f64())
            .fold(0.0, f64::max);
        if busiest < SETTLE_BUSY {
            let waited = started.elapsed();
            if waited > SETTLE_WINDOW * 2 {
                say(
                    options,
                    &format!(
                        "waited {:.1} s for the brokers to go quiet",
                        waited.as_secs_f64()
                    ),
                );
            }
            return;
        }
        if started.elapsed() >= SETTLE_MAX {
            say(
                options,
                &format!(
                    "a broker is still busy ({:.0}% of a CPU) after {} s; running anyway",
                    busiest * 100.0,
                    SETTLE_MAX.as_secs()
                ),
            );
            return;
        }
    }
}

async fn run_amqp(
    options: &SuiteOptions,
    workload: &AmqpWorkload,
    uri: &str,
    pid: Option<u32>,
) -> Outcome {
    let mut amqp_options = workload.options.clone();
    amqp_options.uri = uri.to_owned();
    amqp_options.load.broker_pid = pid;
    say(options, &format!("{} against {}", workload.id, redact(uri)));
    Outcome::from_result(amqp::run(&amqp_options, workload.id, options.quiet).await)
}

/// The URI without its password, for logs.
fn redact(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &uri[scheme_end + 3..at];
            let user = credentials.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &uri[..scheme_end + 3], &uri[at..])
        }
        _ => uri.to_owned(),
    }
}

/// Writes a workload's files and adds it to the report.
fn record(
    options: &SuiteOptions,
    report: &mut SuiteReport,
    id: &str,
    title: &str,
    broker: &str,
    outcome: Outcome,
) {
    let mut files = Vec::new();
    let stem = format!("{broker}-{id}");
    match &outcome {
        Outcome::Ran { report: run } => {
            let json = PathBuf::from(format!("{stem}.json"));
            let markdown = PathBuf::from(format!("{stem}.md"));
            let written = write_json(&options.out.join(&json), run.as_ref())
                .and_then(|()| write_text(&options.out.join(&markdown), &run.to_markdown()));
            match written {
                Ok(()) => files.extend([json, markdown]),
                Err(error) => say(options, &error.chain()),
            }
            if !options.no_charts {
                match chart::draw_run(run, &options.out.join("charts"), &stem) {
                    Ok(paths) => files.extend(paths.into_iter().map(|p| {
                        p.strip_prefix(&options.out)
                            .map(Path::to_owned)
                            .unwrap_or(p)
                    })),
                    Err(error) => say(options, &format!("charts not drawn: {}", error.chain())),
                }
            }
            let receive = run
                .receive
                .map_or("-".into(), |r| format!("{:.0} msg/s", r.msgs_per_s));
            let send = run
                .send
                .map_or("-".into(), |s| format!("{:.0} msg/s", s.msgs_per_s));
            say(
                options,
                &format!(
                    "{stem}: sent {send}, received {receive}, errors {}",
                    run.error_count
                ),
            );
        }
        Outcome::Skipped { reason } => say(options, &format!("{stem} skipped: {reason}")),
        Outcome::Failed { reason } => say(options, &format!("{stem} failed: {reason}")),
    }
    report.workloads.push(WorkloadResult {
        id: id.to_owned(),
        title: title.to_owned(),
        broker: broker.to_owned(),
        outcome,
        files,
    });
}

fn missing_outcome() -> Outcome {
    Outcome::Skipped {
        reason: "not run".into(),
    }
}

/// Builds the comparison table.
pub fn rows(report: &SuiteReport) -> Vec<Row> {
    let mut rows = Vec::new();
    let loopback = report.limits.as_ref().and_then(|l| l.loopback_mb_per_s);
    let outcome = |id: &str, broker: &str| {
        report
            .workload(id, broker)
            .map_or_else(missing_outcome, |w| w.outcome.clone())
    };
    let titles: Vec<(String, String)> = {
        let mut seen: Vec<(String, String)> = Vec::new();
        for w in &report.workloads {
            if !seen.iter().any(|(id, _)| *id == w.id) {
                seen.push((w.id.clone(), w.title.clone()));
            }
        }
        seen
    };
    for (id, title) in &titles {
        let sluice = outcome(id, "sluice");
        let rabbitmq = if id.starts_with("amqp") {
            outcome(id, "rabbitmq")
        } else {
            Outcome::Skipped {
                reason: "n/a".into(),
            }
        };
        let rabbit_cell = |value: &dyn Fn(&RunReport) -> Option<f64>| {
            if id.starts_with("amqp") {
                rabbitmq.cell(value)
            } else {
                Cell::na()
            }
        };
        let mut add = |figure: &str,
                       unit: &str,
                       value: &dyn Fn(&RunReport) -> Option<f64>,
                       limit: Option<(f64, &str)>,
                       higher_is_better: bool| {
            rows.push(Row {
                figure: format!("{title}: {figure}"),
                unit: unit.to_owned(),
                sluice: sluice.cell(value),
                rabbitmq: rabbit_cell(value),
                limit: limit.map(|(v, _)| v),
                limit_name: limit.map(|(_, name)| name.to_owned()),
                higher_is_better,
            });
        };
        let net_limit = loopback.map(|v| (v, "iperf3 loopback"));
        let send_rate = |r: &RunReport| r.send.map(|s| s.msgs_per_s);
        let send_mb = |r: &RunReport| r.send.map(|s| s.mb_per_s);
        let receive_rate = |r: &RunReport| r.receive.map(|s| s.msgs_per_s);
        let receive_mb = |r: &RunReport| r.receive.map(|s| s.mb_per_s);
        let p50 = |r: &RunReport| r.latency.as_ref().map(|l| l.p50_us as f64 / 1000.0);
        let p99 = |r: &RunReport| r.latency.as_ref().map(|l| l.p99_us as f64 / 1000.0);
        let p999 = |r: &RunReport| r.latency.as_ref().map(|l| l.p999_us as f64 / 1000.0);
        let rss = |r: &RunReport| r.broker_rss.map(|m| m.peak_bytes as f64 / 1048576.0);
        if id.contains("backlog") {
            let fill = if id.starts_with("kafka") {
                "produce rate (no consumer)"
            } else {
                "publish rate (no consumer)"
            };
            add(fill, "msg/s", &send_rate, None, true);
            add("drain rate", "msg/s", &receive_rate, None, true);
            add("drain rate", "MB/s", &receive_mb, net_limit, true);
            add("broker peak RSS", "MiB", &rss, None, false);
        } else if id.starts_with("kafka-produce") {
            add("produce rate", "msg/s", &send_rate, None, true);
            add("produce rate", "MB/s", &send_mb, net_limit, true);
        } else if id.starts_with("kafka-latency") {
            add("offered load", "msg/s", &send_rate, None, true);
            add("latency p50", "ms", &p50, None, false);
            add("latency p99", "ms", &p99, None, false);
            add("latency p99.9", "ms", &p999, None, false);
        } else {
            add("publish rate", "msg/s", &send_rate, None, true);
            add("delivery rate", "msg/s", &receive_rate, None, true);
            add("delivery rate", "MB/s", &receive_mb, net_limit, true);
            add("latency p50", "ms", &p50, None, false);
            add("latency p99", "ms", &p99, None, false);
        }
    }
    if let Some(storage) = &report.storage {
        storage_rows(storage, report.limits.as_ref(), &mut rows);
    }
    rows
}

fn storage_rows(storage: &StorageReport, limits: Option<&LimitsReport>, rows: &mut Vec<Row>) {
    let buffered = limits.and_then(|l| l.buffered_write_mb_per_s);
    let fdatasync = limits.and_then(|l| l.fdatasync_per_s);
    let sync_block = limits.map_or(0, |l| l.sync_block_bytes);
    let mut add = |figure: String,
                   unit: &str,
                   value: Option<f64>,
                   limit: Option<(f64, String)>,
                   higher_is_better: bool| {
        rows.push(Row {
            figure,
            unit: unit.to_owned(),
            sluice: value.map_or_else(Cell::na, Cell::Value),
            rabbitmq: Cell::na(),
            limit: limit.as_ref().map(|(v, _)| *v),
            limit_name: limit.map(|(_, name)| name),
            higher_is_better,
        });
    };
    for append in &storage.appends {
        let batch = human_bytes(append.batch_bytes_asked);
        let label = format!(
            "storage append, {batch} batches, fsync={}, {} appender{}",
            append.fsync,
            append.appender_count,
            if append.appender_count == 1 { "" } else { "s" }
        );
        match append.fsync.as_str() {
            "never" => {
                let limit = match append.paired_fio_mb_per_s {
                    Some(fio) => Some((fio, "fio buffered write, same round".to_owned())),
                    None => buffered.map(|v| (v, "fio buffered write".to_owned())),
                };
                add(label, "MB/s", Some(append.mb_per_s), limit, true);
            }
            "always" => {
                // fio's fdatasync rate is a limit only for writes of the batch's own size.
                let limit = match append.paired_fdatasync_per_s {
                    Some(rate) => Some((rate, format!("fio {batch} write+fdatasync just before"))),
                    None => fdatasync
                        .filter(|_| append.batch_bytes_asked == sync_block)
                        .map(|v| {
                            (
                                v,
                                format!("fio {} write+fdatasync", human_bytes(sync_block)),
                            )
                        }),
                };
                add(label, "batches/s", Some(append.batches_per_s), limit, true);
            }
            _ => add(label, "MB/s", Some(append.mb_per_s), None, true),
        }
    }
    if let Some(read) = &storage.read {
        add(
            "storage read from page cache".into(),
            "MB/s",
            Some(read.mb_per_s),
            None,
            true,
        );
    }
    if let Some(reopen) = &storage.reopen {
        add(
            format!(
                "storage reopen of a {} log after clean shutdown",
                human_bytes(reopen.log_bytes)
            ),
            "ms",
            Some(reopen.open_ms),
            None,
            false,
        );
    }
}

/// Checks the storage issue's targets against this run. Reported, never asserted.
pub fn storage_targets(report: &SuiteReport) -> Vec<TargetCheck> {
    let mut checks = Vec::new();
    let Some(storage) = &report.storage else {
        return checks;
    };
    let buffered = report
        .limits
        .as_ref()
        .and_then(|l| l.buffered_write_mb_per_s);
    for &batch in &storage.settings.batch_bytes {
        let never: Vec<_> = storage
            .appends
            .iter()
            .filter(|a| a.batch_bytes_asked == batch && a.fsync == "never")
            .collect();
        let reference = |a: &storage::AppendResult| a.paired_fio_mb_per_s.or(buffered);
        let ratio_of = |a: &storage::AppendResult| reference(a).map(|fio| a.mb_per_s / fio);
        let best = never.iter().max_by(|a, b| {
            ratio_of(a)
                .unwrap_or(a.mb_per_s)
                .total_cmp(&ratio_of(b).unwrap_or(b.mb_per_s))
        });
        if let Some(best) = best {
            let ratio = ratio_of(best);
            checks.push(TargetCheck {
                target: format!(
                    "fsync=never appends of {} batches reach ≥ 80% of fio's buffered sequential write bandwidth",
                    human_bytes(batch)
                ),
                measured: match (ratio, reference(best)) {
                    (Some(ratio), Some(fio)) => format!(
                        "{:.0}% ({:.0} MB/s with {} appender{} vs {:.0} MB/s{})",
                        ratio * 100.0,
                        best.mb_per_s,
                        best.appender_count,
                        if best.appender_count == 1 { "" } else { "s" },
                        fio,
                        if best.paired_fio_mb_per_s.is_some() {
                            " in the same round"
                        } else {
                            ""
                        }
                    ),
                    _ => format!("{:.0} MB/s; fio not measured", best.mb_per_s),
                },
                met: ratio.map(|r| r >= 0.8),
            });
        }
        let rounds: Vec<f64> = report
            .always_rounds
            .iter()
            .filter(|round| round.batch_bytes == batch)
            .filter_map(|round| Some(round.rate(64)? / round.rate(1)?.max(1e-9)))
            .collect();
        if !rounds.is_empty() {
            // Each round's 64- and 1-appender runs were taken a few seconds apart; the median
            // of the per-round ratios is the figure.
            let mut sorted = rounds.clone();
            sorted.sort_by(f64::total_cmp);
            let median = sorted[(sorted.len() - 1) / 2];
            checks.push(TargetCheck {
                target: format!(
                    "fsync=always with 64 appenders reaches ≥ 20× the batches/s of one ({} batches)",
                    human_bytes(batch)
                ),
                measured: format!(
                    "{median:.1}× (median of {} rounds: {})",
                    rounds.len(),
                    rounds
                        .iter()
                        .map(|r| format!("{r:.1}×"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                met: Some(median >= 20.0),
            });
        } else if let (Some(one), Some(many)) = (
            storage.append(batch, "always", 1),
            storage.append(batch, "always", 64),
        ) {
            let ratio = many.batches_per_s / one.batches_per_s.max(1e-9);
            checks.push(TargetCheck {
                target: format!(
                    "fsync=always with 64 appenders reaches ≥ 20× the batches/s of one ({} batches)",
                    human_bytes(batch)
                ),
                measured: format!(
                    "{ratio:.1}× ({:.0} vs {:.0} batches/s)",
                    many.batches_per_s, one.batches_per_s
                ),
                met: Some(ratio >= 20.0),
            });
        }
    }
    if let Some(reopen) = &storage.reopen {
        let full_size = reopen.log_bytes >= 2 << 30;
        checks.push(TargetCheck {
            target: "reopening a 2 GiB log after a clean shutdown takes < 1 s".into(),
            measured: format!(
                "{:.1} ms for a {} log{}",
                reopen.open_ms,
                human_bytes(reopen.log_bytes),
                if full_size {
                    ""
                } else {
                    " (smaller than the target's 2 GiB in this mode)"
                }
            ),
            met: full_size.then_some(reopen.open_ms < 1000.0),
        });
    }
    checks
}

fn summary_charts(report: &SuiteReport, out: &Path) -> Result<(), BenchError> {
    let charts = out.join("charts");
    let amqp: Vec<BarGroup> = report
        .rows
        .iter()
        .filter(|row| {
            row.figure.contains("delivery rate")
                && row.unit == "msg/s"
                && row.figure.starts_with("AMQP")
        })
        .map(|row| BarGroup {
            label: short_label(&row.figure),
            values: vec![row.sluice.value(), row.rabbitmq.value()],
        })
        .collect();
    if amqp.iter().any(|g| g.values.iter().any(Option::is_some)) {
        chart::draw_bars(
            "AMQP delivery rate (msg/s)",
            "msg/s",
            &["Sluice", "RabbitMQ"],
            &amqp,
            &charts.join("amqp-delivery-rate.png"),
        )?;
    }
    if let Some(storage) = &report.storage {
        let policies: Vec<String> = storage
            .settings
            .fsync
            .iter()
            .map(|f| {
                f.parse::<sluice_storage::FsyncPolicy>()
                    .map_or(f.clone(), |p| p.to_string())
            })
            .collect();
        let mut groups = Vec::new();
        for &batch in &storage.settings.batch_bytes {
            for &appenders in &storage.settings.appenders {
                groups.push(BarGroup {
                    label: format!("{} ×{appenders}", human_bytes(batch)),
                    values: policies
                        .iter()
                        .map(|policy| storage.append(batch, policy, appenders).map(|a| a.mb_per_s))
                        .collect(),
                });
            }
        }
        if !groups.is_empty() {
            let names: Vec<String> = policies.iter().map(|p| format!("fsync={p}")).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            chart::draw_bars(
                "Storage append throughput by batch size × appenders (MB/s)",
                "MB/s",
                &names,
                &groups,
                &charts.join("storage-append.png"),
            )?;
        }
    }
    Ok(())
}

/// `AMQP 1→1, 16 B, transient, auto-ack: delivery rate` → `1→1, 16 B, transient`.
fn short_label(figure: &str) -> String {
    let title = figure.split(':').next().unwrap_or(figure);
    let title = title.strip_prefix("AMQP ").unwrap_or(title);
    title.split(',').take(3).collect::<Vec<_>>().join(",")
}

/// The whole summary as Markdown: machine, table, targets, limits, skips.
pub fn summary_markdown(report: &SuiteReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Sluice benchmark results ({:?} mode)\n\n{}\n",
        report.mode,
        report.machine.to_markdown()
    );
    let _ = writeln!(
        out,
        "Ran for {:.0} s. Rates: ↑ higher is better, ↓ lower is better. MB = 10^6 bytes. \
         Ratios are Sluice divided by the other column, from this same run.\n",
        report.elapsed_s
    );
    out.push_str(&table::to_markdown(&report.rows));
    if !report.storage_targets.is_empty() {
        let _ = writeln!(out, "\n## Storage targets (reported, not asserted)\n");
        let _ = writeln!(out, "| target | measured | met |\n| --- | --- | --- |");
        for check in &report.storage_targets {
            let met = match check.met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "—",
            };
            let _ = writeln!(out, "| {} | {} | {met} |", check.target, check.measured);
        }
    }
    if let Some(limits) = &report.limits {
        let _ = writeln!(out, "\n## Machine limits\n");
        let show = |value: Option<f64>, unit: &str| {
            value.map_or("not measured".into(), |v| {
                format!("{} {unit}", table::format_number(v))
            })
        };
        let _ = writeln!(
            out,
            "- fio buffered sequential write ({}, the best of 256 KiB, 1 MiB and 250 KiB writes): {}",
            human_bytes(limits.buffered_write_bytes),
            show(limits.buffered_write_mb_per_s, "MB/s")
        );
        let _ = writeln!(
            out,
            "- fio O_DIRECT sequential write (1 MiB, one at a time): {}",
            show(limits.direct_write_mb_per_s, "MB/s")
        );
        let _ = writeln!(
            out,
            "- fio {} write + fdatasync: {} (p99 {})",
            human_bytes(limits.sync_block_bytes),
            show(limits.fdatasync_per_s, "per second"),
            show(limits.fdatasync_p99_us.map(|us| us / 1000.0), "ms")
        );
        let _ = writeln!(
            out,
            "- iperf3 loopback, one TCP stream: {}",
            show(limits.loopback_mb_per_s, "MB/s")
        );
        for skipped in &limits.skipped {
            let _ = writeln!(out, "- not measured: {skipped}");
        }
    }
    if !report.never_pairs.is_empty() {
        let _ = writeln!(
            out,
            "\n## fsync=never appends beside fio, round by round\n\n\
             Each round runs fio's buffered write and the append run with the same byte count in \
             the same directory, one right after the other, alternating which goes first; both \
             leave their data fsynced and deleted. The table above shows the median round.\n\n\
             | batch | appenders | append MB/s | fio MB/s | fio ran | ratio |\n\
             | --- | --- | ---: | ---: | --- | ---: |"
        );
        for pair in &report.never_pairs {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} | {} | {:.2}× |",
                human_bytes(pair.batch_bytes),
                pair.appender_count,
                pair.append_mb_per_s,
                pair.fio_mb_per_s,
                if pair.fio_first { "first" } else { "second" },
                pair.append_mb_per_s / pair.fio_mb_per_s.max(1e-9)
            );
        }
    }
    if !report.always_rounds.is_empty() {
        let _ = writeln!(
            out,
            "\n## fsync=always appends beside fio, round by round\n\n\
             Each round runs fio's write + fdatasync with blocks of the batch size, then the \
             append runs for every appender count; the table above shows the median round.\n\n\
             | batch | fio write+fdatasync/s | batches/s by appenders |\n\
             | --- | ---: | --- |"
        );
        for round in &report.always_rounds {
            let rates: Vec<String> = round
                .batches_per_s
                .iter()
                .map(|(appenders, rate)| format!("×{appenders}: {rate:.0}"))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {:.0} | {} |",
                human_bytes(round.batch_bytes),
                round.fio_fdatasync_per_s,
                rates.join(", ")
            );
        }
    }
    if let Some(error) = &report.storage_error {
        let _ = writeln!(out, "\nStorage benchmarks failed: {error}");
    }
    let not_run: Vec<&WorkloadResult> = report
        .workloads
        .iter()
        .filter(|w| !matches!(w.outcome, Outcome::Ran { .. }))
        .collect();
    if !not_run.is_empty() {
        let _ = writeln!(out, "\n## Skipped or failed\n");
        for workload in not_run {
            let (status, reason) = match &workload.outcome {
                Outcome::Skipped { reason } => ("skipped", reason),
                Outcome::Failed { reason } => ("failed", reason),
                Outcome::Ran { .. } => continue,
            };
            let _ = writeln!(
                out,
                "- {} on {}: {status}: {reason}",
                workload.id, workload.broker
            );
        }
    }
    let flagged: Vec<&WorkloadResult> = report
        .workloads
        .iter()
        .filter(|w| {
            w.outcome
                .report()
                .is_some_and(|r| r.error_count > 0 || r.missing_count() > 0 || !r.notes.is_empty())
        })
        .collect();
    if !flagged.is_empty() {
        let _ = writeln!(out, "\n## Runs with notes, errors or missing messages\n");
        for workload in flagged {
            if let Some(run) = workload.outcome.report() {
                let _ = writeln!(
                    out,
                    "- {} on {}: {} errors, {} missing{}{}",
                    workload.id,
                    workload.broker,
                    run.error_count,
                    run.missing_count(),
                    run.errors
                        .first()
                        .map_or(String::new(), |e| format!("; first error: {e}")),
                    run.notes
                        .iter()
                        .map(|n| format!("; {n}"))
                        .collect::<String>()
                );
            }
        }
    }
    if let Some(sluice) = &report.sluice {
        let _ = writeln!(
            out,
            "\nSluice: {} (exit: {}).",
            sluice
                .binary
                .as_ref()
                .map_or("external".into(), |b| b.display().to_string()),
            sluice.exit.as_deref().unwrap_or("still running")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_has_the_issues_workloads() {
        let scale = Scale::new(Mode::Full, Path::new("/tmp"), None);
        let amqp: Vec<_> = amqp_workloads(&scale).into_iter().map(|w| w.id).collect();
        let kafka: Vec<_> = kafka_workloads(&scale).into_iter().map(|w| w.id).collect();
        for id in [
            "amqp-16b-transient",
            "amqp-1k-persistent",
            "amqp-fanout4",
            "amqp-backlog",
        ] {
            assert!(amqp.contains(&id), "{id}");
        }
        for id in [
            "kafka-produce-1k-acks-all",
            "kafka-produce-16k-acks1",
            "kafka-consume-backlog",
            "kafka-consume-backlog-raw",
            "kafka-end-to-end-peak",
            "kafka-latency-half-peak",
        ] {
            assert!(kafka.contains(&id), "{id}");
        }
        let position = |id: &str| kafka.iter().position(|k| *k == id).unwrap();
        assert!(
            position(KAFKA_TOGETHER_PEAK_ID) < position("kafka-latency-half-peak"),
            "the latency run takes its rate from the peak measured before it"
        );
        let backlog = amqp_workloads(&scale)
            .into_iter()
            .find(|w| w.id == "amqp-backlog")
            .unwrap();
        assert_eq!(backlog.options.load.count, Some(5_000_000));
        for id in ["kafka-consume-backlog", "kafka-consume-backlog-raw"] {
            let consume = kafka_workloads(&scale)
                .into_iter()
                .find(|w| w.id == id)
                .unwrap();
            assert_eq!(consume.options.load.count, Some(10_000_000), "{id}");
            assert!(consume.options.load.backlog, "{id}");
        }
        for workload in amqp_workloads(&scale) {
            workload.options.validate().unwrap();
        }
        for workload in kafka_workloads(&scale) {
            workload.options.validate().unwrap();
        }
    }

    #[test]
    fn both_kafka_backlog_drains_get_the_backlog_figures() {
        let ran = |id: &str, title: &str| WorkloadResult {
            id: id.into(),
            title: title.into(),
            broker: "sluice".into(),
            outcome: Outcome::Ran {
                report: Box::new(RunReport {
                    name: id.into(),
                    protocol: "kafka".into(),
                    target: String::new(),
                    settings: serde_json::Value::Null,
                    started_unix_ms: 0,
                    send: Some(crate::report::Throughput::new(10, 1_000, 1.0)),
                    receive: Some(crate::report::Throughput::new(10, 1_000, 0.5)),
                    expected_receive_count: 10,
                    latency: None,
                    error_count: 0,
                    errors: Vec::new(),
                    broker_rss: None,
                    timeline: Vec::new(),
                    notes: Vec::new(),
                }),
            },
            files: Vec::new(),
        };
        let report = SuiteReport {
            started_unix_ms: 0,
            elapsed_s: 0.0,
            mode: Mode::Smoke,
            machine: Machine::default(),
            sluice: None,
            sluice_unavailable: None,
            rabbitmq_uri: None,
            workloads: vec![
                ran("kafka-consume-backlog", "librdkafka"),
                ran("kafka-consume-backlog-raw", "lean"),
            ],
            storage: None,
            storage_error: None,
            never_pairs: Vec::new(),
            always_rounds: Vec::new(),
            limits: None,
            rows: Vec::new(),
            storage_targets: Vec::new(),
        };
        let rows = rows(&report);
        let figures = |title: &str| -> Vec<(String, String)> {
            rows.iter()
                .filter_map(|row| {
                    let figure = row.figure.strip_prefix(title)?;
                    Some((figure.to_owned(), row.unit.clone()))
                })
                .collect()
        };
        let lean = figures("lean: ");
        assert_eq!(figures("librdkafka: "), lean);
        assert!(
            lean.contains(&("drain rate".to_owned(), "msg/s".to_owned())),
            "{lean:?}"
        );
    }

    #[test]
    fn passwords_are_not_logged() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:1/%2f"),
            "amqp://guest:***@127.0.0.1:1/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1:1"), "amqp://127.0.0.1:1");
    }

    #[test]
    fn unreachable_brokers_are_skips_not_failures() {
        let skipped = Outcome::from_result(Err(BenchError::Unreachable {
            address: "x".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        }));
        assert!(matches!(skipped, Outcome::Skipped { .. }));
        let failed = Outcome::from_result(Err(BenchError::Invalid("x".into())));
        assert!(matches!(failed, Outcome::Failed { .. }));
    }

    #[test]
    fn labels_are_shortened_for_charts() {
        assert_eq!(
            short_label("AMQP 1→1, 16 B, transient, auto-ack: delivery rate"),
            "1→1, 16 B, transient"
        );
    }
}
