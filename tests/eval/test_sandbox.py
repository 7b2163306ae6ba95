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
    # Read whatever the descriptors it was given hold (the runner's secret pipe), write it to every
    # descriptor (the verdict pipe), then leave: the secret is no longer in any descriptor.
    "steal from every descriptor, exit 0": "import os\nfds = [int(f) for f in os.listdir('/proc/self/fd')]\n"
                                           "got = b''\nfor fd in fds:\n    try:\n        os.set_blocking(fd, False)\n"
                                           "        got += os.read(fd, 64)\n    except OSError:\n        pass\n"
                                           "for fd in fds:\n    try:\n        os.write(fd, got)\n"
                                           "    except OSError:\n        pass\nos._exit(0)\nassert False",
}


def test_a_forged_completion_marker_fails():
    """Whatever an early exit prints or writes, the verdict is the launcher's: failed, status 125."""
    results = sandbox.run_programs(list(FORGED_MARKERS.values()), timeout_s=3, workers=2)
    assert [(r.passed, r.status, r.returncode) for r in results] == [(False, "failed", sandbox.EARLY_EXIT)] * 3
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


def test_the_process_limit_is_the_programs_own_whatever_runs_beside_it():
    """Every program gets the same RLIMIT_NPROC, MAX_PROCS + the launcher, however many run at once (it used
    to be the uid's process count at its start + 32, which shrank with every program running beside it)."""
    program = "import resource, sys\nprint(resource.getrlimit(resource.RLIMIT_NPROC), file=sys.stderr)"
    alone = sandbox.run_program(program, timeout_s=3)
    together = sandbox.run_programs([program] * 4, timeout_s=3, workers=4)
    expected = str((sandbox.MAX_PROCS + 1,) * 2)
    assert [r.stderr_tail.strip() for r in [alone, *together]] == [expected] * 5


NOBODY = 65534
NOBODY_DRIVER = """
import json, os, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox
threads = ("import resource, sys, threading, time\\n"
           "ts = [threading.Thread(target=time.sleep, args=(1,)) for _ in range(12)]\\n"
           "[t.start() for t in ts]\\n[t.join() for t in ts]\\n"
           "print(resource.getrlimit(resource.RLIMIT_NPROC)[0], file=sys.stderr)\\n")
bomb = "import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass\\n"
peak, running = [0], [True]
def count():
    total = 0
    for entry in os.scandir("/proc"):
        try:
            status = open(f"/proc/{entry.name}/status").read() if entry.name.isdigit() else ""
        except OSError:
            continue
        if f"\\nUid:\\t{os.getuid()}\\t" in status:
            total += int(status.split("Threads:")[1].split()[0])
    return total
def sample():
    while running[0]:
        peak[0] = max(peak[0], count())
        time.sleep(0.02)
sampler = threading.Thread(target=sample)
sampler.start()
with ThreadPoolExecutor(8) as pool:
    results = list(pool.map(lambda p: sandbox.run_program(p, 3, concurrency=8), [bomb] + [threads] * 7))
running[0] = False
sampler.join()
print(json.dumps({"uid": os.getuid(), "peak": peak[0], "results": [[r.status, r.stderr_tail[-300:]] for r in results]}))
"""


def python_for(uid: int) -> str | None:
    """An interpreter that `uid` can run (the test's own may live under /root), or None."""
    import shutil
    import subprocess
    import sys

    for candidate in dict.fromkeys([sys.executable, os.path.realpath(sys.executable), shutil.which("python3") or "",
                                    "/usr/bin/python3"]):
        # Through `env`: setpriv itself may still open what root can, the program's own exec may not.
        if candidate and subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "env",
                                         candidate, "-c", "import resource"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.slow
def test_parallel_programs_of_an_unprivileged_user_do_not_take_each_others_processes():
    """As `nobody` (RLIMIT_NPROC counts per uid; root is exempt): a fork bomb and seven correct programs of
    12 threads each, all at once. The seven pass with the same limit of their own, the bomb is capped.
    Before, each program's limit was the uid's count at its start + 32, so correct programs beside others
    failed with "can't start new thread"."""
    import json
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the check as nobody")
    python = python_for(NOBODY)
    if python is None:
        pytest.skip("no Python interpreter that nobody can run")
    folder = Path(tempfile.mkdtemp(prefix="mft-nobody-", dir="/tmp"))
    try:
        folder.chmod(0o777)
        for module in (sandbox.LAUNCHER, Path(sandbox.__file__)):  # both use only the standard library
            shutil.copy(module, folder / module.name)
        (folder / "driver.py").write_text(NOBODY_DRIVER)
        for path in folder.iterdir():
            path.chmod(0o755)
        done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "env",
                               f"HOME={folder}", f"TMPDIR={folder}", python, "-I", "driver.py"], cwd=folder,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout.splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert report["uid"] == NOBODY
    (bomb_status, _), *rest = report["results"]
    if any(tail.strip() != str(sandbox.MAX_PROCS + 1) for status, tail in rest if status == "passed"):
        pytest.skip(f"no unprivileged user namespaces here (limits {[t for _, t in rest]}): the limit is shared")
    assert bomb_status == "timeout"
    assert [(status, tail.strip()) for status, tail in rest] == [("passed", str(sandbox.MAX_PROCS + 1))] * 7, rest
    assert report["peak"] < 1000, report["peak"]  # the bomb capped (uncapped it reaches many thousands)


def test_output_to_dev_null_is_allowed():
    program = ("import os, subprocess, sys\nwith open(os.devnull, 'w') as f:\n    f.write('x' * 100)\n"
               "done = subprocess.run([sys.executable, '-c', 'print(1)'], stdout=subprocess.DEVNULL)\n"
               "assert done.returncode == 0\nopen('/dev/null', 'rb').read()")
    result = sandbox.run_program(program, timeout_s=3)
    assert (result.passed, result.returncode) == (True, 0), result.stderr_tail


def test_a_correct_program_with_a_lot_of_stderr_passes():
    """20 MiB on stderr (over the 16 MiB file-size limit the stderr file used to count against)."""
    program = "import sys\nfor _ in range(20):\n    sys.stderr.write('x' * (1 << 20))\nsys.stderr.write('END')"
    result = sandbox.run_program(program, timeout_s=10)
    assert (result.passed, result.returncode) == (True, 0)
    assert len(result.stderr_tail) == sandbox.STDERR_TAIL and result.stderr_tail.endswith("xxEND")


def test_unencodable_program_text_fails_and_leaves_no_folder(tmp_path, monkeypatch):
    home = tmp_path / "sandboxes"
    home.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(home))
    result = sandbox.run_program("x = '\ud800'\nassert x", timeout_s=3)  # a lone surrogate: no UTF-8 for it
    assert (result.passed, result.status, result.returncode) == (False, "failed", 1)
    assert "SyntaxError" in result.stderr_tail and "utf-8" in result.stderr_tail
    assert list(home.iterdir()) == []


def test_a_program_that_closes_the_runners_descriptor_fails_with_a_plain_message():
    result = sandbox.run_program("import os\nos.closerange(3, 256)\nx = 1", timeout_s=3)
    assert (result.passed, result.status, result.returncode) == (False, "failed", 1)
    assert "sandbox: the program ran to its end but closed descriptor" in result.stderr_tail
    assert "counted as failed" in result.stderr_tail and "Traceback" not in result.stderr_tail
