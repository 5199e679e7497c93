//! The suite's summary for people: `summary.md` and the comparison charts beside it.

use std::fmt::Write as _;
use std::path::Path;

use crate::chart::{self, BarGroup};
use crate::error::BenchError;
use crate::storage::human_bytes;
use crate::table;

use super::report::{Outcome, SuiteReport, WorkloadResult};

pub(super) fn summary_charts(report: &SuiteReport, out: &Path) -> Result<(), BenchError> {
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
    fn labels_are_shortened_for_charts() {
        assert_eq!(
            short_label("AMQP 1→1, 16 B, transient, auto-ack: delivery rate"),
            "1→1, 16 B, transient"
        );
    }
}
