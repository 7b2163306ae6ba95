"""`mft plot` on real run folders: two MFT runs of a layer-window sweep (one with evaluation results)."""

from __future__ import annotations

import csv
import json

import pytest

from mft.cli import main
from mft.plot import TRAIN_LOG, figure, load_runs


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, saved_model):
    """Two real `mft train` MFT runs (layers 0-1 and 2-3) of a tiny Llama, 8 logged steps each."""
    from accelerate.state import AcceleratorState, GradientState

    from mft.train.config import load_config
    from mft.train.loop import train

    root = tmp_path_factory.mktemp("sweep")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                                     {"role": "assistant", "content": f"{2 * i}"}]}) + "\n"
                            for i in range(16)))
    runs = []
    for layers in ("0-1", "2-3"):
        out = root / f"mft_{layers}"
        values = {"model_name_or_path": str(saved_model("llama")), "train_file": str(data), "output_dir": str(out),
                  "max_seq_length": 64, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                  "num_train_epochs": 1, "logging_steps": 1, "report_to": "[none]", "subnet_mode": "both",
                  "masked_layers": layers, "learning_rate": 0.05, "dataset_local_cache_dir": str(root / "cache")}
        try:
            train(load_config(None, [f"--{k}={v}" for k, v in values.items()]))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        runs.append(out)
    # evaluation results beside the first run's model, as `mft eval --output-dir RUN/eval_output` writes them
    (runs[0] / "eval_output").mkdir()
    (runs[0] / "eval_output" / "metrics.json").write_text(json.dumps({"metrics": [
        {"task": "gsm8k", "primary_score": 0.125, "num_instances": 64}]}))
    return runs


def test_train_log_name_is_the_trainers():
    from mft.train.loop import TRAIN_LOG as trainer_log

    assert TRAIN_LOG == trainer_log


def test_plot_writes_the_panels_and_a_csv_of_the_logged_values(sweep, tmp_path, capsys):
    logs = [[json.loads(line) for line in (run / TRAIN_LOG).read_text().splitlines()] for run in sweep]
    assert [len(log) for log in logs] == [8, 8] and "kept_fraction" in logs[0][0]

    out = tmp_path / "plots" / "sweep.png"
    assert main(["plot", str(sweep[0]), str(sweep[1]), "--labels", "L0-1", "L2-3", "--output", str(out)]) == 0
    assert f"wrote {out} and {out.with_suffix('.csv')}" in capsys.readouterr().out
    from PIL import Image

    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1500, 800)

    fig = figure(load_runs([str(r) for r in sweep], ["L0-1", "L2-3"]))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["training loss", "learning rate", "held-out scores", "mask changes per masked layer",
                      "kept fraction per masked layer", ""]
    loss, lr, heldout, changes, kept = fig.axes[:5]
    assert [list(line.get_ydata()) for line in loss.get_lines()] == [[r["loss"] for r in log] for log in logs]
    assert [list(line.get_ydata()) for line in lr.get_lines()] == [[r["lr"] for r in log] for log in logs]
    assert [line.get_label() for line in changes.get_lines()] == ["L0-1, layer 0", "L0-1, layer 1",
                                                                  "L2-3, layer 2", "L2-3, layer 3"]
    assert list(kept.get_lines()[3].get_ydata()) == [100 * r["kept_fraction"]["3"] for r in logs[1]]
    assert [t.get_text() for t in heldout.texts] == ["12.5", "n/a"]

    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    by_key = {(r["run"], r["step"], r["metric"], r["layer"]): float(r["value"]) for r in rows}
    for label, log in zip(("L0-1", "L2-3"), logs):
        for record in log:
            step = str(record["step"])
            assert by_key[(label, step, "loss", "")] == record["loss"]
            assert by_key[(label, step, "lr", "")] == record["lr"]
            for layer, value in record["mask_changed_per_layer"].items():
                assert by_key[(label, step, "mask_changed_per_layer", layer)] == value
                assert by_key[(label, step, "kept_fraction", layer)] == record["kept_fraction"][layer]
    assert by_key[("L0-1", "", "heldout/gsm8k", "")] == 0.125
    assert len(rows) == 2 * 8 * (4 + 2 * 2) + 1


def test_plot_refuses_a_folder_without_a_log(tmp_path, capsys, sweep):
    assert main(["plot", str(sweep[0]), str(tmp_path), "--output", str(tmp_path / "x.png")]) == 1
    assert f"{tmp_path} has no train_log.jsonl; expected an `mft train` output folder" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert main(["plot", str(sweep[0]), "--labels", "a", "b"]) == 1
    assert "--labels has 2 names for 1 runs" in capsys.readouterr().err


