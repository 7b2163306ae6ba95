"""Output folders that never destroy inputs: path checks, temporary siblings, the final swap, one-line OS errors.

The rule every writing command follows (`mft train`, `mft apply`):

1. Before anything is written or deleted, each local input path (model, tokenizer, mask run, mask file, data
   files, the base model a run records) is resolved (symlinks followed) and compared with the output folder.
   The output may not *equal* or *contain* an input (`check_output_vs_inputs`): replacing it would delete or
   change that input. A new folder *inside* an input folder is fine (`RUN/mask_applied`).
2. The result is written into a temporary sibling `.<name>.tmp-<pid>-<tag>` and moved into place at the very
   end (`swap_into_place`): the old output, if any, is renamed to `.<name>.old-<pid>-<tag>`, the new one takes
   its name, then the old one is removed. A failed or interrupted run leaves the old output as it was.
3. Temporary folders left by a killed run are removed, and reported, by the next run into the same place
   (`remove_leftovers`), and only those this tool made: the exact name `.<name>.tmp-<pid>-<tag>`, the marker
   file `TEMP_MARKER` inside (written when the folder is created), and a `<pid>` that is no longer running.
   An `.<name>.old-<pid>-<tag>` folder is never deleted by a later run: it may be the only complete copy of the
   output (a swap killed between its two renames); it is renamed back into place when the output is missing,
   otherwise kept and reported.
4. Replacing an output (`mft train --overwrite_output_dir`, `mft apply --overwrite`) is refused while the old
   folder holds evaluation results another command wrote into it (`eval_output/`, or any folder with a
   `metrics.json`; `mft eval --output-dir MODEL/eval_output` puts them there): `check_overwrite_keeps_results`,
   before any work. The user moves them out (or deletes them) first.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path

from mft.errors import MftError

_TEMP = re.compile(r"\.(tmp|old)-(\d+)-([0-9a-f]{8}|train|partial)")
TEMP_MARKER = ".mft-temporary"  # written inside every temporary folder this tool creates; removed before the swap


def resolved(path: str | os.PathLike) -> Path:
    """The absolute path with `~` expanded and every symlink followed (the path need not exist)."""
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def check_output_vs_inputs(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None],
                           output_flag: str = "--output_dir") -> None:
    """Refuse when the output folder equals or contains one of the local `inputs` ({what: path}).

    Inputs that are not local paths (hub ids, None) are skipped. Raises MftError naming both paths.
    """
    out = resolved(output)
    for what, path in inputs.items():
        if not path or not os.path.exists(os.path.expanduser(str(path))):
            continue
        src = resolved(path)
        if src == out or out in src.parents:
            relation = "is" if src == out else "contains"
            hint = (f"; a new folder inside it (e.g. {Path(str(path)) / 'mask_applied'}) is fine"
                    if src.is_dir() else "")
            raise MftError(f"{output_flag} {output} {relation} the {what} {path}: writing the output there would "
                           f"delete or change that input. Choose an output folder outside it{hint}")
        # the path as given (a symlink inside the output, say) would be deleted with the output, even if what it
        # points to survives; the run would then record a path that no longer exists
        given = Path(os.path.abspath(os.path.expanduser(str(path))))
        link = resolved(given.parent) / given.name
        if link == out or out in link.parents:
            raise MftError(f"the {what} {path} lies inside {output_flag} {output} (a link to {src}): replacing the "
                           f"output would delete it. Give the {what} as {src}, or choose another output folder")


RESULTS_FOLDER = "eval_output"  # where `mft eval` results of a model go by default: inside the model's folder


def results_inside(output: str | os.PathLike) -> list[Path]:
    """Evaluation results inside the folder `output` (which need not exist): every folder named
    RESULTS_FOLDER and every other folder holding a `metrics.json` (a `metrics.json` directly in `output`
    too), none below one already found; symlinks are not followed. Sorted paths."""
    root = Path(output)
    if not root.is_dir() or root.is_symlink():
        return []
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here != root and (here.name == RESULTS_FOLDER or "metrics.json" in filenames):
            found.append(here)
            dirnames[:] = []  # everything below belongs to this result
        elif here == root and "metrics.json" in filenames:
            found.append(here / "metrics.json")
        dirnames.sort()
    return sorted(found)


def check_overwrite_keeps_results(output: str | os.PathLike, overwrite_flag: str) -> None:
    """Refuse to replace the folder `output` while it holds evaluation results (`results_inside`): another
    command wrote them, and replacing the folder would delete the only copy without a word. Call it before
    any work, only when the command is about to replace an existing output (`overwrite_flag` names the flag,
    e.g. "--overwrite"). Raises MftError naming each result (up to five) and what to do."""
    found = results_inside(output)
    if not found:
        return
    names = [str(p.relative_to(output)) + ("/" if p.is_dir() else "") for p in found]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise MftError(f"{overwrite_flag} would replace {output}, which holds evaluation results written into it "
                   f"({shown}): replacing the folder would delete them. Move them out of {output} (or delete "
                   "them) and run again, or choose another output folder")


def check_writable(output: str | os.PathLike, output_flag: str = "--output_dir") -> None:
    """Refuse early when the output folder cannot be created or written: its nearest existing ancestor is not a
    folder, is on a read-only file system, or is not writable. Raises MftError naming the path and the errno."""
    path = resolved(output)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise MftError(f"cannot create {output_flag} {output}: {probe} is a file, not a folder "
                       f"({errno.errorcode[errno.ENOTDIR]})")
    if hasattr(os, "statvfs") and os.statvfs(probe).f_flag & os.ST_RDONLY:
        raise MftError(f"cannot write {output_flag} {output}: {probe} is on a read-only file system "
                       f"({errno.errorcode[errno.EROFS]})")
    # where the output or its temporary sibling is created: the existing folder, or the parent of the output
    target = probe if probe != path else path.parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise MftError(f"cannot write {output_flag} {output}: permission denied on {target} "
                       f"({errno.errorcode[errno.EACCES]})")


def os_error(exc: OSError, where: str | os.PathLike) -> MftError:
    """One line for a failed file operation: the path, the reason in words and the errno name, e.g.
    `cannot write out/model.safetensors: No space left on device (ENOSPC)`."""
    path = exc.filename or where
    name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__
    reason = exc.strerror or os.strerror(exc.errno or 0)
    hint = {errno.ENOSPC: "; free space there or choose another output folder",
            errno.EDQUOT: "; your disk quota is used up",
            errno.EROFS: "; choose an output folder on a writable file system"}.get(exc.errno, "")
    return MftError(f"cannot write {path}: {reason} ({name}){hint}")


def temp_sibling(output: str | os.PathLike, kind: str = "tmp", tag: str | None = None) -> Path:
    """`.<name>.<kind>-<pid>-<tag>` beside `output` (kind: tmp = being written, old = being replaced)."""
    output = Path(output)
    return output.parent / f".{output.name}.{kind}-{os.getpid()}-{tag or uuid.uuid4().hex[:8]}"


def make_temp_dir(path: Path) -> Path:
    """Create the temporary folder `path` (from `temp_sibling`) with the marker that lets a later run recognise
    and remove it if this one is killed."""
    path.mkdir(parents=True)
    (path / TEMP_MARKER).write_text(f"temporary output of mft (pid {os.getpid()}); safe to delete once that "
                                    "process has ended\n")
    return path


def leftovers(output: str | os.PathLike, kind: str = "tmp") -> list[Path]:
    """Siblings of `output` named exactly `.<name>.<kind>-<pid>-<tag>` whose process `<pid>` is gone; for kind
    "tmp" only real folders holding `TEMP_MARKER` (nothing else is ours to delete)."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    found = []
    prefix = f".{output.name}"
    for item in output.parent.iterdir():
        if not item.name.startswith(prefix):
            continue
        match = _TEMP.fullmatch(item.name[len(prefix):])
        if not match or match.group(1) != kind:
            continue
        pid = int(match.group(2))
        if pid != os.getpid() and _alive(pid):
            continue  # another run is writing there right now (this process's own is an earlier, failed call)
        if kind == "tmp" and (item.is_symlink() or not item.is_dir() or not (item / TEMP_MARKER).is_file()):
            continue  # not made by this tool, or a finished folder whose swap was interrupted: kept
        found.append(item)
    return sorted(found)


