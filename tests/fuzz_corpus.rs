//! Replays the fuzz corpora (`fuzz/seeds/<target>` and, when present,
//! `fuzz/corpus/<target>`) through the same entry points the fuzz targets
//! use, on the stable toolchain: an input that once crashed envd, or that the
//! fuzzer found interesting, keeps being exercised by `make test`.

use std::path::Path;

#[test]
fn replay_fuzz_corpora() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut total = 0;
    for (name, target) in envd::fuzzing::TARGETS {
        let mut n = 0;
        for dir in ["seeds", "corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).unwrap();
                let run = std::panic::catch_unwind(|| target(&data));
                assert!(run.is_ok(), "{name}: {} crashes envd", e.path().display());
                n += 1;
            }
        }
        assert!(n > 0, "no corpus for fuzz target {name}");
        total += n;
    }
    eprintln!("replayed {total} fuzz inputs");
}
