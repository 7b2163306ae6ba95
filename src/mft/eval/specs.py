"""Task specs on the command line: a task name, or olmes' JSON form `{"task_name": "gsm8k", "num_shots": 8}`."""

from __future__ import annotations

import difflib
import json

from mft.errors import MftError
from mft.eval.tasks import GROUPS, TASKS, Task

# JSON keys -> Task constructor arguments. `generation_kwargs.max_gen_toks` is olmes' spelling too.
SPEC_KEYS = {"task_name", "num_shots", "limit", "dataset_path", "fewshot_source", "generation_kwargs"}


def known_names() -> list[str]:
    return [*TASKS, *GROUPS]


def unknown_task(name: str) -> MftError:
    close = difflib.get_close_matches(name, known_names(), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return MftError(f"unknown task {name!r}; {hint}known tasks: {', '.join(known_names())}")


def parse_spec(text: str) -> dict:
    """One --task value as a dict with at least `task_name`."""
    text = text.strip()
    if not text.startswith("{"):
        return {"task_name": text}
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MftError(f"task spec {text!r} is not valid JSON ({exc.msg} at character {exc.pos}); expected "
                       "a task name or e.g. '{\"task_name\": \"gsm8k\", \"num_shots\": 8}'") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("task_name"), str):
        raise MftError(f"task spec {text!r} needs a string \"task_name\"")
    extra = set(spec) - SPEC_KEYS
    if extra:
        raise MftError(f"task spec {text!r} has unknown key(s) {sorted(extra)}; allowed: {sorted(SPEC_KEYS)}")
    return spec


def _options(spec: dict, limit: int | None, data_dir: str | None) -> dict:
    generation = spec.get("generation_kwargs") or {}
    if not isinstance(generation, dict):
        raise MftError(f"{spec['task_name']}: generation_kwargs must be an object like {{\"max_gen_toks\": 512}}, "
                       f"got {generation!r}")
    # As on the command line (--limit): 0 documents or 0 new tokens is no evaluation, and 0 used to fall
    # back silently to the task's default for max_gen_toks.
    for key, value, least in (("num_shots", spec.get("num_shots"), 0), ("limit", spec.get("limit"), 1),
                              ("max_gen_toks", generation.get("max_gen_toks"), 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            kind = "a non-negative integer" if least == 0 else "a positive integer"
            raise MftError(f"{spec['task_name']}: {key} must be {kind}, got {value!r}")
    return {"num_shots": spec.get("num_shots"), "limit": spec.get("limit", limit),
            "dataset_path": spec.get("dataset_path"), "data_dir": data_dir,
            "fewshot_source": spec.get("fewshot_source"), "max_gen_toks": generation.get("max_gen_toks")}


def build_tasks(specs: list[str], limit: int | None = None, data_dir: str | None = None) -> list[Task]:
    """Task objects for the --task values, groups expanded, in order, each task once."""
    tasks: dict[str, Task] = {}
    for text in specs:
        spec = parse_spec(text)
        name = spec["task_name"]
        names = GROUPS.get(name, [name])
        if names[0] not in TASKS:
            raise unknown_task(name)
        options = _options(spec, limit, data_dir)
        for member in names:
            tasks[member] = TASKS[member](name=member, **options)
    return list(tasks.values())
