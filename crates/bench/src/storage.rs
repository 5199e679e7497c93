//! Benchmarks of the storage engine (`sluice-storage`) on its own, in this process: append
//! throughput under each fsync policy and appender count, reads from the page cache, and the
//! time to reopen a large log after a clean shutdown.
//!
//! Appends go through the log's owner task ([`LogHandle::append`]), as the broker's partitions
//! and queues will send them: each appender is a tokio task that awaits the ack of one append
//! before sending the next, so with `fsync = always` the appenders that wait together share an
//! fsync (group commit). Every append sends the same prebuilt batch (the log patches offsets on
//! the way to the file and never changes the buffer), as fio writes one buffer over and over:
//! the figure is the engine's, beside fio's, and copying from the network is the protocol
//! benchmarks' part.
//!
//! Each run writes into a fresh directory under `--dir`, closes the log, and deletes the
//! directory, so runs do not see each other's files or dirty pages. A run stops at its byte
//! budget or its time limit, whichever comes first.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use sluice_storage::record::BatchBuilder;
use sluice_storage::{
    BatchHeader, FsyncPolicy, Log, LogConfig, LogHandle, LogReader, OwnerOptions,
};

use crate::error::BenchError;
use crate::report::{unix_ms_now, write_text};

/// The record size the storage benchmarks use unless told otherwise.
pub const RECORD_BYTES_DEFAULT: usize = 1024;
/// Largest batch the benchmarks build; the log's own limit is raised to fit it.
const BATCH_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Batch size used to fill the log that is reopened and read back.
const FILL_BATCH_BYTES: usize = 1024 * 1024;
/// Appenders used to fill that log: enough to keep the owner busy.
const FILL_APPENDER_COUNT: usize = 4;

#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct StorageOptions {
    /// Directory under which each run gets a fresh log directory (default: the system's
    /// temporary directory). Put it on the disk you want to measure.
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// Batch sizes to append, comma separated (suffixes KiB, MiB, GiB allowed).
    #[arg(long, value_delimiter = ',', value_parser = parse_bytes, default_value = "16KiB,1MiB")]
    pub batch_bytes: Vec<u64>,

    /// Size of each record's value inside a batch.
    #[arg(long, value_parser = parse_bytes, default_value = "1KiB")]
    pub record_bytes: u64,

    /// Fsync policies to try, comma separated: never, always, interval(<ms>ms) or <ms>ms.
    #[arg(long, value_delimiter = ',', default_value = "never,5ms,always")]
    pub fsync: Vec<String>,

    /// Concurrent appenders to try, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub appenders: Vec<usize>,

    /// Time limit of each append run.
    #[arg(long, default_value_t = 5.0)]
    pub append_duration_s: f64,

    /// Byte budget of each append run.
    #[arg(long, value_parser = parse_bytes, default_value = "2GiB")]
    pub append_bytes_max: u64,

    /// Size of the log written, closed, reopened and read back (0 skips those benchmarks).
    #[arg(long, value_parser = parse_bytes, default_value = "2GiB")]
    pub reopen_log_bytes: u64,

    /// Most bytes asked for by each read call.
    #[arg(long, value_parser = parse_bytes, default_value = "4MiB")]
    pub read_bytes: u64,

    /// Skip the append benchmarks.
    #[arg(long)]
    pub no_append: bool,
}

impl Default for StorageOptions {
    fn default() -> Self {
        Self {
            dir: None,
            batch_bytes: vec![16 * 1024, 1024 * 1024],
            record_bytes: RECORD_BYTES_DEFAULT as u64,
            fsync: vec!["never".into(), "5ms".into(), "always".into()],
            appenders: vec![1, 8, 64],
            append_duration_s: 5.0,
            append_bytes_max: 2 << 30,
            reopen_log_bytes: 2 << 30,
            read_bytes: 4 << 20,
            no_append: false,
        }
    }
}

impl StorageOptions {
    fn policies(&self) -> Result<Vec<FsyncPolicy>, BenchError> {
        self.fsync
            .iter()
            .map(|text| text.parse::<FsyncPolicy>().map_err(BenchError::Config))
            .collect()
    }

