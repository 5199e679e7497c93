//! The owner task of a log: the one task that writes it.
//!
//! Requests arrive on a bounded channel and are applied in batches. Replies that must wait for
//! durability (`fsync = always`) queue up while one fsync runs on a blocking thread; when it
//! finishes, every reply it covers is released at once, and the next fsync covers everything
//! appended meanwhile. That is group commit: concurrent appenders share fsyncs, and the writer
//! never stops appending while the disk syncs.
//!
//! What the owner does with a request is up to a [`LogHandler`]: [`BasicHandler`] offers plain
//! log operations; the broker's partitions and queues plug in their own state (producer
//! sequence checks, acknowledgements) so that state changes in the same task, in the same
//! order, as the log.
//!
//! Bounds: the channel holds `channel_capacity` requests, a drain takes at most `drain_max`,
//! and at most `waiting_max` replies wait for an fsync; past that the owner stops reading the
//! channel and senders wait.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::clock::{Clock, SystemClock};
use crate::config::FsyncPolicy;
use crate::error::StorageError;
use crate::log::{AppendInfo, CheckedBatches, FlushJob, Log, LogReader};

/// A reply, and how far the log must be written and made durable (offsets, exclusive) before
/// it is sent.
#[derive(Debug)]
pub struct Handled<R> {
    pub reply: R,
    /// The reply waits for the fsync that covers this offset.
    pub durable_at: Option<u64>,
    /// The reply stands only if the drain's deferred appends up to this offset are written
    /// (see [`Log::append_deferred`]); if writing them fails, the handler's
    /// [`LogHandler::flush_failed`] reply goes instead.
    pub written_at: Option<u64>,
}

impl<R> Handled<R> {
    pub fn now(reply: R) -> Self {
        Self {
            reply,
            durable_at: None,
            written_at: None,
        }
    }

    pub fn when_durable(reply: R, end_offset: u64) -> Self {
        Self {
            reply,
            durable_at: Some(end_offset),
            written_at: None,
        }
    }

    /// The reply to an append that ended at `end_offset`: sent once the append is written
    /// (at the end of the drain, for a deferred one) and, under `fsync = always`, once an
    /// fsync covers it.
    pub fn after_append(log: &Log, reply: R, end_offset: u64) -> Self {
        let durable_at = match log.config().fsync {
            FsyncPolicy::Always => Some(end_offset),
            _ => None,
        };
        Self {
            reply,
            durable_at,
            written_at: Some(end_offset),
        }
    }
}

/// What the owner task does with each request.
pub trait LogHandler: Send + 'static {
    type Request: Send + 'static;
    type Reply: Send + 'static;

    /// Applies one request to the log.
    fn handle(
        &mut self,
        log: &mut Log,
        request: Self::Request,
        now_ms: i64,
    ) -> Handled<Self::Reply>;

    /// The reply to send instead of `reply` when the fsync it waited for failed.
    fn flush_failed(&mut self, reply: Self::Reply, error: &StorageError) -> Self::Reply;

    /// Called when the log has become durable up to `flushed_offset` (exclusive).
    fn on_durable(&mut self, _log: &Log, _flushed_offset: u64) {}

    /// Called after each drain of requests, once its deferred appends are written (see
    /// [`Log::append_deferred`]) or writing them failed: what readers may see is now
    /// [`Log::written_end_offset`].
    fn on_written(&mut self, _log: &Log) {}

    /// Called once, just before the log is closed.
    fn on_close(&mut self, _log: &mut Log) {}

    /// Periodic housekeeping. The default enforces retention.
    fn tick(&mut self, log: &mut Log, now_ms: i64) {
        if let Err(error) = log.apply_retention(now_ms) {
            tracing::warn!(dir = %log.dir().display(), %error, "retention failed");
        }
    }
}

#[derive(Debug, Clone)]
pub struct OwnerOptions {
    pub channel_capacity: usize,
    pub drain_max: usize,
    pub waiting_max: usize,
    pub tick_interval: Duration,
    pub clock: Arc<dyn Clock>,
    /// Where fsync round durations are recorded (one histogram may serve many logs).
    pub fsync_latency: Option<Arc<sluice_metrics::Histogram>>,
}

impl Default for OwnerOptions {
    fn default() -> Self {
        Self {
            channel_capacity: 1024,
            drain_max: 256,
            waiting_max: 4096,
            tick_interval: Duration::from_secs(5),
            clock: Arc::new(SystemClock),
            fsync_latency: None,
        }
    }
}

enum Message<Req, Rep> {
    Call(Req, oneshot::Sender<Rep>),
    Close(oneshot::Sender<Result<(), StorageError>>),
}

