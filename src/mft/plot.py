"""`mft plot RUN [RUN ...]`: the curves of training runs, several runs overlaid, as a PNG and a CSV.

Reads each run folder's `train_log.jsonl` (written by `mft train`; one record per logged step: `step`,
`epoch`, `loss`, `lr`, `tokens_per_s`, and for MFT `mask_changed`, `mask_changed_per_layer`,
`kept_fraction`) and, when present, the evaluation summaries (`metrics.json`, olmes layout) under the run
folder (e.g. `RUN/eval_output/`, `RUN/mask_applied/eval_output/`). Panels: training loss, learning rate,
mask entries flipped per logged step per layer, kept fraction per layer, and the held-out primary scores.
The CSV holds every plotted number, one per row: `run,step,epoch,metric,layer,value` (`layer` empty for
whole-run values; held-out scores as metric `heldout/<task>` with no step). The demo's figure draws its
training-loss, learning-rate and mask-change curves with the panel functions below.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mft.errors import MftError

TRAIN_LOG = "train_log.jsonl"
PALETTE = ["tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "tab:gray"]
LAYER_STYLES = ["-", "--", ":", "-."]


@dataclass
class RunLog:
    """One run's logged records; `offset` shifts its steps (the demo draws MFT after FFT's last step)."""

    label: str
    records: list[dict]
    color: str = "tab:blue"
    offset: int = 0
    heldout: dict[str, float] = field(default_factory=dict)  # task -> primary score in [0, 1]

    def steps(self, key: str) -> list[int]:
        return [self.offset + r["step"] for r in self.records if key in r]

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.records if key in r]

    def layers(self, key: str) -> list[str]:
        names = {k for r in self.records for k in (r.get(key) or {})}
        return sorted(names, key=lambda k: (0, int(k)) if k.isdigit() else (1, k))

    def per_layer(self, key: str, layer: str) -> tuple[list[int], list[float]]:
        rows = [(self.offset + r["step"], r[key][layer]) for r in self.records if layer in (r.get(key) or {})]
        return [s for s, _ in rows], [v for _, v in rows]


def read_log(path: Path) -> list[dict]:
    """The records of a train_log.jsonl; a line that is not JSON is an error naming the file and line, except a
    last line with no newline (the run was killed mid-write, or is still writing): it is skipped, with a note
    on stderr, and the complete records are returned."""
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if number == len(lines) and not text.endswith("\n"):
                print(f"note: {path}, line {number}: skipped a partial last line (the run was stopped while "
                      "writing it, or is still writing)", file=sys.stderr)
                break
            raise MftError(f"{path}, line {number}: not JSON ({exc})") from exc
        if not isinstance(record, dict) or "step" not in record:
            raise MftError(f"{path}, line {number}: a log record needs a 'step'")
        records.append(record)
    return records


def read_heldout(folder: Path) -> dict[str, float]:
    """task -> primary score from the olmes `metrics.json` summaries under `folder` (newest wins)."""
    scores: dict[str, float] = {}
    for path in sorted(folder.rglob("metrics.json"), key=lambda p: p.stat().st_mtime):
        try:
            entries = json.loads(path.read_text()).get("metrics")
            scores.update({e["task"]: float(e["primary_score"]) for e in entries or []})
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a per-task or per-subject metrics.json, not a summary
    return scores


def load_runs(folders: list[str], labels: list[str] | None = None) -> list[RunLog]:
    """Every folder must hold a train_log.jsonl with at least one record (checked before anything is drawn)."""
    if labels is not None and len(labels) != len(folders):
        raise MftError(f"--labels has {len(labels)} names for {len(folders)} runs; give one per run")
    runs = []
    for i, folder in enumerate(folders):
        root = Path(folder).expanduser()
        log = root / TRAIN_LOG
        if not log.is_file():
            raise MftError(f"{folder} has no {TRAIN_LOG}; expected an `mft train` output folder")
        records = read_log(log)
        if not records:
            raise MftError(f"{log} is empty: the run logged no step yet (logging_steps)")
        runs.append(RunLog("", records, PALETTE[i % len(PALETTE)], heldout=read_heldout(root)))
    for run, label in zip(runs, labels or default_labels(folders)):
        run.label = label
    return runs


def default_labels(folders: list[str]) -> list[str]:
    """Each folder's shortest path suffix that no other folder shares (x1/mft, x2/mft -> "x1/mft", "x2/mft";
    a/mft_0-3, b/mft_4-7 -> "mft_0-3", "mft_4-7"), from the resolved paths; a folder given twice gets " #2"."""
    paths = [Path(folder).expanduser().resolve().parts for folder in folders]
    labels = []
    for i, parts in enumerate(paths):
        others = [other for j, other in enumerate(paths) if j != i and other != parts]
        k = 1
        while k < len(parts) and any(other[-k:] == parts[-k:] for other in others):
            k += 1
        label = "/".join(parts[-k:]).replace("//", "/")
        repeat = sum(other == parts for other in paths[:i])
        labels.append(f"{label} #{repeat + 1}" if repeat else label)
    return labels


# -- panels (shared with the demo's figure) ------------------------------------------------------------
def loss_panel(ax, runs: list[RunLog]) -> None:
    for run in runs:
        ax.plot(run.steps("loss"), run.values("loss"), color=run.color, lw=0.8, label=run.label)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title("training loss")
    ax.legend(fontsize=8)


def lr_panel(ax, runs: list[RunLog]) -> None:
    for run in runs:
        ax.plot(run.steps("lr"), run.values("lr"), color=run.color, lw=1.2, label=run.label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.legend(fontsize=8)


def _layer_curves(ax, runs: list[RunLog], key: str, scale: float) -> int:
    drawn = 0
    for run in runs:
        for j, layer in enumerate(run.layers(key)):
            steps, values = run.per_layer(key, layer)
            ax.plot(steps, [scale * v for v in values], color=run.color, lw=1.0,
                    ls=LAYER_STYLES[j % len(LAYER_STYLES)], alpha=1.0 - 0.5 * j / max(1, len(run.layers(key))),
                    label=f"{run.label}, layer {layer}" if len(runs) > 1 else f"layer {layer}")
            drawn += 1
    return drawn


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray")


def mask_changes_panel(ax, runs: list[RunLog]) -> None:
    if _layer_curves(ax, runs, "mask_changed_per_layer", 100.0):
        ax.legend(fontsize=7, ncol=2)
    else:
        _no_data(ax, "no mask statistics in these logs\n(FFT or LoRA runs)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mask entries flipped since the last log (%)")
    ax.set_title("mask changes per masked layer")


def kept_panel(ax, runs: list[RunLog]) -> None:
    if _layer_curves(ax, runs, "kept_fraction", 100.0):
        ax.legend(fontsize=7, ncol=2)
        ax.ticklabel_format(axis="y", useOffset=False)
    else:
        _no_data(ax, "no mask statistics in these logs\n(FFT or LoRA runs)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("kept (%)")
    ax.set_title("kept fraction per masked layer")


def heldout_panel(ax, runs: list[RunLog]) -> None:
    tasks = sorted({t for run in runs for t in run.heldout})
    if not tasks:
        _no_data(ax, "no evaluation results under these runs\n(mft eval --output-dir RUN/eval_output)")
        ax.set_title("held-out scores")
        return
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        xs = [t + (i - (len(runs) - 1) / 2) * width for t in range(len(tasks))]
        values = [100 * run.heldout[t] if t in run.heldout else 0.0 for t in tasks]
        bars = ax.bar(xs, values, width, color=run.color, label=run.label)
        for bar, task in zip(bars, tasks):
            ax.annotate("n/a" if task not in run.heldout else f"{100 * run.heldout[task]:.1f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("primary score (%)")
    ax.set_title("held-out scores")
    ax.legend(fontsize=8)


# -- the command ---------------------------------------------------------------------------------------
def csv_rows(runs: list[RunLog]) -> list[dict]:
    rows = []
    for run in runs:
        for r in run.records:
            for key in ("loss", "lr", "tokens_per_s", "mask_changed"):
                if key in r:
                    rows.append({"run": run.label, "step": r["step"], "epoch": r.get("epoch", ""), "metric": key,
                                 "layer": "", "value": r[key]})
            for key in ("mask_changed_per_layer", "kept_fraction"):
                for layer, value in sorted((r.get(key) or {}).items()):
                    rows.append({"run": run.label, "step": r["step"], "epoch": r.get("epoch", ""), "metric": key,
                                 "layer": layer, "value": value})
        for task, value in sorted(run.heldout.items()):
            rows.append({"run": run.label, "step": "", "epoch": "", "metric": f"heldout/{task}", "layer": "",
                         "value": value})
    return rows


def plot_runs(folders: list[str], output: str = "runs.png", labels: list[str] | None = None) -> tuple[Path, Path]:
    """Write the figure to `output` (PNG) and its numbers beside it (same name, `.csv`); returns both paths."""
    png = Path(output).expanduser()
    if not png.suffix:
        png = png.with_name(png.name + ".png")
    elif png.suffix.lower() != ".png":
        raise MftError(f"--output must name a .png file (the CSV is written beside it), got {output}")
    runs = load_runs(folders, labels)
    import matplotlib.pyplot as plt

    fig = figure(runs)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    table = png.with_suffix(".csv")
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "step", "epoch", "metric", "layer", "value"])
        writer.writeheader()
        writer.writerows(csv_rows(runs))
    return png, table


def figure(runs: list[RunLog]):
    """The matplotlib figure: 2 x 2 panels (loss, lr; mask changes, kept fraction), a third column with the
    held-out scores when some run has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_heldout = any(run.heldout for run in runs)
    fig, axes = plt.subplots(2, 3 if has_heldout else 2, figsize=(15 if has_heldout else 11, 8), squeeze=False)
    loss_panel(axes[0][0], runs)
    lr_panel(axes[0][1], runs)
    mask_changes_panel(axes[1][0], runs)
    kept_panel(axes[1][1], runs)
    if has_heldout:
        heldout_panel(axes[0][2], runs)
        axes[1][2].axis("off")
    fig.suptitle(", ".join(f"{run.label} ({run.records[-1]['step']} steps)" for run in runs)[:200], fontsize=10)
    fig.tight_layout()
    return fig


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot training runs: loss, lr, mask changes and kept fraction per layer",
                       description="Plot the train_log.jsonl of one or more `mft train` runs, overlaid (e.g. a "
                       "layer-window sweep), with the held-out scores of evaluations found under the run folders. "
                       "Writes a PNG and, beside it, a CSV of every plotted number.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each holds train_log.jsonl)")
    p.add_argument("--labels", nargs="+", default=None,
                   help="names for the runs (default: each folder's shortest path suffix no other run shares)")
    p.add_argument("--output", default="runs.png",
                   help="the PNG to write (.png added when the name has no suffix); the CSV goes beside it "
                   "(default: runs.png)")
    p.set_defaults(func=run_plot_command)


def run_plot_command(args) -> int:
    png, table = plot_runs(args.runs, args.output, args.labels)
    print(f"wrote {png} and {table}")
    return 0
