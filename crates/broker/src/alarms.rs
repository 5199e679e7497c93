//! Resource alarms: the broker's resident memory and the free space of the data directory's
//! file system, sampled once a second. While either is past its watermark, front-ends stop
//! reading from publishing connections (AMQP sends `connection.blocked`), as RabbitMQ does,
//! until the broker recovers.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Which alarms are raised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Alarms {
    pub memory: bool,
    pub disk: bool,
}

impl Alarms {
    pub fn any(self) -> bool {
        self.memory || self.disk
    }

    /// The reason RabbitMQ gives in `connection.blocked`.
    pub fn reason(self) -> &'static str {
        match (self.memory, self.disk) {
            (true, _) => "low on memory",
            (false, true) => "low on disk",
            _ => "",
        }
    }
}

/// The process's resident memory in bytes, if the system tells.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

/// Free bytes available to the broker on the file system holding `dir`.
pub fn free_disk_bytes(dir: &std::path::Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The size of the file system holding `dir` and the bytes available on it, in bytes.
pub fn disk_bytes(dir: &std::path::Path) -> Option<(i64, i64)> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    let total = stat.f_blocks.saturating_mul(stat.f_frsize);
    let usable = stat.f_bavail.saturating_mul(stat.f_frsize);
    Some((
        i64::try_from(total).unwrap_or(i64::MAX),
        i64::try_from(usable).unwrap_or(i64::MAX),
    ))
}

/// Total memory of the machine, from `/proc/meminfo`.
pub fn total_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Starts the monitor; the receiver always holds the current alarms.
pub fn start(
    data_dir: PathBuf,
    memory_high_watermark_bytes: Option<u64>,
    disk_free_limit_bytes: u64,
) -> (watch::Receiver<Alarms>, JoinHandle<Result<(), String>>) {
    let sample = move || Alarms {
        memory: memory_high_watermark_bytes
            .zip(resident_bytes())
            .is_some_and(|(limit, used)| used > limit),
        disk: disk_free_limit_bytes > 0
            && free_disk_bytes(&data_dir).is_some_and(|free| free < disk_free_limit_bytes),
    };
    let (sender, receiver) = watch::channel(sample());
    let task = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let now = sample();
            sender.send_if_modified(|current| {
                if *current != now {
                    tracing::warn!(
                        memory = now.memory,
                        disk = now.disk,
                        "resource alarms changed"
                    );
                    *current = now;
                    true
                } else {
                    false
                }
            });
            if sender.is_closed() {
                return Ok(());
            }
        }
    });
    (receiver, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_reports_memory_and_disk() {
        assert!(resident_bytes().is_some_and(|b| b > 0));
        assert!(total_memory_bytes().is_some_and(|b| b > 0));
        assert!(free_disk_bytes(std::path::Path::new("/")).is_some());
        assert_eq!(
            Alarms {
                memory: true,
                disk: true
            }
            .reason(),
            "low on memory"
        );
    }
}
