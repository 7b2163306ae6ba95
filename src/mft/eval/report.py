"""`mft report`: primary scores of several result folders side by side, as markdown and as a bar chart."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mft.errors import MftError
from mft.eval.data import describe_record

# Paper order; anything else found follows alphabetically.
TASK_ORDER = ["gsm8k", "minerva_math", "codex_humaneval", "codex_humanevalplus", "ifeval"]


def _folders(root: Path):
    """(folder, file names) of `root` and everything below it, following symlinked folders, each real
    folder once (a link back up the tree is not followed again)."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        yield Path(dirpath), filenames


def result_folders(folder: str, unfinished: list[Path] | None = None) -> list[Path]:
    """Each model's result folder at or below `folder`, in path order: every folder holding a metrics.json.

    Symlinked folders are followed. The one exception is the authors' MATH layout: `X/math/<subject>/
    metrics.json`, with <subject> one of the seven minerva_math subjects, belongs to X's results. Two
    folders are never merged into one, whatever model they name. Folders with `task-NNN-*` files but no
    metrics.json (a run that did not finish) are not results; they are appended to `unfinished` when given.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise MftError(f"result folder {folder} does not exist")
    files, started = [], []
    for path, names in _folders(root):
        if "metrics.json" in names:
            files.append(path / "metrics.json")
        elif any(name.startswith("task-") and name.endswith(("-predictions.jsonl", "-metrics.json"))
                 for name in names):
            started.append(path)
    if unfinished is not None:
        unfinished += started
    if not files:
        hint = (f" (unfinished runs without one: {', '.join(map(str, started))}; finish them with the same "
                "`mft eval` command)") if started else ""
        raise MftError(f"no metrics.json under {folder}{hint}; run `mft eval --output-dir {folder}` first")
    return sorted({_owner(path, root) for path in files})


def _owner(path: Path, root: Path) -> Path:
    from mft.eval.tasks.minerva_math import SUBJECTS

    subject = path.parent
    if (subject.name in SUBJECTS and subject.parent.name == "math" and subject.parent != root
            and root in subject.parent.parents):
        return subject.parent.parent
    return subject


def _files_of(result_folder: Path) -> list[Path]:
    """Its metrics.json files: the MATH subjects' first, the folder's own (the summary) last, so it wins."""
    from mft.eval.tasks.minerva_math import SUBJECTS

    own = result_folder / "metrics.json"
    subjects = sorted(path for path in (result_folder / "math").glob("*/metrics.json") if path.parent.name in SUBJECTS)
    return subjects + ([own] if own.is_file() else [])


def collect_results(result_folder: Path, notes: list[str] | None = None) -> tuple[dict[str, float], dict[str, dict]]:
    """(task -> primary score, task -> data_source record) of one model's result folder.

    A MATH subject file of the same model but other files or settings than the folder's metrics.json
    (left by an earlier run on other weights) is not counted; a line saying so goes to `notes`.
    """
    scores: dict[str, float] = {}
    sources: dict[str, dict] = {}
    models: dict[str, Path] = {}
    own = result_folder / "metrics.json"
    own_config = _model_config(own) if own.is_file() else None
    for path in _files_of(result_folder):
        try:
            summary = json.loads(path.read_text())
            entries = summary["metrics"]
            model_config = summary.get("model_config") or {}
            if (path != own and own_config is not None and model_config.get("model") == own_config.get("model")
                    and model_config != own_config):
                if notes is not None:
                    notes.append(f"{path}: not counted, scored with other model files or settings than "
                                 f"{own} (re-run its task to include it)")
                continue
            scores.update({e["task"]: float(e["primary_score"]) for e in entries})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MftError(f"{path} is not an olmes metrics.json (needs metrics[].task/primary_score): {exc}") from exc
        sources.update({e["task"]: e["task_config"]["data_source"] for e in entries
                        if isinstance(e.get("task_config"), dict) and e["task_config"].get("data_source")})
        model = model_config.get("model")
        if model:
            models.setdefault(model, path)
    if len(models) > 1:
        (a, path_a), (b, path_b) = list(models.items())[:2]
        raise MftError(f"{result_folder} mixes two models' results: {path_a} is {a}, {path_b} is {b}; "
                       "keep one model per folder")
    return scores, sources


def _model_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text()).get("model_config")
    except (OSError, ValueError, AttributeError) as exc:
        raise MftError(f"{path} is not an olmes metrics.json (not readable JSON: {exc})") from exc
    return config if isinstance(config, dict) else {}


def collect_scores(folder: str) -> dict[str, float]:
    """task -> primary score of the one result folder `folder` (see `result_folders`)."""
    return collect_results(Path(folder).expanduser())[0]


def ordered_tasks(all_scores: list[dict[str, float]]) -> list[str]:
    names = set().union(*all_scores)
    return [t for t in TASK_ORDER if t in names] + sorted(names - set(TASK_ORDER))


def default_labels(dirs: list[str]) -> list[str]:
    """The folder's name as given (a symlink's own name, not its target's), with its parent's name for the
    generic names `eval_output`, `results`, `eval`."""
    labels = []
    for d in dirs:
        path = Path(os.path.abspath(Path(d).expanduser()))
        labels.append(f"{path.parent.name}/{path.name}" if path.name in {"eval_output", "results", "eval"} else path.name)
    return labels


def folder_labels(found: list[tuple[str, Path]]) -> list[str]:
    """A column name per result folder: as `default_labels` for a folder given itself, else its path below
    the folder it was found in (prefixed with that folder's name when two would read the same)."""
    labels = []
    for given, folder in found:
        root = Path(given).expanduser()
        labels.append(default_labels([given])[0] if folder == root else folder.relative_to(root).as_posix())
    if len(set(labels)) < len(labels):
        labels = [f"{Path(os.path.abspath(folder)).parent.name}/{Path(folder).name}" if folder == Path(given).expanduser()
                  else f"{Path(os.path.abspath(Path(given).expanduser())).name}/{label}"
                  for label, (given, folder) in zip(labels, found)]
    return labels


def data_source_lines(tasks: list[str], labels: list[str], all_sources: list[dict[str, dict]]) -> list[str]:
    """'- task[, task...]: source' per group of tasks read from the same data (per model where they differ)."""
    groups: dict[tuple, list[str]] = {}
    for task in tasks:
        lines = [(label, describe_record(sources[task])) for label, sources in zip(labels, all_sources)
                 if task in sources]
        if lines:
            key = (lines[0][1],) if len({line for _, line in lines}) == 1 else tuple(lines)
            groups.setdefault(key, []).append(task)
    out = []
    for key, names in groups.items():
        if len(key) == 1 and isinstance(key[0], str):
            out.append(f"- {', '.join(names)}: {key[0]}")
        else:
            out += [f"- {', '.join(names)} ({label}): {line}" for label, line in key]
    return out


def markdown_table(tasks: list[str], labels: list[str], all_scores: list[dict[str, float]],
                   counts: list[dict[str, int]] | None = None) -> str:
    """Scores in %, one decimal as in the paper, then each model's difference to the first. Where the columns
    scored a task on different numbers of instances (`counts`, task -> num_instances per column), each of that
    row's cells names its n: `20.0 (n=5)`."""
    counts = counts or [{} for _ in labels]

    def cell(value, n):
        return "–" if value is None else f"{100 * value:.1f}" + (f" (n={n})" if n is not None else "")

    header = ["task", *labels, *(f"Δ {label}" for label in labels[1:])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        values = [scores.get(task) for scores in all_scores]
        ns = [c.get(task) if v is not None else None for c, v in zip(counts, values)]
        shown = ns if len({n for n in ns if n is not None}) > 1 else [None] * len(ns)
        base = values[0]
        deltas = ["–" if v is None or base is None else f"{100 * (v - base):+.1f}" for v in values[1:]]
        lines.append("| " + " | ".join([task, *map(cell, values, shown), *deltas]) + " |")
    return "\n".join(lines)


CONFIG_KEYS = ("num_instances", "limit", "num_shots", "max_gen_toks", "data source")


def _config_value(entry: dict, key: str):
    config = entry.get("task_config") if isinstance(entry.get("task_config"), dict) else {}
    if key == "num_instances":
        return entry.get("num_instances")
    if key == "max_gen_toks":
        return (config.get("generation_kwargs") or {}).get("max_gen_toks")
    if key == "data source":
        source = config.get("data_source")
        return (source.get("sha256") or json.dumps(source, sort_keys=True)) if isinstance(source, dict) else source
    return config.get(key)


def collect_task_configs(folder: str | Path) -> dict[str, dict]:
    """task -> {CONFIG_KEYS: value} from one result folder's metrics.json files (those `collect_results`
    reads); the data source is its sha256 (the file's content, wherever it lies)."""
    configs: dict[str, dict] = {}
    for path in _files_of(Path(folder).expanduser()):
        try:
            entries = json.loads(path.read_text())["metrics"]
            configs.update({e["task"]: {key: _config_value(e, key) for key in CONFIG_KEYS} for e in entries})
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return configs


def config_warnings(tasks: list[str], labels: list[str], configs: list[dict[str, dict]]) -> list[str]:
    """One line per task that two or more columns scored under different settings (CONFIG_KEYS: the number
    of instances, --limit, shots, generation budget, data file): their scores are not comparable."""
    lines = []
    for task in tasks:
        have = [(label, config[task]) for label, config in zip(labels, configs) if task in config]
        if len(have) < 2:
            continue
        differ = []
        for key in CONFIG_KEYS:
            values = [config.get(key) for _, config in have]
            if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
                shown = [str(v)[:12] if key == "data source" and v is not None else str(v) for v in values]
                differ.append(f"{key} " + ", ".join(f"{value} ({label})" for value, (label, _) in zip(shown, have)))
        if differ:
            lines.append(f"warning: {task} was scored under different settings in these columns, so its scores "
                         f"are not comparable: {'; '.join(differ)}")
    return lines


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
    where a model has no result for the task or scored it on 0 instances, the legend (its "n/a" entry only
    when some bar is n/a) outside the axes and a title naming the tasks
    with their sample sizes (in legend order where the models' differ). An --output folder that cannot be
    created or written is one MftError line with the errno."""
    import matplotlib.pyplot as plt

    from mft.paths import check_writable, os_error

    path = Path(output).expanduser()
    check_writable(path.parent, output_flag="the --output folder")
    fig = chart_figure(tasks, labels, all_scores, counts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as exc:
        raise os_error(exc, path) from None
    finally:
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
    any_na = False
    for i, (label, scores) in enumerate(zip(labels, all_scores)):
        color = colors[i % len(colors)]
        scored = [name for name in tasks if name in scores and counts[i].get(name) != 0]  # 0 instances: no score
        for t, task in enumerate(tasks):
            x = t + (i - (len(labels) - 1) / 2) * width
            if task not in scored:
                any_na = True
                ax.bar(x, 6, width, facecolor="none", edgecolor="gray", hatch="///", lw=0.8)
                ax.annotate("n/a", (x, 6), ha="center", va="bottom", fontsize=8, color="gray")
                continue
            value, n = 100 * scores[task], counts[i].get(task)
            ax.bar(x, value, width, color=color, label=label if task == scored[0] else None)
            top = value
            if n:
                low, high = binomial_interval(scores[task], n)
                ax.errorbar(x, value, yerr=[[value - 100 * low], [100 * high - value]], fmt="none", ecolor="black",
                            elinewidth=0.9, capsize=3)
                top = 100 * high
            ax.annotate(f"{value:.1f}", (x, top), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8)
    if any_na:
        ax.bar(0, 0, 0, facecolor="none", edgecolor="gray", hatch="///", label="n/a: no result")
    ax.set_xticks(range(len(tasks)), tasks, rotation=15, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("primary score (%), 95 % interval")
    sizes = []
    for task in tasks:
        ns = [c.get(task) for c in counts]
        known = {n for n in ns if n is not None}
        if len(known) > 1:  # per model, in legend order ("–": no count)
            sizes.append(f"{task} (n={'/'.join('–' if n is None else str(n) for n in ns)} in legend order)")
        else:
            sizes.append(f"{task} (n={known.pop()})" if known else task)
    ax.set_title("; ".join(sizes), fontsize=9, wrap=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=9)
    fig.tight_layout()
    return fig


def collect_counts(folder: str) -> dict[str, int]:
    """task -> num_instances from the metrics.json files of one result folder (the files `collect_results`
    reads), for the intervals."""
    counts: dict[str, int] = {}
    for path in _files_of(Path(folder).expanduser()):
        try:
            entries = json.loads(path.read_text())["metrics"]
            counts.update({e["task"]: int(e["num_instances"]) for e in entries
                           if e.get("num_instances") is not None})
        except (ValueError, KeyError, TypeError):
            continue
    return counts


def run_report(dirs: list[str], output: str, labels: list[str] | None = None) -> str:
    """The markdown table (returned) and the PNG chart (written to `output`): one column per model's
    result folder found in `dirs` (see `result_folders`), in the order given, then path order."""
    unfinished: list[Path] = []
    found = [(d, folder) for d in dirs for folder in result_folders(d, unfinished)]
    if labels is not None and len(labels) != len(found):
        names = ", ".join(str(folder) for _, folder in found)
        raise MftError(f"--labels has {len(labels)} names for {len(found)} result folders ({names}); "
                       "give one per result folder")
    notes: list[str] = []
    results = [collect_results(folder, notes) for _, folder in found]
    all_scores = [scores for scores, _ in results]
    labels = labels or folder_labels(found)
    tasks = ordered_tasks(all_scores)
    counts = [collect_counts(folder) for _, folder in found]
    table = markdown_table(tasks, labels, all_scores, counts)
    warnings = config_warnings(tasks, labels, [collect_task_configs(folder) for _, folder in found])
    if warnings:
        table += "\n\n" + "\n".join(warnings)
    headline = [t for t in tasks if not (t.startswith("minerva_math_") and "minerva_math" in tasks)]
    path = bar_chart(headline, labels, all_scores, output, counts)  # the paper's five numbers, not the subjects
    folders = "\n".join(f"- {label}: {folder}" for label, (_, folder) in zip(labels, found))
    sources = data_source_lines(tasks, labels, [s for _, s in results])
    data = "\n\ndata sources:\n" + "\n".join(sources) if sources else ""
    skipped = [f"- {folder}: task files but no metrics.json (an unfinished run; finish it with the same "
               "`mft eval` command)" for folder in unfinished] + [f"- {note}" for note in notes]
    left_out = "\n\nleft out:\n" + "\n".join(skipped) if skipped else ""
    return f"{table}\n\nresult folders:\n{folders}{data}{left_out}\n\nchart: {path}"