    pub fn validate(&self) -> Result<(), BenchError> {
        self.policies()?;
        let fail = |reason: &str| Err(BenchError::Config(reason.to_owned()));
        if self
            .batch_bytes
            .iter()
            .any(|b| !(256..=BATCH_BYTES_MAX as u64).contains(b))
        {
            return fail("--batch-bytes must each be between 256 bytes and 64 MiB");
        }
        if self.record_bytes == 0 || self.batch_bytes.iter().any(|b| *b < self.record_bytes) {
            return fail("--record-bytes must be positive and fit in every batch");
        }
        if self.appenders.iter().any(|a| *a == 0 || *a > 4096) {
            return fail("--appenders must each be between 1 and 4096");
        }
        if !(self.append_duration_s.is_finite() && self.append_duration_s > 0.0) {
            return fail("--append-duration-s must be positive");
        }
        if self.read_bytes == 0 {
            return fail("--read-bytes must be positive");
        }
        Ok(())
    }
}

/// Parses `4096`, `16KiB`, `1MiB`, `2GiB` (also `K`, `M`, `G`, `KB`... as powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 4096, 16KiB or 2GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// One append run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppendResult {
    /// The batch size asked for.
    pub batch_bytes_asked: u64,
    /// Bytes of one batch as built (header included): as many whole records as fit.
    pub batch_bytes: u64,
    pub records_per_batch: u64,
    pub fsync: String,
    pub appender_count: usize,
    pub batch_count: u64,
    pub bytes: u64,
    pub elapsed_s: f64,
    pub mb_per_s: f64,
    pub batches_per_s: f64,
    /// Fsync rounds the log completed during the run.
    pub flush_count: u64,
    /// From sending an append to its ack, in microseconds.
    pub ack_p50_us: u64,
    pub ack_p99_us: u64,
    pub ack_max_us: u64,
    /// Time to close the log afterwards (it fsyncs whatever is still dirty).
    pub close_ms: f64,
    /// What ended the run: `bytes` (budget reached) or `time`.
    pub stopped_by: String,
    /// Appends the owner task dropped without applying them, which were sent again.
    #[serde(default)]
    pub lost_request_count: u64,
    /// fio's buffered sequential write bandwidth measured next to this run, with the
    /// same byte count in the same directory, when the suite pairs them (fsync=never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paired_fio_mb_per_s: Option<f64>,
    /// fio's write + fdatasync rate with blocks of this batch's size, measured right before
    /// this run when the suite pairs them (fsync=always).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paired_fdatasync_per_s: Option<f64>,
}

/// Reading a whole log from the page cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadResult {
    pub bytes: u64,
    pub read_count: u64,
    pub read_bytes_max: u64,
    pub elapsed_s: f64,
    pub mb_per_s: f64,
}

/// Reopening a log after a clean shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReopenResult {
    pub log_bytes: u64,
    pub segment_count: usize,
    /// Time for the fill's `LogHandle::close` (persists indexes, fsyncs).
    pub close_ms: f64,
    /// Appends the owner dropped while filling the log, which were sent again.
    #[serde(default)]
    pub lost_request_count: u64,
    /// Time for `Log::open` on the closed log: the figure that matters.
    pub open_ms: f64,
    pub rebuilt_index_count: usize,
    pub truncated_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageReport {
    pub started_unix_ms: u64,
    pub dir: PathBuf,
    pub settings: StorageOptions,
    pub appends: Vec<AppendResult>,
    pub reopen: Option<ReopenResult>,
    pub read: Option<ReadResult>,
}

