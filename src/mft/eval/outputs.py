"""The olmes output layout, and finding finished work to reuse.

Per task: `task-NNN-<task>-requests.jsonl` (the prompts), `-predictions.jsonl` (one line per document) and
`-metrics.json`; per run: `metrics.json` with every task of the folder; for MATH subjects also
`math/<subject>/metrics.json` and `math/task_scores_flex.jsonl`, the layout the authors'
`get_math_score.py` read and wrote.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from mft.errors import MftError

MATH_PREFIX = "minerva_math_"


def task_path(out: Path, index: int, task: str, kind: str) -> Path:
    """kind: requests.jsonl | predictions.jsonl | metrics.json"""
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


def prepare_dir(output_dir: str, model_config: dict) -> Path:
    """Create the folder; refuse one that holds another model's results (reuse would mix models)."""
    out = Path(output_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MftError(f"cannot create output folder {out}: {exc.strerror}; choose a writable --output-dir") from exc
    summary = out / "metrics.json"
    if summary.is_file():
        previous = json.loads(summary.read_text()).get("model_config", {}).get("model")
        if previous and previous != model_config["model"]:
            raise MftError(f"{out} holds results of model {previous}, not {model_config['model']}; "
                           "use a separate --output-dir per model")
    return out


def reusable(out: Path, task: str, requests: list[dict], task_config: dict):
    """(predictions, metrics) stored for exactly these requests, else (None, None).

    Predictions are reused when the stored prompts, stops and generation settings are the same; the
    stored metrics too when the task configuration is also unchanged.
    """
    for requests_file in reversed(existing(out, task, "requests.jsonl")):
        predictions_file = Path(str(requests_file).replace("-requests.jsonl", "-predictions.jsonl"))
        if not predictions_file.is_file() or read_jsonl(requests_file) != requests:
            continue
        predictions = read_jsonl(predictions_file)
        if len(predictions) != len(requests):
            continue
        metrics_file = Path(str(requests_file).replace("-requests.jsonl", "-metrics.json"))
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        if metrics is not None and metrics.get("task_config") != task_config:
            metrics = None
        return predictions, metrics
    return None, None


def remove_stale(out: Path, task: str, index: int) -> None:
    """Files of `task` under another index (an earlier run ordered its tasks differently)."""
    for kind in ("requests.jsonl", "predictions.jsonl", "metrics.json"):
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
    return {"task": "minerva_math", **mean, "primary_score": mean["exact_match_flex"],
            "num_instances": sum(m["num_instances"] for m in members),
            "task_config": {"task_name": "minerva_math", "subtasks": subjects,
                            "aggregation": "unweighted mean of the subjects' exact_match_flex"}}


def primary_line(entry: dict) -> str:
    return f"{entry['task']}: {format(entry['primary_score'], '.6')}"


def write_summary(out: Path, entries: list[dict], model_config: dict) -> Path:
    """`metrics.json`: this run's tasks, plus tasks of earlier runs in the same folder that it did not redo."""
    path = out / "metrics.json"
    old = json.loads(path.read_text()).get("metrics", []) if path.is_file() else []
    ran = {e["task"] for e in entries}
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
    """`math/<subject>/metrics.json` per MATH subject, then `math/task_scores_flex.jsonl`."""
    subjects = [e for e in entries if e["task"].startswith(MATH_PREFIX)]
    for entry in subjects:
        write_json(out / "math" / entry["task"].removeprefix(MATH_PREFIX) / "metrics.json",
                   {"all_primary_scores": [primary_line(entry)], "metrics": [entry], "model_config": model_config})
    if subjects:
        write_math_scores(out)


def write_math_scores(out: Path) -> Path:
    """What the authors' get_math_score.py wrote: each subject's exact_match_flex, then their average."""
    scores = []
    for metrics_file in sorted((out / "math").glob("*/metrics.json")):
        first = json.loads(metrics_file.read_text())["metrics"][0]
        scores.append({"task": first["task"], "score": first["exact_match_flex"]})
    if not scores:
        raise MftError(f"no {out}/math/*/metrics.json found; run the minerva_math tasks first")
    average = round(sum(s["score"] for s in scores) / len(scores), 6)
    path = out / "math" / "task_scores_flex.jsonl"
    write_jsonl(path, [*scores, {"task": "average", "score": average}])
    return path
