//! Duties of envd as PID 1 (`init=/usr/bin/envd`, or `/init` in an
//! initramfs): mount what is missing (cgroup2 included), read options from the kernel command
//! line, load listed kernel modules, reap every orphan (the reaper does that
//! for any process), and on a shutdown signal end all processes gracefully,
//! sync and power the machine off. PID 1 must never exit.
//!
//! Kernel command line options (there are no flags for PID 1):
//! - `envd.listen=URL[,URL...]`: listeners (default: `vsock://-1:49983`);
//! - `envd.log=FILTER`: log filter;
//! - `envd.modules=/path/a.ko[,/path/b.ko...]`: modules to load, in order,
//!   before listening (missing files are skipped with a warning);
//! - `envd.args=ARG[,ARG...]`: any other envd flags.

use std::ffi::CString;
use std::time::Duration;

/// Listener used as PID 1 when the command line names none.
pub const PID1_DEFAULT_LISTEN: &str = "vsock://-1:49983";

pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Mounts proc, sys, devtmpfs, devpts, /run and /tmp where missing.
pub fn mount_basics() {
    let mounts: [(&str, &str, &str, &str); 7] = [
        ("proc", "/proc", "proc", ""),
        ("sysfs", "/sys", "sysfs", ""),
        // For the commands' cgroups (resource control, /freeze).
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", ""),
        ("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            "gid=5,mode=620,ptmxmode=666",
        ),
        ("tmpfs", "/run", "tmpfs", "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
    ];
    for (source, target, fstype, data) in mounts {
        if is_mounted(target) {
            continue;
        }
        let _ = std::fs::create_dir_all(target);
        let data = (!data.is_empty()).then_some(data);
        match nix::mount::mount(
            Some(source),
            target,
            Some(fstype),
            nix::mount::MsFlags::empty(),
            data,
        ) {
            Ok(()) => {}
            Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => eprintln!("envd(init): mount {fstype} on {target}: {e}"),
        }
    }
    // Programs expect /dev/ptmx to reach the devpts instance.
    if !std::path::Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    if std::env::var_os("PATH").is_none() {
        // SAFETY: called before any thread exists (start of main, PID 1).
        unsafe { std::env::set_var("PATH", crate::process::DEFAULT_PATH) };
    }
}

/// Turns on the kernel's link protections, as systemd does on every boot
/// (its `50-default.conf`), since nothing else will in an initramfs:
/// `protected_hardlinks` (a user cannot hard-link a file it does not own, so
/// `~/x` cannot be `/etc/passwd` by another name when the host appends to
/// it), `protected_symlinks` (a link in a sticky world-writable directory such
/// as `/tmp` is followed only by its owner or the directory's),
/// `protected_fifos` and `protected_regular` (root's `O_CREAT` does not open
/// another user's FIFO or file in such a directory).
pub fn protect_links() {
    for (name, value) in [
        ("protected_hardlinks", "1"),
        ("protected_symlinks", "1"),
        ("protected_fifos", "1"),
        ("protected_regular", "1"),
    ] {
        let path = format!("/proc/sys/fs/{name}");
        if let Err(e) = std::fs::write(&path, value) {
            eprintln!("envd(init): {path}: {e}");
        }
    }
}

/// Brings the loopback interface up (down in a fresh initramfs): servers on
/// 127.0.0.1, envd's tunnels and port forwarding need it.
pub fn loopback_up() {
    // SAFETY: a plain datagram socket for interface ioctls, closed below; the
    // ifreq is zeroed, named "lo" (NUL-terminated) and only read back by us.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = libc::c_char::from_ne_bytes([*src]);
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
            if libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req) != 0 {
                eprintln!(
                    "envd(init): cannot bring lo up: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        libc::close(fd);
    }
}

/// Whether `target` is a mount point (in `/proc/self/mountinfo`, read a
/// line at a time: sandboxed root can make the table megabytes long).
pub(crate) fn is_mounted(target: &str) -> bool {
    use std::io::BufRead;
    let Ok(table) = std::fs::File::open("/proc/self/mountinfo") else {
        return false;
    };
    std::io::BufReader::new(table)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.split(' ').nth(4) == Some(target))
}

/// `envd.*` options from `/proc/cmdline` as envd flags, plus modules to load.
pub fn cmdline() -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    parse_cmdline(&text)
}

fn parse_cmdline(text: &str) -> (Vec<String>, Vec<String>) {
    let mut args = Vec::new();
    let mut modules = Vec::new();
    let mut listen = false;
    for word in text.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let values = value
            .split(',')
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        match key {
            "envd.listen" => {
                listen = true;
                for v in values {
                    args.extend(["--listen".to_owned(), v]);
                }
            }
            "envd.log" => args.extend(["--log-level".to_owned(), value.to_owned()]),
            "envd.modules" => modules.extend(values),
            "envd.args" => args.extend(values),
            _ => {}
        }
    }
    if !listen {
        args.extend(["--listen".to_owned(), PID1_DEFAULT_LISTEN.to_owned()]);
    }
    (args, modules)
}