def remove_leftovers(output: str | os.PathLike, stream=None) -> list[Path]:
    """Clean up after a killed earlier run into `output`, one line per item on `stream` (default stderr).

    An `.old-` folder of a dead run while `output` is missing (a swap killed between its renames) is renamed
    back into place; one while `output` exists is kept and reported, never deleted. Then the temporary folders
    `leftovers` finds are removed. Returns the removed paths.
    """
    output = Path(output)
    stream = stream or sys.stderr
    for old in leftovers(output, "old"):
        if not output.exists() and not output.is_symlink():
            os.replace(old, output)
            print(f"note: restored {output} from {old}, left aside by an interrupted earlier run", file=stream)
        else:
            print(f"note: kept {old}: an earlier run left it aside while replacing {output}; delete it yourself "
                  "once you have checked that you do not need it", file=stream)
    removed = leftovers(output)
    for item in removed:
        shutil.rmtree(item, ignore_errors=True)
        print(f"note: removed {item}, the temporary output of an interrupted earlier run", file=stream)
    return removed


@contextlib.contextmanager
def _ctrl_c_waits():
    """Hold a Ctrl-C (SIGINT) until the block has run, then note it: for steps that must not stop half-way and
    take a moment (the swap below). Only the main thread can hold signals; elsewhere the block runs as is.
    SIGKILL cannot be held: `remove_leftovers` deals with what it leaves."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            print("note: Ctrl-C came while the finished output was being moved into place; the move was completed "
                  "first (it cannot stop half-way)", file=sys.stderr)


def swap_into_place(tmp: Path, output: Path) -> None:
    """Make the finished folder `tmp` the `output`: the old output is renamed aside first and removed only
    after the new one is in place, so at every moment one complete version exists under a recognisable name.
    The marker `TEMP_MARKER` is removed from `tmp` first (it must not end up in the output). A Ctrl-C during
    the swap waits for its end (`_ctrl_c_waits`): the command then finishes, its output complete, and the
    old folder is never left aside."""
    with _ctrl_c_waits():
        (tmp / TEMP_MARKER).unlink(missing_ok=True)
        if output.exists() or output.is_symlink():
            old = temp_sibling(output, "old")
            os.replace(output, old)
            os.replace(tmp, output)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(tmp, output)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give the regular files under `path` (or `path` itself) the mode a plain `open` would: 0o666 & ~umask.
    Some writers (safetensors' `save_file`) create files 0600 whatever the umask, which hides a shared model
    folder from the rest of the group."""
    mode = 0o666 & ~current_umask()
    path = Path(path)
    items = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    for item in items:
        if item.stat().st_mode & 0o777 != mode:
            os.chmod(item, mode)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (any size, constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
