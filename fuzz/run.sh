#!/usr/bin/env bash
# Fuzzes every target for FUZZ_SECONDS each (default 60) with cargo-fuzz
# (libFuzzer, nightly toolchain), starting from fuzz/seeds and growing
# fuzz/corpus. Prints executions per target; a crash stops with its input in
# fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${FUZZ_SECONDS:-60}
TARGETS=${FUZZ_TARGETS:-$(ls fuzz_targets | sed 's/\.rs$//')}
cargo +nightly fuzz build -O
for t in $TARGETS; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  if ! cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
       -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -timeout=10 -max_len=65536 >"$log" 2>&1; then
    tail -40 "$log"; echo "FUZZ $t: CRASH (see fuzz/artifacts/$t)"; exit 1
  fi
  runs=$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' || echo '?')
  echo "FUZZ $t: ${runs} executions in ${SECONDS_EACH}s, no crash"
  rm -f "$log"
done
