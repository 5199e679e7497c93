//! A description of the machine a benchmark ran on, to print beside its numbers: figures
//! from different machines are not comparable, and the reader needs to know which one this was.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: Option<String>,
    pub cpu_count: usize,
    pub memory_bytes: Option<u64>,
    pub kernel: Option<String>,
    pub os: Option<String>,
    /// `df` line for the directory benchmarks wrote to: device, filesystem, size.
    pub disk: Option<String>,
    /// Whether the kernel reports that device as rotational (its virtual disks often are
    /// reported so whatever is behind them).
    pub disk_rotational: Option<bool>,
}

impl Machine {
    /// Describes this machine, with the disk that holds `data_dir`.
    pub fn describe(data_dir: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        let (disk, device) = describe_disk(data_dir).unzip();
        Self {
            cpu_model: field(&cpuinfo, "model name", ':'),
            cpu_count: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes: field(&meminfo, "MemTotal", ':')
                .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kib| kib * 1024),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_owned()),
            os: field(&os_release, "PRETTY_NAME", '=').map(|v| v.trim_matches('"').to_owned()),
            disk,
            disk_rotational: device.as_deref().and_then(rotational),
        }
    }

    /// One Markdown paragraph.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            "Machine: {} CPUs ({}), {} of memory, kernel {}, {}.",
            self.cpu_count,
            self.cpu_model.as_deref().unwrap_or("unknown model"),
            self.memory_bytes.map_or("unknown".into(), |b| format!(
                "{:.1} GiB",
                b as f64 / (1u64 << 30) as f64
            )),
            self.kernel.as_deref().unwrap_or("unknown"),
            self.os.as_deref().unwrap_or("unknown OS"),
        );
        if let Some(disk) = &self.disk {
            let _ = write!(out, " Disk: {disk}");
            if let Some(rotational) = self.disk_rotational {
                let _ = write!(
                    out,
                    " (reported {})",
                    if rotational {
                        "rotational"
                    } else {
                        "non-rotational"
                    }
                );
            }
            out.push('.');
        }
        out
    }
}

fn field(text: &str, key: &str, separator: char) -> Option<String> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(separator)?;
        (name.trim() == key).then(|| value.trim().to_owned())
    })
}

/// `df` on `dir`: a description, and the device name.
fn describe_disk(dir: &Path) -> Option<(String, String)> {
    let output = std::process::Command::new("df")
        .args(["-B1", "--output=source,fstype,size"])
        .arg(dir)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().nth(1)?;
    let mut fields = line.split_whitespace();
    let source = fields.next()?.to_owned();
    let fstype = fields.next()?;
    let size: u64 = fields.next()?.parse().ok()?;
    Some((
        format!(
            "{source} ({fstype}, {:.0} GiB)",
            size as f64 / (1u64 << 30) as f64
        ),
        source,
    ))
}

fn rotational(device: &str) -> Option<bool> {
    let name = device.strip_prefix("/dev/")?;
    // A partition (vda1, nvme0n1p1) reports through its parent disk.
    let mut candidates = vec![name.to_owned()];
    let trimmed = name.trim_end_matches(|c: char| c.is_ascii_digit());
    candidates.push(trimmed.trim_end_matches('p').to_owned());
    candidates.push(trimmed.to_owned());
    candidates.iter().find_map(|disk| {
        let flag = std::fs::read_to_string(format!("/sys/block/{disk}/queue/rotational")).ok()?;
        Some(flag.trim() == "1")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_is_described() {
        let machine = Machine::describe(Path::new("/"));
        assert!(machine.cpu_count >= 1);
        assert!(machine.memory_bytes.is_some_and(|b| b > 0));
        assert!(machine.kernel.is_some());
        assert!(machine.to_markdown().starts_with("Machine: "));
    }

    #[test]
    fn fields_are_found_by_key() {
        assert_eq!(field("a: 1\nb : 2\n", "b", ':'), Some("2".into()));
        assert_eq!(field("X=\"y z\"", "X", '='), Some("\"y z\"".into()));
        assert_eq!(field("", "X", '='), None);
    }
}
