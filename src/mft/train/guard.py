"""What `mft train` checks and how it owns its output folder, so that nothing is lost and nothing resumes wrong.

- `check_inputs(cfg)` (before anything loads): the output folder may not be or contain an input (model,
  tokenizer, local data files); it must be writable; the tokenizer files exist; every line of a local
  JSON-lines data file parses.
- `check_mask_base(cfg, skeleton, targets)` (MFT): no tied `lm_head`, and no already-masked checkpoint unless
  `allow_masked_base` (the record `mft_masks.json`, or matrices that already hold the pruned fraction of
  exact zeros).
- `open_output(cfg, state, accelerator)`: a run folder records its effective config (`train_config.yaml`,
  plus `train_launch.json`: processes, precision, distributed type). Re-running into an interrupted run
  resumes only when every key that changes the result is the same, otherwise it refuses and lists the
  differing keys (old -> new). `overwrite_output_dir` starts over *beside* the old output: the new run is
  written to a temporary sibling and `finish_output` swaps it into place at the end, so a failed run leaves
  the old output as it was; the temporary folder of a killed run is removed (and reported) by the next one.
- `check_checkpoint(path, model)`: a checkpoint must hold exactly the trained tensors, with their shapes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from mft.errors import MftError
from mft.run_dir import CONFIG_FILE, INPUTS_FILE, LAUNCH_FILE, RUN_INFO, TRAIN_LOG, latest_checkpoint
from mft.train.config import TrainConfig, field_help, source_kind

# Keys that cannot change what a run computes: they may differ between a run and its resumption.
NON_RESULT_KEYS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "checkpointing_steps",
    "keep_last_n_checkpoints", "logging_steps", "with_tracking", "report_to", "exp_name", "timeout",
    "preprocessing_num_workers", "overwrite_cache", "dataset_local_cache_dir", "dataset_mix_dir",
    "allow_masked_base", "save_model_snapshots",
    # bit-identical scores with or without sharding the optimizer state (tests/train/test_distributed.py)
    "shard_optimizer_state"})
# Local path keys: compared by the folder or file they name, not by spelling.
_PATH_KEYS = ("model_name_or_path", "tokenizer_name", "train_file", "dataset_name")
# Where the job is, for the one-line Ctrl-C message (set by the training loop).
PROGRESS: dict = {}


# -- before anything loads --------------------------------------------------------------------------------
def check_inputs(cfg: TrainConfig) -> None:
    """Output vs inputs, writability, results another command wrote into an output that overwrite_output_dir
    would replace, tokenizer files, JSON lines of local data files. Raises MftError."""
    from mft.paths import check_output_vs_inputs, check_overwrite_keeps_results, check_writable

    inputs = {"model_name_or_path": cfg.model_name_or_path, "tokenizer_name": cfg.tokenizer_name}
    local_data = [src for src, _ in cfg.data_sources() if source_kind(src) in ("file", "dir")]
    inputs.update({f"training data {src}": src for src in local_data})
    check_output_vs_inputs(cfg.output_dir, inputs, output_flag="output_dir")
    check_writable(cfg.output_dir, output_flag="output_dir")
    if cfg.overwrite_output_dir:
        check_overwrite_keeps_results(cfg.output_dir, "--overwrite_output_dir")
    check_not_mask_only(cfg.model_name_or_path)
    check_tokenizer_files(cfg.tokenizer_name or cfg.model_name_or_path)
    for src in local_data:
        if source_kind(src) == "file" and src.lower().endswith((".jsonl", ".json")):
            check_json_lines(os.path.expanduser(src))


def check_not_mask_only(name_or_path: str) -> None:
    """A local folder holding an MFT run's masks and mft_run.json but no config.json (an MFT run folder or one
    of its snapshots) has no weights to train: name its base model instead of failing inside transformers."""
    folder = Path(os.path.expanduser(name_or_path))
    if not (folder / RUN_INFO).is_file() or (folder / "config.json").exists():
        return
    try:
        base = json.loads((folder / RUN_INFO).read_text()).get("base_model") or "its base model"
    except (OSError, ValueError, AttributeError):
        base = "its base model (see its mft_run.json)"
    raise MftError(f"model_name_or_path {folder} is a mask-only MFT snapshot of {base}, not a model; use {base} "
                   f"as model_name_or_path (and `mft apply --mask_model_name_or_path {folder} --output_dir DIR` to "
                   "bake the masks into a model you can train further)")


TOKENIZER_FILE_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))


def check_tokenizer_files(name_or_path: str) -> None:
    """A local model/tokenizer folder must hold a tokenizer: tokenizer.json, tokenizer.model (SentencePiece),
    vocab.json + merges.txt (BPE) or vocab.txt (WordPiece). Hub ids are left to the loader."""
    folder = Path(os.path.expanduser(name_or_path))
    if not folder.is_dir():
        return
    names = {p.name for p in folder.iterdir()}
    if any(all(f in names for f in files) for files in TOKENIZER_FILE_SETS):
        return
    partial = [f for files in TOKENIZER_FILE_SETS if len(files) > 1 and any(f in names for f in files)
               for f in files if f not in names]
    if partial:
        raise MftError(f"the tokenizer in {folder} is incomplete: {', '.join(partial)} is missing")
    raise MftError(f"no tokenizer files in {folder}: expected tokenizer.json (or tokenizer.model, or vocab.json + "
                   f"merges.txt); it holds {', '.join(sorted(names)) or 'nothing'}. Copy them there or set "
                   "tokenizer_name")


def check_json_lines(path: str) -> None:
    """Every non-blank line of a JSON-lines file must be one JSON object; a `.json` file may instead be one JSON
    document. Raises MftError with the file, the line number and the parser's complaint."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        if path.lower().endswith(".json"):
            head = fh.read(1 << 16).lstrip()
            if not head.startswith("{"):
                return  # a JSON array: datasets reads it whole and names its own errors
            fh.seek(0)
            try:
                json.load(fh)
                return  # one JSON document
            except ValueError:
                fh.seek(0)
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except ValueError as exc:
                raise MftError(f"{path}, line {number}: not valid JSON ({exc.msg} at column {exc.colno}); every "
                               "line must hold one {\"messages\": [...]} object") from None
            if not isinstance(row, dict):
                raise MftError(f"{path}, line {number}: expected a JSON object {{\"messages\": [...]}}, got "
                               f"{type(row).__name__}")


