//! Starting and stopping a Sluice broker for the suite and the smoke test.
//!
//! The broker runs as `sluice serve` with a fresh data directory and every listener on a
//! loopback port chosen by the kernel (port 0); once bound, it writes the addresses to its
//! ready file as JSON, which is how this module learns them.
//!
//! While the broker is still growing some listeners may not exist yet. If the binary refuses
//! a listener flag it does not know, the flag is dropped and the start retried, and the
//! missing listener is reported so the workloads that need it are skipped with that reason.
//!
//! Invariant: a [`SluiceProcess`] never outlives its value. [`SluiceProcess::stop`] sends
//! SIGTERM and waits for a graceful exit; dropping the value without stopping kills the
//! process, so an error anywhere in a suite cannot leave a broker running.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::BenchError;

/// The listener flags `sluice serve` is started with, in order.
const LISTENER_FLAGS: [(&str, &str); 3] = [
    ("--kafka-listen", "kafka"),
    ("--amqp-listen", "amqp"),
    ("--http-listen", "http"),
];
/// Starts attempted before giving up: one per listener flag that might be dropped, plus one.
const START_ATTEMPTS_MAX: usize = LISTENER_FLAGS.len() + 1;
const LOG_TAIL_BYTES: usize = 2000;

/// The addresses a running broker listens on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listeners {
    pub kafka: Option<String>,
    pub amqp: Option<String>,
    pub http: Option<String>,
}

impl Listeners {
    /// The AMQP URI of the listener, with the default guest credentials and vhost.
    pub fn amqp_uri(&self) -> Option<String> {
        self.amqp
            .as_ref()
            .map(|address| format!("amqp://guest:guest@{address}/%2f"))
    }
}

#[derive(Debug)]
pub struct SluiceProcess {
    child: Child,
    pub listeners: Listeners,
    /// Listener flags the binary did not accept, with what it said.
    pub refused_flags: Vec<(String, String)>,
    pub log_path: PathBuf,
    data_dir: Option<tempfile::TempDir>,
}

impl SluiceProcess {
    /// Starts `binary` with a fresh data directory under `work_dir`, its output appended to
    /// `log_path`, and waits up to `timeout` for its ready file.
    pub async fn start(
        binary: &Path,
        work_dir: &Path,
        log_path: &Path,
        timeout: Duration,
    ) -> Result<Self, BenchError> {
        if !binary.is_file() {
            return Err(BenchError::Process(format!(
                "no sluice binary at {}",
                binary.display()
            )));
        }
        std::fs::create_dir_all(work_dir)
            .map_err(|source| BenchError::io("create", work_dir, source))?;
        let mut flags: Vec<(&str, &str)> = LISTENER_FLAGS.to_vec();
        let mut refused_flags = Vec::new();
        for _ in 0..START_ATTEMPTS_MAX {
            let data_dir = tempfile::Builder::new()
                .prefix("sluice-data-")
                .tempdir_in(work_dir)
                .map_err(|source| BenchError::io("create a data directory in", work_dir, source))?;
            let ready_file = data_dir.path().with_extension("ready.json");
            let mut child = spawn(binary, data_dir.path(), &ready_file, &flags, log_path)?;
            match wait_ready(&mut child, &ready_file, log_path, timeout).await {
                Ok(listeners) => {
                    let _ = std::fs::remove_file(&ready_file);
                    return Ok(Self {
                        child,
                        listeners,
                        refused_flags,
                        log_path: log_path.to_owned(),
                        data_dir: Some(data_dir),
                    });
                }
                Err(Exit::Refused(flag, said)) if flags.iter().any(|(f, _)| *f == flag) => {
                    flags.retain(|(f, _)| *f != flag);
                    refused_flags.push((flag, said));
                }
                Err(Exit::Refused(_, said) | Exit::Failed(said)) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(BenchError::Process(said));
                }
            }
        }
        Err(BenchError::Process(format!(
            "sluice refused every listener flag; see {}",
            log_path.display()
        )))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `grace` for the process to exit, then kills it. The data
    /// directory is removed afterwards.
    pub async fn stop(mut self, grace: Duration) -> Result<ExitStatus, BenchError> {
        let pid = rustix::process::Pid::from_child(&self.child);
        if let Err(error) = rustix::process::kill_process(pid, rustix::process::Signal::TERM) {
            return Err(BenchError::Process(format!("cannot send SIGTERM: {error}")));
        }
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.data_dir.take();
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(BenchError::Process(format!(
                        "sluice did not exit within {grace:?} of SIGTERM and was killed"
                    )));
                }
                Err(error) => {
                    return Err(BenchError::Process(format!(
                        "cannot wait for sluice: {error}"
                    )));
                }
            }
        }
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn(
    binary: &Path,
    data_dir: &Path,
    ready_file: &Path,
    flags: &[(&str, &str)],
    log_path: &Path,
) -> Result<Child, BenchError> {
    if let Some(parent) = log_path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|source| BenchError::io("create", parent, source))?;
    }
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|source| BenchError::io("open", log_path, source))?;
    let log_err = log
        .try_clone()
        .map_err(|source| BenchError::io("duplicate", log_path, source))?;
    let mut command = Command::new(binary);
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--ready-file")
        .arg(ready_file);
    for (flag, _) in flags {
        command.arg(flag).arg("127.0.0.1:0");
    }
    command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|source| BenchError::io("start", binary, source))
}

