//! The machine's own limits, measured with the standard tools so Sluice's figures can be
//! read as a fraction of what the hardware allows: fio for the disk (buffered sequential
//! write bandwidth, O_DIRECT sequential write bandwidth, and the rate of write + fdatasync
//! pairs) and iperf3 for loopback TCP bandwidth.
//!
//! A tool that is missing or fails does not fail the whole measurement: that limit is left
//! out and the reason recorded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::error::BenchError;

#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct LimitsOptions {
    /// Directory fio writes its test file in (default: the system's temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// Bytes fio writes in the buffered sequential write test; match the storage benchmark's
    /// append budget so the two measure the same thing.
    #[arg(long, value_parser = crate::storage::parse_bytes, default_value = "2GiB")]
    pub write_bytes: u64,

    /// Block size of the write + fdatasync test: the batch size being compared.
    #[arg(long, value_parser = crate::storage::parse_bytes, default_value = "16KiB")]
    pub sync_block_bytes: u64,

    /// Seconds each time-based test runs (O_DIRECT write, fdatasync rate, iperf3).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,

    #[arg(long)]
    pub no_fio: bool,

    #[arg(long)]
    pub no_iperf: bool,
}

impl Default for LimitsOptions {
    fn default() -> Self {
        Self {
            dir: None,
            write_bytes: 2 << 30,
            sync_block_bytes: 16 * 1024,
            seconds: 10,
            no_fio: false,
            no_iperf: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LimitsReport {
    pub dir: PathBuf,
    pub fio_version: Option<String>,
    /// Sequential writes through the page cache, no fsync: the best of 256 KiB, 1 MiB and 250 KiB writes.
    pub buffered_write_mb_per_s: Option<f64>,
    pub buffered_write_bytes: u64,
    /// Sequential 1 MiB writes with O_DIRECT, one at a time.
    pub direct_write_mb_per_s: Option<f64>,
    /// Writes of `sync_block_bytes`, each followed by fdatasync, per second.
    pub fdatasync_per_s: Option<f64>,
    pub fdatasync_p99_us: Option<f64>,
    pub sync_block_bytes: u64,
    pub iperf3_version: Option<String>,
    /// One TCP stream over loopback.
    pub loopback_mb_per_s: Option<f64>,
    /// Limits not measured, with the reason.
    pub skipped: Vec<String>,
}

/// Measures every limit `options` asks for.
pub async fn run(options: &LimitsOptions, quiet: bool) -> LimitsReport {
    let dir = options.dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut report = LimitsReport {
        dir: dir.clone(),
        buffered_write_bytes: options.write_bytes,
        sync_block_bytes: options.sync_block_bytes,
        ..LimitsReport::default()
    };
    if options.no_fio {
        report.skipped.push("fio: not asked for".into());
    } else if let Err(error) = std::fs::create_dir_all(&dir) {
        report
            .skipped
            .push(format!("fio: cannot create {}: {error}", dir.display()));
    } else {
        match version("fio", &["--version"]).await {
            Err(reason) => report.skipped.push(format!("fio: {reason}")),
            Ok(fio_version) => {
                report.fio_version = Some(fio_version);
                measure_disk(options, &dir, &mut report, quiet).await;
            }
        }
    }
    if options.no_iperf {
        report.skipped.push("iperf3: not asked for".into());
    } else {
        match version("iperf3", &["--version"]).await {
            Err(reason) => report.skipped.push(format!("iperf3: {reason}")),
            Ok(iperf_version) => {
                report.iperf3_version = iperf_version.lines().next().map(str::to_owned);
                match loopback_bandwidth(options.seconds).await {
                    Ok(mb_per_s) => {
                        if !quiet {
                            eprintln!("limits: iperf3 loopback {mb_per_s:.0} MB/s");
                        }
                        report.loopback_mb_per_s = Some(mb_per_s);
                    }
                    Err(error) => report.skipped.push(format!("iperf3: {}", error.chain())),
                }
            }
        }
    }
    report
}

async fn measure_disk(options: &LimitsOptions, dir: &Path, report: &mut LimitsReport, quiet: bool) {
    let common = common_args(dir);
    let timed = [
        format!("--runtime={}", options.seconds),
        "--time_based".to_owned(),
    ];
    match buffered_write_mb_per_s(dir, options.write_bytes).await {
        Ok(mb_per_s) => report.buffered_write_mb_per_s = Some(mb_per_s),
        Err(error) => report
            .skipped
            .push(format!("fio buffered write: {}", error.chain())),
    }
    let direct = [
        "--name=direct-seq-write".to_owned(),
        "--bs=1M".to_owned(),
        "--direct=1".to_owned(),
        "--unlink=1".to_owned(),
        format!("--size={}", options.write_bytes.min(1 << 30)),
    ];
    match fio(common.iter().chain(&timed).chain(&direct)).await {
        Ok(job) => report.direct_write_mb_per_s = job.write_bytes_per_s.map(|b| b / 1e6),
        Err(error) => report
            .skipped
            .push(format!("fio O_DIRECT write: {}", error.chain())),
    }
    match fdatasync_per_s(dir, options.sync_block_bytes, options.seconds).await {
        Ok((per_s, p99_us)) => {
            report.fdatasync_per_s = Some(per_s);
            report.fdatasync_p99_us = p99_us;
        }
        Err(error) => report
            .skipped
            .push(format!("fio fdatasync: {}", error.chain())),
    }
    if !quiet {
        eprintln!(
            "limits: fio buffered write {} MB/s, O_DIRECT write {} MB/s, write+fdatasync {}/s",
            show(report.buffered_write_mb_per_s),
            show(report.direct_write_mb_per_s),
            show(report.fdatasync_per_s)
        );
    }
}

/// Arguments every fio job shares. The file is not preallocated (`fallocate=none`) because
/// the log's segments are not: both then append to a growing file, which is what the
/// comparison needs (preallocation changes fdatasync rates several times over on ext4).
fn common_args(dir: &Path) -> [String; 4] {
    [
        format!("--directory={}", dir.display()),
        "--rw=write".to_owned(),
        "--ioengine=psync".to_owned(),
        "--fallocate=none".to_owned(),
    ]
}

/// Block sizes of fio's buffered sequential writes; the fastest is the machine's figure.
///
/// The page cache's speed depends on the size and alignment of each write, and not the same
/// way on every machine or even every hour: on the development machine (Linux 6.18, ext4),
/// 1 MiB writes ran at 4 GB/s one morning and at 0.3–1.6 GB/s that afternoon, while 256 KiB
/// writes held about 3 GB/s; later the same day 256 KiB writes fell to 0.4–1.0 GB/s while
/// 250 KiB ones, which are not page-aligned, ran at 2.0–2.6 GB/s. Taking the best of three
/// sizes keeps the reference at what the disk's page cache can really take.
const BUFFERED_BLOCK_SIZES: [&str; 3] = ["256k", "1M", "250k"];

/// fio's sequential writes through the page cache, `bytes` in total, no fsync, in MB/s: the
/// best of 256 KiB, 1 MiB and 250 KiB writes ([`BUFFERED_BLOCK_SIZES`]).
///
/// After each, the file is fsynced (outside the measurement) and deleted, which leaves the
/// page cache as an append run leaves it when it closes its log: deleting a file with 2 GiB
/// still dirty makes the next writer on this machine several times faster than deleting a
/// clean one.
pub async fn buffered_write_mb_per_s(dir: &Path, bytes: u64) -> Result<f64, BenchError> {
    let mut best: f64 = 0.0;
    for block in BUFFERED_BLOCK_SIZES {
        best = best.max(buffered_write_with(dir, bytes, block).await?);
    }
    Ok(best)
}

async fn buffered_write_with(dir: &Path, bytes: u64, block: &str) -> Result<f64, BenchError> {
    // fio puts a relative file name under --directory.
    let file_name = format!("fio-buffered-{}", std::process::id());
    let path = dir.join(&file_name);
    let buffered = [
        "--name=buffered-seq-write".to_owned(),
        format!("--filename={file_name}"),
        format!("--bs={block}"),
        "--direct=0".to_owned(),
        "--end_fsync=0".to_owned(),
        format!("--size={bytes}"),
    ];
    let result = fio(common_args(dir).iter().chain(&buffered)).await;
    let settled = tokio::task::spawn_blocking({
        let path = path.clone();
        move || -> std::io::Result<()> {
            std::fs::File::open(&path)?.sync_all()?;
            std::fs::remove_file(&path)
        }
    })
    .await;
    let job = result?;
    match settled {
        Ok(Ok(())) => {}
        Ok(Err(source)) => return Err(BenchError::io("sync and delete", &path, source)),
        Err(error) => return Err(BenchError::Task(format!("fio file cleanup: {error}"))),
    }
    job.write_bytes_per_s
        .map(|b| b / 1e6)
        .ok_or_else(|| BenchError::Tool {
            tool: "fio",
            reason: "its output has no write bandwidth".into(),
        })
}

/// fio's rate of `block_bytes` writes each followed by fdatasync, appending to a growing file
/// for `seconds`: the most `fsync = always` appends one appender can make. Returns the rate
/// per second and the fdatasync p99 in microseconds.
pub async fn fdatasync_per_s(
    dir: &Path,
    block_bytes: u64,
    seconds: u64,
) -> Result<(f64, Option<f64>), BenchError> {
    let sync = [
        "--name=write-fdatasync".to_owned(),
        format!("--bs={block_bytes}"),
        "--direct=0".to_owned(),
        "--fdatasync=1".to_owned(),
        "--unlink=1".to_owned(),
        format!("--runtime={}", seconds.max(1)),
        "--time_based".to_owned(),
        // Large enough that the run never wraps around and overwrites.
        "--size=4G".to_owned(),
    ];
    let job = fio(common_args(dir).iter().chain(&sync)).await?;
    let per_s = job.write_iops.ok_or_else(|| BenchError::Tool {
        tool: "fio",
        reason: "its output has no write rate".into(),
    })?;
    Ok((per_s, job.sync_p99_ns.map(|ns| ns / 1000.0)))
}

/// Whether fio can be run here.
pub async fn fio_available() -> bool {
    version("fio", &["--version"]).await.is_ok()
}

fn show(value: Option<f64>) -> String {
    value.map_or("n/a".into(), |v| format!("{v:.0}"))
}

async fn version(tool: &'static str, args: &[&str]) -> Result<String, String> {
    match Command::new(tool).args(args).output().await {
        Ok(output) if output.status.success() => {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        }
        Ok(output) => Err(format!("`{tool} --version` exited with {}", output.status)),
        Err(error) => Err(format!("not installed ({error})")),
    }
}

/// What we read from one fio job.
#[derive(Debug, Clone, Default, PartialEq)]
struct FioJob {
    write_bytes_per_s: Option<f64>,
    write_iops: Option<f64>,
    sync_p99_ns: Option<f64>,
}

async fn fio(args: impl Iterator<Item = &String>) -> Result<FioJob, BenchError> {
    let output = Command::new("fio")
        .args(args)
        .arg("--output-format=json")
        .output()
        .await
        .map_err(|error| BenchError::Tool {
            tool: "fio",
            reason: error.to_string(),
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(BenchError::Tool {
            tool: "fio",
            reason: format!(
                "exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    parse_fio(&stdout)
}

fn parse_fio(stdout: &str) -> Result<FioJob, BenchError> {
    // fio may print notes before its JSON.
    let json = stdout.find('{').map_or(stdout, |at| &stdout[at..]);
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|source| BenchError::Json {
            action: "decode",
            what: "fio output".into(),
            source,
        })?;
    let job = value
        .get("jobs")
        .and_then(|jobs| jobs.get(0))
        .ok_or_else(|| BenchError::Tool {
            tool: "fio",
            reason: "its output has no job".into(),
        })?;
    let write = job.get("write");
    Ok(FioJob {
        write_bytes_per_s: write
            .and_then(|w| w.get("bw_bytes"))
            .and_then(serde_json::Value::as_f64),
        write_iops: write
            .and_then(|w| w.get("iops"))
            .and_then(serde_json::Value::as_f64),
        sync_p99_ns: job
            .pointer("/sync/lat_ns/percentile/99.000000")
            .and_then(serde_json::Value::as_f64),
    })
}

/// One iperf3 TCP stream over loopback, in MB/s as received.
async fn loopback_bandwidth(seconds: u64) -> Result<f64, BenchError> {
    let port = free_port()?;
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| BenchError::Tool {
            tool: "iperf3",
            reason: format!("cannot start the server: {error}"),
        })?;
    // Give the server a moment to listen, then retry the client briefly if it was not ready.
    let mut last = None;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let output = Command::new("iperf3")
            .args([
                "-c",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-J",
                "-t",
                &seconds.to_string(),
            ])
            .output()
            .await
            .map_err(|error| BenchError::Tool {
                tool: "iperf3",
                reason: error.to_string(),
            })?;
        if output.status.success() {
            let _ = server.wait().await;
            return parse_iperf(&String::from_utf8_lossy(&output.stdout));
        }
        last = Some(
            String::from_utf8_lossy(&output.stdout)
                .chars()
                .take(400)
                .collect::<String>(),
        );
    }
    let _ = server.kill().await;
    Err(BenchError::Tool {
        tool: "iperf3",
        reason: format!("the client never connected: {}", last.unwrap_or_default()),
    })
}

fn parse_iperf(stdout: &str) -> Result<f64, BenchError> {
    let value: serde_json::Value =
        serde_json::from_str(stdout).map_err(|source| BenchError::Json {
            action: "decode",
            what: "iperf3 output".into(),
            source,
        })?;
    value
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .map(|bits| bits / 8.0 / 1e6)
        .ok_or_else(|| BenchError::Tool {
            tool: "iperf3",
            reason: "its output has no end.sum_received.bits_per_second".into(),
        })
}

fn free_port() -> Result<u16, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|source| BenchError::io("bind", "127.0.0.1:0", source))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|source| BenchError::io("inspect", "127.0.0.1:0", source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_json_is_read_past_leading_notes() {
        let text = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"jobs":[{"jobname":"x","write":{"bw_bytes":2000000,"iops":30.5},
  "sync":{"lat_ns":{"percentile":{"99.000000":120000}}}}]}"#;
        let job = parse_fio(text).unwrap();
        assert_eq!(job.write_bytes_per_s, Some(2e6));
        assert_eq!(job.write_iops, Some(30.5));
        assert_eq!(job.sync_p99_ns, Some(120000.0));
        assert!(parse_fio("{}").is_err());
    }

    #[tokio::test]
    async fn fio_runs_leave_no_file_behind() {
        if !fio_available().await {
            eprintln!("skipped: fio is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mb_per_s = buffered_write_mb_per_s(dir.path(), 8 << 20).await.unwrap();
        assert!(mb_per_s > 0.0);
        let (per_s, _) = fdatasync_per_s(dir.path(), 4096, 1).await.unwrap();
        assert!(per_s > 0.0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn iperf_json_gives_megabytes_per_second() {
        let text = r#"{"end":{"sum_received":{"bits_per_second":8e9}}}"#;
        assert_eq!(parse_iperf(text).unwrap(), 1000.0);
        assert!(parse_iperf("{}").is_err());
    }
}