def check_mask_base(cfg: TrainConfig, skeleton, targets) -> None:
    """MFT only: refuse a tied lm_head among the targets, and a checkpoint that is already masked (unless
    allow_masked_base)."""
    from mft.masking.apply import already_masked, check_not_tied
    from mft.masking.checkpoint import Checkpoint, resolve_model_dir
    from mft.masking.rule import num_pruned

    check_not_tied(skeleton, [t.name for t in targets])
    if cfg.allow_masked_base:
        return
    mask_cfg = cfg.mask_config()
    # local masks prune int((1 - k) n) per matrix; global ones have no fixed count per matrix, so only the
    # fraction of zeros counts (see already_masked)
    pruned = {t.name: (num_pruned(math.prod(t.shape), mask_cfg.keep_ratio(t.kind)) if mask_cfg.subnet_type == "local"
                       else math.prod(t.shape), tuple(t.shape), t.layout) for t in targets}
    checkpoint = Checkpoint(resolve_model_dir(cfg.model_name_or_path, cfg.model_revision))
    why = already_masked(checkpoint, pruned)
    if why:
        raise MftError(f"{cfg.model_name_or_path} is already masked: {why}. MFT on it would learn a mask on top of "
                       "the baked one; train from the unmasked (FFT) checkpoint, or set allow_masked_base: true if "
                       "this is intended")



# -- the run folder ---------------------------------------------------------------------------------------
def launch_info(accelerator) -> dict:
    """How this run is launched, as far as it changes the result."""
    info = {"num_processes": accelerator.num_processes, "mixed_precision": str(accelerator.mixed_precision),
            "distributed_type": str(accelerator.distributed_type).split(".")[-1]}
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        info["zero_stage"] = plugin.deepspeed_config.get("zero_optimization", {}).get("stage")
    return info


def config_differences(recorded: dict, cfg: TrainConfig) -> list[str]:
    """["key: old -> new", ...] for every key that changes the result and differs between the config recorded
    in a run folder and `cfg` (keys missing from the record count as their defaults)."""
    import yaml

    defaults = {key: default for key, _, default, _ in field_help()}
    current = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    out = []
    for key in current:
        if key in NON_RESULT_KEYS:
            continue
        old, new = recorded.get(key, defaults.get(key)), current[key]
        if key in _PATH_KEYS and isinstance(old, str) and isinstance(new, str) and old != new:
            from mft.paths import resolved

            if os.path.exists(os.path.expanduser(old)) and resolved(old) == resolved(new):
                continue
        if old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


