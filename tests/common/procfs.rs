//! What benchmarks read of a process in `/proc`: its CPU time and memory.
#![allow(dead_code)]

/// utime + stime (every thread, living or gone) in clock ticks, from the
/// text of a `/proc/<pid>/stat`.
pub fn stat_cpu_ticks(stat: &str) -> u64 {
    // After the command's closing parenthesis, the numbers start at ppid:
    // utime and stime are the 11th and 12th of them.
    let f: Vec<u64> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
}

/// utime + stime of local process `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap())
}

/// A KiB figure of `/proc/<pid>/status` (`key` with its colon, e.g.
/// "VmRSS:"); 0 when absent.
pub fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
