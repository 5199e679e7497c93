//! CI smoke test of the benchmark tool: runs the suite's smoke workloads (a second or so each)
//! against a real `sluice` binary, without RabbitMQ, fio or iperf3, and checks that messages
//! flowed and that the report was written. It never checks a speed.
//!
//! The binary comes from `SLUICE_BIN`, else the workspace's `target/{debug,release}/sluice`,
//! else `$CARGO_TARGET_DIR/{debug,release}/sluice`. Without one the test says so and passes:
//! the repository's full test command builds the broker first.
//!
//! A workload may be skipped only because the broker has no listener for its protocol yet;
//! any other outcome than messages flowing fails the test.

use std::path::Path;
use std::process::Command;

use sluice_bench::report::read_json;
use sluice_bench::suite::{Outcome, SuiteReport};

#[test]
fn the_quick_workloads_move_messages_through_sluice() -> anyhow::Result<()> {
    let workspace_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let Some(binary) = sluice_bench::sluice::find_binary(&workspace_root) else {
        eprintln!(
            "skipped: no sluice binary yet (set SLUICE_BIN or run `cargo build -p sluice` first)"
        );
        return Ok(());
    };
    let out = tempfile::tempdir()?;
    let output = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .arg("suite")
        .arg("--smoke")
        .args(["--skip", "limits"])
        .arg("--sluice-bin")
        .arg(&binary)
        .arg("--out")
        .arg(out.path())
        .arg("--scratch-dir")
        .arg(out.path().join("scratch"))
        .arg("--quiet")
        .output()?;
    assert!(
        output.status.success(),
        "sluice-bench suite exited with {}:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let report: SuiteReport = read_json(&out.path().join("summary.json"))?;
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