def input_fingerprint(cfg: TrainConfig) -> dict[str, dict[str, list[int]]]:
    """{input: {file: [size in bytes, mtime in ns]}} for the local inputs that the result depends on: the files
    of `model_name_or_path` (weights, config, tokenizer; top level) and of `tokenizer_name`, and every local
    data file (a data folder: all files under it). Hub ids are left out (nothing local to compare). Size and
    modification time, not hashes: a multi-GB checkpoint is not read again for this."""
    def files(path: str, recursive: bool) -> dict[str, list[int]]:
        root = Path(os.path.expanduser(path))
        if root.is_file():
            items = [(root.name, root)]
        else:
            found = root.rglob("*") if recursive else root.iterdir()
            items = [(str(p.relative_to(root)), p) for p in found]
        out = {}
        for name, item in sorted(items):
            if item.is_file():
                st = item.stat()
                out[name] = [st.st_size, st.st_mtime_ns]
        return out

    inputs = {"model_name_or_path": cfg.model_name_or_path, "tokenizer_name": cfg.tokenizer_name}
    inputs.update({f"training data {src}": src for src, _ in cfg.data_sources() if source_kind(src) in ("file", "dir")})
    return {what: files(path, what.startswith("training data")) for what, path in inputs.items()
            if path and os.path.exists(os.path.expanduser(path))}


def fingerprint_differences(recorded: dict, current: dict) -> list[str]:
    """["<input> <file>: changed (size, modified time) | added | removed", ...] between two `input_fingerprint`s."""
    out = []
    for what in sorted(set(recorded) | set(current)):
        old, new = recorded.get(what, {}), current.get(what, {})
        for name in sorted(set(old) | set(new)):
            if name not in new:
                out.append(f"{what} {name}: removed")
            elif name not in old:
                out.append(f"{what} {name}: added")
            elif list(old[name]) != list(new[name]):
                out.append(f"{what} {name}: changed ({old[name][0]} -> {new[name][0]} bytes, modified since)")
    return out


