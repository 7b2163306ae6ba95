"""The demo's results table (markdown) and its figure (training curves, mask statistics, accuracy bars)."""

from __future__ import annotations

import json
from pathlib import Path

from mft.demo.settings import LABELS, MODELS, Paths
from mft.train.loop import TRAIN_LOG

TABLE = "results.md"
FIGURE = "demo.png"


def table_markdown(summary: dict) -> str:
    """One row per model: accuracy and held-out loss, each with its difference to FFT."""
    models = summary["models"]
    fft = models["fft"]
    lines = ["| model | accuracy (%) | Δ accuracy vs FFT | held-out loss | Δ loss vs FFT |",
             "|---|---:|---:|---:|---:|"]
    for name in MODELS:
        row = models[name]
        acc, loss = 100 * row["accuracy"], row["heldout_loss"]
        d_acc = "–" if name == "fft" else f"{acc - 100 * fft['accuracy']:+.1f}"
        d_loss = "–" if name == "fft" else f"{loss - fft['heldout_loss']:+.3f}"
        lines.append(f"| {LABELS[name]} | {acc:.1f} | {d_acc} | {loss:.3f} | {d_loss} |")
    return "\n".join(lines)


def write_table(root: Path, summary: dict) -> str:
    s = summary["settings"]
    n = summary["models"]["fft"]["num_instances"]
    text = (f"{table_markdown(summary)}\n\n"
            f"Held-out: {n} problems (GSM8K protocol, 0-shot, greedy, exact match on the number after ####); "
            f"held-out loss: mean token NLL on their answers. Masks: layers {s['masked_layers']}, attention and "
            f"MLP, keep ratio {s['keep_ratio']}. Seed {summary['seed']}"
            f"{', --quick (a smoke test: too short to mean anything)' if summary['quick'] else ''}.\n")
    (root / TABLE).write_text(text)
    return text


def read_log(folder: Path) -> list[dict]:
    path = folder / TRAIN_LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


COLORS = {"base": "tab:gray", "fft": "tab:blue", "mft": "tab:red", "random": "tab:orange", "l1": "tab:green"}
SHORT = {"base": "base", "fft": "FFT", "mft": "MFT", "random": "random", "l1": "L1"}


def write_plots(paths: Paths, summary: dict, output: Path | None = None, dpi: int = 100) -> Path:
    """One figure, six panels: training loss, held-out loss along training, accuracy, mask changes per layer,
    learning rate, and where the learned mask prunes compared with the baselines. The loss, learning-rate
    curves are drawn by `mft plot`'s panel functions. No kept-fraction panel: with local selection every
    matrix keeps exactly `int(k * n)` entries at every step, a flat line by construction."""
    from mft.plot import RunLog, loss_panel, lr_panel

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fft_log, mft_log = read_log(paths.model("fft")), read_log(paths.runs / "mft")
    curves, models = summary.get("curves") or {}, summary["models"]
    offset = fft_log[-1]["step"] if fft_log else 0
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    (ax_train, ax_heldout, ax_acc), (ax_changed, ax_lr, ax_overlap) = axes

    runs = [RunLog("FFT", fft_log, COLORS["fft"]),
            RunLog("MFT (starts from the last FFT step)", mft_log, COLORS["mft"], offset=offset)]
    loss_panel(ax_train, runs)
    ax_train.set_ylabel("loss per answer token (log scale)")

    for name, shift in (("fft", 0), ("mft", offset)):
        points = curves.get(name) or []
        ax_heldout.plot([shift + c["step"] for c in points], [c["heldout_loss"] for c in points], "o-", ms=4,
                        color=COLORS[name], label=f"{SHORT[name]} checkpoints")
    top = None
    points = [c["heldout_loss"] for name in ("fft", "mft") for c in curves.get(name) or []]
    if points:  # every checkpoint of both curves in view; a baseline far above them is named, not drawn
        low, high = min(points), max(points)
        pad = 0.05 * (high - low) + 1e-3
        top = high + 0.4 * (high - low) + pad  # headroom: the legend sits above every point
        ax_heldout.set_ylim(low - pad, top)
    for name in ("random", "l1"):
        value = models[name]["heldout_loss"]
        above = top is not None and value > top
        ax_heldout.axhline(value, color=COLORS[name], ls="--", lw=1,
                           label=f"{SHORT[name]} mask on the last FFT step: {value:.3f}{' (off the top)' if above else ''}")
    ax_heldout.axvline(offset, color="gray", ls=":", lw=0.8)
    ax_heldout.set_xlabel("optimizer step (FFT, then MFT)")
    ax_heldout.set_ylabel("held-out loss per answer token")
    ax_heldout.set_title("held-out loss along training")
    ax_heldout.legend(fontsize=8, loc="upper center")

    accuracies = [100 * models[m]["accuracy"] for m in MODELS]
    bars = ax_acc.bar([SHORT[m] for m in MODELS], accuracies, color=[COLORS[m] for m in MODELS])
    for bar, m in zip(bars, MODELS):
        ax_acc.annotate(f"{100 * models[m]['accuracy']:.1f} %\nloss {models[m]['heldout_loss']:.3f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax_acc.set_ylim(0, max(100.0, max(accuracies) * 1.25))
    ax_acc.set_ylabel("held-out accuracy (%)")
    ax_acc.set_title(f"held-out accuracy, {models['fft']['num_instances']} problems (exact match)")

    steps = [r["step"] for r in mft_log]
    layers = sorted({k for r in mft_log for k in r.get("kept_fraction", {})}, key=int)
    changes = curves.get("mft_layer_changes") or []
    ax_changed.plot(steps, [100 * r.get("mask_changed", 0.0) for r in mft_log], color="gray", lw=0.8,
                    label="all masked layers, per logged step")
    for layer in layers if changes else []:
        ax_changed.plot([c["step"] for c in changes], [100 * c[layer] for c in changes], "o-", ms=3,
                        label=f"layer {layer}, per step between checkpoints")
    ax_changed.set_xlabel("MFT step")
    ax_changed.set_ylabel("mask entries flipped per step (%)")
    ax_changed.set_title("mask changes during MFT")
    ax_changed.legend(fontsize=8)

    lr_panel(ax_lr, [RunLog("FFT", fft_log, COLORS["fft"]), RunLog("MFT", mft_log, COLORS["mft"], offset=offset)])
    ax_lr.set_xlabel("optimizer step (FFT, then MFT)")

    overlap = summary["masks"]["mft"].get("pruned_overlap_per_layer", {})
    names = sorted(overlap, key=int)
    width = 0.38
    for i, other in enumerate(("random", "l1")):
        ax_overlap.bar([k + (i - 0.5) * width for k in range(len(names))], [100 * overlap[n][other] for n in names],
                       width, color=COLORS[other], label=f"also pruned by the {SHORT[other]} mask")
    ax_overlap.axhline(100 * (1 - summary["settings"]["keep_ratio"]), color="gray", ls=":", lw=1,
                       label="chance (an unrelated mask)")
    ax_overlap.set_xticks(range(len(names)), [f"layer {n}" for n in names])
    ax_overlap.set_ylim(0, 100)
    ax_overlap.set_ylabel("share of MFT's pruned weights (%)")
    ax_overlap.set_title("what MFT prunes, compared with the baselines")
    ax_overlap.legend(fontsize=8)

    fig.tight_layout()
    path = output or paths.plots / FIGURE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_small_png(fig, path, dpi)
    plt.close(fig)
    return path


def save_small_png(fig, path: Path, dpi: int) -> None:
    """A 64-colour palette PNG: looks the same as matplotlib's, a third of the size (the README's copy)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
