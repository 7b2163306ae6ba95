"""Output folders that never destroy inputs: path checks, temporary siblings, the final swap, one-line OS errors.

The rule every writing command follows (`mft train`, `mft apply`):

1. Before anything is written or deleted, each local input path (model, tokenizer, mask run, mask file, data
   files, the base model a run records) is resolved (symlinks followed) and compared with the output folder.
   The output may not *equal* or *contain* an input (`check_output_vs_inputs`): replacing it would delete or
   change that input. A new folder *inside* an input folder is fine (`RUN/mask_applied`).
2. The result is written into a temporary sibling `.<name>.tmp-<pid>-<tag>` and moved into place at the very
   end (`swap_into_place`): the old output, if any, is renamed to `.<name>.old-<pid>-<tag>`, the new one takes
   its name, then the old one is removed. A failed or interrupted run leaves the old output as it was.
3. Temporary siblings left by a killed run (their process is gone) are removed, and reported, by the next run
   into the same place (`remove_leftovers`).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

from mft.errors import MftError

_TEMP = re.compile(r"\.(tmp|old)-(?:(\d+)-)?")


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


def leftovers(output: str | os.PathLike) -> list[Path]:
    """Temporary siblings of `output` whose process is gone (or unknown): what a killed run left behind."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    found = []
    prefix = f".{output.name}."
    for item in output.parent.iterdir():
        if not item.name.startswith(prefix):
            continue
        match = _TEMP.match(item.name[len(prefix) - 1:])
        if not match:
            continue
        pid = int(match.group(2)) if match.group(2) else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue  # another run is writing there right now
        found.append(item)
    return sorted(found)


def remove_leftovers(output: str | os.PathLike, stream=None) -> list[Path]:
    """Remove what `leftovers` finds, printing one line per item to `stream` (default stderr)."""
    removed = leftovers(output)
    for item in removed:
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        print(f"note: removed {item}, the temporary output of an interrupted earlier run", file=stream or sys.stderr)
    return removed


def swap_into_place(tmp: Path, output: Path) -> None:
    """Make the finished folder `tmp` the `output`: the old output is renamed aside first and removed only
    after the new one is in place, so at every moment one complete version exists under a recognisable name."""
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
