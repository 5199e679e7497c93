//! Runs the suite: starts and stops Sluice, runs each group of workloads (limits, Kafka, AMQP,
//! storage) in order, waits for the brokers to settle between AMQP runs, and writes each
//! workload's files as it records it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::amqp;
use crate::chart;
use crate::error::BenchError;
use crate::kafka;
use crate::limits;
use crate::machine::Machine;
use crate::meter;
use crate::report::{unix_ms_now, write_json, write_text};
use crate::sluice::{Listeners, SluiceProcess};
use crate::storage::{self, StorageReport, human_bytes};
use sluice_storage::FsyncPolicy;

use super::markdown::{summary_charts, summary_markdown};
use super::report::{
    AlwaysRound, NeverPair, Outcome, SluiceInfo, SuiteReport, WorkloadResult, rows, storage_targets,
};
use super::workloads::{
    AmqpWorkload, KAFKA_CONSUME_PEAK_ID, KAFKA_PEAK_ID, KAFKA_TOGETHER_PEAK_ID, KafkaWorkload,
    Mode, Scale, amqp_workloads, kafka_workloads,
};

const SLUICE_START_TIMEOUT: Duration = Duration::from_secs(60);
const SLUICE_STOP_GRACE: Duration = Duration::from_secs(30);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_logged() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:1/%2f"),
            "amqp://guest:***@127.0.0.1:1/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1:1"), "amqp://127.0.0.1:1");
    }
}
