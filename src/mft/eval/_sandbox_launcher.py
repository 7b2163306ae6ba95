"""Run one untrusted Python program locked down; started by `mft.eval.sandbox`, never imported.

    python -I -B _sandbox_launcher.py WORKDIR WALL_SECONDS MEMORY_BYTES MAX_PROCS SHARED_PROCS PIDS_CGROUP|- PROGRAM

Exit status: 0 only when the program ran to its end and then exited 0; 125 when it exited 0 before its
end (`sys.exit(0)`, `os._exit(0)`, ...); otherwise the program's status (128 + signal when it was killed),
or 124 when it ran out of time.

"Ran to its end" is proven through a channel the program cannot write by exiting, printing or writing to
the descriptors it holds: before the program starts, this launcher puts 32 random bytes into a pipe and
keeps them in its own memory (a separate process the program cannot read: it is made non-dumpable). The
program runs under a small runner (`RUNNER`) that reads the bytes and closes that pipe *before* the
program's first line, holding them only as a local variable of its own frame, and keeps the write end of a
verdict pipe; only after `runpy.run_path` has returned (the last line of the program ran, no exception, no
`SystemExit`) does it write them there. The launcher compares the bytes after the program has ended.
What this guarantees: a program that exits early (`sys.exit(0)`, `os._exit(0)`, a signal, an exception in
`atexit`), whatever it prints or writes to any descriptor it holds, fails; no descriptor of the program
holds the secret, and its source holds no token to copy. What it cannot guarantee: the runner shares the
program's address space, so a program written to find the runner's frame (`sys._getframe().f_back...`,
`gc`) can read the bytes and write the verdict itself; no check inside the program's own process can rule
that out, olmes' "ran to the end" marker included.

Only the standard library is used, so nothing of the evaluator's state reaches the program. Each layer is
applied where the OS allows it and skipped otherwise (the parent reports which were active):
  1. resource limits: address space, CPU seconds, file size, process count, no core files. The kernel
     counts RLIMIT_NPROC per user *and user namespace*: in a user namespace of its own (step 2) the
     launcher sets MAX_PROCS after entering it, so the limit counts only this program's processes and
     threads (the launcher included), whatever runs beside it, while the user's own limit still bounds
     the total. Without a user namespace the count is the whole uid's, shared with every concurrent
     program, so the parent passes SHARED_PROCS (the uid's count plus MAX_PROCS per parallel worker) and
     a runaway program can then take its neighbours' share. The kernel never applies the process count
     to uid 0, so as root the parent hands over a `pids` cgroup with a maximum that this launcher joins
     before it starts the program;
  2. new network and PID namespaces (root, or an unprivileged user namespace): no network; when the
     program (PID 1 there) ends or is killed, the kernel kills everything it started;
  3. as root: every capability dropped (also from the bounding set, so exec cannot regain them), which
     takes away root's power over other users' files and processes (the program keeps uid 0, since the
     interpreter may live where only root can read);
  4. Landlock: write access only below WORKDIR and to /dev/null, no TCP, no signals to processes outside
     the sandbox;
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
FS_WRITE_FILE, FS_READ_FILE, FS_TRUNCATE = 1 << 1, 1 << 2, 1 << 14
DEV_NULL = "/dev/null"  # writable too: programs send output there (subprocess.DEVNULL, os.devnull)
NO_SOCKETS = (
    "import socket as _s\n"
    "def _no_network(*a, **k):\n    raise OSError('network access is disabled in the sandbox')\n"
    "_s.socket = _s.create_connection = _s.socketpair = _s.fromfd = _no_network\n"
)

# Run as `python -I -B -c RUNNER SECRET_FD VERDICT_FD PROGRAM`: the program sees sys.argv == [PROGRAM].
# The secret is read and its pipe closed before the program starts; it lives on only as a local of `_run`.
RUNNER = (
    "def _run():\n"
    "    import os, sys, runpy\n"
    "    secret_fd, verdict_fd = int(sys.argv[1]), int(sys.argv[2])\n"
    "    secret = os.read(secret_fd, {size})\n"
    "    os.close(secret_fd)\n"
    "    os.set_inheritable(verdict_fd, False)\n"
    "    sys.argv = sys.argv[3:]\n"
    "{no_sockets}"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "    try:\n"
    "        os.write(verdict_fd, secret)\n"
    "    except OSError as exc:\n"
    "        sys.stderr.write(f'sandbox: the program ran to its end but closed descriptor {{verdict_fd}}, through '\n"
    "                         f'which the runner reports that ({{exc.strerror}}); counted as failed\\n')\n"
    "        sys.stderr.flush()\n"
    "        os._exit(1)\n"
    "_run()\n"
)

libc = ctypes.CDLL(None, use_errno=True)


def set_limits(cpu_seconds, memory_bytes):
    for limit, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256)):
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass


def set_process_limit(max_procs, shared_procs, own_user_namespace):
    """RLIMIT_NPROC, set *after* the user namespace exists (see the docstring, layer 1); returns the value.

    The kernel counts a new user namespace's processes on their own and checks the count of the user outside
    against the limit the creator had when it made the namespace: so the launcher's (unchanged) limit still
    bounds the user's total, and MAX_PROCS only this program's processes and threads.
    """
    value = max_procs if own_user_namespace or os.geteuid() == 0 else shared_procs
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (value, value))
    except (ValueError, OSError):
        pass
    return value


def join_cgroup(cgroup):
    if cgroup == "-":
        return
    try:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        pass


def enter_namespaces():
    """New net + PID namespaces (and a user namespace when not root); (namespaces exist, own user namespace)."""
    flags = CLONE_NEWNET | CLONE_NEWPID
    if os.geteuid() == 0 and libc.unshare(flags) == 0:
        return True, False
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | flags) != 0:
        return False, False
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        return False, True
    return True, True


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
    dev_null = (FS_READ_FILE | FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)) & handled_fs
    for path, access in (("/", FS_READ), (workdir, handled_fs), (DEV_NULL, dev_null)):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:  # no /dev/null in this root: nothing to allow
            continue
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
    no_sockets = "" if net_blocked else f"    exec({NO_SOCKETS!r}, {{}})\n"
    runner = RUNNER.format(no_sockets=no_sockets, size=SECRET_BYTES)
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
    workdir, wall_seconds, memory_bytes, max_procs, shared_procs, cgroup, program = sys.argv[1:8]
    set_limits(int(float(wall_seconds)) + 1, int(memory_bytes))
    join_cgroup(cgroup)
    isolated_net, own_user_namespace = enter_namespaces()
    set_process_limit(int(max_procs), int(shared_procs), own_user_namespace)
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
