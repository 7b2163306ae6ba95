"""What produced a set of predictions: a fingerprint of the model's weight and tokenizer files.

`mft eval` reuses stored predictions only when this fingerprint, the rest of the model settings and the
full task configuration all equal the current ones (see `mft.eval.outputs.reusable`). The fingerprint is
each file's size in bytes and modification time in nanoseconds, not a hash: reading tens of GB of
weights on every run would cost more than the evaluation it saves, and any program that rewrites a file
(`save_pretrained`, `cp`, a training run) sets a new modification time.
"""

from __future__ import annotations

import datetime
import fnmatch
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.index.json", "config.json",
                   "generation_config.json")
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "spiece.model", "*.tiktoken", "chat_template.*")


def _files(folder: Path, patterns: tuple[str, ...], exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    found = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if path.is_file() and any(fnmatch.fnmatch(name, p) for p in patterns) and not any(
                fnmatch.fnmatch(name, p) for p in exclude):
            stat = path.stat()  # follows the hub cache's symlinks to the blobs
            found[name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return found


def model_fingerprint(model: str) -> dict:
    """{"weights": {file: {"bytes", "mtime_ns"}}, "tokenizer": {...}} of a local checkpoint folder.

    Weights: `*.safetensors`, `*.bin`, `*.pt(h)`, `*.gguf`, the shard indexes, `config.json` and
    `generation_config.json` (both change what is generated). Tokenizer: `tokenizer*`, the special-token,
    vocabulary and merge files, chat templates. A hub id is fingerprinted through its snapshot in the local
    hub cache ({"hub": id, "revision": snapshot commit, ...}); one not in the cache gives
    {"hub": id, "revision": None}.
    """
    folder = Path(model).expanduser()
    record: dict = {}
    if not folder.is_dir():
        record = {"hub": model, "revision": None}
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # an id the hub library rejects: nothing cached to fingerprint
            cached = None
        if not isinstance(cached, str):
            return record
        folder = Path(cached).parent
        record["revision"] = folder.name
    weights = _files(folder, WEIGHT_PATTERNS, exclude=TOKENIZER_PATTERNS)
    return {**record, "weights": weights, "tokenizer": _files(folder, TOKENIZER_PATTERNS)}


def _when(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def fingerprint_change(old: dict, new: dict) -> str | None:
    """Which files differ between two fingerprints, in a few words; None when they are equal."""
    if old == new:
        return None
    parts = []
    for group in ("weights", "tokenizer"):
        before, after = old.get(group, {}), new.get(group, {})
        for name in sorted(set(before) | set(after)):
            a, b = before.get(name), after.get(name)
            if a == b:
                continue
            if a is None or b is None:
                parts.append(f"{name} {'added' if a is None else 'removed'}")
            elif a["bytes"] != b["bytes"]:
                parts.append(f"{name} {a['bytes']} -> {b['bytes']} bytes")
            else:
                parts.append(f"{name} rewritten {_when(a['mtime_ns'])} -> {_when(b['mtime_ns'])}")
    if old.get("revision") != new.get("revision"):
        parts.insert(0, f"revision {old.get('revision')} -> {new.get('revision')}")
    shown = "; ".join(parts[:3]) + (f"; and {len(parts) - 3} more" if len(parts) > 3 else "")
    return shown or "fingerprint differs"
