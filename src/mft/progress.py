"""One progress helper for every command: a bar on a terminal, plain log lines elsewhere, nothing when quiet.

`progress(...)` takes tqdm's common arguments (`iterable`, `total`, `desc`, `unit`, `initial`, `leave`,
`disable`) and returns an object with tqdm's `update`, `set_postfix`, `set_postfix_str`, `close`, iteration
and `with` support:

- stderr is a terminal: a `tqdm` bar, as before.
- stderr is a file or a pipe (SLURM's `> log`, `| tee`): a `LogProgress`, which writes one plain line
  (`desc: 40% 312/780 step [02:11<03:15, 2.38 step/s] loss=1.93`) when another `LOG_EVERY_PERCENT` of the
  total is done or `LOG_EVERY_S` seconds have passed, whichever comes first, and one when it closes.
  No carriage return is ever written and no line is longer than `MAX_LINE` characters.
- quiet (`set_quiet(True)`, what every command's `--quiet` calls, or `MFT_QUIET=1` in the environment, which
  child processes inherit): nothing, and the `transformers` / `datasets` / `huggingface_hub` bars are off too.
- other libraries' own tqdm bars (e.g. `transformers`' GGUF reader calls `tqdm.auto.tqdm` directly, past its
  own switch): code that calls such a library runs it inside `third_party_bars_off_terminal()`, which disables
  every tqdm bar created meanwhile when stderr is no terminal or quiet.

The percentage is rounded down (99.6 % prints 99 %): 100 % only when the work is done.

`MFT_PROGRESS=bar|log` forces one form (e.g. `log` on a terminal, to see what a cluster job writes).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time

LOG_EVERY_PERCENT = 10.0
LOG_EVERY_S = 60.0
MAX_LINE = 300


def set_quiet(quiet: bool = True) -> None:
    """Silence (or restore) every progress bar of this process and of the processes it starts."""
    if quiet:
        os.environ["MFT_QUIET"] = "1"
        _third_party_bars(enabled=False)
    else:
        os.environ.pop("MFT_QUIET", None)


def is_quiet() -> bool:
    return os.environ.get("MFT_QUIET", "") not in ("", "0")


def _stream_is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    forced = os.environ.get("MFT_PROGRESS", "")
    if forced in ("bar", "log"):
        return forced == "bar"
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_LIBRARY_BARS = (("transformers.utils.logging", "disable_progress_bar", "enable_progress_bar"),
                 ("datasets", "disable_progress_bars", "enable_progress_bars"),
                 ("huggingface_hub.utils", "disable_progress_bars", "enable_progress_bars"))


def _third_party_bars(enabled: bool, load: bool = False) -> None:
    """Turn the libraries' own bars on or off (theirs write carriage returns into log files). Libraries not
    imported yet are imported only when `load`; off, the environment variables `datasets` and
    `huggingface_hub` read at import time are set as well, so later imports and child processes follow."""
    import importlib

    if not enabled:
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    for module, off, on in _LIBRARY_BARS:
        if not load and module.split(".")[0] not in sys.modules:
            continue
        try:
            getattr(importlib.import_module(module), on if enabled else off)()
        except (ImportError, AttributeError):
            pass


def quiet_libraries_off_terminal() -> None:
    """For commands that use `transformers` / `datasets` anyway: their bars only on a terminal and when not
    quiet (imports them)."""
    if is_quiet() or not _stream_is_terminal():
        _third_party_bars(enabled=False, load=True)


def _disabled(real):
    """A subclass of the tqdm class `real` whose bars are always created with `disable=True`: no output, the
    same interface (iteration, `update`, `write`, `set_postfix`, class attributes)."""
    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        real.__init__(self, *args, **kwargs)

    return type(real.__name__, (real,), {"__init__": __init__, "__module__": real.__module__})


@contextlib.contextmanager
def third_party_bars_off_terminal():
    """Within the block, the tqdm bars that other libraries create write nothing when stderr is no terminal or
    quiet (on a terminal and not quiet: no change). Patches the `tqdm` attribute of `tqdm`, `tqdm.std`,
    `tqdm.auto` and `tqdm.autonotebook`, which is what `from tqdm.auto import tqdm` inside a library's function
    reads at call time, and turns the libraries' own switches off (`quiet_libraries_off_terminal`); restores
    the attributes on exit. Bars created before the block, or through a class a library imported earlier at
    module level, are not reached: those libraries have their own switch (`_LIBRARY_BARS`)."""
    if not (is_quiet() or not _stream_is_terminal()):
        yield
        return
    import importlib

    quiet_libraries_off_terminal()
    saved = []
    try:
        importlib.import_module("tqdm.auto")  # loads tqdm, tqdm.std and tqdm.autonotebook as well
    except ImportError:
        pass
    for name in ("tqdm", "tqdm.std", "tqdm.auto", "tqdm.autonotebook"):
        module = sys.modules.get(name)
        real = getattr(module, "tqdm", None)
        if isinstance(real, type):
            saved.append((module, real))
            setattr(module, "tqdm", _disabled(real))
    try:
        yield
    finally:
        for module, real in reversed(saved):
            setattr(module, "tqdm", real)


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", initial: int = 0, leave: bool = True,
             disable: bool = False, unit_scale: bool = False):
    """A progress bar suited to where stderr goes (see the module docstring)."""
    if total is None and iterable is not None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    if disable or is_quiet():
        return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, silent=True)
    if _stream_is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, unit_scale=unit_scale,
                    dynamic_ncols=True)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def _amount(n: float, unit_scale: bool) -> str:
    if not unit_scale:
        return f"{n:g}" if isinstance(n, float) else str(n)
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{prefix}"
        n /= 1000
    return f"{n:.3g}P"


class LogProgress:
    """tqdm's interface, written as plain lines (see the module docstring); `silent=True` writes nothing."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", initial=0, unit_scale=False,
                 silent=False, stream=None, every_percent=None, every_s=None):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = initial
        self.unit_scale, self.silent = unit_scale, silent
        self.stream = stream
        self.every_percent = LOG_EVERY_PERCENT if every_percent is None else every_percent
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self.postfix = ""
        self.start = self.last_time = time.monotonic()
        self.start_n = initial
        self.last_fraction = self._fraction()
        self._written_n = None
        self.closed = False
        self._lock = threading.Lock()  # apply copies two shards at once, each thread updates the bar

    # tqdm's interface ----------------------------------------------------------------------------------
    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self):
        return self.total

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n=1) -> None:
        with self._lock:
            self.n += n
            if self.silent:
                return
            now, fraction = time.monotonic(), self._fraction()
            due_percent = fraction is not None and (fraction - self.last_fraction) * 100 >= self.every_percent - 1e-9
            if due_percent or now - self.last_time >= self.every_s:
                self._write(now)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s="", refresh=True) -> None:
        self.postfix = str(s)

    def set_description(self, desc=None, refresh=True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def write(self, message: str) -> None:
        if not self.silent:
            self._emit(message)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.silent and self.n != self.start_n and self._written_n != self.n:
            self._write(time.monotonic())

    # lines ---------------------------------------------------------------------------------------------

    def _fraction(self):
        return self.n / self.total if self.total else None

    def line(self, now: float | None = None) -> str:
        """The current state as one line of at most MAX_LINE characters."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{_amount(self.n, self.unit_scale)}/{_amount(self.total, self.unit_scale)}" if self.total \
            else _amount(self.n, self.unit_scale)
        percent = f"{math.floor(100 * self.n / self.total)}% " if self.total else ""  # 100 % only when done
        eta = f"<{_clock((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
        text = (f"{self.desc + ': ' if self.desc else ''}{percent}{count} {self.unit} "
                f"[{_clock(elapsed)}{eta}, {_amount(rate, True) if self.unit_scale else f'{rate:.3g}'} {self.unit}/s]")
        if self.postfix:
            text += " " + self.postfix
        text = text.replace("\r", " ").replace("\n", " ")
        return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."

    def _write(self, now: float) -> None:
        self._emit(self.line(now))
        self.last_time, self.last_fraction, self._written_n = now, self._fraction(), self.n

    def _emit(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text[:MAX_LINE] + "\n")
        stream.flush()
