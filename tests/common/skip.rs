//! Skipping a test visibly. libtest captures `eprintln!` of passing tests,
//! so a skip would look like a pass: the notice is written to the process's
//! stderr directly. Where every prerequisite is expected (`make test` as
//! root, which is how CI runs, sets `ENVD_REQUIRE_ALL_TESTS=1`), a skip of a
//! test that must run there fails it instead.

#![allow(dead_code)]

use std::io::Write;

/// Whether this run must not skip tests that need root, QEMU or the SDKs.
pub fn all_required() -> bool {
    std::env::var("ENVD_REQUIRE_ALL_TESTS").is_ok_and(|v| v == "1")
}

/// Skips `test` for `reason`; fails instead when all tests are required.
pub fn skip(test: &str, reason: &str) {
    assert!(
        !all_required(),
        "{test} must run here (ENVD_REQUIRE_ALL_TESTS=1) but would skip: {reason}"
    );
    notice(test, reason);
}

/// Skips `test` for a reason that depends on the machine, not on setup
/// (e.g. no vsock transport): allowed even when all tests are required.
pub fn skip_on_this_machine(test: &str, reason: &str) {
    notice(test, reason);
}

fn notice(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {reason}");
}