/// A sender to the owner task. Cheap to clone.
#[derive(Debug)]
pub struct OwnerHandle<Req, Rep> {
    tx: mpsc::Sender<Message<Req, Rep>>,
}

impl<Req, Rep> Clone for OwnerHandle<Req, Rep> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<Req, Rep> std::fmt::Debug for Message<Req, Rep> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Call(..) => "Call",
            Self::Close(..) => "Close",
        })
    }
}

impl<Req: Send + 'static, Rep: Send + 'static> OwnerHandle<Req, Rep> {
    /// Sends a request and waits for its reply. Waits for channel space if the owner is busy.
    pub async fn call(&self, request: Req) -> Result<Rep, StorageError> {
        self.submit(request)
            .await?
            .await
            .map_err(|_| StorageError::OwnerGone)
    }

    /// Sends a request (waiting for channel space if the owner is busy) and returns where its
    /// reply will come: requests are handled in the order they were submitted, so a caller
    /// may submit the next one before this one is answered.
    pub async fn submit(&self, request: Req) -> Result<oneshot::Receiver<Rep>, StorageError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Message::Call(request, tx))
            .await
            .map_err(|_| StorageError::OwnerGone)?;
        Ok(rx)
    }

    /// Asks the owner to finish pending work, close the log and stop.
    pub async fn close(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Message::Close(tx))
            .await
            .map_err(|_| StorageError::OwnerGone)?;
        rx.await.map_err(|_| StorageError::OwnerGone)?
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The owner task itself: it ends with the result of closing the log.
pub type OwnerTask = JoinHandle<Result<(), StorageError>>;

/// Starts the owner task of `log` on the current tokio runtime.
pub fn spawn<H: LogHandler>(
    log: Log,
    handler: H,
    options: OwnerOptions,
) -> (OwnerHandle<H::Request, H::Reply>, OwnerTask) {
    let (tx, rx) = mpsc::channel(options.channel_capacity.max(1));
    let task = tokio::spawn(run(log, handler, rx, options));
    (OwnerHandle { tx }, task)
}

/// An fsync round running on a blocking thread.
type FlushTask = JoinHandle<Result<(), StorageError>>;

type Waiting<R> = VecDeque<(u64, oneshot::Sender<R>, R)>;

/// Replies handled in one drain, with where to send them.
type DrainReplies<R> = Vec<(oneshot::Sender<R>, Handled<R>)>;