def check_resume(cfg: TrainConfig, state: str, accelerator) -> None:
    """For an interrupted run ("resume"): refuse a folder that is not an mft run, or one started with other
    settings. Read-only: every rank may call it."""
    if state != "resume":
        return
    out = Path(cfg.output_dir)
    record = out / CONFIG_FILE
    if not record.exists():
        names = sorted(p.name for p in out.iterdir())
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise MftError(f"output_dir {out} is not empty ({shown}) and holds no mft run ({CONFIG_FILE}); choose a "
                       "new or empty folder, or pass --overwrite_output_dir to replace its content")
    import yaml

    try:
        recorded = yaml.safe_load(record.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise MftError(f"cannot read {record} ({exc}); pass --overwrite_output_dir to start over") from None
    diffs = config_differences(recorded, cfg)
    launch_file = out / LAUNCH_FILE
    if launch_file.exists():
        old_launch = json.loads(launch_file.read_text())
        new_launch = launch_info(accelerator)
        diffs += [f"{k}: {old_launch.get(k)!r} -> {new_launch.get(k)!r}"
                  for k in sorted(set(old_launch) | set(new_launch)) if old_launch.get(k) != new_launch.get(k)]
    inputs_file = out / INPUTS_FILE
    if inputs_file.exists():
        diffs += fingerprint_differences(json.loads(inputs_file.read_text()), input_fingerprint(cfg))
    if diffs:
        raise MftError(f"{out} holds an interrupted run started with other settings, so it cannot be resumed: "
                       + "; ".join(diffs) + ". Re-run with the recorded settings to resume, pass "
                       "--overwrite_output_dir to start over (the old run is replaced only when the new one "
                       "finishes), or choose another output_dir")


def open_output(cfg: TrainConfig, state: str, accelerator) -> TrainConfig:
    """Prepare the folder this run writes into and return the config to run with.

    "new" / "resume": `output_dir` itself (a resume without any checkpoint starts again, so its old log goes).
    "overwrite": a temporary sibling `.<name>.tmp-<pid>-train`, swapped into place by `finish_output`.
    Temporary siblings of killed runs are removed and reported. The effective config is written into the folder.
    """
    import dataclasses

    from accelerate.utils import broadcast_object_list

    from mft.paths import make_temp_dir, remove_leftovers, temp_sibling

    check_resume(cfg, state, accelerator)
    final = Path(cfg.output_dir)
    target = [str(temp_sibling(final, "tmp", "train")) if state == "overwrite" else str(final)]
    if accelerator.num_processes > 1:
        broadcast_object_list(target, from_process=0)  # the main process's pid names the folder
    write_dir = Path(target[0])
    if accelerator.is_main_process:
        remove_leftovers(final)
        if write_dir == final:
            write_dir.mkdir(parents=True, exist_ok=True)
        else:
            make_temp_dir(write_dir)
        if state == "resume" and not cfg.resume_from_checkpoint:
            if latest_checkpoint(str(write_dir)) is None and (write_dir / TRAIN_LOG).exists():
                (write_dir / TRAIN_LOG).unlink()  # no checkpoint: the run starts again from step 0
        # written whole or not at all (a kill must not leave a record that cannot be read back)
        cfg.save(str(write_dir / f".{CONFIG_FILE}.tmp"))
        os.replace(write_dir / f".{CONFIG_FILE}.tmp", write_dir / CONFIG_FILE)
        (write_dir / f".{LAUNCH_FILE}.tmp").write_text(json.dumps(launch_info(accelerator), indent=1))
        os.replace(write_dir / f".{LAUNCH_FILE}.tmp", write_dir / LAUNCH_FILE)
        (write_dir / f".{INPUTS_FILE}.tmp").write_text(json.dumps(input_fingerprint(cfg), indent=1))
        os.replace(write_dir / f".{INPUTS_FILE}.tmp", write_dir / INPUTS_FILE)
    accelerator.wait_for_everyone()
    PROGRESS.update(step=0, output_dir=str(final), write_dir=str(write_dir), overwrite=state == "overwrite",
                    checkpointing=cfg.checkpointing_steps is not None)
    if write_dir == final:
        return cfg
    run_cfg = dataclasses.replace(cfg)
    run_cfg.output_dir = str(write_dir)
    return run_cfg


def finish_output(write_dir: Path, final: Path, main: bool) -> Path:
    """Main process, after the finished marker is written: files get the umask's mode; an overwrite run's folder
    is moved into place."""
    if main:
        from mft.paths import follow_umask, swap_into_place

        follow_umask(write_dir)  # safetensors writes 0600 files; the run folder follows the user's umask
        if Path(write_dir) != Path(final):
            swap_into_place(Path(write_dir), Path(final))
    return Path(final)


def check_checkpoint(checkpoint: Path, model) -> None:
    """Refuse a checkpoint whose model tensors are not exactly this run's trained parameters (names and shapes):
    the load that follows is told to skip the frozen weights, so it would not notice by itself."""
    file = Path(checkpoint) / "model.safetensors"
    if not file.exists():
        return  # DeepSpeed's own format: it checks parameter groups itself
    from mft.masking.checkpoint import read_safetensors_header

    header, _ = read_safetensors_header(file)
    saved = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    wanted = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    shapes = sorted(n for n in set(saved) & set(wanted) if saved[n] != wanted[n])
    if missing or extra or shapes:
        parts = [f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)})"
                 for what, names in (("missing", missing), ("unexpected", extra), ("other shape", shapes)) if names]
        raise MftError(f"checkpoint {checkpoint} does not fit this run: " + "; ".join(parts) + ". It was saved by "
                       "a run with other settings; pass --overwrite_output_dir to start over")


def interrupted_message() -> str:
    """The one line for Ctrl-C."""
    step = PROGRESS.get("step")
    where = f"interrupted at step {step}" if step is not None else "interrupted before training started"
    if step is not None and PROGRESS.get("write_dir"):
        newest = latest_checkpoint(PROGRESS["write_dir"])
        where += f" (newest checkpoint: {newest.name})" if newest else " (no checkpoint yet)"
    if PROGRESS.get("overwrite"):
        return (f"{where}; {PROGRESS['output_dir']} is unchanged (the new run was being written beside it and is "
                "removed by the next run); re-run the same command to start over")
    if step and not PROGRESS.get("checkpointing"):
        return f"{where}; no checkpoints were saved (checkpointing_steps is unset), so re-running starts from step 0"
    return f"{where}; re-run the same command to resume"



def close_progress_bars() -> None:
    """End the progress bars an interrupted loop left open, so the message that follows gets its own line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
