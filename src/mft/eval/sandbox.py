"""Run model-written programs safely: own process group, fresh folder, time/memory/process limits, no network.

Each program runs through `_sandbox_launcher.py` (read its docstring for the layers and the wall-clock
limit it enforces). Here: a fresh temporary folder per program (the only place it may write), a
back-up time limit after which the launcher's whole process group is killed, and a pool of worker
threads that each wait on one program at a time.

A program passes only if the launcher exits 0: the program exited 0 *and* the launcher holds its own
proof that the program's last line ran (a secret the runner writes to a verdict pipe after `runpy`
returned; see the launcher's docstring for what that does and does not guarantee). What the program
prints plays no part, so `sys.exit(0)`, `os._exit(0)` or a printed fake marker before the tests is a
failure, as in olmes ("ran to the end").

A program's verdict does not depend on what runs beside it: its process limit counts only its own
processes and threads (a user namespace of its own, or as root a `pids` cgroup of its own; see the
launcher's layer 1), and its stderr goes through a pipe of which the last `STDERR_TAIL` bytes are kept, so
no amount of output fails it. Only where neither a user namespace nor a cgroup is available is the limit
shared by the uid, then sized to MAX_PROCS per parallel worker.
"""

from __future__ import annotations

import os
import select
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
MAX_PROCS = 32  # processes + threads of one program (the launcher adds one of its own)
STDERR_TAIL = 2000  # bytes of the program's stderr kept for the result
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


def _prepare_folder(root: Path, program: str) -> tuple[Path, Path]:
    """`root/work/program.py`. Text that UTF-8 cannot encode (a lone surrogate) is written as its code
    points' bytes (`surrogatepass`), which the interpreter then refuses like any other invalid source."""
    work = root / "work"
    work.mkdir()
    source = work / "program.py"
    source.write_bytes(program.encode("utf-8", "surrogatepass"))
    return work, source


def shared_process_limit(concurrency: int) -> int:
    """RLIMIT_NPROC for a launcher without a user namespace of its own, where the kernel counts every
    process and thread of the uid: the uid's count now plus MAX_PROCS for each of `concurrency` programs
    that may run at once (the launchers' own included), so that programs that stay within MAX_PROCS never
    take each other's room."""
    return _user_process_count() + (MAX_PROCS + 1) * max(1, concurrency)


def _wait_collecting_stderr(proc: subprocess.Popen, deadline: float) -> tuple[bool, bytes]:
    """Wait for `proc` until `deadline` (time.monotonic), reading its stderr pipe meanwhile and keeping
    its last STDERR_TAIL bytes; (timed out, tail). Returns when the process ends, even if something it
    started still holds the pipe open."""
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    try:
        exit_fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3): poll for the exit
        exit_fd = None
    tail, open_pipe, timed_out = b"", True, False
    try:
        while proc.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            watched = ([fd] if open_pipe else []) + ([exit_fd] if exit_fd is not None else [])
            ready = select.select(watched, [], [], remaining if exit_fd is not None else min(remaining, 0.05))[0]
            if fd in ready:
                chunk = _read_some(fd)
                if chunk is None:
                    open_pipe = False
                else:
                    tail = (tail + chunk)[-STDERR_TAIL:]
        for _ in range(64):  # what is left in the pipe; writers that outlive the process are not waited for
            chunk = _read_some(fd) if open_pipe else None
            if not chunk:
                break
            tail = (tail + chunk)[-STDERR_TAIL:]
    finally:
        if exit_fd is not None:
            os.close(exit_fd)
    return timed_out, tail


def _read_some(fd: int) -> bytes | None:
    """Up to 1 MiB from a non-blocking pipe: b"" when nothing is there now, None at its end."""
    try:
        return os.read(fd, 1 << 20) or None
    except BlockingIOError:
        return b""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(program: str, timeout_s: float, memory_bytes: int = MEMORY_BYTES, concurrency: int = 1) -> RunResult:
    """Run `program` (Python source) in a sandbox; passed = it ran to its end within `timeout_s`.

    `returncode` is the launcher's: 0 passed, 124 timeout, 125 exited 0 before its end, else the program's.
    `concurrency`: how many programs the caller runs at once (sizes the shared process limit where no user
    namespace is available; see `shared_process_limit`). The temporary folder is removed whatever happens.
    """
    root = Path(tempfile.mkdtemp(prefix="mft-sandbox-"))
    cgroup = None
    try:
        work, source = _prepare_folder(root, program)
        cgroup = _make_pids_cgroup()
        argv = [sys.executable, "-I", "-B", str(LAUNCHER), str(work), str(timeout_s), str(memory_bytes),
                str(MAX_PROCS + 1), str(shared_process_limit(concurrency)), str(cgroup or "-"), str(source)]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        with proc.stderr:
            timed_out, tail = _wait_collecting_stderr(proc, time.monotonic() + timeout_s + BACKUP_GRACE_S)
            _kill_group(proc.pid)  # a launcher that did not clean up in time
            proc.wait()
        timed_out = timed_out or proc.returncode == TIMEOUT_EXIT
        stderr_tail = tail.decode("utf-8", "replace")
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
    from mft.progress import progress as tqdm

    from mft.eval.parallel import default_workers

    workers = max(1, workers or default_workers())
    results = []
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(programs), desc=desc, unit="prog") as bar:
        for result in pool.map(lambda program: run_program(program, timeout_s, memory_bytes, workers), programs):
            results.append(result)
            bar.update(1)
    return results
