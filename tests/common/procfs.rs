//! What benchmarks read of a process in `/proc`: its CPU time and memory.
#![allow(dead_code)]

/// utime + stime (every thread, living or gone; not its children's) in
/// clock ticks, from the text of a `/proc/<pid>/stat`.
pub fn stat_cpu_ticks(stat: &str) -> u64 {
    // After the command's closing parenthesis come, by position: state,
    // ppid, pgrp, session, tty_nr, tpgid, flags, minflt, cminflt, majflt,
    // cmajflt, utime, stime, cutime, cstime... Taken by position: a field
    // that is not a u64 (the state letter, a tpgid of -1 for a process
    // without a terminal) must not shift the others.
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let at = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    at(11) + at(12)
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

/// Zombie children of `pid`.
pub fn zombie_children(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // "pid (comm) S ppid ..." — comm may contain spaces.
            let Some(after) = stat.rsplit_once(") ").map(|(_, a)| a) else {
                return false;
            };
            let mut f = after.split_whitespace();
            let state = f.next();
            let ppid = f.next().and_then(|p| p.parse::<u32>().ok());
            state == Some("Z") && ppid == Some(pid)
        })
        .count()
}
