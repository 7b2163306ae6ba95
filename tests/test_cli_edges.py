"""Edges of every `mft` command's ending: a closed stdout pipe, `--quiet` spelled as a boolean setting."""

from __future__ import annotations

import os
import subprocess
import sys

from mft.train.cli import main as train_main

from tests.conftest import ROOT


def test_a_reader_that_closes_the_pipe_early_gets_no_traceback():
    """`mft models list | head -1` (break8): the reader goes away before mft writes; mft ends quietly with 141
    (what a shell reports for SIGPIPE), and stderr holds no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    child = subprocess.Popen([sys.executable, "-m", "mft", "models", "list"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, cwd=ROOT)
    child.stdout.close()  # before the child has imported anything: its first write meets a closed pipe
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err


def test_train_quiet_takes_a_boolean_value(monkeypatch, capsys):
    """`--quiet=true` / `--quiet=false` as every other boolean of `mft train`; anything else is one line."""
    monkeypatch.delenv("MFT_QUIET", raising=False)
    assert train_main(["--quiet=maybe"]) == 1
    assert "mft train: error: --quiet takes true or false, not 'maybe'" in capsys.readouterr().err
    assert "MFT_QUIET" not in os.environ
    train_main(["--quiet=true"])  # fails later (no model given): the flag has been taken by then
    assert os.environ.get("MFT_QUIET") == "1"
    err = capsys.readouterr().err
    assert "unknown setting 'quiet'" not in err
    train_main(["--quiet=false"])
    assert "MFT_QUIET" not in os.environ


def test_ctrl_c_during_the_swap_waits_for_its_end(tmp_path, monkeypatch, capsys):
    """The fault test's race (CI, 2026-12-01): a SIGINT between moving the new output in and removing the old
    one left `.out.old-<pid>-<tag>` beside a complete output. Now the swap holds Ctrl-C until it is done: no
    KeyboardInterrupt, the new output in place, nothing left aside, and a note says what happened."""
    import shutil
    import signal

    from mft import paths

    output, tmp = tmp_path / "out", tmp_path / ".out.tmp-1-abcdef12"
    output.mkdir()
    (output / "weights").write_text("old")
    tmp.mkdir()
    (tmp / "weights").write_text("new")
    (tmp / paths.TEMP_MARKER).write_text("")
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):  # Ctrl-C lands just when the old output is being removed
        os.kill(os.getpid(), signal.SIGINT)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(paths.shutil, "rmtree", interrupted_rmtree)
    paths.swap_into_place(tmp, output)
    assert (output / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "note: Ctrl-C came while the finished output was being moved into place" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_train_help_into_a_closed_pipe_gets_no_traceback():
    """break9 #8: `mft train --help | head -40`: the reader goes away while the long help is written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    child = subprocess.Popen([sys.executable, "-m", "mft", "train", "--help"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, cwd=ROOT)
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err