def test_a_partial_last_line_is_skipped_and_a_bad_middle_line_refused(sweep, tmp_path, capsys):
    """A run killed (or still writing) mid-record: plot the complete records, say the last line was skipped."""
    full = (sweep[0] / TRAIN_LOG).read_text()
    run = tmp_path / "killed"
    run.mkdir()
    (run / TRAIN_LOG).write_text(full + '{"step": 9, "epoch": 1.0, "lo')
    assert main(["plot", str(run), "--output", str(tmp_path / "k.png")]) == 0
    assert f"note: {run / TRAIN_LOG}, line 9: skipped a partial last line" in capsys.readouterr().err
    with open(tmp_path / "k.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["metric"] == "loss"]
    assert steps == list(range(1, 9))
    lines = full.splitlines()
    (run / TRAIN_LOG).write_text("\n".join([*lines[:3], '{"step": 4, "lo', *lines[3:]]) + "\n")
    assert main(["plot", str(run), "--output", str(tmp_path / "m.png")]) == 1
    assert f"{run / TRAIN_LOG}, line 4: not JSON" in capsys.readouterr().err and not (tmp_path / "m.png").exists()
    (run / TRAIN_LOG).write_text(full + '{"step": 9, "lo\n')  # a complete (newline-ended) bad last line: an error
    assert main(["plot", str(run), "--output", str(tmp_path / "n.png")]) == 1
    assert f"{run / TRAIN_LOG}, line 9: not JSON" in capsys.readouterr().err


def test_default_labels_tell_the_runs_apart(sweep, tmp_path, capsys):
    from mft.plot import default_labels

    for parent in ("x1", "x2"):
        (tmp_path / parent / "mft").mkdir(parents=True)
        (tmp_path / parent / "mft" / TRAIN_LOG).write_text((sweep[0] / TRAIN_LOG).read_text())
    folders = [str(tmp_path / "x1/mft"), str(tmp_path / "x2/mft")]
    assert main(["plot", *folders, "--output", str(tmp_path / "two")]) == 0  # no suffix: .png added
    assert f"wrote {tmp_path / 'two.png'} and {tmp_path / 'two.csv'}" in capsys.readouterr().out
    with open(tmp_path / "two.csv", newline="") as f:
        assert sorted({r["run"] for r in csv.DictReader(f)}) == ["x1/mft", "x2/mft"]
    assert default_labels([str(sweep[0]), str(sweep[1])]) == ["mft_0-1", "mft_2-3"]
    assert default_labels([folders[0], str(tmp_path / "x2"), folders[0]]) == ["mft", "x2", "mft #2"]
    assert default_labels([folders[0], str(tmp_path / "y/x1/mft")]) == [f"{tmp_path.name}/x1/mft", "y/x1/mft"]


def test_output_must_be_a_png(sweep, tmp_path, capsys):
    (tmp_path / "x.csv").write_text("keep me")
    assert main(["plot", str(sweep[0]), "--output", str(tmp_path / "x.csv")]) == 1
    assert f"--output must name a .png file or a folder (the CSV is written beside the PNG), got " \
        f"{tmp_path / 'x.csv'}" in capsys.readouterr().err
    assert (tmp_path / "x.csv").read_text() == "keep me"


def write_log(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TRAIN_LOG).write_text("".join(json.dumps(r) + "\n" for r in records))  # NaN/Infinity as mft train writes
    return folder


def write_summary(folder, score):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"metrics": [
        {"task": "gsm8k", "primary_score": score, "num_instances": 8}]}))


