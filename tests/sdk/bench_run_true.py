"""Median round trip of one official Python SDK call.
Usage: python bench_run_true.py URL N [CALL]
CALL: run (commands.run("true"), the default), list (commands.list(): one
small RPC, no process), read (files.read of a 1 MiB file as bytes)."""
import statistics
import sys
import time

from e2b import Sandbox

sbx = Sandbox.create(debug=True, sandbox_url=sys.argv[1])
call = sys.argv[3] if len(sys.argv) > 3 else "run"
if call == "run":
    def once():
        sbx.commands.run("true")
elif call == "list":
    def once():
        sbx.commands.list()
elif call == "read":
    sbx.files.write("/tmp/bench-1mib.bin", bytes(range(256)) * 4096)

    def once():
        assert len(sbx.files.read("/tmp/bench-1mib.bin", format="bytes")) == 1 << 20
else:
    sys.exit(f"unknown call {call!r}")
once()  # warm the connection pool
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    once()
    times.append(time.perf_counter() - t)
print(f"{statistics.median(times) * 1e6:.0f}")
