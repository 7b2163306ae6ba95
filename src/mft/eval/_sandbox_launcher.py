"""Run one untrusted Python program locked down; started by `mft.eval.sandbox`, never imported.

    python -I -B _sandbox_launcher.py WORKDIR WALL_SECONDS MEMORY_BYTES MAX_PROCS PIDS_CGROUP|- PROGRAM

Exit status: 0 only when the program ran to its end and then exited 0; 125 when it exited 0 before its
end (`sys.exit(0)`, `os._exit(0)`, ...); otherwise the program's status (128 + signal when it was killed),
or 124 when it ran out of time.

"Ran to its end" is proven through a channel the program cannot read from its source or its memory
while it runs: before the program starts, this launcher puts 32 random bytes into a pipe and keeps them
in its own memory (a separate process the program cannot read: it is made non-dumpable). The program
runs under a small runner (`RUNNER`) holding that pipe's read end and the write end of a verdict pipe,
both non-inheritable; only after `runpy.run_path` has returned (the last line of the program ran,
no exception, no `SystemExit`) does the runner move the secret from one pipe to the other. The launcher
compares the bytes after the program has ended. Nothing the program prints counts, and its source holds
no token to copy. (A program that deliberately reads the runner's descriptors could still move the bytes
itself; no check inside the program's own process can rule that out, the olmes one included.)

Only the standard library is used, so nothing of the evaluator's state reaches the program. Each layer is
applied where the OS allows it and skipped otherwise (the parent reports which were active):
  1. resource limits: address space, CPU seconds, file size, process count, no core files; the kernel
     never applies the process count to uid 0, so as root the parent also hands over a `pids` cgroup
     with a maximum that this launcher joins before it starts the program;
  2. new network and PID namespaces (root, or an unprivileged user namespace): no network; when the
     program (PID 1 there) ends or is killed, the kernel kills everything it started;
  3. as root: every capability dropped (also from the bounding set, so exec cannot regain them), which
     makes the process-count limit apply and takes away root's power over other users' files and
     processes (the program keeps uid 0, since the interpreter may live where only root can read);
  4. Landlock: write access only below WORKDIR, no TCP, no signals to processes outside the sandbox;
  5. without a network namespace or Landlock networking: Python's socket module is disabled in-process.
The launcher enforces the wall-clock limit itself and returns only once the program and everything
it started are gone (the end of a PID namespace's first process waits for all of them). The program
runs in a session of its own, so it cannot signal the launcher through its process group; if the
launcher dies anyway, the program gets SIGKILL (PR_SET_PDEATHSIG).
"""

import ctypes
import os
import resource
import signal
import struct
import sys

CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER = 0x40000000, 0x20000000, 0x10000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
EARLY_EXIT = 125  # exited 0 without the runner's proof that the program ran to its end
SECRET_BYTES = 32
SYS_LANDLOCK = {"create": 444, "add_rule": 445, "restrict": 446}  # x86_64 and the generic (arm64) table
FS_READ = (1 << 0) | (1 << 2) | (1 << 3)  # EXECUTE, READ_FILE, READ_DIR
FS_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1}  # all handled rights per ABI (no IOCTL_DEV)
NO_SOCKETS = (
    "import socket as _s\n"
    "def _no_network(*a, **k):\n    raise OSError('network access is disabled in the sandbox')\n"
    "_s.socket = _s.create_connection = _s.socketpair = _s.fromfd = _no_network\n"
)

# Run as `python -I -B -c RUNNER SECRET_FD VERDICT_FD PROGRAM`: the program sees sys.argv == [PROGRAM].
RUNNER = (
    "import os as _os, sys as _sys, runpy as _runpy\n"
    "_fds = int(_sys.argv[1]), int(_sys.argv[2])\n"
    "_sys.argv = _sys.argv[3:]\n"
    "for _fd in _fds:\n    _os.set_inheritable(_fd, False)\n"
    "{no_sockets}"
    "_runpy.run_path(_sys.argv[0], run_name='__main__')\n"
    "_os.write(_fds[1], _os.read(_fds[0], {size}))\n"
)

libc = ctypes.CDLL(None, use_errno=True)


