//! A child process appends with `fsync = always` through the owner task and prints every
//! acknowledged offset; it is killed with SIGKILL mid-stream. After reopening, every
//! acknowledged offset must be there with its bytes intact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_storage::record;
use sluice_storage::{FsyncPolicy, Log, LogConfig, LogHandle, OwnerOptions};

const DIR_VAR: &str = "SLUICE_KILL_TEST_DIR";
const WRITERS: u64 = 8;
const VALUE_BYTES: usize = 300;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 * 1024,
        fsync: FsyncPolicy::Always,
        ..common::small_config()
    }
}

/// Runs in the child: appends forever from several writers, printing `ACK <offset> <writer>
/// <sequence>` once each append is acknowledged.
#[test]
#[ignore = "run by acknowledged_appends_survive_sigkill in a child process"]
fn child_appender() {
    let Ok(dir) = std::env::var(DIR_VAR) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let log = Log::open(&dir, config(), 0).unwrap();
        let (handle, _task) = LogHandle::spawn(log, OwnerOptions::default());
        let mut writers = Vec::new();
        for writer in 0..WRITERS {
            let handle = handle.clone();
            writers.push(tokio::spawn(async move {
                for sequence in 0u64.. {
                    let seed = writer * 1_000_000 + sequence;
                    let batch = common::batch(1, VALUE_BYTES, 0, seed);
                    let info = handle.append(batch).await.unwrap();
                    println!("ACK {} {seed}", info.base_offset);
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
    });
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_appender",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR_VAR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let started = Instant::now();
    // Kill after a good number of acknowledgements, or after a while on a slow disk.
    while acked.len() < 3_000 && started.elapsed() < Duration::from_secs(20) {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(rest) = line.strip_prefix("ACK ") {
                    let mut fields = rest.split(' ');
                    let offset = fields.next().unwrap().parse().unwrap();
                    let seed = fields.next().unwrap().parse().unwrap();
                    acked.push((offset, seed));
                }
            }
            _ => break,
        }
    }
    child.kill().unwrap(); // SIGKILL on Unix
    // Acknowledgements printed before the kill are still in the pipe.
    for line in lines.map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("ACK ") {
            let mut fields = rest.split(' ');
            acked.push((
                fields.next().unwrap().parse().unwrap(),
                fields.next().unwrap().parse().unwrap(),
            ));
        }
    }
    child.wait().unwrap();
    assert!(
        acked.len() > 100,
        "the child acknowledged only {} appends",
        acked.len()
    );

    let log = Log::open(dir.path(), config(), 0).unwrap();
    let mut offsets: Vec<u64> = acked.iter().map(|(offset, _)| *offset).collect();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(
        offsets.len(),
        acked.len(),
        "an offset was acknowledged twice"
    );
    assert!(log.log_end_offset() > *offsets.last().unwrap());
    for (offset, seed) in &acked {
        let read = log.read(*offset, 1, true).unwrap();
        let batches = common::split(&read.bytes);
        let (base, bytes) = batches.first().expect("acknowledged offset is readable");
        assert_eq!(base, offset);
        let records = record::decode(bytes).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(
            records[0].value.unwrap(),
            common::value_for(*seed, 0, VALUE_BYTES).as_slice(),
            "bytes at offset {offset}"
        );
    }
}
