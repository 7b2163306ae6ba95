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
