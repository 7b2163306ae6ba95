"""Progress that suits where it is written: plain lines off a terminal, nothing when quiet."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mft import progress as P

ROOT = Path(__file__).resolve().parents[1]


def test_log_lines_every_ten_percent_without_carriage_returns():
    out = io.StringIO()
    bar = P.LogProgress(total=780, desc="mft training", unit="step", stream=out, every_s=1e9)
    for step in range(780):
        bar.set_postfix(loss=f"{2 - step / 1000:.4f}", lr="1.00e-05")
        bar.update(1)
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 10  # 10 %, 20 %, ... 100 %; close adds none at 100 %
    assert lines[0].startswith("mft training: 10% 78/780 step [")
    assert lines[-1].startswith("mft training: 100% 780/780 step [") and lines[-1].endswith("loss=1.2210, lr=1.00e-05")


def test_time_based_lines_a_final_line_and_no_line_over_300_characters():
    out = io.StringIO()
    bar = P.LogProgress(total=None, desc="x" * 50, unit="tok", stream=out, every_s=0.0)
    bar.set_postfix_str("y" * 1000 + "\r")
    bar.update(5)
    bar.update(5)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("x" * 50 + ": 10 tok [")
    assert max(map(len, lines)) == P.MAX_LINE and lines[0].endswith("...") and "\r" not in out.getvalue()
    quiet = io.StringIO()
    bar = P.LogProgress(total=10, stream=quiet, silent=True)
    for _ in bar.__class__(range(10), total=10, stream=quiet, silent=True):
        pass
    bar.update(10)
    bar.close()
    assert quiet.getvalue() == ""


def test_the_form_follows_stderr_and_quiet(monkeypatch):
    monkeypatch.delenv("MFT_QUIET", raising=False)
    monkeypatch.delenv("MFT_PROGRESS", raising=False)
    bar = P.progress(total=3, desc="d")  # pytest captures stderr: not a terminal
    assert isinstance(bar, P.LogProgress) and not bar.silent
    assert list(P.progress([1, 2, 3])) == [1, 2, 3]
    monkeypatch.setenv("MFT_PROGRESS", "bar")
    assert not isinstance(P.progress(total=3), P.LogProgress)
    P.set_quiet()
    try:
        assert os.environ["MFT_QUIET"] == "1" and P.progress(total=3).silent
        assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    finally:
        P.set_quiet(False)
        for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.pop(name, None)
    assert "MFT_QUIET" not in os.environ


def run_to_file(args: list[str], log: Path, env=None) -> str:
    """Run `python -m mft ARGS` with stdout and stderr appended to one file, as SLURM's `> log 2>&1` does."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("MFT_QUIET", None)
    env.pop("MFT_PROGRESS", None)
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "mft", *args], stdout=f, stderr=subprocess.STDOUT, env=env,
                              cwd=ROOT, timeout=600)
    data = log.read_bytes()  # bytes: read_text() would turn every \r into \n before the check sees it
    assert proc.returncode == 0, data[-3000:].decode(errors="replace")
    return data


def assert_log_friendly(data: bytes) -> None:
    """No carriage return anywhere; no line over MAX_LINE but the logging records (`2026-... INFO name: ...`),
    whose length is that of the paths the user chose. Takes the raw BYTES (a text read would have turned
    every carriage return into a line break, and tqdm's refreshes into short lines)."""
    assert isinstance(data, bytes)
    assert b"\r" not in data
    lines = [line for line in data.decode().split("\n")
             if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ", line)]
    longest = max(lines, key=len, default="")
    assert len(longest) <= P.MAX_LINE, longest[:400]


# A library that creates its own tqdm bar inside a function, as transformers' GGUF reader
# (`load_gguf_checkpoint`: `from tqdm.auto import tqdm`) does, called plainly or inside the context manager.
LIBRARY = """
import sys
from mft.progress import third_party_bars_off_terminal

def library_call():
    from tqdm.auto import tqdm
    total = 0
    for i in tqdm(range(300), desc="Converting and de-quantizing GGUF tensors...", mininterval=0, miniters=1):
        total += i
    print("sum", total, flush=True)

if sys.argv[1] == "managed":
    with third_party_bars_off_terminal():
        library_call()
    import tqdm.auto, tqdm.std
    print("restored", tqdm.auto.tqdm.__module__, tqdm.std.tqdm.__name__, flush=True)
else:
    library_call()
"""


def library_to_file(mode: str, log: Path, **env) -> bytes:
    base = {k: v for k, v in os.environ.items() if k not in ("MFT_QUIET", "MFT_PROGRESS")}
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, "-c", LIBRARY, mode], stdout=f, stderr=subprocess.STDOUT,
                              env={**base, "PYTHONUNBUFFERED": "1", **env}, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, log.read_bytes()[-2000:]
    return log.read_bytes()


