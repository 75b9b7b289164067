"""The official Python SDK against envd in a VM, reached through
`envctl proxy` (the VM has no network device). Usage: vm_smoke.py URL"""
import sys

from e2b import Sandbox

URL = sys.argv[1]
sbx = Sandbox.create(debug=True, sandbox_url=URL)
r = sbx.commands.run("echo hello from the vm; uname -s")
assert r.stdout == "hello from the vm\nLinux\n", r
assert r.exit_code == 0
sbx.files.write("/tmp/sdk.txt", "written by the SDK")
assert sbx.files.read("/tmp/sdk.txt") == "written by the SDK"
names = [e.name for e in sbx.files.list("/tmp")]
assert "sdk.txt" in names, names
h = sbx.commands.run("sleep 30", background=True)
assert any(p.pid == h.pid for p in sbx.commands.list())
h.kill()
print("vm smoke: 4 passed, 0 failed")
