"""A training run folder (`output_dir` of `mft train`): the name of every file the loop writes there, and the
bookkeeping over them that other commands share (is the folder free, finished or resumable; which checkpoints and
snapshots it holds).

    OUTPUT_DIR/
      train_config.yaml      CONFIG_FILE     the resolved settings (loads back unchanged)
      train_launch.json      LAUNCH_FILE     processes, precision, distributed type, ZeRO stage
      train_inputs.json      INPUTS_FILE     size and mtime of every local input file (a resume refuses changes)
      train_log.jsonl        TRAIN_LOG       one JSON line per logged step
      mft_run.json           RUN_INFO        MFT: base model, mask settings, per-rank mask digests
      checkpoints/step_N/    CHECKPOINTS     accelerate state; TRAINER_STATE (trainer_state.json) written last
      snapshots/step_N/      SNAPSHOTS       save_model_snapshots: a model folder + SNAPSHOT_INFO, or MFT's masks
      run_complete.json      FINISHED_MARKER written last: the run finished

The mask file (`masks.safetensors`) is named by its format, `mft.masking.files.DEFAULT_NAME`. This module imports
nothing of mft but its errors, so every layer (masking, train, demo) may use it.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from mft.errors import MftError

# Written by the training loop at the very end of a successful run (see mark_finished / check_output_dir).
FINISHED_MARKER = "run_complete.json"
TRAIN_LOG = "train_log.jsonl"  # one JSON line per logged step
CONFIG_FILE = "train_config.yaml"  # the resolved settings of the run
LAUNCH_FILE = "train_launch.json"  # how the run was launched: processes, precision, distributed type
INPUTS_FILE = "train_inputs.json"  # fingerprint of the local input files: a resume refuses changed inputs
RUN_INFO = "mft_run.json"  # written by `mft train` into an MFT run folder (and MFT snapshots): base model, masks
CHECKPOINTS = "checkpoints"  # checkpoints/step_N/
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its presence marks it complete
SNAPSHOTS = "snapshots"  # save_model_snapshots: snapshots/step_N/, complete once renamed from .step_N.partial
SNAPSHOT_INFO = "snapshot.json"  # FFT / LoRA snapshots: method, steps, epoch, base model
# A run's bookkeeping: never copied along with a model folder (e.g. by the streaming apply).
RUN_FILES = (FINISHED_MARKER, TRAIN_LOG, CONFIG_FILE, LAUNCH_FILE, INPUTS_FILE)


def check_output_dir(output_dir: str, overwrite: bool = False) -> str:
    """What to do with `output_dir` before training; raises MftError for a finished run we may not replace.

    Returns "new" (missing or empty), "resume" (content but no FINISHED_MARKER: an interrupted run; resume
    from its latest complete checkpoint if it has one) or "overwrite" (content and `overwrite`, the run's
    overwrite_output_dir: the new run is written beside it and replaces it once finished).
    Read-only, so every rank may call it.
    """
    out = output_dir
    if not os.path.isdir(out) or not os.listdir(out):
        if os.path.exists(out) and not os.path.isdir(out):
            raise MftError(f"output_dir {out!r} exists and is not a folder")
        return "new"
    if overwrite:
        return "overwrite"
    marker = os.path.join(out, FINISHED_MARKER)
    if os.path.exists(marker):
        when = ""
        try:
            with open(marker, encoding="utf-8") as fh:
                when = json.load(fh).get("finished_at", "")
        except (OSError, ValueError, AttributeError):
            pass
        raise MftError(f"{out} already holds a finished run ({FINISHED_MARKER}{', ' + when if when else ''}); "
                       "pass --overwrite_output_dir to replace it, or choose another --output_dir")
    return "resume"


def mark_finished(output_dir: str, info: dict | None = None) -> str:
    """Write FINISHED_MARKER atomically (main process, after everything else is saved). Returns its path."""
    payload = {"finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **(info or {})}
    path = os.path.join(output_dir, FINISHED_MARKER)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, default=str)
    os.replace(tmp, path)
    return path


def latest_checkpoint(output_dir: str) -> Path | None:
    """The newest checkpoint that finished writing (has trainer_state.json)."""
    root = Path(output_dir) / CHECKPOINTS
    done = [p for p in root.glob("step_*") if (p / TRAINER_STATE).exists()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def list_checkpoints(output_dir: str) -> list[dict]:
    """[{"kind": "checkpoint" | "snapshot", "step", "epoch", "path"}] of a run folder, complete ones only,
    by step then kind. Checkpoints resume a run; snapshots are loadable models (FFT, LoRA) or mask files
    (MFT): the model_name_or_path of an MFT config, or `mft apply --mask_model_name_or_path`."""
    out = []
    root = Path(output_dir)
    for kind, folder, marker in (("checkpoint", CHECKPOINTS, TRAINER_STATE), ("snapshot", SNAPSHOTS, None)):
        for path in sorted((root / folder).glob("step_*")) if (root / folder).is_dir() else []:
            if not path.name.split("_")[1].isdigit():
                continue
            info_file = path / marker if marker else next((path / n for n in (SNAPSHOT_INFO, RUN_INFO)
                                                          if (path / n).exists()), None)
            if info_file is None or not info_file.exists():
                continue
            info = json.loads(info_file.read_text())
            out.append({"kind": kind, "step": int(path.name.split("_")[1]), "epoch": info.get("epoch"),
                        "path": str(path)})
    return sorted(out, key=lambda r: (r["step"], r["kind"]))
