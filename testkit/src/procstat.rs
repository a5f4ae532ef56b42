//! CPU time and memory of processes, read from Linux's /proc.
//!
//! The benches compare what each arm costs the machine, so they read the kernel's
//! own accounting of the processes involved (backends, proxies) before and after a
//! run instead of trusting any process's self-report.

use std::path::Path;
use std::sync::OnceLock;

/// User plus system CPU seconds `pid` has used so far, or `None` once it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields are
    // counted from the last ')'. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ').skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

/// CPU seconds of `pid` and all its direct children (nginx's workers).
pub fn cpu_seconds_with_children(pid: u32) -> f64 {
    std::iter::once(pid)
        .chain(children(pid))
        .filter_map(cpu_seconds)
        .sum()
}

/// The largest resident set `pid` has had (VmHWM), in bytes.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:").map(|kib| kib * 1024)
}

/// Peak resident sets of `pid` and its direct children, added up.
pub fn peak_rss_bytes_with_children(pid: u32) -> u64 {
    std::iter::once(pid)
        .chain(children(pid))
        .filter_map(peak_rss_bytes)
        .sum()
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The 1-minute load average: how busy the machine was with everything else too.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Pids whose parent is `pid`, found by scanning /proc (works without
/// CONFIG_PROC_CHILDREN).
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| parent(child) == Some(pid))
        .collect()
}

fn parent(pid: u32) -> Option<u32> {
    let stat =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    stat[stat.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()
}

/// The kernel's clock ticks per second for /proc times (USER_HZ).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            // USER_HZ is 100 on every architecture Linux runs these benches on.
            .unwrap_or(100.0)
    })
}
