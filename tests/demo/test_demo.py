"""`mft demo --quick`, end to end: the table, every model and plot, and masks that are exactly what they claim."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mft.cli import main
from mft.demo.settings import MARKER, MODELS
from mft.masking.files import read_masks

KEEP = 0.9


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One `mft demo --quick` run in a subprocess (its own accelerate state and thread settings)."""
    logs = tmp_path_factory.mktemp("demo_logs")
    out = logs.parent / (logs.name + "_run") / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("MFT_QUIET", "MFT_PROGRESS")}
    env["PYTHONUNBUFFERED"] = "1"
    started = time.perf_counter()
    with open(logs / "stdout.log", "w") as fout, open(logs / "stderr.log", "w") as ferr:  # piped to files
        proc = subprocess.run([sys.executable, "-m", "mft", "demo", "--quick", "--output-dir", str(out), "--seed", "1"],
                              stdout=fout, stderr=ferr, env=env, timeout=600)
    seconds = time.perf_counter() - started
    # bytes first: read_text() turns every \r into \n (universal newlines), which would hide a tqdm refresh
    raw = {"stdout_bytes": (logs / "stdout.log").read_bytes(), "stderr_bytes": (logs / "stderr.log").read_bytes()}
    stdout, stderr = raw["stdout_bytes"].decode(), raw["stderr_bytes"].decode()
    assert proc.returncode == 0, stderr[-3000:]
    return {"out": out, "stdout": stdout, "stderr": stderr, "seconds": seconds, **raw,
            "results": json.loads((out / "results.json").read_text())}


def test_output_to_a_file_has_plain_lines_only(demo):
    """Written to files (as under SLURM): no carriage return, no line over 300 characters, and the stages'
    progress as plain lines ending at 100 %."""
    for data in (demo["stdout_bytes"], demo["stderr_bytes"]):
        assert b"\r" not in data
        # logging records (`2026-11-30 23:37:53,915 INFO name: ...`) are as long as the paths they name
        lines = [line for line in data.decode().split("\n") if not re.match(r"\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ ", line)]
        assert max(map(len, lines), default=0) <= 300
    assert any(line.startswith("mft training: 100% ") for line in demo["stderr"].splitlines())
    assert any(line.startswith("generating gsm8k") and " 100% " in line for line in demo["stderr"].splitlines())


def test_table_has_every_model_with_numbers_in_range(demo):
    results = demo["results"]
    assert results["seed"] == 1 and results["quick"] is True
    assert list(results["models"]) == list(MODELS)
    for name, row in results["models"].items():
        assert 0.0 <= row["accuracy"] <= 1.0, name
        assert math.isfinite(row["heldout_loss"]) and row["heldout_loss"] > 0, name
        assert row["num_instances"] == results["settings"]["n_test"]
    table = (demo["out"] / "results.md").read_text()
    header, rule, *rows = table.split("\n\n")[0].splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == \
        ["model", "accuracy (%)", "Δ accuracy vs FFT", "held-out loss", "Δ loss vs FFT"]
    assert [r.split("|")[1].strip() for r in rows] == ["base", "FFT", "MFT", "random mask", "L1 mask"]
    fft = results["models"]["fft"]
    for line, name in zip(rows, MODELS):
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = results["models"][name]
        assert float(cells[1]) == pytest.approx(100 * row["accuracy"], abs=0.05)
        assert float(cells[3]) == pytest.approx(row["heldout_loss"], abs=5e-4)
        if name != "fft":
            assert float(cells[2]) == pytest.approx(100 * (row["accuracy"] - fft["accuracy"]), abs=0.06)
            assert float(cells[4]) == pytest.approx(row["heldout_loss"] - fft["heldout_loss"], abs=1e-3)
    assert table.split("\n\n")[0] in demo["stdout"]  # printed as well


