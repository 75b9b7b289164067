"""Median round trip of commands.run("true") through the official Python SDK.
Usage: python bench_run_true.py URL N"""
import statistics
import sys
import time

from e2b import Sandbox

sbx = Sandbox.create(debug=True, sandbox_url=sys.argv[1])
sbx.commands.run("true")  # warm the connection pool
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    sbx.commands.run("true")
    times.append(time.perf_counter() - t)
print(f"{statistics.median(times) * 1e6:.0f}")
