"""The official E2B Python SDK (e2b==2.63.0) in debug mode against a real envd.

Usage: python python_suite.py URL WORKDIR
Runs every test_* function; prints PASS/FAIL per test; exits non-zero on any
failure. Plain asserts, no test framework, so the venv holds only the SDK.
With ENVD_SDK_REMOTE=1, envd runs elsewhere (a VM): WORKDIR is a path there,
and what the suite would check on local disk it checks through envd.
"""

import asyncio
import io
import os
import subprocess
import sys
import threading
import time
import traceback

from e2b import (
    AsyncSandbox,
    CommandExitException,
    FilesystemEventType,
    FileType,
    NotFoundException,
    PtySize,
    Sandbox,
    TimeoutException,
)

URL = sys.argv[1]
ROOT = sys.argv[2]
REMOTE = os.environ.get("ENVD_SDK_REMOTE") == "1"


def sandbox():
    return Sandbox.create(debug=True, sandbox_url=URL)


def p(*parts):
    return os.path.join(ROOT, *parts)


def test_files_write_and_read_every_way():
    sbx = sandbox()
    info = sbx.files.write(p("w", "str.txt"), "hello text")
    assert info.path == p("w", "str.txt") and info.name == "str.txt", info
    sbx.files.write(p("w", "bytes.bin"), b"\x00\x01\xff")
    sbx.files.write(p("w", "fileobj.txt"), io.BytesIO(b"from a file object"))
    sbx.files.write(p("w", "octet.bin"), b"octets", use_octet_stream=True)
    sbx.files.write(p("w", "gz.txt"), b"zipped content", gzip=True)
    infos = sbx.files.write_files(
        [{"path": p("w", "many1.txt"), "data": "one"}, {"path": p("w", "sub", "many2.txt"), "data": b"two"}]
    )
    assert sorted(i.name for i in infos) == ["many1.txt", "many2.txt"], infos
    assert sbx.files.read(p("w", "str.txt")) == "hello text"
    assert bytes(sbx.files.read(p("w", "bytes.bin"), format="bytes")) == b"\x00\x01\xff"
    assert sbx.files.read(p("w", "fileobj.txt")) == "from a file object"
    assert sbx.files.read(p("w", "octet.bin")) == "octets"
    assert sbx.files.read(p("w", "gz.txt")) == "zipped content"
    assert sbx.files.read(p("w", "gz.txt"), gzip=True) == "zipped content"
    assert sbx.files.read(p("w", "sub", "many2.txt")) == "two"
    stream = sbx.files.read(p("w", "str.txt"), format="stream")
    assert b"".join(stream) == b"hello text"
    # The bytes on disk are the decompressed ones.
    if REMOTE:
        assert sbx.commands.run(f"cat {p('w', 'gz.txt')}").stdout == "zipped content"
    else:
        with open(p("w", "gz.txt"), "rb") as f:
            assert f.read() == b"zipped content"


def test_files_list_exists_info_remove_rename_make_dir():
    sbx = sandbox()
    assert sbx.files.make_dir(p("l", "a", "b")) is True
    assert sbx.files.make_dir(p("l", "a", "b")) is False
    sbx.files.write(p("l", "a", "b", "deep.txt"), "d")
    sbx.files.write(p("l", "top.txt"), "t")
    names = sorted(e.name for e in sbx.files.list(p("l")))
    assert names == ["a", "top.txt"], names
    deep = sorted(e.path for e in sbx.files.list(p("l"), depth=3))
    assert p("l", "a", "b", "deep.txt") in deep, deep
    assert sbx.files.exists(p("l", "top.txt"))
    assert not sbx.files.exists(p("l", "nope"))
    info = sbx.files.get_info(p("l", "top.txt"))
    assert info.type == FileType.FILE and info.size == 1 and info.permissions.startswith("-"), info
    assert sbx.files.get_info(p("l", "a")).type == FileType.DIR
    moved = sbx.files.rename(p("l", "top.txt"), p("l", "moved", "top2.txt"))
    assert moved.path == p("l", "moved", "top2.txt"), moved
    assert not sbx.files.exists(p("l", "top.txt"))
    sbx.files.remove(p("l", "a"))
    assert not sbx.files.exists(p("l", "a"))
    for call in (lambda: sbx.files.get_info(p("l", "a")), lambda: sbx.files.read(p("l", "missing.txt"))):
        try:
            call()
            raise AssertionError("expected a not-found error")
        except NotFoundException:
            pass


def test_watch_dir_sync_polling():
    sbx = sandbox()
    sbx.files.make_dir(p("ws"))
    handle = sbx.files.watch_dir(p("ws"), recursive=True)
    sbx.files.write(p("ws", "new.txt"), "x")
    events = []
    for _ in range(50):
        events += handle.get_new_events()
        if any(e.name == "new.txt" and e.type == FilesystemEventType.CREATE for e in events):
            break
        time.sleep(0.1)
    handle.stop()
    assert any(e.name == "new.txt" and e.type == FilesystemEventType.CREATE for e in events), events


def test_watch_dir_async_stream():
    async def scenario():
        sbx = await AsyncSandbox.create(debug=True, sandbox_url=URL)
        await sbx.files.make_dir(p("wa"))
        seen = []
        done = asyncio.Event()

        # Uploads are atomic (temporary file, then rename): watchers see the
        # target created and written, and never envd's temporary file.
        def on_event(e):
            seen.append(e)
            if e.name == "streamed.txt" and e.type == FilesystemEventType.WRITE:
                done.set()

        handle = await sbx.files.watch_dir(p("wa"), on_event, include_entry=True, timeout=30)
        await sbx.files.write(p("wa", "streamed.txt"), "y")
        await asyncio.wait_for(done.wait(), 10)
        await handle.stop()
        created = [e for e in seen if e.type == FilesystemEventType.CREATE]
        assert created and created[0].name == "streamed.txt", seen
        assert all(e.name == "streamed.txt" for e in seen), seen

    asyncio.run(scenario())


