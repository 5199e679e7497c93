//! Every fsync the engine does, and the broker's own (queue journals, producer snapshots),
//! goes through here, so that none of them holds a runtime worker thread.
//!
//! Group commit already runs its fsyncs on tokio's blocking pool. The others happen inside an
//! owner task, in the middle of a change the task must finish before it does anything else
//! (rolling a segment, writing a checkpoint, truncating, syncing a queue's journal): there the
//! call runs under [`tokio::task::block_in_place`], which hands the thread's worker duties to
//! another thread for the duration, so every other connection and log keeps running while the
//! disk takes its time. With the default of one worker thread on a two-CPU machine, a slow
//! fsync on the worker would otherwise stall every client. Outside a multi-threaded runtime (a
//! blocking-pool thread, a plain thread, a single-threaded test runtime) the call runs as is.
//!
//! Tests can make every fsync slow ([`inject_delay`]) to check that nothing waits for one on a
//! worker thread.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::StorageError;

/// Extra time every fsync takes, for tests (0: none).
static INJECTED_DELAY_US: AtomicU64 = AtomicU64::new(0);

/// Makes every fsync of this process take at least `delay` longer, as on a slow disk. For
/// tests only: it affects every log in the process.
pub fn inject_delay(delay: Duration) {
    INJECTED_DELAY_US.store(delay.as_micros() as u64, Ordering::Relaxed);
}

/// Runs a blocking call without holding a runtime worker thread (see the module docs).
pub fn off_worker<R>(call: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(call)
        }
        _ => call(),
    }
}

fn injected_delay() {
    let delay_us = INJECTED_DELAY_US.load(Ordering::Relaxed);
    if delay_us > 0 {
        std::thread::sleep(Duration::from_micros(delay_us));
    }
}

/// fsyncs a file's data (and the metadata needed to read it back).
pub fn data(file: &File) -> io::Result<()> {
    off_worker(|| {
        injected_delay();
        file.sync_data()
    })
}

/// fsyncs a file's data and all its metadata.
pub fn all(file: &File) -> io::Result<()> {
    off_worker(|| {
        injected_delay();
        file.sync_all()
    })
}

/// fsyncs a directory, so that files created, renamed or deleted in it stay so.
pub fn dir(path: &Path) -> Result<(), StorageError> {
    off_worker(|| {
        injected_delay();
        File::open(path).and_then(|handle| handle.sync_all())
    })
    .map_err(|source| StorageError::io("sync directory", path, source))
}

#[cfg(test)]
mod tests {

    #[test]
    fn runs_inline_outside_a_multi_threaded_runtime() {
        let dir = tempfile::tempdir().unwrap();
        // A plain thread, and a single-threaded runtime where block_in_place would panic.
        super::dir(dir.path()).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async { super::dir(dir.path()).unwrap() });
    }
}