impl StorageReport {
    /// The append run with these parameters, if it was run.
    pub fn append(
        &self,
        batch_bytes_asked: u64,
        fsync: &str,
        appender_count: usize,
    ) -> Option<&AppendResult> {
        self.appends.iter().find(|a| {
            a.batch_bytes_asked == batch_bytes_asked
                && a.fsync == fsync
                && a.appender_count == appender_count
        })
    }

    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "### Storage engine ({})\n", self.dir.display());
        if !self.appends.is_empty() {
            let _ = writeln!(
                out,
                "| batch | fsync | appenders | MB/s | batches/s | fsyncs | ack p50 ms | ack p99 ms | stopped by |\n\
                 | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
            );
            for a in &self.appends {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {:.1} | {:.0} | {} | {:.3} | {:.3} | {} |",
                    human_bytes(a.batch_bytes_asked),
                    a.fsync,
                    a.appender_count,
                    a.mb_per_s,
                    a.batches_per_s,
                    a.flush_count,
                    a.ack_p50_us as f64 / 1000.0,
                    a.ack_p99_us as f64 / 1000.0,
                    a.stopped_by
                );
            }
            out.push('\n');
            let lost: u64 = self.appends.iter().map(|a| a.lost_request_count).sum();
            if lost > 0 {
                let _ = writeln!(
                    out,
                    "The log's owner task dropped {lost} appends without applying them (they \
                     were sent again; see `lost_request_count` in the JSON).\n"
                );
            }
        }
        if let Some(read) = &self.read {
            let _ = writeln!(
                out,
                "Read {} in {} calls of at most {}: {:.0} MB/s.\n",
                human_bytes(read.bytes),
                read.read_count,
                human_bytes(read.read_bytes_max),
                read.mb_per_s
            );
        }
        if let Some(reopen) = &self.reopen {
            let _ = writeln!(
                out,
                "Reopened a {} log ({} segments) after a clean shutdown in {:.1} ms \
                 (closing it took {:.0} ms; indexes rebuilt: {}).\n",
                human_bytes(reopen.log_bytes),
                reopen.segment_count,
                reopen.open_ms,
                reopen.close_ms,
                reopen.rebuilt_index_count
            );
        }
        out
    }
}

/// `1048576` → `1 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Builds one uncompressed batch of records with `record_bytes` values, as large as fits in
/// `batch_bytes` (at least one record).
pub fn build_batch(batch_bytes: usize, record_bytes: usize) -> Bytes {
    let value = vec![b'x'; record_bytes];
    let now_ms = unix_ms_now() as i64;
    let mut builder = BatchBuilder::new(now_ms);
    // A record adds its value plus a few bytes of varints; leave room for them.
    let record_overhead_bytes = 16;
    loop {
        builder.push(now_ms, None, Some(&value), &[]);
        if builder.len_bytes() + record_bytes + record_overhead_bytes > batch_bytes {
            break;
        }
    }
    builder.finish()
}

fn log_config(fsync: FsyncPolicy, batch_bytes: usize) -> LogConfig {
    let defaults = LogConfig::default();
    LogConfig {
        fsync,
        retention_ms: None,
        max_batch_bytes: defaults.max_batch_bytes.max(batch_bytes),
        ..defaults
    }
}

/// Runs every benchmark `options` asks for.
pub async fn run(options: &StorageOptions, quiet: bool) -> Result<StorageReport, BenchError> {
    options.validate()?;
    let base = options.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).map_err(|source| BenchError::io("create", &base, source))?;
    let mut report = StorageReport {
        started_unix_ms: unix_ms_now(),
        dir: base.clone(),
        settings: options.clone(),
        appends: Vec::new(),
        reopen: None,
        read: None,
    };
    if !options.no_append {
        for &batch_bytes in &options.batch_bytes {
            let batch = build_batch(batch_bytes as usize, options.record_bytes as usize);
            for policy in options.policies()? {
                for &appenders in &options.appenders {
                    let result =
                        append_run(&base, batch_bytes, &batch, policy, appenders, options).await?;
                    if !quiet {
                        eprintln!(
                            "storage: {} batches, fsync={}, {} appenders: {:.1} MB/s, {:.0} batches/s",
                            human_bytes(result.batch_bytes_asked),
                            result.fsync,
                            appenders,
                            result.mb_per_s,
                            result.batches_per_s
                        );
                    }
                    report.appends.push(result);
                }
            }
        }
    }
    if options.reopen_log_bytes > 0 {
        let (reopen, read) = reopen_and_read(&base, options).await?;
        if !quiet {
            eprintln!(
                "storage: reopened {} in {:.1} ms; read at {:.0} MB/s",
                human_bytes(reopen.log_bytes),
                reopen.open_ms,
                read.mb_per_s
            );
        }
        report.reopen = Some(reopen);
        report.read = Some(read);
    }
    Ok(report)
}

fn fresh_dir(base: &Path, label: &str) -> Result<tempfile::TempDir, BenchError> {
    tempfile::Builder::new()
        .prefix(&format!("sluice-bench-{label}-"))
        .tempdir_in(base)
        .map_err(|source| BenchError::io("create a directory in", base, source))
}

