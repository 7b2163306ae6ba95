"""Run model-written programs safely: own process group, fresh folder, time/memory/process limits, no network.

Each program runs through `_sandbox_launcher.py` (read its docstring for the layers and the wall-clock
limit it enforces). Here: a fresh temporary folder per program (the only place it may write), a
back-up time limit after which the launcher's whole process group is killed, and a pool of worker
threads that each wait on one program at a time.

A program passes only if the launcher exits 0: the program exited 0 *and* the launcher holds its own
proof that the program's last line ran (a secret moved between two pipes after `runpy` returned; see the
launcher's docstring). What the program prints plays no part, so `sys.exit(0)`, `os._exit(0)` or a
printed fake marker before the tests is a failure, as in olmes ("ran to the end").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

LAUNCHER = Path(__file__).with_name("_sandbox_launcher.py")
MEMORY_BYTES = 4 << 30
MAX_PROCS = 32  # processes + threads one program may add to its uid's count
TIMEOUT_EXIT = 124  # the launcher's status for "ran out of time"
EARLY_EXIT = 125  # the launcher's status for "exited 0 before its last line ran"
BACKUP_GRACE_S = 10.0  # after the limit, how long the launcher gets to clean up before we kill it
PIDS_MAX = 64  # processes + threads of one program, through a pids cgroup (as root)
CGROUP_ROOTS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")  # cgroup v1 `pids` hierarchy, cgroup v2


@dataclass
class RunResult:
    passed: bool
    status: str  # passed | failed | timeout
    returncode: int | None
    stderr_tail: str


def _user_process_count() -> int:
    """Processes and threads of our uid now: RLIMIT_NPROC counts all of them, so the limit is this + margin."""
    uid, total = str(os.getuid()), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = dict(line.split(":", 1) for line in open(f"/proc/{entry.name}/status") if ":" in line)
            if fields["Uid"].split()[0] == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return total


def _pids_cgroup_root() -> Path | None:
    """A writable cgroup folder offering the `pids` controller (root only; RLIMIT_NPROC spares uid 0)."""
    if os.geteuid() != 0:
        return None
    for root in map(Path, CGROUP_ROOTS):
        control = root / "cgroup.subtree_control"
        if (root / "cgroup.procs").is_file() and os.access(root, os.W_OK) and (
                root.name == "pids" or (control.is_file() and "pids" in control.read_text().split())):
            return root
    return None


def _make_pids_cgroup() -> Path | None:
    root = _pids_cgroup_root()
    if root is None:
        return None
    try:
        path = Path(tempfile.mkdtemp(prefix="mft-sandbox-", dir=root))
        (path / "pids.max").write_text(str(PIDS_MAX))
        return path
    except OSError:
        return None


def _remove_cgroup(path: Path | None) -> None:
    for _ in range(100):  # empty once the launcher is reaped; removal can lag a moment
        if path is None or not path.exists():
            return
        try:
            path.rmdir()
        except OSError:
            time.sleep(0.02)


def _prepare_folder(program: str) -> tuple[Path, Path, Path]:
    root = Path(tempfile.mkdtemp(prefix="mft-sandbox-"))
    work = root / "work"
    work.mkdir()
    source = work / "program.py"
    source.write_text(program, encoding="utf-8")
    return root, work, source


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(program: str, timeout_s: float, memory_bytes: int = MEMORY_BYTES) -> RunResult:
    """Run `program` (Python source) in a sandbox; passed = it ran to its end within `timeout_s`.

    `returncode` is the launcher's: 0 passed, 124 timeout, 125 exited 0 before its end, else the program's.
    """
    root, work, source = _prepare_folder(program)
    max_procs = _user_process_count() + MAX_PROCS
    cgroup = _make_pids_cgroup()
    argv = [sys.executable, "-I", "-B", str(LAUNCHER), str(work), str(timeout_s), str(memory_bytes),
            str(max_procs), str(cgroup or "-"), str(source)]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
    timed_out = False
    try:
        with open(root / "stderr", "w+b") as err:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
            try:
                proc.wait(timeout=timeout_s + BACKUP_GRACE_S)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # a launcher that did not clean up in time
            proc.wait()
            timed_out = timed_out or proc.returncode == TIMEOUT_EXIT
            err.seek(max(0, err.seek(0, os.SEEK_END) - 2000))
            stderr_tail = err.read().decode("utf-8", "replace")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        _remove_cgroup(cgroup)
    if timed_out:
        return RunResult(False, "timeout", None, stderr_tail)
    passed = proc.returncode == 0
    return RunResult(passed, "passed" if passed else "failed", proc.returncode, stderr_tail)


def run_programs(programs: list[str], timeout_s: float, workers: int | None = None, desc: str = "running code",
                 memory_bytes: int = MEMORY_BYTES) -> list[RunResult]:
    """Run each program in its own sandbox, `workers` at a time, in order, with a progress bar."""
    from tqdm.auto import tqdm

    from mft.eval.parallel import default_workers

    workers = max(1, workers or default_workers())
    results = []
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(programs), desc=desc, unit="prog") as bar:
        for result in pool.map(lambda program: run_program(program, timeout_s, memory_bytes), programs):
            results.append(result)
            bar.update(1)
    return results
