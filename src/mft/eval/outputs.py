"""The olmes output layout, and finding finished work to reuse.

Per task: `task-NNN-<task>-requests.jsonl` (the prompts), `-predictions.jsonl` (one line per document),
`-metrics.json` and `-provenance.json` (what produced the predictions: `model_config` with the model's file
fingerprint, and `task_config`; written after the predictions, so predictions without it are never
reused); per run: `metrics.json` with every task of the folder; for MATH subjects also
`math/<subject>/metrics.json` and `math/task_scores_flex.jsonl`, the layout the authors'
`get_math_score.py` read and wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from mft.errors import MftError
from mft.eval.fingerprint import fingerprint_change

MATH_PREFIX = "minerva_math_"


def task_path(out: Path, index: int, task: str, kind: str) -> Path:
    """kind: requests.jsonl | predictions.jsonl | metrics.json | provenance.json"""
    return out / f"task-{index:03d}-{task}-{kind}"


def existing(out: Path, task: str, kind: str) -> list[Path]:
    return sorted(out.glob(f"task-[0-9][0-9][0-9]-{task}-{kind}"))


def write_text(path: Path, text: str) -> None:
    """Write atomically: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: Path) -> dict:
    """A JSON object from `path`; MftError naming the file when it is not one (a truncated or edited file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MftError(f"{path} is not readable JSON ({exc}); restore it or remove it, or choose another "
                       "--output-dir") from exc
    if not isinstance(data, dict):
        raise MftError(f"{path} holds a JSON {type(data).__name__}, not an object; restore it or remove it")
    return data


def _recorded_model(data: dict) -> str | None:
    model = (data.get("model_config") or {}).get("model") if isinstance(data.get("model_config"), dict) else None
    return model if isinstance(model, str) else None


def prepare_dir(output_dir: str, model_config: dict) -> Path:
    """Create the folder; refuse one that holds another model's results (reuse would mix models).

    The model is read from `metrics.json` and from every task's `-provenance.json` and `-metrics.json`,
    so the folder of a run interrupted before its `metrics.json` is guarded too. A file that is not
    readable JSON is an MftError naming it.
    """
    out = Path(output_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MftError(f"cannot create output folder {out}: {exc.strerror}; choose a writable --output-dir") from exc
    check_dir(out, model_config["model"])
    return out


def check_dir(output_dir, model: str) -> None:
    """`prepare_dir`'s refusal without creating anything: MftError when an existing folder holds results
    of a model other than `model` (or a record that is not readable JSON). Nothing when it does not exist."""
    out = Path(output_dir).expanduser()
    if not out.is_dir():
        return
    records = [out / "metrics.json", *existing(out, "*", "provenance.json"), *existing(out, "*", "metrics.json")]
    for path in records:
        if not path.is_file():
            continue
        previous = _recorded_model(read_json(path))
        if previous and previous != model:
            raise MftError(f"{out} holds results of model {previous} ({path.name}), not {model}; "
                           "use a separate --output-dir per model")


def _changed_keys(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def producer_change(stored: dict, model_config: dict, task_config: dict) -> str | None:
    """Why a stored {"model_config", "task_config"} record does not match this run; None when it does."""
    old_model = stored.get("model_config") or {}
    changed = fingerprint_change(old_model.get("fingerprint") or {}, model_config.get("fingerprint") or {})
    if changed:
        return f"the model's files changed ({changed})"
    rest = {k: v for k, v in old_model.items() if k != "fingerprint"}
    now = {k: v for k, v in model_config.items() if k != "fingerprint"}
    if rest != now:
        return f"the model settings changed ({_changed_keys(rest, now)})"
    if stored.get("task_config") != task_config:
        return f"the task config changed ({_changed_keys(stored.get('task_config') or {}, task_config)})"
    return None


def reusable(out: Path, task: str, requests: list[dict], task_config: dict, model_config: dict):
    """(predictions, metrics, reason, provenance): what earlier runs stored for exactly this work, and why not
    the rest; `provenance` is the reused predictions' `-provenance.json` content (None when none is reused).

    Predictions are reused only when their `-provenance.json` names the same model settings and file
    fingerprint (`mft.eval.fingerprint`) and the same full task config, and the stored requests (prompts,
    stops, generation settings) are the same; the metrics too when their file records the same model and
    task config. `reason` is one line saying why stored files are not reused (None when nothing was stored
    or everything is reused).
    """
    reason = None
    for requests_file in reversed(existing(out, task, "requests.jsonl")):
        def sibling(kind: str) -> Path:
            return Path(str(requests_file).removesuffix("requests.jsonl") + kind)

        predictions_file, provenance_file = sibling("predictions.jsonl"), sibling("provenance.json")
        if not predictions_file.is_file():
            reason = reason or "its stored predictions file is missing"
            continue
        if not provenance_file.is_file():
            reason = reason or f"no record of the model that produced its stored predictions ({provenance_file.name})"
            continue
        try:
            provenance = read_json(provenance_file)
            changed = producer_change(provenance, model_config, task_config)
        except MftError:
            reason = reason or f"{provenance_file.name} is not readable JSON"
            continue
        if changed:
            reason = reason or changed
            continue
        try:
            same_requests = read_jsonl(requests_file) == requests
        except (UnicodeDecodeError, ValueError):
            same_requests = False
        if not same_requests:
            reason = reason or "its prompts or generation settings changed"
            continue
        try:
            predictions = read_jsonl(predictions_file)
        except (UnicodeDecodeError, ValueError):
            reason = reason or f"{predictions_file.name} is not readable JSON lines"
            continue
        if len(predictions) != len(requests):
            reason = reason or f"{len(predictions)} stored predictions for {len(requests)} requests"
            continue
        metrics_file = sibling("metrics.json")
        try:
            metrics = read_json(metrics_file) if metrics_file.is_file() else None
        except MftError:
            metrics = None  # scored again below
        if metrics is not None and producer_change(metrics, model_config, task_config):
            return (predictions, None, f"scoring again: {producer_change(metrics, model_config, task_config)}",
                    provenance)
        return predictions, metrics, None, provenance
    return None, None, reason, None


def write_provenance(out: Path, index: int, task: str, model_config: dict, task_config: dict,
                     batch_size_used: int | None = None) -> None:
    """`-provenance.json`: the settings reuse compares (`model_config`, `task_config`) and, for the hf
    backend, `batch_size_used`: the batch size the predictions were generated with (`model_config.batch_size`
    is the setting, e.g. "auto", which reuse is keyed by)."""
    record = {"model_config": model_config, "task_config": task_config}
    if batch_size_used is not None:
        record["batch_size_used"] = batch_size_used
    write_json(task_path(out, index, task, "provenance.json"), record)


def remove_stale(out: Path, task: str, index: int) -> None:
    """Files of `task` under another index (an earlier run ordered its tasks differently)."""
    for kind in ("requests.jsonl", "predictions.jsonl", "metrics.json", "provenance.json"):
        for path in existing(out, task, kind):
            if path != task_path(out, index, task, kind):
                path.unlink()


def summary_entry(task: str, metrics: dict, num_instances: int, task_config: dict) -> dict:
    return {"task": task, **metrics, "num_instances": num_instances, "task_config": task_config}


def math_group_entry(entries: list[dict], subjects: list[str]) -> dict | None:
    """The `minerva_math` line: unweighted means of the seven subjects (only when all seven ran)."""
    by_task = {e["task"]: e for e in entries}
    if not all(s in by_task for s in subjects):
        return None
    members = [by_task[s] for s in subjects]
    mean = {k: sum(m[k] for m in members) / len(members) for k in ("exact_match", "exact_match_flex")}
    sources = [m.get("task_config", {}).get("data_source") for m in members]
    return {"task": "minerva_math", **mean, "primary_score": mean["exact_match_flex"],
            "num_instances": sum(m["num_instances"] for m in members),
            "task_config": {"task_name": "minerva_math", "subtasks": subjects,
                            "aggregation": "unweighted mean of the subjects' exact_match_flex",
                            # the subjects' common source (one MATH-500 file); None when they differ
                            "data_source": sources[0] if all(s == sources[0] for s in sources) else None}}


def primary_line(entry: dict) -> str:
    return f"{entry['task']}: {format(entry['primary_score'], '.6')}"


def write_summary(out: Path, entries: list[dict], model_config: dict) -> Path:
    """`metrics.json`: this run's tasks, plus tasks of earlier runs in the same folder that it did not redo
    when those ran with the same `model_config` (model file fingerprint included); other ones are left out
    of the summary (their task files stay) and named on stderr."""
    path = out / "metrics.json"
    previous = read_json(path) if path.is_file() else {}
    old = previous.get("metrics", [])
    ran = {e["task"] for e in entries}
    if previous.get("model_config") != model_config:
        dropped = [e["task"] for e in old if e["task"] not in ran and e["task"] != "minerva_math"]
        if dropped:
            print(f"metrics.json: leaving out {', '.join(dropped)}: scored by an earlier run with other model "
                  "files or settings; evaluate them again to include them", file=sys.stderr, flush=True)
        old = []
    merged = [e for e in old if e["task"] not in ran and e["task"] != "minerva_math"] + entries
    from mft.eval.tasks import GROUPS

    group = math_group_entry(merged, GROUPS["minerva_math"])
    if group:
        merged.append(group)
    write_json(path, {"all_primary_scores": [primary_line(e) for e in merged], "metrics": merged,
                      "model_config": model_config})
    write_math_layout(out, merged, model_config)
    return path


def write_math_layout(out: Path, entries: list[dict], model_config: dict) -> None:
    """`math/<subject>/metrics.json` per MATH subject, then `math/task_scores_flex.jsonl`.

    The folder mirrors `metrics.json`: a subject file an earlier run wrote with other model files or
    settings (a subject this run's `metrics.json` left out) is removed and named on stderr, so neither the
    MATH average nor `mft report` counts another checkpoint's scores; the subject's task files stay.
    """
    subjects = [e for e in entries if e["task"].startswith(MATH_PREFIX)]
    written = {entry["task"].removeprefix(MATH_PREFIX) for entry in subjects}
    for stale in sorted((out / "math").glob("*/metrics.json")):
        if stale.parent.name in written:
            continue
        try:
            recorded = read_json(stale).get("model_config")
        except MftError:
            continue  # not ours to judge; write_math_scores names it
        if isinstance(recorded, dict) and "fingerprint" in recorded and recorded != model_config:
            stale.unlink()
            with contextlib.suppress(OSError):
                stale.parent.rmdir()  # only when nothing else is in it
            print(f"removed {stale}: scored by an earlier run with other model files or settings "
                  f"(its task files stay); evaluate minerva_math_{stale.parent.name} again to include it",
                  file=sys.stderr, flush=True)
    for entry in subjects:
        write_json(out / "math" / entry["task"].removeprefix(MATH_PREFIX) / "metrics.json",
                   {"all_primary_scores": [primary_line(entry)], "metrics": [entry], "model_config": model_config})
    if subjects:
        write_math_scores(out)


def write_math_scores(out: Path) -> Path:
    """What the authors' get_math_score.py wrote: each subject's exact_match_flex, then their average."""
    scores = []
    for metrics_file in sorted((out / "math").glob("*/metrics.json")):
        try:
            first = read_json(metrics_file)["metrics"][0]
            scores.append({"task": first["task"], "score": first["exact_match_flex"]})
        except (KeyError, IndexError, TypeError) as exc:
            raise MftError(f"{metrics_file} is not an olmes metrics.json (needs metrics[0].task and "
                           f"exact_match_flex): {exc!r}") from exc
    if not scores:
        raise MftError(f"no {out}/math/*/metrics.json found; run the minerva_math tasks first")
    average = round(sum(s["score"] for s in scores) / len(scores), 6)
    path = out / "math" / "task_scores_flex.jsonl"
    write_jsonl(path, [*scores, {"task": "average", "score": average}])
    return path
