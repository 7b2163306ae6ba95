"""The sandbox against hostile programs: each one fails, the evaluator survives, nothing outside changes.

Real processes, real temporary folders, a real TCP listener on the loopback address: nothing is mocked.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from mft.eval import sandbox
from mft.eval.tasks.humaneval import HumanEval, HumanEvalPlus


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def sandbox_processes(home: Path) -> list[str]:
    """Command lines of the live processes started by sandboxes under `home`: this test's own, no one else's.

    Every sandbox process (the launcher, the program, anything it forks) carries its folder in its command
    line, and the test points the sandboxes' temporary folders at a folder of its own: another evaluation
    running on the same machine is never counted.
    """
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = open(f"/proc/{entry.name}/cmdline", "rb").read().decode(errors="replace")
                state = open(f"/proc/{entry.name}/stat", "rb").read().decode(errors="replace").rsplit(")", 1)[1]
            except (OSError, IndexError):
                continue
            if str(home) in cmdline and state.split()[0] != "Z":
                found.append(cmdline)
    return found


def test_a_correct_program_passes_and_a_wrong_one_fails():
    ok, wrong = sandbox.run_programs(["def f():\n    return 1\n\nassert f() == 1\nprint('x' * 10000)",
                                      "assert 1 == 2"], timeout_s=3, workers=2)
    assert ok.passed and ok.status == "passed" and ok.returncode == 0
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.stderr_tail


FORGED_MARKERS = {
    # Today's scheme appended a completion token to the program file and trusted stdout: copy the file to
    # stdout (token included), then leave before the tests run.
    "print own file, exit 0": "import os, sys\nos.write(1, open(__file__, 'rb').read())\nsys.stdout.flush()\n"
                              "os._exit(0)\nassert False",
    # Write the file to every descriptor this process holds (stdout, any verdict pipe), then leave.
    "write every descriptor, exit 0": "import os\ndata = open(__file__, 'rb').read()\n"
                                      "for fd in map(int, os.listdir('/proc/self/fd')):\n"
                                      "    try:\n        os.write(fd, data)\n    except OSError:\n        pass\n"
                                      "os._exit(0)\nassert False",
}


def test_a_forged_completion_marker_fails():
    """Whatever an early exit prints or writes, the verdict is the launcher's: failed, status 125."""
    results = sandbox.run_programs(list(FORGED_MARKERS.values()), timeout_s=3, workers=2)
    assert [(r.passed, r.status, r.returncode) for r in results] == [(False, "failed", sandbox.EARLY_EXIT)] * 2
    assert sandbox.run_program("x = 1\nassert x == 1", timeout_s=3).returncode == 0  # the same path, run to its end


def test_time_limits_are_the_protocol_ones():
    assert HumanEval.timeout_s == 3.0 and HumanEvalPlus.timeout_s == 20.0


@pytest.mark.slow
def test_hostile_programs_fail_and_change_nothing_outside(tmp_path, monkeypatch):
    home = tmp_path / "sandboxes"  # the sandboxes' temporary folders: marks this test's processes
    home.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(home))
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "keep.txt").write_text("precious")
    (outside / "sub" / "data.bin").write_bytes(os.urandom(64))
    before = snapshot(outside)
    marker = tmp_path / f"mft-hostile-{os.getpid()}"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port, me = listener.getsockname()[1], os.getpid()
    hostile = {
        "infinite loop": "while True:\n    pass",
        "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 28))",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "sys.exit(0) before the tests": "import sys\nsys.exit(0)\nassert False",
        "os._exit(0)": "import os\nos._exit(0)",
        "kill the evaluator": f"import os, signal\nos.kill({me}, signal.SIGKILL)",
        "kill the evaluator's group": f"import os, signal\nos.killpg(os.getpgid({me}), signal.SIGKILL)",
        "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(5)",
        "delete outside": f"import shutil\nshutil.rmtree({str(outside)!r})",
        "overwrite outside": f"open({str(outside / 'keep.txt')!r}, 'w').write('gone')",
        "write a new file outside": f"open({str(marker)!r}, 'w').write('x')",
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
    }
    peak, running = [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], len(sandbox_processes(home)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        results = sandbox.run_programs(list(hostile.values()), timeout_s=3, workers=len(hostile))
    finally:
        running[0] = False
        sampler.join()
    assert 0 < peak[0] < 1000  # seen running; the fork bomb was capped (uncapped it reaches many thousands)
    for (name, _), result in zip(hostile.items(), results):
        assert not result.passed, name
    statuses = dict(zip(hostile, (r.status for r in results)))
    assert statuses["infinite loop"] == "timeout" and statuses["fork bomb"] == "timeout"
    assert snapshot(outside) == before
    assert not marker.exists()
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected
    listener.close()
    assert sandbox_processes(home) == []  # nothing it started outlives it
    # ... and the evaluator is still here and still works.
    assert sandbox.run_program("assert True", timeout_s=3).passed