async fn run<H: LogHandler>(
    mut log: Log,
    mut handler: H,
    mut rx: mpsc::Receiver<Message<H::Request, H::Reply>>,
    options: OwnerOptions,
) -> Result<(), StorageError> {
    let mut waiting: Waiting<H::Reply> = VecDeque::new();
    let mut flushing: Option<(Arc<FlushJob>, FlushTask)> = None;
    let mut tick = tokio::time::interval(options.tick_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let fsync_period = match log.config().fsync {
        FsyncPolicy::Interval { interval_ms } => Some(Duration::from_millis(interval_ms)),
        _ => None,
    };
    let mut fsync_timer = tokio::time::interval(fsync_period.unwrap_or(Duration::from_secs(3600)));
    fsync_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing: Option<oneshot::Sender<Result<(), StorageError>>> = None;
    let mut want_flush = false;
    // The replies of one drain, held until its deferred appends are written.
    let mut drain_replies: DrainReplies<H::Reply> = Vec::new();

    loop {
        tokio::select! {
            biased;
            joined = async {
                match flushing.as_mut() {
                    Some((_, task)) => task.await,
                    None => std::future::pending().await,
                }
            }, if flushing.is_some() => {
                let (job, _) = flushing.take().expect("guarded by the branch condition");
                let result = joined.unwrap_or_else(|join_error| Err(StorageError::Failed {
                    dir: log.dir().to_owned(),
                    reason: format!("fsync task failed: {join_error}"),
                }));
                finish_flush(&mut log, &mut handler, &mut waiting, &job, result);
            }
            message = rx.recv(), if closing.is_none() && waiting.len() < options.waiting_max => {
                let Some(first) = message else { break };
                let now_ms = options.clock.now_ms();
                // Take a message off the channel only when it will be handled in this drain:
                // one taken and then left behind would be dropped, and its caller told the
                // owner is gone.
                let mut next = Some(first);
                let mut drained = 0;
                let drain_max = options
                    .drain_max
                    .min(options.waiting_max.saturating_sub(waiting.len()))
                    .max(1);
                while let Some(message) = next.take() {
                    drained += 1;
                    match message {
                        Message::Call(request, reply_to) => {
                            let handled = handler.handle(&mut log, request, now_ms);
                            drain_replies.push((reply_to, handled));
                        }
                        Message::Close(reply_to) => {
                            closing = Some(reply_to);
                            break;
                        }
                    }
                    if drained < drain_max {
                        next = rx.try_recv().ok();
                    }
                }
                let written = log.write_deferred();
                handler.on_written(&log);
                let written_end = log.written_end_offset();
                for (reply_to, handled) in drain_replies.drain(..) {
                    let reply = match &written {
                        Err(error) if handled.written_at.is_some_and(|end| end > written_end) => {
                            let _ = reply_to.send(handler.flush_failed(handled.reply, error));
                            continue;
                        }
                        _ => handled.reply,
                    };
                    match handled.durable_at {
                        Some(offset) if offset > log.flushed_offset() => {
                            waiting.push_back((offset, reply_to, reply));
                        }
                        _ => {
                            let _ = reply_to.send(reply);
                        }
                    }
                }
            }
            _ = tick.tick() => {
                handler.tick(&mut log, options.clock.now_ms());
                if fsync_period.is_none() {
                    // Without periodic fsyncs, still keep the index files current.
                    if let Err(error) = log.persist_indexes() {
                        tracing::warn!(dir = %log.dir().display(), %error, "cannot write index files");
                    }
                }
            }
            _ = fsync_timer.tick(), if fsync_period.is_some() => {
                want_flush = true;
            }
        }

        if flushing.is_none() && (want_flush || !waiting.is_empty()) {
            want_flush = false;
            match log.flush_job() {
                Some(job) => {
                    let job = Arc::new(job);
                    let runner = Arc::clone(&job);
                    let latency = options.fsync_latency.clone();
                    let task = tokio::task::spawn_blocking(move || {
                        let started = std::time::Instant::now();
                        let result = runner.run();
                        if let Some(latency) = latency {
                            latency.observe(started.elapsed());
                        }
                        result
                    });
                    flushing = Some((job, task));
                }
                None => release_without_flush(&log, &mut handler, &mut waiting),
            }
        }
        if closing.is_some() && flushing.is_none() && waiting.is_empty() {
            break;
        }
    }

    if let Some((job, task)) = flushing.take() {
        let result = task.await.unwrap_or_else(|join_error| {
            Err(StorageError::Failed {
                dir: log.dir().to_owned(),
                reason: format!("fsync task failed: {join_error}"),
            })
        });
        finish_flush(&mut log, &mut handler, &mut waiting, &job, result);
    }
    handler.on_close(&mut log);
    let result = log.close();
    release_without_flush_after_close(&mut handler, &mut waiting, &result);
    match closing {
        Some(reply_to) => {
            let _ = reply_to.send(result);
            Ok(())
        }
        None => result,
    }
}

fn finish_flush<H: LogHandler>(
    log: &mut Log,
    handler: &mut H,
    waiting: &mut Waiting<H::Reply>,
    job: &FlushJob,
    result: Result<(), StorageError>,
) {
    match log.complete_flush(job, result) {
        Ok(durable) => {
            handler.on_durable(log, durable);
            while waiting
                .front()
                .is_some_and(|(offset, _, _)| *offset <= durable)
            {
                let (_, reply_to, reply) = waiting.pop_front().expect("front checked above");
                let _ = reply_to.send(reply);
            }
        }
        Err(error) => {
            for (_, reply_to, reply) in waiting.drain(..) {
                let _ = reply_to.send(handler.flush_failed(reply, &error));
            }
        }
    }
}

/// Nothing left to flush: either the replies are already covered, or the log has failed.
fn release_without_flush<H: LogHandler>(
    log: &Log,
    handler: &mut H,
    waiting: &mut Waiting<H::Reply>,
) {
    let durable = log.flushed_offset();
    let failure = log.failure().map(|reason| StorageError::Failed {
        dir: log.dir().to_owned(),
        reason: reason.to_owned(),
    });
    while let Some((offset, reply_to, reply)) = waiting.pop_front() {
        let reply = match &failure {
            Some(error) if offset > durable => handler.flush_failed(reply, error),
            _ => reply,
        };
        let _ = reply_to.send(reply);
    }
}

fn release_without_flush_after_close<H: LogHandler>(
    handler: &mut H,
    waiting: &mut Waiting<H::Reply>,
    close_result: &Result<(), StorageError>,
) {
    for (_, reply_to, reply) in waiting.drain(..) {
        let reply = match close_result {
            Ok(()) => reply,
            Err(error) => handler.flush_failed(reply, error),
        };
        let _ = reply_to.send(reply);
    }
}

/// Plain log operations, for logs with no state of their own beside the data.
#[derive(Debug)]
pub enum LogRequest {
    /// Batches checked by the sender ([`LogHandle::append`] does it on the caller's task).
    Append(CheckedBatches),
    Roll,
    Flush,
    AdvanceLogStart(u64),
    TruncateTo(u64),
    BeginLeaderEpoch(i32),
    ApplyRetention,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogResponse {
    Appended(AppendInfo),
    /// The log is durable up to this offset.
    Flushed(u64),
    LogStart(u64),
    Done,
}

/// The [`LogHandler`] for plain logs.
#[derive(Debug, Default)]
pub struct BasicHandler {
    dir: std::path::PathBuf,
}

impl LogHandler for BasicHandler {
    type Request = LogRequest;
    type Reply = Result<LogResponse, StorageError>;

    fn handle(&mut self, log: &mut Log, request: LogRequest, now_ms: i64) -> Handled<Self::Reply> {
        match request {
            LogRequest::Append(checked) => match log.append_deferred(checked, now_ms) {
                Ok(info) => {
                    let end = info.last_offset + 1;
                    Handled::after_append(log, Ok(LogResponse::Appended(info)), end)
                }
                Err(error) => Handled::now(Err(error)),
            },
            LogRequest::Flush => {
                let end = log.log_end_offset();
                Handled::when_durable(Ok(LogResponse::Flushed(end)), end)
            }
            LogRequest::Roll => Handled::now(log.roll(now_ms).map(|()| LogResponse::Done)),
            LogRequest::AdvanceLogStart(offset) => Handled::now(
                log.advance_log_start(offset, now_ms)
                    .map(LogResponse::LogStart),
            ),
            LogRequest::TruncateTo(offset) => {
                Handled::now(log.truncate_to(offset, now_ms).map(|()| LogResponse::Done))
            }
            LogRequest::BeginLeaderEpoch(epoch) => {
                Handled::now(log.begin_leader_epoch(epoch).map(|()| LogResponse::Done))
            }
            LogRequest::ApplyRetention => Handled::now(
                log.apply_retention(now_ms)
                    .map(|outcome| LogResponse::LogStart(outcome.log_start_offset)),
            ),
        }
    }

    fn flush_failed(&mut self, _reply: Self::Reply, error: &StorageError) -> Self::Reply {
        Err(StorageError::Failed {
            dir: self.dir.clone(),
            reason: error.to_string(),
        })
    }
}

/// A plain log behind its owner task: appends go through the owner, reads go straight to the
/// files.
#[derive(Debug, Clone)]
pub struct LogHandle {
    owner: OwnerHandle<LogRequest, Result<LogResponse, StorageError>>,
    reader: LogReader,
    /// The log's batch size limit when the owner started (the owner checks it again).
    max_batch_bytes: usize,
}

impl LogHandle {
    /// Starts the owner task for `log` and returns a handle plus the task to supervise.
    pub fn spawn(log: Log, options: OwnerOptions) -> (Self, OwnerTask) {
        let reader = log.reader();
        let max_batch_bytes = log.config().max_batch_bytes;
        let handler = BasicHandler {
            dir: log.dir().to_owned(),
        };
        let (owner, task) = spawn(log, handler, options);
        (
            Self {
                owner,
                reader,
                max_batch_bytes,
            },
            task,
        )
    }

    pub fn reader(&self) -> &LogReader {
        &self.reader
    }

    /// Appends batches, checking them on the caller's task first. The bytes are written as
    /// they are (the assigned offsets are patched on the way to the file), so one buffer may be
    /// appended many times.
    pub async fn append(&self, batches: impl Into<Bytes>) -> Result<AppendInfo, StorageError> {
        let checked = CheckedBatches::check(batches.into(), self.max_batch_bytes)?;
        match self.owner.call(LogRequest::Append(checked)).await?? {
            LogResponse::Appended(info) => Ok(info),
            other => unexpected(other),
        }
    }

    /// Waits until everything appended so far is on disk.
    pub async fn flush(&self) -> Result<u64, StorageError> {
        match self.owner.call(LogRequest::Flush).await?? {
            LogResponse::Flushed(offset) => Ok(offset),
            other => unexpected(other),
        }
    }

    pub async fn request(&self, request: LogRequest) -> Result<LogResponse, StorageError> {
        self.owner.call(request).await?
    }

    pub async fn close(&self) -> Result<(), StorageError> {
        self.owner.close().await
    }
}

fn unexpected<T>(reply: LogResponse) -> T {
    unreachable!("BasicHandler answers each request with its own variant, not {reply:?}")
}
