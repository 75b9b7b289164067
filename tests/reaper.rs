//! The reaper against real children, in a test binary of its own and in one
//! test: a reaper collects every child of its process, so two would take
//! each other's.

use std::sync::atomic::Ordering;
use std::time::Duration;

use envd::process::reaper::{ExitStatus, Reaper};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawns_that_take_long() {
    let reaper = Reaper::start().unwrap();
    a_child_reaped_before_it_is_registered_keeps_its_status(&reaper).await;
    a_pause_waits_for_spawns_only_so_long(&reaper).await;
}

// A clone may take long (a working directory on a stalled mount), so the
// reaper holds no lock across it; a child that exits before its spawn has
// registered it must still have its status delivered.
async fn a_child_reaped_before_it_is_registered_keeps_its_status(reaper: &std::sync::Arc<Reaper>) {
    let r = reaper.clone();
    let (pid, status) = tokio::task::spawn_blocking(move || {
        r.spawn(|slot| {
            // SAFETY: the child only sleeps and exits, both async-signal-safe.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let pause = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 50_000_000,
                };
                // SAFETY: as above.
                unsafe {
                    libc::nanosleep(&pause, std::ptr::null_mut());
                    libc::_exit(7)
                }
            }
            assert!(pid > 0, "fork failed");
            // As CLONE_PARENT_SETTID has it: the slot holds the pid before
            // the child can exit.
            slot.store(pid, Ordering::Release);
            // The child exits and is reaped meanwhile.
            std::thread::sleep(Duration::from_millis(500));
            Ok(pid)
        })
    })
    .await
    .unwrap()
    .unwrap();
    assert!(pid > 0);
    assert_eq!(*status.borrow(), Some(ExitStatus::Exited(7)));
}

// A live upgrade's snapshot holds spawns off; a spawn that does not finish
// (stalled) must not hold the snapshot off forever.
async fn a_pause_waits_for_spawns_only_so_long(reaper: &std::sync::Arc<Reaper>) {
    let r = reaper.clone();
    let spawning = tokio::task::spawn_blocking(move || {
        r.spawn(|_| {
            std::thread::sleep(Duration::from_millis(1500));
            Err(std::io::Error::other("no child"))
        })
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = reaper.paused(Duration::from_millis(300), || ()).await;
    assert!(during.is_none(), "paused while a spawn was under way");
    assert!(spawning.await.unwrap().is_err());
    let after = reaper.paused(Duration::from_millis(300), || ()).await;
    assert!(after.is_some(), "no spawn under way, yet not paused");
}