/// Loads kernel modules in order (`finit_module`); already loaded is fine.
pub fn load_modules(paths: &[String]) {
    for path in paths {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(module = %path, error = %e, "module not loaded");
                continue;
            }
        };
        let params = CString::default();
        // SAFETY: finit_module reads the module from an open fd we own; the
        // parameter string is a valid empty C string.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                params.as_ptr(),
                0,
            )
        };
        let err = std::io::Error::last_os_error();
        if rc != 0 && err.raw_os_error() != Some(libc::EEXIST) {
            tracing::warn!(module = %path, error = %err, "module not loaded");
        } else {
            tracing::info!(module = %path, "module loaded");
        }
    }
}

/// Counts fatal-error re-executions of PID 1 (in its environment).
const REEXEC_ENV: &str = "ENVD_PID1_REEXECS";
/// Re-executions tried before PID 1 gives up and powers off.
const MAX_REEXECS: u32 = 3;

/// After a fatal error as PID 1: execute envd afresh (same PID, commands keep
/// running), at most [`MAX_REEXECS`] times per boot; then power off.
pub fn reexec_or_power_off() -> ! {
    let done: u32 = std::env::var(REEXEC_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if done < MAX_REEXECS {
        tracing::error!(attempt = done + 1, "PID 1: executing envd afresh");
        // SAFETY: the runtime has ended; envd is about to replace itself.
        unsafe { std::env::set_var(REEXEC_ENV, (done + 1).to_string()) };
        crate::logging::flush();
        let err = std::os::unix::process::CommandExt::exec(&mut std::process::Command::new(
            "/proc/self/exe",
        ));
        tracing::error!(error = %err, "PID 1: cannot execute envd afresh");
    }
    power_off(Duration::from_secs(5))
}

/// Ends every other process (SIGTERM, then SIGKILL after `grace`), syncs
/// and powers off. Never returns.
pub fn power_off(grace: Duration) -> ! {
    tracing::info!("PID 1 shutdown: terminating all processes");
    // SAFETY: kill(-1) from PID 1 signals every process except PID 1 itself.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline && others_alive() {
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(100));
    nix::unistd::sync();
    tracing::info!("PID 1 shutdown: powering off");
    crate::logging::flush();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Not allowed to power off (e.g. in a container): never exit anyway.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Whether any process other than PID 1 and kernel threads is left.
fn others_alive() -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != 1)
        .any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| user_process_alive(&stat))
        })
}

/// Whether a `/proc/PID/stat` line is of a user-space process not yet
/// dead: not a kernel thread (`PF_KTHREAD` in its flags), not a zombie. Read
/// from `stat`, not `cmdline`: reading a process's `cmdline` takes its
/// memory map's lock, which sandboxed code can keep taken (a page fault it
/// never lets finish, through userfaultfd, with a thread waiting to map),
/// and PID 1's shutdown would wait on it for good.
fn user_process_alive(stat: &str) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    // The name (field 2) is in parentheses and may hold anything.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    let state = fields.next().unwrap_or("X");
    // Fields 4 to 8 (ppid, pgrp, session, tty, tpgid), then the flags.
    let flags = fields.nth(5).and_then(|f| f.parse::<u64>().ok());
    !matches!(state, "Z" | "X" | "x") && flags.is_some_and(|f| f & PF_KTHREAD == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_command_line() {
        let (args, mods) = parse_cmdline("console=ttyS0 envd.listen=vsock://-1:1024,tcp://0.0.0.0:49983 envd.log=debug envd.modules=/a.ko,/b.ko quiet");
        assert_eq!(
            args,
            [
                "--listen",
                "vsock://-1:1024",
                "--listen",
                "tcp://0.0.0.0:49983",
                "--log-level",
                "debug"
            ]
        );
        assert_eq!(mods, ["/a.ko", "/b.ko"]);
        let (args, _) = parse_cmdline("quiet");
        assert_eq!(args, ["--listen", PID1_DEFAULT_LISTEN]);
    }

    #[test]
    fn shutdown_waits_for_user_processes_only() {
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(user_process_alive(&me), "{me}");
        // kthreadd, where the test can see it (not in a PID namespace).
        if let Ok(k) = std::fs::read_to_string("/proc/2/stat") {
            if k.contains("(kthreadd)") {
                assert!(!user_process_alive(&k), "{k}");
            }
        }
        let zombie = "77 (a) b) c) Z 1 77 77 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 5";
        assert!(!user_process_alive(zombie));
        let odd_name = "78 (x) S 1 2 3 4 5 6) R 1 78 78 0 -1 4194560 0 0 0 0 0 0 0 0 20";
        assert!(user_process_alive(odd_name));
        assert!(!user_process_alive("79 (cut"));
    }
}
