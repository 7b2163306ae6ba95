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