def test_every_model_run_and_plot_exists(demo):
    out = demo["out"]
    assert (out / MARKER).is_file() and (out / "timings.json").is_file()
    for name in ("init", *MODELS):
        folder = out / "models" / name
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file(), name
        assert (folder / "tokenizer.json").is_file(), name
    for name in ("base", "fft"):
        assert (out / "models" / name / "train_log.jsonl").is_file()
    run = out / "runs" / "mft"
    assert (run / "masks.safetensors").is_file() and (run / "mft_run.json").is_file()
    for name in MODELS:
        assert json.loads((out / "eval" / name / "metrics.json").read_text())["metrics"][0]["task"] == "gsm8k"
    for split in ("pretrain", "train", "test"):
        assert (out / "data" / f"{split}.jsonl").is_file()
    plot = out / "plots" / "demo.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_eval_prompts_are_the_training_format(demo):
    """The model is prompted at evaluation with exactly the text it was trained on, up to the answer."""
    out = demo["out"]
    request = json.loads((out / "eval" / "fft" / "task-000-gsm8k-requests.jsonl").read_text().splitlines()[0])
    test = json.loads((out / "data" / "test.jsonl").read_text().splitlines()[0])
    assert request["request"]["context"] == f"Question: {test['question']}\nAnswer:"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "models" / "fft")
    messages = [{"role": "user", "content": test["question"]}, {"role": "assistant", "content": test["answer"]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == f"{request['request']['context']} {test['answer']}</s>"
    assert test["answer"].splitlines()[-1] == f"#### {request['label']}"


def _masked_weights(out: Path, name: str):
    """(applied model tensors, FFT tensors, the mask set saved next to the applied model)."""
    applied = load_file(str(out / "models" / name / "model.safetensors"))
    fft = load_file(str(out / "models" / "fft" / "model.safetensors"))
    return applied, fft, read_masks(out / "models" / name / "masks.safetensors")


@pytest.mark.parametrize("name", ["mft", "random", "l1"])
def test_masked_models_prune_exactly_the_mask_and_nothing_else(demo, name):
    out, settings = demo["out"], demo["results"]["settings"]
    applied, fft, mask_set = _masked_weights(out, name)
    layers = [int(i) for i in settings["masked_layers"].split()]
    expected = {f"model.layers.{i}.{part}" for i in layers
                for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(mask_set.masks) == expected
    assert set(applied) == set(fft)
    for key, weight in fft.items():
        module = key.removesuffix(".weight")
        if module not in expected:
            assert torch.equal(applied[key], weight), f"{key} changed but is not masked"
            continue
        mask, new = mask_set.masks[module], applied[key]
        n, pruned = mask.numel(), int((~mask).sum())
        if name == "random":  # each weight kept with probability 0.9
            assert abs(pruned / n - (1 - KEEP)) < 0.03, (key, pruned / n)
        else:  # local rule: exactly int((1 - k) * n) pruned per matrix
            assert pruned == int((1 - KEEP) * n), (key, pruned, n)
        assert torch.equal(new[mask], weight[mask]), f"{key}: a kept weight differs from FFT's"
        assert torch.all(new[~mask] == 0), f"{key}: a pruned weight is not zero"
        # zeros of the applied matrix = the pruned entries + FFT's own exact zeros among the kept ones
        assert int((new == 0).sum()) == pruned + int((weight[mask] == 0).sum())
        if name == "l1":  # the smallest |W| went
            assert weight[~mask].abs().max() <= weight[mask].abs().min()


def test_mft_model_carries_the_learned_mask_and_differs_from_the_baselines(demo):
    out = demo["out"]
    learned = read_masks(out / "runs" / "mft" / "masks.safetensors")
    applied = read_masks(out / "models" / "mft" / "masks.safetensors")
    assert learned.source == "learned" and set(learned.masks) == set(applied.masks)
    for module, mask in learned.masks.items():
        assert torch.equal(mask, applied.masks[module])
    random_set = read_masks(out / "models" / "random" / "masks.safetensors")
    assert random_set.source == "random"
    assert any(not torch.equal(mask, random_set.masks[m]) for m, mask in learned.masks.items())


def test_the_curves_end_at_the_models_they_describe(demo):
    """The last FFT checkpoint is the FFT model, and the last MFT checkpoint's mask, taken through the mask
    layers, is the learned mask the streaming apply baked into models/mft: each curve ends at that model's
    held-out loss, to the bit. One point per checkpoint; the mask changes name every masked layer."""
    results = demo["results"]
    s, curves, models = results["settings"], results["curves"], results["models"]
    steps = math.ceil(s["n_train"] / s["batch_size"])  # per epoch: 4
    fft_every, mft_every = s["fft_curve_every"] * steps, s["mft_curve_every"] * steps
    assert [c["step"] for c in curves["fft"]] == list(range(fft_every, s["fft_epochs"] * steps + 1, fft_every))
    assert [c["step"] for c in curves["mft"]] == list(range(mft_every, s["mft_epochs"] * steps + 1, mft_every))
    assert curves["fft"][-1]["heldout_loss"] == models["fft"]["heldout_loss"]
    assert curves["mft"][-1]["heldout_loss"] == models["mft"]["heldout_loss"]
    assert [c["step"] for c in curves["mft_layer_changes"]] == [c["step"] for c in curves["mft"][1:]]
    for change in curves["mft_layer_changes"]:
        assert sorted(k for k in change if k != "step") == s["masked_layers"].split()
        assert all(0 <= change[layer] <= 1 for layer in s["masked_layers"].split())


def test_the_curves_refuse_a_checkpoint_with_other_scores(demo, tmp_path):
    """An MFT checkpoint whose scores are not those of the demo's masked matrices: a clear error naming it,
    before any held-out loss is computed."""
    import shutil

    from safetensors.torch import save_file

    from mft.demo.pipeline import training_curves
    from mft.demo.settings import Paths, Settings
    from mft.errors import MftError

    paths = Paths(tmp_path)
    shutil.copytree(demo["out"] / "models" / "fft", paths.model("fft"))
    checkpoint = paths.runs / "mft" / "checkpoints" / "step_4"
    checkpoint.mkdir(parents=True)
    save_file({"model.layers.0.self_attn.q_proj.scores": torch.zeros(64, 64)}, str(checkpoint / "model.safetensors"))
    settings = Settings(**demo["results"]["settings"])
    with pytest.raises(MftError, match=r"step_4 holds 1 tensors, not the scores of the 21 matrices the demo's mask "
                                        r"settings select \(layers 0 1 2\)"):
        training_curves(paths, None, settings, seed=1)


def test_the_same_seed_gives_the_same_results(demo, tmp_path):
    """results.json holds only what the seed decides: a second run must write it byte for byte again."""
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "mft", "demo", "--quick", "--output-dir", str(again), "--seed", "1",
                           "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not re.search(r"\d+% \d", proc.stderr), proc.stderr[-2000:]  # --quiet: no progress line at all
    assert (again / "results.json").read_text() == (demo["out"] / "results.json").read_text()
    assert (again / "results.md").read_text() == (demo["out"] / "results.md").read_text()


def test_quick_run_is_quick(demo):
    assert demo["seconds"] < 240, f"mft demo --quick took {demo['seconds']:.0f} s"  # ~1-2 min on 2 busy cores


def test_refuses_a_folder_that_is_not_a_demo_and_an_earlier_demo_without_overwrite(tmp_path, capsys, demo):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["demo", "--quick", "--output-dir", str(other)]) == 1
    assert "is not a demo output folder" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"
    assert main(["demo", "--quick", "--output-dir", str(demo["out"])]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (demo["out"] / "results.json").is_file()


def test_a_real_demo_of_a_model_inside_this_demo_folder_is_refused_with_overwrite(demo, capsys):
    """`mft demo --model OUT/models/fft --output-dir OUT --overwrite` on a tiny demo's folder: refused before
    anything is deleted (it used to delete OUT, the model with it, then fail to read the model)."""
    out = demo["out"]
    model = out / "models" / "fft"
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["demo", "--model", str(model), "--output-dir", str(out), "--overwrite", "--quick", "--quiet"]) == 1
    assert f"--output-dir {out} contains the model {model}: writing the output there would delete" in \
        capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
