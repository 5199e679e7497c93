//! On a slow disk, the fsyncs a log's owner task does in the middle of a change (rolling a
//! segment, writing the log-start and leader-epoch checkpoints, truncating) must not hold the
//! runtime's worker thread: with one worker, every other task would wait for the disk.
//!
//! Every fsync of this test process is made 200 ms slower. While the owner task rolls,
//! checkpoints and truncates (a dozen fsyncs or more), a task ticking every 10 ms must keep
//! ticking. If an fsync ran on the only worker, it could not tick during it at all. The test
//! counts ticks, with a wide margin, rather than timing anything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice_storage::{FsyncPolicy, Log, LogConfig, LogHandle, LogRequest, OwnerOptions};

#[test]
fn fsyncs_inside_an_owner_task_leave_the_only_worker_free() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            fsync: FsyncPolicy::Always,
            ..common::small_config()
        };
        let log = Log::open(dir.path(), config, 0).unwrap();
        let (handle, task) = LogHandle::spawn(log, OwnerOptions::default());
        for seed in 0..3 {
            handle.append(common::batch(5, 100, 0, seed)).await.unwrap();
        }

        sluice_storage::sync::inject_delay(Duration::from_millis(200));
        let ticks = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = tokio::spawn({
            let ticks = Arc::clone(&ticks);
            let stop = Arc::clone(&stop);
            async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    ticks.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let started = Instant::now();
        let before = ticks.load(Ordering::Relaxed);
        handle.request(LogRequest::Roll).await.unwrap();
        handle
            .request(LogRequest::AdvanceLogStart(5))
            .await
            .unwrap();
        handle
            .request(LogRequest::BeginLeaderEpoch(3))
            .await
            .unwrap();
        handle.request(LogRequest::TruncateTo(10)).await.unwrap();
        let elapsed = started.elapsed();
        let ticked = ticks.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        ticker.await.unwrap();
        sluice_storage::sync::inject_delay(Duration::ZERO);

        // The slow fsyncs did happen (otherwise this proves nothing) ...
        assert!(elapsed >= Duration::from_millis(1_000), "{elapsed:?}");
        // ... and the other task kept running through them: about one tick per 10 ms when
        // nothing holds the worker, none at all while an fsync does.
        let expected = elapsed.as_millis() as u64 / 10;
        assert!(
            ticked * 4 >= expected,
            "{ticked} ticks in {elapsed:?}: fsyncs held the worker thread"
        );

        handle.close().await.unwrap();
        task.await.unwrap().unwrap();
    });
}