/// One append run: a fresh log under `base`, `appender_count` appenders appending
/// `batch` under `policy` until `options`' byte budget or time limit, then close.
pub async fn append_run(
    base: &Path,
    batch_bytes_asked: u64,
    batch: &Bytes,
    policy: FsyncPolicy,
    appender_count: usize,
    options: &StorageOptions,
) -> Result<AppendResult, BenchError> {
    let dir = fresh_dir(base, "append")?;
    let log = Log::open(
        dir.path(),
        log_config(policy, batch.len()),
        unix_ms_now() as i64,
    )
    .map_err(|error| BenchError::storage("opening the log", error))?;
    let (handle, owner) = LogHandle::spawn(log, OwnerOptions::default());
    let budget_count = (options.append_bytes_max / batch.len() as u64).max(1);
    let claimed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(options.append_duration_s);
    let mut appenders = Vec::with_capacity(appender_count);
    for _ in 0..appender_count {
        let handle = handle.clone();
        let batch = batch.clone();
        let claimed = Arc::clone(&claimed);
        appenders.push(tokio::spawn(async move {
            append_loop(&handle, &batch, &claimed, budget_count, deadline).await
        }));
    }
    let mut histogram = ack_histogram()?;
    let mut batch_count = 0u64;
    let mut lost_request_count = 0u64;
    for appender in appenders {
        let joined = appender
            .await
            .map_err(|error| BenchError::Task(format!("an appender: {error}")))?;
        let tally = match joined {
            Ok(tally) => tally,
            Err(error) => return Err(explain_owner_gone(error, owner).await),
        };
        batch_count += tally.append_count;
        lost_request_count += tally.lost_request_count;
        histogram
            .add(&tally.ack_us)
            .map_err(|error| BenchError::Invalid(format!("merging ack latencies: {error}")))?;
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let flush_count = handle.reader().flush_count();
    let close_started = Instant::now();
    handle
        .close()
        .await
        .map_err(|error| BenchError::storage("closing the log", error))?;
    owner
        .await
        .map_err(|error| BenchError::Task(format!("the log owner: {error}")))?
        .map_err(|error| BenchError::storage("the log owner", error))?;
    let close_ms = close_started.elapsed().as_secs_f64() * 1000.0;
    drop(dir);

    let bytes = batch_count * batch.len() as u64;
    let records_per_batch = BatchHeader::parse(batch).map_or(0, |h| h.record_count.max(0) as u64);
    Ok(AppendResult {
        batch_bytes_asked,
        batch_bytes: batch.len() as u64,
        records_per_batch,
        fsync: policy.to_string(),
        appender_count,
        batch_count,
        bytes,
        elapsed_s,
        mb_per_s: bytes as f64 / elapsed_s / 1e6,
        batches_per_s: batch_count as f64 / elapsed_s,
        flush_count,
        ack_p50_us: histogram.value_at_quantile(0.5),
        ack_p99_us: histogram.value_at_quantile(0.99),
        ack_max_us: histogram.max(),
        close_ms,
        lost_request_count,
        paired_fio_mb_per_s: None,
        paired_fdatasync_per_s: None,
        stopped_by: if batch_count >= budget_count {
            "bytes".into()
        } else {
            "time".into()
        },
    })
}

/// An append that failed because the owner task is gone says only that; the task's own
/// result says why it ended.
async fn explain_owner_gone(error: BenchError, owner: sluice_storage::OwnerTask) -> BenchError {
    let gone = matches!(
        &error,
        BenchError::Storage {
            source: sluice_storage::StorageError::OwnerGone,
            ..
        }
    );
    if !gone {
        owner.abort();
        return error;
    }
    match owner.await {
        Ok(Ok(())) => BenchError::Invalid("the log owner stopped without an error".into()),
        Ok(Err(cause)) => BenchError::storage("the log owner stopped", cause),
        Err(join_error) => BenchError::Task(format!("the log owner died: {join_error}")),
    }
}

fn ack_histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|error| BenchError::Invalid(format!("ack histogram: {error}")))
}

/// How often one append is sent again after the owner dropped it (see [`append_loop`]).
const LOST_REQUEST_RETRIES_MAX: u32 = 3;

/// What one appender did.
#[derive(Debug)]
struct AppenderTally {
    append_count: u64,
    lost_request_count: u64,
    ack_us: Histogram<u64>,
}