def test_third_party_bars_are_off_in_a_log_file_and_when_quiet(tmp_path):
    plain = library_to_file("plain", tmp_path / "plain.log")
    # the failing case (what `mft models get` wrote before): the bar's refreshes, joined by carriage returns.
    # A text read hides them (universal newlines), which is why every check here reads bytes.
    assert plain.count(b"\r") >= 100 and "\r" not in (tmp_path / "plain.log").read_text()
    with pytest.raises(AssertionError):
        assert_log_friendly(plain)
    managed = library_to_file("managed", tmp_path / "managed.log")
    assert managed == b"sum 44850\nrestored tqdm.asyncio tqdm\n"  # no bar at all; tqdm's classes restored after
    assert_log_friendly(managed)
    forced_bar = library_to_file("managed", tmp_path / "bar.log", MFT_PROGRESS="bar")  # a terminal: left alone
    assert forced_bar.count(b"\r") >= 100
    quiet = library_to_file("managed", tmp_path / "quiet.log", MFT_PROGRESS="bar", MFT_QUIET="1")
    assert quiet == b"sum 44850\nrestored tqdm.asyncio tqdm\n"


def test_the_percentage_reaches_100_only_when_done():
    out = io.StringIO()
    bar = P.LogProgress(total=538, desc="apply masks", unit="B", stream=out, every_percent=0.1, every_s=1e9)
    bar.update(537)
    bar.update(1)
    assert out.getvalue().splitlines()[0].startswith("apply masks: 99% 537/538 B")  # 99.8 %: not 100 yet
    assert out.getvalue().splitlines()[1].startswith("apply masks: 100% 538/538 B")


@pytest.mark.slow
def test_mft_train_to_a_file_writes_plain_lines_and_quiet_writes_no_bar(tmp_path, saved_model):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                                                     {"role": "assistant", "content": f"{i + 1}"}]}) + "\n"
                            for i in range(40)))
    common = [f"--model_name_or_path={saved_model('llama')}", f"--train_file={data}", "--max_seq_length=64",
              "--per_device_train_batch_size=2", "--gradient_accumulation_steps=1", "--num_train_epochs=1",
              "--logging_steps=1", "--report_to=[none]", f"--dataset_local_cache_dir={tmp_path / 'cache'}"]
    data = run_to_file(["train", *common, f"--output_dir={tmp_path / 'run'}"], tmp_path / "train.log")
    assert_log_friendly(data)
    text = data.decode()
    bar_lines = [line for line in text.splitlines() if line.startswith("fft training: ")]
    # every 10 % (a run slower than a minute per 10 % adds time-based lines in between)
    assert {f"{p}%" for p in range(10, 101, 10)} <= {line.split()[2] for line in bar_lines}
    assert bar_lines[-1].startswith("fft training: 100% 20/20 step") and "loss=" in bar_lines[-1]

    quiet = run_to_file(["train", *common, f"--output_dir={tmp_path / 'quiet'}", "--quiet"], tmp_path / "quiet.log")
    assert_log_friendly(quiet)
    quiet = quiet.decode()
    assert "training:" not in quiet and not re.search(r"\d+% \d+/\d+ ", quiet)
    assert (tmp_path / "quiet" / "run_complete.json").is_file()