def test_commands_run_callbacks_envs_cwd():
    sbx = sandbox()
    out, err = [], []
    r = sbx.commands.run(
        "echo $FOO; pwd; echo oops >&2",
        envs={"FOO": "bar"},
        cwd="/tmp",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert r.exit_code == 0
    assert r.stdout == "bar\n/tmp\n", repr(r.stdout)
    assert "".join(out) == r.stdout and "".join(err) == "oops\n"


def test_commands_nonzero_exit_raises():
    sbx = sandbox()
    try:
        sbx.commands.run("echo partial; exit 7")
        raise AssertionError("expected CommandExitException")
    except CommandExitException as e:
        assert e.exit_code == 7 and e.stdout == "partial\n", e


def test_commands_user():
    if REMOTE:
        sandbox().commands.run("id envdsdk >/dev/null 2>&1 || useradd -m envdsdk", user="root")
    elif os.geteuid() != 0:
        print("  SKIP test_commands_user: needs root to create a user")
        return
    elif subprocess.run(["id", "envdsdk"], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "envdsdk"], check=True)
    sbx = sandbox()
    r = sbx.commands.run("id -un; echo $HOME", user="envdsdk")
    assert r.stdout == "envdsdk\n/home/envdsdk\n", repr(r.stdout)
    r = sbx.commands.run("id -un", user="root")
    assert r.stdout == "root\n"


def test_commands_timeout():
    sbx = sandbox()
    t = time.time()
    try:
        # 3 s: the login shell's profile (0.35 s here, idle) is done by then;
        # see started_past_its_profile.
        sbx.commands.run("sleep 30", timeout=3)
        raise AssertionError("expected a timeout")
    except TimeoutException:
        pass
    assert time.time() - t < 10


def started_past_its_profile(sbx, name):
    """Runs `sleep 60` in the background once the login shell's profile is
    done: a kill that lands inside the profile can leave a lock of the
    machine's own (pyenv's rehash lock in root's .bashrc) that holds every
    later login shell for 60 s."""
    mark = os.path.join(ROOT, name)
    h = sbx.commands.run(f"mkdir -p {ROOT} && touch {mark}; sleep 60", background=True)
    deadline = time.time() + 30
    while not sbx.files.exists(mark) and time.time() < deadline:
        time.sleep(0.02)
    assert sbx.files.exists(mark)
    return h


def test_commands_background_list_kill_connect_stdin():
    sbx = sandbox()
    h = started_past_its_profile(sbx, "sleeping")
    assert any(pr.pid == h.pid for pr in sbx.commands.list())
    assert sbx.commands.kill(h.pid) is True
    try:
        h.wait()
        raise AssertionError("a killed command must not succeed")
    except CommandExitException as e:
        assert e.exit_code == -1, e
    assert sbx.commands.kill(h.pid) is False
    assert not any(pr.pid == h.pid for pr in sbx.commands.list())

    h = sbx.commands.run("cat", background=True, stdin=True, timeout=30)
    sbx.commands.send_stdin(h.pid, "via send_stdin\n")
    again = sbx.commands.connect(h.pid, timeout=30)
    got = []
    t = threading.Thread(target=lambda: got.append(again.wait()))
    t.start()
    time.sleep(0.3)
    sbx.commands.send_stdin(h.pid, "after connect\n")
    time.sleep(0.3)
    sbx.commands.close_stdin(h.pid)
    t.join(15)
    assert got and got[0].exit_code == 0, got
    assert "after connect" in got[0].stdout, got[0].stdout
    first = h.wait()
    assert first.stdout == "via send_stdin\nafter connect\n", repr(first.stdout)


def _wait_quietly(handle, chunks):
    try:
        handle.wait(on_pty=chunks.append)
    except CommandExitException:
        pass


def test_pty_create_input_resize_kill():
    sbx = sandbox()
    chunks = []
    h = sbx.pty.create(PtySize(rows=24, cols=80), timeout=30)
    reader = threading.Thread(target=lambda: _wait_quietly(h, chunks))
    reader.start()
    text = lambda: b"".join(bytes(c) for c in list(chunks)).decode(errors="replace")
    sbx.pty.send_stdin(h.pid, b"stty size; echo marker-$((6*7))\n")
    deadline = time.time() + 15
    while "marker-42" not in text() and time.time() < deadline:
        time.sleep(0.1)
    assert "marker-42" in text() and "24 80" in text(), text()
    sbx.pty.resize(h.pid, PtySize(rows=40, cols=100))
    sbx.pty.send_stdin(h.pid, b"stty size\n")
    while "40 100" not in text() and time.time() < deadline:
        time.sleep(0.1)
    assert "40 100" in text(), text()
    assert sbx.pty.kill(h.pid)
    reader.join(10)
    assert not reader.is_alive()


def run_all():
    tests = [(n, f) for n, f in sorted(globals().items()) if n.startswith("test_") and callable(f)]
    only = os.environ.get("ONLY")
    failed = 0
    for name, fn in tests:
        if only and only not in name:
            continue
        t = time.time()
        try:
            fn()
            print(f"PASS {name} ({time.time() - t:.2f}s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name}", flush=True)
            traceback.print_exc()
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    run_all()
