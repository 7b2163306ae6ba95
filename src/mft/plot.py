"""`mft plot RUN [RUN ...]`: the curves of training runs, several runs overlaid, as a PNG and a CSV.

Reads each run folder's `train_log.jsonl` (written by `mft train`; one record per logged step: `step`,
`epoch`, `loss`, `lr`, `tokens_per_s`, and for MFT `mask_changed`, `mask_changed_per_layer`,
`kept_fraction`) and, when present, the held-out scores of the run's model from one fixed place,
`HELDOUT_LOCATIONS` in order: `RUN/mask_applied/eval_output/metrics.json` (an MFT run's applied model), else
`RUN/eval_output/metrics.json` (an FFT run's own model) — the olmes summary `mft eval --output-dir` writes.
Other evaluations under the run folder (of snapshots, say) are not plotted; a note on stderr names them.
The location used is named in the panel's legend and in the CSV's `source` column.

Panels: training loss, learning rate, mask entries flipped per logged step per layer, kept fraction per
layer, and the held-out primary scores. The loss axis is logarithmic, its ticks written as plain numbers
with as many digits as tell them apart (6.0975, 6.1, not 6.1 x 10^0 twice). A loss that is NaN,
infinite or not positive (none has a place on a log axis) is drawn as a red x at the top of the loss panel
and named there, so a diverged run does not look like a run that stopped logging. A
series of at most `MARKERS_UP_TO` points is drawn with markers (one logged step is a visible dot). Steps are
integers on every axis. Learning rates are drawn as they are when the runs' peak rates lie within a factor
`LR_SPREAD` of each other; otherwise (FFT at 5e-6 overlaid on MFT at 5e-3, where FFT would be a flat line at
0) each run's curve is divided by its own peak, which the legend names: the panel then compares schedules,
and the CSV keeps the absolute values.

The CSV holds every plotted number, one per row: `run,step,epoch,metric,layer,value,source` (`layer` empty
for whole-run values; held-out scores as metric `heldout/<task>` with no step and the metrics.json they come
from, relative to the run folder, as `source`). The demo's figure draws its training-loss and learning-rate
curves with the panel functions below.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mft.errors import MftError

TRAIN_LOG = "train_log.jsonl"
HELDOUT_LOCATIONS = ("mask_applied/eval_output", "eval_output")  # relative to the run folder, first found wins
MARKERS_UP_TO = 20
LR_SPREAD = 10.0
DEFAULT_OUTPUT = "runs.png"
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
    heldout_source: str = ""  # the metrics.json the scores come from, relative to the run folder

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


def read_heldout(folder: Path) -> tuple[dict[str, float], str]:
    """(task -> primary score, source) from the first of `HELDOUT_LOCATIONS` under the run `folder` that holds
    an olmes summary `metrics.json`; `source` is that file relative to `folder` ("" when none). File times play
    no part. Other summaries under `folder` are named in a note on stderr (they are not plotted)."""
    scores: dict[str, float] = {}
    source = ""
    for location in HELDOUT_LOCATIONS:
        path = folder / location / "metrics.json"
        if not path.is_file():
            continue
        try:
            entries = json.loads(path.read_text()).get("metrics")
            scores = {e["task"]: float(e["primary_score"]) for e in entries or []}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MftError(f"{path} is not an olmes metrics.json (needs metrics[].task/primary_score): {exc}") from exc
        source = f"{location}/metrics.json"
        break
    others = sorted(str(p.relative_to(folder)) for p in folder.rglob("eval_output/metrics.json")
                    if str(p.relative_to(folder)) != source)
    if others:
        print(f"note: {folder}: held-out scores {'from ' + source if source else 'not plotted'}; not plotted: "
              f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''} (only "
              f"{' or '.join(f'{loc}/' for loc in HELDOUT_LOCATIONS)} is read)", file=sys.stderr)
    return scores, source


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
        heldout, source = read_heldout(root)
        runs.append(RunLog("", records, PALETTE[i % len(PALETTE)], heldout=heldout, heldout_source=source))
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
def _markers(n: int) -> dict:
    """Line style extras: dots when a series has few points (a single point is invisible as a bare line)."""
    return {"marker": "o", "ms": 3} if n <= MARKERS_UP_TO else {}


def _integer_steps(ax, steps: list[int] | None = None) -> None:
    """Integer ticks on the step axis; `steps` (all the panel's steps) set the x range, at least one step either
    side (a single logged step would otherwise get ticks 1.9 ... 2.1), also for marks drawn off the data."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if steps:
        low, high = min(steps), max(steps)
        pad = max(1.0, 0.04 * (high - low)) if high - low < 2 else 0.04 * (high - low)
        ax.set_xlim(low - pad, high + pad)


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _PlainLogFormatter(**kwargs):
    """matplotlib's LogFormatter (it picks which ticks get a label) writing the numbers plainly (0.6, 6, 60)."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            span = abs(vmax - vmin)  # digits enough to tell ticks a small fraction of the view apart
            digits = 3 if span <= 0 or x <= 0 else max(3, math.ceil(math.log10(abs(x) / span)) + 2)
            return f"{x:.{min(digits, 8)}g}"

    return PlainLogFormatter(**kwargs)


def loss_panel(ax, runs: list[RunLog]) -> None:
    """Training loss on a log axis; NaN, infinite or non-positive losses as red x marks at the top, named."""
    from matplotlib.transforms import blended_transform_factory

    bad_notes, all_steps = [], []
    for run in runs:
        steps, values = run.steps("loss"), run.values("loss")
        good = [(s, v) for s, v in zip(steps, values) if _finite_positive(v)]
        all_steps += steps
        ax.plot([s for s, _ in good], [v for _, v in good], color=run.color, lw=0.8, label=run.label,
                **_markers(len(good)))
        bad = [(s, v) for s, v in zip(steps, values) if not _finite_positive(v)]
        if bad:
            top = blended_transform_factory(ax.transData, ax.transAxes)
            ax.scatter([s for s, _ in bad], [0.97] * len(bad), marker="x", color="red", s=30, transform=top,
                       zorder=5, clip_on=False)
            kinds = sorted({str(v) for _, v in bad})
            bad_notes.append(f"{run.label}: loss {'/'.join(kinds)} at {_step_ranges([s for s, _ in bad])}")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PlainLogFormatter())  # plain numbers (6, 0.6), not 6.1 x 10^0 or 6e-01
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    _integer_steps(ax, all_steps)
    ax.set_xlabel("\n".join(["optimizer step", *(f"red x at the top: {note}" for note in bad_notes)]))
    if bad_notes:
        ax.xaxis.label.set_color("red")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title("training loss")
    ax.legend(fontsize=8)


def _step_ranges(steps: list[int]) -> str:
    """[5, 6, 7, 9] -> "steps 5-7, 9" (at most four ranges)."""
    ranges: list[list[int]] = []
    for step in sorted(steps):
        if ranges and step == ranges[-1][1] + 1:
            ranges[-1][1] = step
        else:
            ranges.append([step, step])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in ranges[:4])
    return "steps " + text + (", ..." if len(ranges) > 4 else "")


def lr_normalised(runs: list[RunLog]) -> bool:
    """True when the runs' peak learning rates differ by more than LR_SPREAD (see the module docstring)."""
    peaks = [max(run.values("lr")) for run in runs if run.values("lr")]
    peaks = [p for p in peaks if p > 0]
    return len(peaks) > 1 and max(peaks) / min(peaks) > LR_SPREAD


def lr_panel(ax, runs: list[RunLog]) -> None:
    """Learning rate, absolute; each run divided by its own peak when the peaks are far apart (`lr_normalised`)."""
    normalise = lr_normalised(runs)
    for run in runs:
        values = run.values("lr")
        peak = max(values, default=0.0)
        if normalise and peak > 0:
            values, label = [v / peak for v in values], f"{run.label} (peak {peak:.3g})"
        else:
            label = run.label
        ax.plot(run.steps("lr"), values, color=run.color, lw=1.2, label=label, **_markers(len(values)))
    _integer_steps(ax, [s for run in runs for s in run.steps("lr")])
    ax.set_xlabel("optimizer step")
    if normalise:
        ax.set_ylabel("learning rate / the run's peak")
        ax.set_title("learning rate (each run relative to its peak)")
    else:
        ax.set_ylabel("learning rate")
        ax.set_title("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.legend(fontsize=8)


def _layer_curves(ax, runs: list[RunLog], key: str, scale: float) -> int:
    drawn = 0
    for run in runs:
        for j, layer in enumerate(run.layers(key)):
            steps, values = run.per_layer(key, layer)
            ax.plot(steps, [scale * v for v in values], color=run.color, lw=1.0, **_markers(len(values)),
                    ls=LAYER_STYLES[j % len(LAYER_STYLES)], alpha=1.0 - 0.5 * j / max(1, len(run.layers(key))),
                    label=f"{run.label}, layer {layer}" if len(runs) > 1 else f"layer {layer}")
            drawn += 1
    return drawn


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray")


def _per_layer_panel(ax, runs: list[RunLog], key: str, ylabel: str, title: str, fixed_ticks: bool = False) -> None:
    """One curve per run and masked layer of the logged per-layer statistic `key` (a fraction, drawn in %)."""
    _integer_steps(ax, [s for run in runs for s in run.steps(key)])
    if _layer_curves(ax, runs, key, 100.0):
        ax.legend(fontsize=7, ncol=2)
        if fixed_ticks:
            ax.ticklabel_format(axis="y", useOffset=False)
    else:
        _no_data(ax, "no mask statistics in these logs\n(FFT or LoRA runs)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def mask_changes_panel(ax, runs: list[RunLog]) -> None:
    _per_layer_panel(ax, runs, "mask_changed_per_layer", "mask entries flipped since the last log (%)",
                     "mask changes per masked layer")


def kept_panel(ax, runs: list[RunLog]) -> None:
    _per_layer_panel(ax, runs, "kept_fraction", "kept (%)", "kept fraction per masked layer", fixed_ticks=True)


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
        where = f" ({run.heldout_source.removesuffix('/metrics.json')})" if run.heldout_source else ""
        bars = ax.bar(xs, values, width, color=run.color, label=run.label + where)
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
                                 "layer": "", "value": r[key], "source": ""})
            for key in ("mask_changed_per_layer", "kept_fraction"):
                for layer, value in sorted((r.get(key) or {}).items()):
                    rows.append({"run": run.label, "step": r["step"], "epoch": r.get("epoch", ""), "metric": key,
                                 "layer": layer, "value": value, "source": ""})
        for task, value in sorted(run.heldout.items()):
            rows.append({"run": run.label, "step": "", "epoch": "", "metric": f"heldout/{task}", "layer": "",
                         "value": value, "source": run.heldout_source})
    return rows


def output_png(output: str) -> Path:
    """The PNG `--output` names: `output` itself (.png added when it has no suffix), or `DEFAULT_OUTPUT` inside
    it when it ends with "/" or is an existing folder. Raises MftError for another suffix, and (one line with
    the errno) for a folder that cannot be created or written: under a file, read-only, no permission."""
    from mft.paths import check_writable

    png = Path(output).expanduser()
    if str(output).endswith(("/", "\\")) or png.is_dir():
        png = png / DEFAULT_OUTPUT
    elif not png.suffix:
        png = png.with_name(png.name + ".png")
    elif png.suffix.lower() != ".png":
        raise MftError(f"--output must name a .png file or a folder (the CSV is written beside the PNG), got {output}")
    check_writable(png.parent, output_flag="the --output folder")
    return png


def plot_runs(folders: list[str], output: str = DEFAULT_OUTPUT, labels: list[str] | None = None) -> tuple[Path, Path]:
    """Write the figure to `output` (PNG; see `output_png`) and its numbers beside it (same name, `.csv`);
    returns both paths. Every check (runs, logs, the output folder) comes before anything is written."""
    from mft.paths import os_error

    png = output_png(output)
    runs = load_runs(folders, labels)
    import matplotlib.pyplot as plt

    fig = figure(runs)
    table = png.with_suffix(".csv")
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=100)
        with open(table, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["run", "step", "epoch", "metric", "layer", "value", "source"])
            writer.writeheader()
            writer.writerows(csv_rows(runs))
    except OSError as exc:
        raise os_error(exc, png) from None
    finally:
        plt.close(fig)
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
    p.add_argument("--output", default=DEFAULT_OUTPUT,
                   help="the PNG to write (.png added when the name has no suffix), or a folder (an existing one, "
                   f"or a name ending with /) to write {DEFAULT_OUTPUT} into; the CSV goes beside the PNG "
                   f"(default: {DEFAULT_OUTPUT})")
    p.set_defaults(func=run_plot_command)


def run_plot_command(args) -> int:
    png, table = plot_runs(args.runs, args.output, args.labels)
    print(f"wrote {png} and {table}")
    return 0