def set_limits(cpu_seconds, memory_bytes, max_procs):
    for limit, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NPROC, max_procs),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256)):
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass


def join_cgroup(cgroup):
    if cgroup == "-":
        return
    try:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        pass


def enter_namespaces():
    """New net + PID namespaces; True when they exist."""
    flags = CLONE_NEWNET | CLONE_NEWPID
    if os.geteuid() == 0 and libc.unshare(flags) == 0:
        return True
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | flags) != 0:
        return False
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        return False
    return True


def drop_capabilities():
    """Empty the bounding, inheritable, permitted and effective capability sets (root only)."""
    if os.geteuid() != 0:
        return
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last capability: harmless
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    libc.capset(header, bytes(24))  # two empty (effective, permitted, inheritable) triples


def landlock(workdir):
    """Restrict writes to `workdir`, TCP and outside signals; returns whether networking was covered."""
    abi = libc.syscall(SYS_LANDLOCK["create"], None, 0, 1)
    if abi < 1:
        return False
    handled_fs = FS_ABI.get(abi, FS_ABI[3])
    handled_net = 0b11 if abi >= 4 else 0  # BIND_TCP, CONNECT_TCP: no rule allows either
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals
    attr = struct.pack("QQQ", handled_fs, handled_net, scoped)[: 24 if abi >= 6 else 16 if abi >= 4 else 8]
    ruleset = libc.syscall(SYS_LANDLOCK["create"], attr, len(attr), 0)
    if ruleset < 0:
        return False
    for path, access in (("/", FS_READ), (workdir, handled_fs)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = struct.pack("=Qi", access, fd)
        libc.syscall(SYS_LANDLOCK["add_rule"], ruleset, 1, rule, 0)
        os.close(fd)
    ok = libc.syscall(SYS_LANDLOCK["restrict"], ruleset, 0) == 0
    os.close(ruleset)
    return ok and handled_net != 0


def run_program(workdir, program, isolated_net, secret_fd, verdict_fd):
    """In the child: become the program (PID 1 of the new namespace when there is one) under `RUNNER`."""
    os.setsid()
    drop_capabilities()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    net_blocked = landlock(workdir) or isolated_net
    os.chdir(workdir)
    runner = RUNNER.format(no_sockets="" if net_blocked else NO_SOCKETS, size=SECRET_BYTES)
    for fd in (secret_fd, verdict_fd):
        os.set_inheritable(fd, True)  # through this exec only: the runner closes them on exec again
    os.execv(sys.executable, [sys.executable, "-I", "-B", "-c", runner, str(secret_fd), str(verdict_fd), program])


def kill_program(pid):
    for kill in (os.killpg, os.kill):  # its session's group (no PID namespace), then the program itself
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main():
    workdir, wall_seconds, memory_bytes, max_procs, cgroup, program = sys.argv[1:7]
    set_limits(int(float(wall_seconds)) + 1, int(memory_bytes), int(max_procs))
    join_cgroup(cgroup)
    isolated_net = enter_namespaces()
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no ptrace or /proc/PID/mem reads of this process
    secret = os.urandom(SECRET_BYTES)
    secret_read, secret_write = os.pipe()
    os.write(secret_write, secret)
    os.close(secret_write)
    verdict_read, verdict_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(verdict_read)
            run_program(workdir, program, isolated_net, secret_read, verdict_write)
        finally:
            os._exit(126)
    os.close(secret_read)
    os.close(verdict_write)
    expired = []

    def on_alarm(signum, frame):
        expired.append(True)
        kill_program(pid)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(wall_seconds))
    _, status = os.waitpid(pid, 0)  # retried after the alarm's handler (PEP 475)
    signal.setitimer(signal.ITIMER_REAL, 0)
    kill_program(pid)  # whatever it left behind, when there is no PID namespace to end it
    code = os.waitstatus_to_exitcode(status)
    if expired:
        os._exit(124)
    if code == 0 and read_available(verdict_read) != secret:
        os._exit(EARLY_EXIT)
    os._exit(code if code >= 0 else 128 - code)


def read_available(fd):
    """What is in the pipe now, without waiting for writers the program may have left open."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) <= SECRET_BYTES:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


if __name__ == "__main__":
    main()
