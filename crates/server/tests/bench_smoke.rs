//! CI smoke test of the benchmark tool: runs the suite's smoke workloads (a second or so each)
//! against this crate's `sluice` binary, without RabbitMQ, fio or iperf3, and checks that
//! messages flowed and that the report was written. It never checks a speed.
//!
//! It lives beside the broker, not in the bench crate, because only here does cargo build the
//! binary before the test runs: a stale binary can never pass it, and a missing one fails it.
//! The suite runs in-process through the bench library, as `sluice-bench suite --smoke` would.
//!
//! A workload may be skipped only because the broker has no listener for its protocol yet;
//! any other outcome than messages flowing fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use clap::Parser;
use sluice_bench::report::read_json;
use sluice_bench::suite::{self, Outcome, SuiteOptions, SuiteReport};

/// The suite's command-line options, parsed as the bench tool parses them.
#[derive(Debug, Parser)]
struct SuiteCommand {
    #[command(flatten)]
    options: SuiteOptions,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_workloads_move_messages_through_sluice() -> anyhow::Result<()> {
    let out = tempfile::tempdir()?;
    let binary = env!("CARGO_BIN_EXE_sluice");
    let scratch = out.path().join("scratch");
    let command = SuiteCommand::try_parse_from([
        std::ffi::OsStr::new("suite"),
        "--smoke".as_ref(),
        "--skip".as_ref(),
        "limits".as_ref(),
        "--sluice-bin".as_ref(),
        binary.as_ref(),
        "--out".as_ref(),
        out.path().as_os_str(),
        "--scratch-dir".as_ref(),
        scratch.as_os_str(),
        "--quiet".as_ref(),
    ])?;
    let report = suite::run(&command.options)
        .await
        .map_err(|error| anyhow::anyhow!(error.chain()))?;
    let written: SuiteReport = read_json(&out.path().join("summary.json"))?;
    assert_eq!(written.workloads.len(), report.workloads.len());
    let summary = std::fs::read_to_string(out.path().join("summary.md"))?;
    assert!(
        summary.contains("| figure |"),
        "summary.md has no table:\n{summary}"
    );
    let sluice = report.sluice.as_ref().unwrap_or_else(|| {
        panic!(
            "sluice did not start: {:?}\n{}",
            report.sluice_unavailable,
            std::fs::read_to_string(out.path().join("sluice.log")).unwrap_or_default()
        )
    });
    assert!(
        sluice
            .exit
            .as_deref()
            .is_some_and(|exit| exit.contains("exit status: 0")),
        "sluice did not shut down cleanly: {:?}",
        sluice.exit
    );

    let storage = report.storage.as_ref().expect("the storage benchmarks ran");
    assert!(!storage.appends.is_empty());
    assert!(storage.appends.iter().all(|append| append.batch_count > 0));

    let mut ran_count = 0;
    for workload in report.workloads.iter().filter(|w| w.broker == "sluice") {
        match &workload.outcome {
            Outcome::Ran { report: run } => {
                ran_count += 1;
                let sent = run.send.map_or(0, |send| send.count);
                let received = run.receive.map_or(0, |receive| receive.count);
                assert!(
                    sent > 0 || received > 0,
                    "{}: no message flowed: {run:?}",
                    workload.id
                );
                assert_eq!(
                    run.missing_count(),
                    0,
                    "{}: {} of {} messages did not arrive; errors: {:?}",
                    workload.id,
                    run.missing_count(),
                    run.expected_receive_count,
                    run.errors
                );
                assert!(
                    workload
                        .files
                        .iter()
                        .any(|f| f.extension().is_some_and(|e| e == "json")),
                    "{}: no JSON result written",
                    workload.id
                );
                if run.error_count > 0 {
                    eprintln!(
                        "{}: {} client errors: {:?}",
                        workload.id, run.error_count, run.errors
                    );
                }
            }
            Outcome::Skipped { reason } => {
                assert!(
                    reason.contains("listener") || reason.contains("nothing listens"),
                    "{}: skipped for a reason other than a missing listener: {reason}",
                    workload.id
                );
                eprintln!("{} skipped: {reason}", workload.id);
            }
            Outcome::Failed { reason } => panic!("{} failed: {reason}", workload.id),
        }
    }
    eprintln!("{ran_count} workloads moved messages through sluice");
    Ok(())
}
