//! Whether a Start may wait on a mount that stops answering.
//!
//! Local filesystems answer; network and FUSE ones (a hung `s3fs`, an NFS
//! server gone) keep any access waiting for as long as they are gone. A
//! Start touches the caller's paths (its working directory, the `PATH`
//! search) and its clone lasts until the child has exec'd, so while such a
//! mount exists, Starts run on a blocking thread, where a stall holds only
//! that thread; otherwise they run in place, two thread hand-offs cheaper.
//! The mount table is read again whenever it changes (`/proc/self/mountinfo`
//! signals `POLLPRI`), at most ten times a second. Until it has been read,
//! or when it cannot be, every mount is taken to be one that may stall.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

static MAY_STALL: AtomicBool = AtomicBool::new(true);

/// The largest mount table read; a larger one counts as one that may stall.
const MAX_TABLE: u64 = 4 << 20;

/// How soon after one change the table is read again.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Filesystem types that answer for as long as the machine does (memory,
/// kernel interfaces, local disks). Anything else (NFS, CIFS, 9p, virtiofs,
/// FUSE, ...) may stall. `autofs` counts as local: systemd's automount
/// points (binfmt_misc) are served by the kernel and systemd, and what an
/// automounter mounts appears in the table with its own type.
const LOCAL: &[&str] = &[
    "autofs",
    "bcachefs",
    "bdev",
    "binfmt_misc",
    "bpf",
    "btrfs",
    "cgroup",
    "cgroup2",
    "configfs",
    "cramfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "erofs",
    "exfat",
    "ext2",
    "ext3",
    "ext4",
    "f2fs",
    "fusectl",
    "hugetlbfs",
    "iso9660",
    "jfs",
    "mqueue",
    "nilfs2",
    "nsfs",
    "ntfs3",
    "overlay",
    "proc",
    "pstore",
    "ramfs",
    "romfs",
    "rootfs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "sysfs",
    "tmpfs",
    "tracefs",
    "udf",
    "vfat",
    "xfs",
    "zfs",
];

/// Whether some mount may stall an access (see the module's note).
pub fn may_stall() -> bool {
    MAY_STALL.load(Ordering::Relaxed)
}

/// Whether a `/proc/*/mountinfo` text lists a mount of a type not in
/// [`LOCAL`].
fn any_stallable(mountinfo: &str) -> bool {
    mountinfo.lines().any(|line| {
        // "... - fstype source options": the type follows the separator.
        let fstype = line
            .split(' ')
            .skip_while(|f| *f != "-")
            .nth(1)
            .unwrap_or("");
        !LOCAL.contains(&fstype)
    })
}

/// Whether the mount table, read from its start, lists a mount that may
/// stall (or cannot be read whole).
fn read_table(mut file: &std::fs::File) -> bool {
    use std::io::{Read, Seek};
    let mut text = String::new();
    let read = file
        .rewind()
        .and_then(|()| file.take(MAX_TABLE + 1).read_to_string(&mut text));
    match read {
        Ok(n) if (n as u64) <= MAX_TABLE => any_stallable(&text),
        _ => true,
    }
}

/// Reads the mount table now and again on every change, for envd's life.
pub fn watch() {
    let Ok(file) = std::fs::File::open("/proc/self/mountinfo") else {
        tracing::warn!("no /proc/self/mountinfo: every Start runs on a blocking thread");
        return;
    };
    let stall = read_table(&file);
    MAY_STALL.store(stall, Ordering::Relaxed);
    tracing::debug!(may_stall = stall, "mount table read");
    tokio::spawn(async move {
        // SAFETY: `file` is an open fd that the AsyncFd owns; a File always
        // returns the same fd until the AsyncFd is dropped.
        let Ok(fd) = (unsafe { AsyncFd::register_with_interest(file, Interest::PRIORITY) }) else {
            return;
        };
        let fd = std::sync::Arc::new(fd);
        loop {
            let Ok(mut ready) = fd.ready(Interest::PRIORITY).await else {
                return;
            };
            ready.clear_ready();
            drop(ready);
            tokio::time::sleep(MIN_INTERVAL).await;
            // An in-memory table of the kernel's: reading it never waits on
            // a mount, but sandboxed code that mounts tens of thousands of
            // times makes it megabytes long; the kernel's formatting then
            // takes tens of milliseconds, kept off the async workers.
            let table = fd.clone();
            let Ok(stall) =
                crate::threads::run("mount table", move || read_table(table.get_ref())).await
            else {
                continue;
            };
            if MAY_STALL.swap(stall, Ordering::Relaxed) != stall {
                tracing::debug!(may_stall = stall, "mount table changed");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_and_fuse_mounts_may_stall() {
        let local = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                     23 22 0:21 / /proc rw - proc proc rw\n\
                     24 22 0:22 / /sys/fs/fuse/connections rw - fusectl fusectl rw\n\
                     25 22 0:23 / /tmp rw - tmpfs tmpfs rw,size=64m\n";
        assert!(!any_stallable(local));
        for fstype in [
            "fuse.s3fs",
            "fuse",
            "fuseblk",
            "nfs4",
            "cifs",
            "9p",
            "virtiofs",
        ] {
            let more = format!("{local}30 22 0:40 / /mnt rw - {fstype} remote rw\n");
            assert!(any_stallable(&more), "{fstype}");
        }
        // A line without a type (never from the kernel) counts as one.
        assert!(any_stallable("garbage\n"));
        // The initramfs root and systemd's automount points are local.
        assert!(!any_stallable(
            "1 0 0:2 / / rw - rootfs rootfs rw\n\
             2 1 0:40 / /proc/sys/fs/binfmt_misc rw - autofs systemd-1 rw\n"
        ));
    }
}
