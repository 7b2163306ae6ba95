"""`mft report`: primary scores of several result folders side by side, as markdown and as a bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from mft.errors import MftError

# Paper order; anything else found follows alphabetically.
TASK_ORDER = ["gsm8k", "minerva_math", "codex_humaneval", "codex_humanevalplus", "ifeval"]


def collect_scores(folder: str) -> dict[str, float]:
    """task -> primary score from every metrics.json below `folder` (newest file wins for a task)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise MftError(f"result folder {folder} does not exist")
    files = sorted(root.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise MftError(f"no metrics.json under {folder}; run `mft eval --output-dir {folder}` first")
    scores: dict[str, float] = {}
    for path in files:
        try:
            entries = json.loads(path.read_text())["metrics"]
            scores.update({e["task"]: float(e["primary_score"]) for e in entries})
        except (ValueError, KeyError, TypeError) as exc:
            raise MftError(f"{path} is not an olmes metrics.json (needs metrics[].task/primary_score): {exc}") from exc
    return scores


def ordered_tasks(all_scores: list[dict[str, float]]) -> list[str]:
    names = set().union(*all_scores)
    return [t for t in TASK_ORDER if t in names] + sorted(names - set(TASK_ORDER))


def default_labels(dirs: list[str]) -> list[str]:
    labels = []
    for d in dirs:
        path = Path(d).expanduser().resolve()
        labels.append(f"{path.parent.name}/{path.name}" if path.name in {"eval_output", "results", "eval"} else path.name)
    return labels


def markdown_table(tasks: list[str], labels: list[str], all_scores: list[dict[str, float]]) -> str:
    """Scores in %, one decimal as in the paper, then each model's difference to the first."""
    def cell(value):
        return "–" if value is None else f"{100 * value:.1f}"

    header = ["task", *labels, *(f"Δ {label}" for label in labels[1:])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        values = [scores.get(task) for scores in all_scores]
        base = values[0]
        deltas = ["–" if v is None or base is None else f"{100 * (v - base):+.1f}" for v in values[1:]]
        lines.append("| " + " | ".join([task, *map(cell, values), *deltas]) + " |")
    return "\n".join(lines)


def bar_chart(tasks: list[str], labels: list[str], all_scores: list[dict[str, float]], output: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(tasks)), 4.0))
    for i, (label, scores) in enumerate(zip(labels, all_scores)):
        xs = [t + (i - (len(labels) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(xs, [100 * scores.get(task, 0.0) for task in tasks], width, label=label)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylabel("score (%)")
    ax.legend()
    fig.tight_layout()
    path = Path(output).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_report(dirs: list[str], output: str, labels: list[str] | None = None) -> str:
    """The markdown table (returned) and the PNG chart (written to `output`)."""
    if labels is not None and len(labels) != len(dirs):
        raise MftError(f"--labels has {len(labels)} names for {len(dirs)} folders; give one per folder")
    all_scores = [collect_scores(d) for d in dirs]
    labels = labels or default_labels(dirs)
    tasks = ordered_tasks(all_scores)
    table = markdown_table(tasks, labels, all_scores)
    headline = [t for t in tasks if not (t.startswith("minerva_math_") and "minerva_math" in tasks)]
    path = bar_chart(headline, labels, all_scores, output)  # the paper's five numbers, not the subjects
    return f"{table}\n\nchart: {path}"
