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


def binomial_interval(score: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (scipy's `binomtest(...).proportion_ci(method="wilson")`) of a score in [0, 1]
    measured on `n` instances, as fractions. The count of successes is `round(score * n)`; for a mean of
    per-instance fractions (IFEval's instruction-level scores, MATH's unweighted subject mean) this treats
    the score as n coin flips, an approximation."""
    from scipy.stats import binomtest

    k = min(n, max(0, round(score * n)))
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def bar_chart(tasks: list[str], labels: list[str], all_scores: list[dict[str, float]], output: str,
              counts: list[dict[str, int]] | None = None) -> Path:
    """Grouped bars, one group per task, one bar per model: the score in % written on each bar, a 95 %
    binomial (Wilson) interval from the task's `num_instances` where `counts` has it, a hatched "n/a" bar
    where a model has no result for the task, the legend outside the axes and a title naming the tasks
    with their sample sizes."""
    import matplotlib.pyplot as plt

    fig = chart_figure(tasks, labels, all_scores, counts)
    path = Path(output).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def chart_figure(tasks: list[str], labels: list[str], all_scores: list[dict[str, float]],
                 counts: list[dict[str, int]] | None = None):
    """The figure `bar_chart` saves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = counts or [{} for _ in labels]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.4 * len(tasks) * max(1.0, len(labels) / 2.5) + 2.5), 4.6))
    for i, (label, scores) in enumerate(zip(labels, all_scores)):
        color = colors[i % len(colors)]
        for t, task in enumerate(tasks):
            x = t + (i - (len(labels) - 1) / 2) * width
            if task not in scores:
                ax.bar(x, 6, width, facecolor="none", edgecolor="gray", hatch="///", lw=0.8)
                ax.annotate("n/a", (x, 6), ha="center", va="bottom", fontsize=8, color="gray")
                continue
            value, n = 100 * scores[task], counts[i].get(task)
            ax.bar(x, value, width, color=color, label=label if t == min(
                j for j, name in enumerate(tasks) if name in scores) else None)
            top = value
            if n:
                low, high = binomial_interval(scores[task], n)
                ax.errorbar(x, value, yerr=[[value - 100 * low], [100 * high - value]], fmt="none", ecolor="black",
                            elinewidth=0.9, capsize=3)
                top = 100 * high
            ax.annotate(f"{value:.1f}", (x, top), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8)
    ax.bar(0, 0, 0, facecolor="none", edgecolor="gray", hatch="///", label="n/a: no result")
    ax.set_xticks(range(len(tasks)), tasks, rotation=15, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("primary score (%), 95 % interval")
    sizes = []
    for task in tasks:
        ns = sorted({c[task] for c in counts if task in c})
        sizes.append(f"{task} (n={'/'.join(map(str, ns))})" if ns else task)
    ax.set_title("; ".join(sizes), fontsize=9, wrap=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=9)
    fig.tight_layout()
    return fig


def collect_counts(folder: str) -> dict[str, int]:
    """task -> num_instances from the metrics.json files below `folder` (newest wins), for the intervals."""
    counts: dict[str, int] = {}
    for path in sorted(Path(folder).expanduser().rglob("metrics.json"), key=lambda p: p.stat().st_mtime):
        try:
            entries = json.loads(path.read_text())["metrics"]
            counts.update({e["task"]: int(e["num_instances"]) for e in entries if e.get("num_instances")})
        except (ValueError, KeyError, TypeError):
            continue
    return counts


def run_report(dirs: list[str], output: str, labels: list[str] | None = None) -> str:
    """The markdown table (returned) and the PNG chart (written to `output`)."""
    if labels is not None and len(labels) != len(dirs):
        raise MftError(f"--labels has {len(labels)} names for {len(dirs)} folders; give one per folder")
    all_scores = [collect_scores(d) for d in dirs]
    labels = labels or default_labels(dirs)
    tasks = ordered_tasks(all_scores)
    table = markdown_table(tasks, labels, all_scores)
    headline = [t for t in tasks if not (t.startswith("minerva_math_") and "minerva_math" in tasks)]
    path = bar_chart(headline, labels, all_scores, output,  # the paper's five numbers, not the subjects
                     [collect_counts(d) for d in dirs])
    return f"{table}\n\nchart: {path}"