/// One appender: claims a batch from the shared budget, appends it, waits for the
/// ack, and again, until the budget or the time is used up.
///
/// An owner task that drops a request without applying it answers `OwnerGone` while it runs
/// on; the owner did exactly that whenever a drain reached `OwnerOptions::drain_max` until
/// commit c9a7172 ("the owner no longer drops a request at the end of a drain"). Such an
/// append is sent again and counted (`lost_request_count`), so the figures stay honest and any
/// return of the bug shows in the report; an owner that really stopped fails every retry.
async fn append_loop(
    handle: &LogHandle,
    batch: &Bytes,
    claimed: &AtomicU64,
    budget_count: u64,
    deadline: Instant,
) -> Result<AppenderTally, BenchError> {
    let mut tally = AppenderTally {
        append_count: 0,
        lost_request_count: 0,
        ack_us: ack_histogram()?,
    };
    while Instant::now() < deadline && claimed.fetch_add(1, Ordering::Relaxed) < budget_count {
        let sent_at = Instant::now();
        let mut retries = 0;
        loop {
            match handle.append(batch.clone()).await {
                Ok(_) => break,
                Err(sluice_storage::StorageError::OwnerGone)
                    if retries < LOST_REQUEST_RETRIES_MAX =>
                {
                    retries += 1;
                    tally.lost_request_count += 1;
                }
                Err(error) => return Err(BenchError::storage("appending", error)),
            }
        }
        tally
            .ack_us
            .saturating_record((sent_at.elapsed().as_micros() as u64).max(1));
        tally.append_count += 1;
    }
    Ok(tally)
}

/// Fills a log, closes it, times reopening it, then reads it all back from the page cache.
async fn reopen_and_read(
    base: &Path,
    options: &StorageOptions,
) -> Result<(ReopenResult, ReadResult), BenchError> {
    let dir = fresh_dir(base, "reopen")?;
    let batch = build_batch(FILL_BATCH_BYTES, options.record_bytes as usize);
    let config = log_config(FsyncPolicy::Never, batch.len());
    let log = Log::open(dir.path(), config.clone(), unix_ms_now() as i64)
        .map_err(|error| BenchError::storage("opening the log to fill", error))?;
    let (handle, owner) = LogHandle::spawn(log, OwnerOptions::default());
    let budget_count = options.reopen_log_bytes.div_ceil(batch.len() as u64);
    let claimed = Arc::new(AtomicU64::new(0));
    let far = Instant::now() + Duration::from_secs(24 * 3600);
    let mut fillers = Vec::new();
    let mut lost_request_count = 0u64;
    for _ in 0..FILL_APPENDER_COUNT {
        let handle = handle.clone();
        let batch = batch.clone();
        let claimed = Arc::clone(&claimed);
        fillers.push(tokio::spawn(async move {
            append_loop(&handle, &batch, &claimed, budget_count, far).await
        }));
    }
    for filler in fillers {
        let joined = filler
            .await
            .map_err(|error| BenchError::Task(format!("a filler: {error}")))?;
        match joined {
            Ok(tally) => lost_request_count += tally.lost_request_count,
            Err(error) => return Err(explain_owner_gone(error, owner).await),
        }
    }
    let log_bytes = handle.reader().size_bytes();
    let close_started = Instant::now();
    handle
        .close()
        .await
        .map_err(|error| BenchError::storage("closing the filled log", error))?;
    owner
        .await
        .map_err(|error| BenchError::Task(format!("the log owner: {error}")))?
        .map_err(|error| BenchError::storage("the log owner", error))?;
    let close_ms = close_started.elapsed().as_secs_f64() * 1000.0;

    let path = dir.path().to_owned();
    let read_bytes_max = options.read_bytes;
    let (reopen, read) = tokio::task::spawn_blocking(move || -> Result<_, BenchError> {
        let open_started = Instant::now();
        let (log, open_report) = Log::open_with_report(&path, config, unix_ms_now() as i64)
            .map_err(|error| BenchError::storage("reopening the log", error))?;
        let open_ms = open_started.elapsed().as_secs_f64() * 1000.0;
        let reopen = ReopenResult {
            log_bytes,
            segment_count: open_report.segment_count,
            close_ms,
            lost_request_count,
            open_ms,
            rebuilt_index_count: open_report.rebuilt_index_count,
            truncated_bytes: open_report.truncated_bytes,
        };
        let read = read_all(&log.reader(), read_bytes_max as usize)?;
        log.close()
            .map_err(|error| BenchError::storage("closing the reopened log", error))?;
        Ok((reopen, read))
    })
    .await
    .map_err(|error| BenchError::Task(format!("reopen and read: {error}")))??;
    drop(dir);
    Ok((reopen, read))
}

