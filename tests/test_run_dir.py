"""mft.run_dir: a run folder's file names and bookkeeping, in one place below every layer that uses them."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

from mft import run_dir
from mft.errors import MftError
from mft.run_dir import FINISHED_MARKER, check_output_dir, latest_checkpoint, list_checkpoints, mark_finished

SRC = Path(__file__).resolve().parents[1] / "src" / "mft"


def test_output_dir_states(tmp_path):
    out = tmp_path / "run"
    assert check_output_dir(str(out)) == "new"  # missing
    out.mkdir()
    assert check_output_dir(str(out)) == "new"  # empty
    (out / "checkpoint-10").mkdir()
    assert check_output_dir(str(out)) == "resume"  # interrupted: no marker
    marker = mark_finished(str(out), {"global_step": 20})
    assert os.path.basename(marker) == FINISHED_MARKER == "run_complete.json"
    info = json.loads(Path(marker).read_text())
    assert info["global_step"] == 20 and info["finished_at"]
    expected = (f"{out} already holds a finished run (run_complete.json, {info['finished_at']}); "
                "pass --overwrite_output_dir")
    with pytest.raises(MftError, match=re.escape(expected)):
        check_output_dir(str(out))
    assert check_output_dir(str(out), overwrite=True) == "overwrite"
    (tmp_path / "file").write_text("x")
    with pytest.raises(MftError, match=r"output_dir '.*file' exists and is not a folder"):
        check_output_dir(str(tmp_path / "file"))


def test_checkpoints_and_snapshots_complete_ones_only(tmp_path):
    for step, epoch in ((2, 0), (10, 1)):
        (tmp_path / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step}" / run_dir.TRAINER_STATE).write_text(json.dumps({"epoch": epoch}))
    (tmp_path / "checkpoints" / "step_12").mkdir()  # still being written: no trainer_state.json
    (tmp_path / "snapshots" / "step_4").mkdir(parents=True)
    (tmp_path / "snapshots" / "step_4" / run_dir.SNAPSHOT_INFO).write_text(json.dumps({"epoch": 0}))
    (tmp_path / "snapshots" / "step_10").mkdir()
    (tmp_path / "snapshots" / "step_10" / run_dir.RUN_INFO).write_text(json.dumps({"epoch": 1}))
    (tmp_path / "snapshots" / ".step_12.partial").mkdir()
    (tmp_path / "snapshots" / ".step_12.partial" / run_dir.RUN_INFO).write_text("{}")
    assert latest_checkpoint(str(tmp_path)) == tmp_path / "checkpoints" / "step_10"
    assert list_checkpoints(str(tmp_path)) == [
        {"kind": "checkpoint", "step": 2, "epoch": 0, "path": str(tmp_path / "checkpoints" / "step_2")},
        {"kind": "snapshot", "step": 4, "epoch": 0, "path": str(tmp_path / "snapshots" / "step_4")},
        {"kind": "checkpoint", "step": 10, "epoch": 1, "path": str(tmp_path / "checkpoints" / "step_10")},
        {"kind": "snapshot", "step": 10, "epoch": 1, "path": str(tmp_path / "snapshots" / "step_10")}]
    assert latest_checkpoint(str(tmp_path / "nothing")) is None and list_checkpoints(str(tmp_path / "nothing")) == []


def test_apply_copies_no_run_bookkeeping(tmp_path):
    """A run folder used as the base of `mft apply` (an FFT run) keeps its side files (config, tokenizer) in the
    masked model, but none of the run's own records; train_inputs.json was copied before it was listed here."""
    from mft.masking.apply import _copy_side_files

    src, dst = tmp_path / "fft_run", tmp_path / "out"
    src.mkdir()
    dst.mkdir()
    keep = ["config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"]
    records = [*run_dir.RUN_FILES, run_dir.RUN_INFO, run_dir.SNAPSHOT_INFO, "mft_masks.json", "masks.safetensors"]
    assert set(run_dir.RUN_FILES) == {"run_complete.json", "train_log.jsonl", "train_config.yaml",
                                      "train_launch.json", "train_inputs.json"}
    for name in keep + records + ["model.safetensors", "model.safetensors.index.json"]:
        (src / name).write_text("{}")
    _copy_side_files(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == sorted(keep)


def _mft_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of an mft module in `path`, at any depth (module level and in functions)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name == "mft" or name.startswith("mft.")]


@pytest.mark.parametrize("package", ["masking", "eval"])
def test_masking_and_eval_never_import_train(package):
    """The layers run masking -> train and eval -> (nothing of train): an import of mft.train from below (even
    inside a function) would run back up. Run-folder names come from mft.run_dir instead."""
    files = sorted((SRC / package).rglob("*.py"))
    assert len(files) >= 5
    upward = [f"{path.relative_to(SRC)}:{line} imports {name}" for path in files
              for line, name in _mft_imports(path) if name == "mft.train" or name.startswith("mft.train.")]
    assert upward == []


def test_run_dir_imports_nothing_of_mft_but_errors():
    assert {name for _, name in _mft_imports(SRC / "run_dir.py")} == {"mft.errors", "mft.errors.MftError"}