enum Exit {
    /// The binary exited saying it does not know this flag.
    Refused(String, String),
    Failed(String),
}

async fn wait_ready(
    child: &mut Child,
    ready_file: &Path,
    log_path: &Path,
    timeout: Duration,
) -> Result<Listeners, Exit> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(ready_file)
            && let Ok(listeners) = serde_json::from_str::<Listeners>(&text)
        {
            return Ok(listeners);
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                let tail = log_tail(log_path);
                let said = format!("sluice exited with {status} before it was ready: {tail}");
                return Err(match refused_flag(&tail) {
                    Some(flag) => Exit::Refused(flag, said),
                    None => Exit::Failed(said),
                });
            }
            Ok(None) => {}
            Err(error) => return Err(Exit::Failed(format!("cannot wait for sluice: {error}"))),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Exit::Failed(format!(
                "sluice wrote no ready file within {timeout:?}: {}",
                log_tail(log_path)
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The flag named in an "unexpected argument '--flag'" error, as clap prints it.
fn refused_flag(output: &str) -> Option<String> {
    let at = output.rfind("unexpected argument '")?;
    let rest = &output[at + "unexpected argument '".len()..];
    let flag = rest.split('\'').next()?;
    let flag = flag.split('=').next()?.split_whitespace().next()?;
    flag.starts_with("--").then(|| flag.to_owned())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(LOG_TAIL_BYTES);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].trim().replace('\n', " | ")
}

/// Where the smoke test and the suite look for the sluice binary when none is given:
/// `$SLUICE_BIN`, then the workspace's debug and release builds, then `$CARGO_TARGET_DIR`'s.
pub fn find_binary(workspace_root: &Path) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SLUICE_BIN") {
        return Some(PathBuf::from(path));
    }
    let mut candidates = vec![
        workspace_root.join("target/debug/sluice"),
        workspace_root.join("target/release/sluice"),
    ];
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        let target = PathBuf::from(target);
        candidates.push(target.join("debug/sluice"));
        candidates.push(target.join("release/sluice"));
    }
    candidates.into_iter().find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_refusals_name_the_flag() {
        let said = "error: unexpected argument '--amqp-listen' found\n\nUsage: sluice serve";
        assert_eq!(refused_flag(said), Some("--amqp-listen".into()));
        assert_eq!(refused_flag("error: something else"), None);
    }

    #[test]
    fn ready_files_may_lack_listeners() {
        let listeners: Listeners =
            serde_json::from_str(r#"{"kafka":"127.0.0.1:1","http":"127.0.0.1:2"}"#).unwrap();
        assert_eq!(listeners.kafka.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(listeners.amqp, None);
        assert_eq!(listeners.amqp_uri(), None);
        let full = Listeners {
            amqp: Some("127.0.0.1:5".into()),
            ..Listeners::default()
        };
        assert_eq!(
            full.amqp_uri().unwrap(),
            "amqp://guest:guest@127.0.0.1:5/%2f"
        );
    }

    #[tokio::test]
    async fn a_binary_that_dies_is_reported_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-sluice");
        std::fs::write(&script, "#!/bin/sh\necho 'cannot bind: no' >&2\nexit 3\n").unwrap();
        make_executable(&script);
        let error = SluiceProcess::start(
            &script,
            dir.path(),
            &dir.path().join("log"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(error.to_string().contains("cannot bind: no"), "{error}");
    }

    #[tokio::test]
    async fn refused_listener_flags_are_dropped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-sluice");
        // Knows no AMQP yet; writes a ready file with what it has, then waits for SIGTERM.
        std::fs::write(
            &script,
            r#"#!/bin/sh
ready=""
for arg in "$@"; do
  if [ "$arg" = "--amqp-listen" ]; then echo "error: unexpected argument '--amqp-listen' found" >&2; exit 2; fi
  if [ "$prev" = "--ready-file" ]; then ready="$arg"; fi
  prev="$arg"
done
echo '{"kafka":"127.0.0.1:9"}' > "$ready"
trap 'exit 0' TERM
while true; do sleep 0.05; done
"#,
        )
        .unwrap();
        make_executable(&script);
        let process = SluiceProcess::start(
            &script,
            dir.path(),
            &dir.path().join("log"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(process.listeners.kafka.as_deref(), Some("127.0.0.1:9"));
        assert_eq!(process.refused_flags.len(), 1);
        assert_eq!(process.refused_flags[0].0, "--amqp-listen");
        let status = process.stop(Duration::from_secs(5)).await.unwrap();
        assert!(status.success(), "{status}");
    }

    fn make_executable(path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}