/// Reads the log from its start to its end with calls of at most `read_bytes_max`.
fn read_all(reader: &LogReader, read_bytes_max: usize) -> Result<ReadResult, BenchError> {
    let end = reader.log_end_offset();
    let mut offset = reader.log_start_offset();
    let mut bytes = 0u64;
    let mut read_count = 0u64;
    let started = Instant::now();
    while offset < end {
        let batches = reader
            .read(offset, read_bytes_max, true)
            .map_err(|error| BenchError::storage(format!("reading at offset {offset}"), error))?;
        read_count += 1;
        if batches.bytes.is_empty() {
            return Err(BenchError::Invalid(format!(
                "a read at offset {offset} below the log end {end} returned nothing"
            )));
        }
        let mut position = 0;
        while position < batches.bytes.len() {
            let header = BatchHeader::parse(&batches.bytes[position..]).map_err(|error| {
                BenchError::Invalid(format!("a read returned a bad batch: {error}"))
            })?;
            position += header.total_bytes();
            offset = header.next_offset() as u64;
        }
        bytes += batches.bytes.len() as u64;
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    Ok(ReadResult {
        bytes,
        read_count,
        read_bytes_max: read_bytes_max as u64,
        elapsed_s,
        mb_per_s: bytes as f64 / elapsed_s.max(1e-9) / 1e6,
    })
}

/// Writes the report as JSON and Markdown beside each other.
pub fn write(
    report: &StorageReport,
    json: Option<&Path>,
    markdown: Option<&Path>,
) -> Result<(), BenchError> {
    if let Some(path) = json {
        crate::report::write_json(path, report)?;
    }
    if let Some(path) = markdown {
        write_text(path, &report.to_markdown())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("16KiB"), Ok(16 * 1024));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("3g"), Ok(3 << 30));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("").is_err());
    }

    #[test]
    fn batches_fill_their_size_without_passing_it() {
        for (size, record) in [(16 * 1024, 1024), (1 << 20, 1024), (300, 1024)] {
            let batch = build_batch(size, record);
            let header = BatchHeader::parse(&batch).unwrap();
            assert!(header.record_count >= 1);
            if size > record {
                assert!(batch.len() <= size, "{} > {size}", batch.len());
                assert!(
                    batch.len() + 2 * (record + 16) > size,
                    "batch of {} is too small",
                    batch.len()
                );
            }
            sluice_storage::batch::verify(&batch).unwrap();
        }
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(16 * 1024), "16 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(2 << 30), "2 GiB");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_run_measures_every_benchmark() {
        let dir = tempfile::tempdir().unwrap();
        let options = StorageOptions {
            dir: Some(dir.path().to_owned()),
            batch_bytes: vec![16 * 1024],
            fsync: vec!["never".into(), "always".into()],
            appenders: vec![1, 4],
            append_duration_s: 0.2,
            append_bytes_max: 4 << 20,
            reopen_log_bytes: 8 << 20,
            read_bytes: 1 << 20,
            ..StorageOptions::default()
        };
        let report = run(&options, true).await.unwrap();
        assert_eq!(report.appends.len(), 4);
        for append in &report.appends {
            assert!(append.batch_count > 0, "{append:?}");
            assert!(append.bytes <= 4 << 20);
        }
        let always = report.append(16 * 1024, "always", 4).unwrap();
        assert!(
            always.flush_count > 0,
            "fsync=always must fsync: {always:?}"
        );
        let reopen = report.reopen.as_ref().unwrap();
        assert!(reopen.log_bytes >= 8 << 20);
        let read = report.read.as_ref().unwrap();
        assert_eq!(read.bytes, reopen.log_bytes);
        // Every run cleaned up after itself.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(report.to_markdown().contains("| always | 4 |"));
    }
}