def test_heldout_scores_come_from_the_fixed_location_not_the_newest_file(tmp_path, capsys):
    """An MFT run with its applied model's evaluation and, written later, a snapshot's: the applied model's
    score is plotted (whatever the file times), its folder is named in the legend and the CSV, and the
    snapshot's evaluation is named as not plotted."""
    import os

    run = write_log(tmp_path / "mft", [{"step": s, "loss": 2.0 - s / 10, "lr": 1e-3} for s in (1, 2, 3)])
    write_summary(run / "mask_applied" / "eval_output", 0.25)
    write_summary(run / "snapshots" / "step_2" / "eval_output", 0.0)
    os.utime(run / "mask_applied" / "eval_output" / "metrics.json", (1, 1))  # the older file
    assert main(["plot", str(run), "--output", str(tmp_path / "p.png")]) == 0
    err = capsys.readouterr().err
    assert (f"note: {run}: held-out scores from mask_applied/eval_output/metrics.json; not plotted: "
            "snapshots/step_2/eval_output/metrics.json") in err
    with open(tmp_path / "p.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "heldout/gsm8k"]
    assert rows == [{"run": "mft", "step": "", "epoch": "", "metric": "heldout/gsm8k", "layer": "", "value": "0.25",
                     "source": "mask_applied/eval_output/metrics.json"}]
    heldout = figure(load_runs([str(run)])).axes[2]
    assert [t.get_text() for t in heldout.texts] == ["25.0"]
    assert [t.get_text() for t in heldout.get_legend().get_texts()] == ["mft (mask_applied/eval_output)"]
    (run / "mask_applied" / "eval_output" / "metrics.json").unlink()  # no fixed location: no score at all
    runs = load_runs([str(run)])
    assert runs[0].heldout == {} and runs[0].heldout_source == ""
    fft = write_log(tmp_path / "fft", [{"step": 1, "loss": 2.0, "lr": 1e-5}])
    write_summary(fft / "eval_output", 0.5)
    assert load_runs([str(fft)])[0].heldout_source == "eval_output/metrics.json"


def test_non_finite_losses_are_marked_and_few_points_get_markers(tmp_path):
    """Losses NaN, inf and 0 at steps 5-7 (a diverged run) are red marks named in the panel, not a curve that
    silently ends at step 4; a run with one record shows its point; step ticks are integers."""
    import math

    bad = write_log(tmp_path / "bad", [{"step": 2, "loss": 6.1, "lr": 0.02}, {"step": 4, "loss": 6.0, "lr": 0.02},
                                       {"step": 5, "loss": math.nan, "lr": 0.01},
                                       {"step": 6, "loss": math.inf, "lr": 0.01}, {"step": 7, "loss": 0.0, "lr": 0.01}])
    one = write_log(tmp_path / "one", [{"step": 2, "loss": 6.1, "lr": 0.02, "kept_fraction": {"0": 0.9},
                                        "mask_changed_per_layer": {"0": 0.19}}])
    fig = figure(load_runs([str(bad)]))
    loss = fig.axes[0]
    assert [list(line.get_xdata()) for line in loss.get_lines()] == [[2, 4]]
    marks = loss.collections[0].get_offsets()
    assert [float(x) for x in marks[:, 0]] == [5.0, 6.0, 7.0]
    assert loss.get_xlabel() == "optimizer step\nred x at the top: bad: loss 0.0/inf/nan at steps 5-7"
    assert loss.get_xlim()[1] >= 7
    fig.canvas.draw()
    ticks = [t.get_text() for t in loss.get_yticklabels(minor=True) + loss.get_yticklabels() if t.get_text()]
    assert len(ticks) >= 2 and len(set(ticks)) == len(ticks) and not any("times" in t or "e" in t for t in ticks)
    for ax in fig.axes[:2]:
        assert all(float(t).is_integer() for t in ax.get_xticks()), ax.get_xticks()
    fig = figure(load_runs([str(one)]))
    fig.canvas.draw()
    for ax in fig.axes[:4]:
        for line in ax.get_lines():
            assert line.get_marker() == "o"
        assert all(float(t).is_integer() for t in ax.get_xticks()), (ax.get_title(), ax.get_xticks())
        assert ax.get_xlim()[0] <= 1 and ax.get_xlim()[1] >= 3


def test_learning_rates_far_apart_are_drawn_relative_to_each_peak(tmp_path):
    """FFT at 5e-6 and MFT at 5e-3 (the paper's rates) overlaid: each curve is divided by its peak, named in the
    legend, so FFT is not a flat line at 0; the CSV keeps the absolute rates. Rates within 10x stay absolute."""
    steps = range(1, 31)
    fft = write_log(tmp_path / "fft", [{"step": s, "loss": 3.0 - s / 20, "lr": 5e-6 * (1 - s / 30)} for s in steps])
    mft = write_log(tmp_path / "mft", [{"step": s, "loss": 1.5 - s / 30, "lr": 5e-3 * (1 - s / 30)} for s in steps])
    fig = figure(load_runs([str(fft), str(mft)]))
    lr = fig.axes[1]
    assert lr.get_title() == "learning rate (each run relative to its peak)"
    assert [t.get_text() for t in lr.get_legend().get_texts()] == ["fft (peak 4.83e-06)", "mft (peak 0.00483)"]
    assert [max(line.get_ydata()) for line in lr.get_lines()] == [1.0, 1.0]
    assert main(["plot", str(fft), str(mft), "--output", str(tmp_path / "o.png")]) == 0
    with open(tmp_path / "o.csv", newline="") as f:
        peaks = {r["run"]: float(r["value"]) for r in csv.DictReader(f) if r["metric"] == "lr" and r["step"] == "1"}
    assert peaks == {"fft": 5e-6 * (1 - 1 / 30), "mft": 5e-3 * (1 - 1 / 30)}
    close = write_log(tmp_path / "close", [{"step": s, "lr": 1e-3} for s in steps])
    assert figure(load_runs([str(mft), str(close)])).axes[1].get_title() == "learning rate"


def test_output_may_name_a_folder_and_bad_folders_are_one_line_errors(tmp_path, capsys):
    run = write_log(tmp_path / "run", [{"step": 1, "loss": 2.0, "lr": 1e-3}])
    assert main(["plot", str(run), "--output", str(tmp_path / "plots") + "/"]) == 0  # a folder meant, created
    assert f"wrote {tmp_path / 'plots' / 'runs.png'} and {tmp_path / 'plots' / 'runs.csv'}" in capsys.readouterr().out
    (tmp_path / "existing").mkdir()
    assert main(["plot", str(run), "--output", str(tmp_path / "existing")]) == 0  # an existing folder
    assert (tmp_path / "existing" / "runs.png").is_file() and (tmp_path / "existing" / "runs.csv").is_file()
    capsys.readouterr()
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert main(["plot", str(run), "--output", str(tmp_path / "model.safetensors" / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err == (f"mft plot: error: cannot create the --output folder {tmp_path / 'model.safetensors'}: "
                   f"{tmp_path / 'model.safetensors'} is a file, not a folder (ENOTDIR)\n")
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
