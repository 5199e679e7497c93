//! Watching the broker's core tasks: if one dies while the broker is serving, the process must
//! stop rather than serve half-dead.
//!
//! Every owner task (and later every coordinator task) is handed to [`Supervisor::watch`]. A
//! panic, or an error return before shutdown has begun, is reported on the fatal channel; the
//! binary exits non-zero when it reads one.

use std::fmt::Display;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A core task died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    pub task: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Supervisor {
    fatal: mpsc::Sender<Fatal>,
    stopping: Arc<AtomicBool>,
}

impl Supervisor {
    /// A supervisor and the receiving end of its fatal channel.
    pub fn new() -> (Self, mpsc::Receiver<Fatal>) {
        // Bounded: the first report is enough to stop the process; later ones may be dropped.
        let (fatal, receiver) = mpsc::channel(16);
        (
            Self {
                fatal,
                stopping: Arc::new(AtomicBool::new(false)),
            },
            receiver,
        )
    }

    /// From now on, tasks ending is expected.
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Reports `task` if it panics, or fails before shutdown began.
    pub fn watch<E: Display + Send + 'static>(
        &self,
        task: String,
        handle: JoinHandle<Result<(), E>>,
    ) {
        let fatal = self.fatal.clone();
        let stopping = Arc::clone(&self.stopping);
        tokio::spawn(async move {
            let reason = match handle.await {
                Ok(Ok(())) => return,
                Ok(Err(error)) if !stopping.load(Ordering::SeqCst) => error.to_string(),
                Ok(Err(error)) => {
                    tracing::warn!(%task, %error, "task failed while shutting down");
                    return;
                }
                Err(join_error) if join_error.is_panic() => format!("panicked: {join_error}"),
                Err(_) => return, // cancelled with the runtime
            };
            tracing::error!(%task, %reason, "a core task died; the broker will stop");
            let _ = fatal.try_send(Fatal { task, reason });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn panics_and_early_errors_are_fatal_but_shutdown_errors_are_not() {
        let (supervisor, mut fatal) = Supervisor::new();
        supervisor.watch("ok".into(), tokio::spawn(async { Ok::<(), String>(()) }));
        supervisor.watch(
            "fails".into(),
            tokio::spawn(async { Err::<(), _>("disk gone".to_owned()) }),
        );
        let report = fatal.recv().await.unwrap();
        assert_eq!(report.task, "fails");
        assert_eq!(report.reason, "disk gone");
        supervisor.watch(
            "panics".into(),
            tokio::spawn(async {
                if true {
                    panic!("bug");
                }
                Ok::<(), String>(())
            }),
        );
        assert_eq!(fatal.recv().await.unwrap().task, "panics");
        supervisor.begin_shutdown();
        supervisor.watch(
            "late".into(),
            tokio::spawn(async { Err::<(), _>("closing".to_owned()) }),
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(fatal.try_recv().is_err());
    }
}
