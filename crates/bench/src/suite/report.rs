//! What a suite run produced: each workload's outcome, the storage pairings, the comparison
//! rows and the storage targets checked against them (reported, never asserted).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::BenchError;
use crate::limits::LimitsReport;
use crate::machine::Machine;
use crate::report::RunReport;
use crate::sluice::Listeners;
use crate::storage::{self, StorageReport, human_bytes};
use crate::table::{Cell, Row};

use super::workloads::Mode;

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

    pub(super) fn from_result(result: Result<RunReport, BenchError>) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn unreachable_brokers_are_skips_not_failures() {
        let skipped = Outcome::from_result(Err(BenchError::Unreachable {
            address: "x".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        }));
        assert!(matches!(skipped, Outcome::Skipped { .. }));
        let failed = Outcome::from_result(Err(BenchError::Invalid("x".into())));
        assert!(matches!(failed, Outcome::Failed { .. }));
    }
}
