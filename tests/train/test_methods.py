"""The training methods as records (`mft.train.methods`, issue 15): looked up once from the config, MFT's
after-step refresh and tracker on a real tiny model, and the loop holding no method tests of its own."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import mft.train.loop as loop_module
from mft.masking.inject import masked_modules
from mft.masking.rule import local_mask
from mft.tiny import tiny_model
from mft.train.config import load_config
from mft.train.methods import METHODS, MaskTracker, method_of


@pytest.fixture()
def base(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1 + 1?"},
                                             {"role": "assistant", "content": "2"}]}) + "\n")
    return ["--model_name_or_path=some/model", f"--train_file={data}", f"--output_dir={tmp_path / 'run'}"]


@pytest.mark.parametrize("extra, name, frozen", [
    ([], "fft", False),
    (["--use_lora"], "lora", True),
    (["--subnet_mode=attn", "--masked_layers=0 1"], "mft", True),
    (["--method=mft", "--masked_layers=0"], "mft", True),
])
def test_the_config_picks_one_record(base, extra, name, frozen):
    method = method_of(load_config(None, base + extra))
    assert method is METHODS[name] and method.name == name
    assert method.frozen_weights is frozen  # loaded in the training precision; no embedding rows added
    assert method.shard_optimizer_state is (name == "mft")
    assert (method.tracker is MaskTracker) is (name == "mft")
    assert ("mft apply --mask_model_name_or_path {out}" in method.next_step) is (name == "mft")


def test_mft_setup_after_step_and_tracker_on_a_tiny_model(base):
    """setup injects the masks; after a fused AdamW step (no version bump: the layers cannot notice), the
    method's after_step makes every mask the rule's for the new scores, and the tracker reports the flips."""
    cfg = load_config(None, base + ["--subnet_mode=both", "--masked_layers=1"])
    mft = METHODS["mft"]
    model, description = mft.setup(cfg, tiny_model("llama", vocab_size=100))
    layers = masked_modules(model)
    entries = sum(m.scores.numel() for m in layers.values())
    assert len(layers) == 7 and description == f"MFT: 7 masked matrices, {entries:,} scores"
    mft.after_step(model, False)
    tracker = mft.tracker(model)
    optimizer = torch.optim.AdamW([m.scores for m in layers.values()], lr=0.05, fused=True)
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    model(x, labels=x).loss.backward()
    optimizer.step()
    follows = [torch.equal(m.mask, local_mask(m.scores.detach(), 0.9)) for m in layers.values()]
    assert not all(follows)  # the premise: nothing noticed the step
    METHODS["fft"].after_step(model, False)  # FFT's after_step does nothing
    assert [torch.equal(m.mask, local_mask(m.scores.detach(), 0.9)) for m in layers.values()] == follows
    mft.after_step(model, False)
    for name, layer in layers.items():
        assert torch.equal(layer.mask, local_mask(layer.scores.detach(), 0.9)), name
    stats = tracker.stats()
    assert set(stats["kept_fraction"]) == {"1"} and stats["kept_fraction"]["1"] == pytest.approx(0.9, abs=0.002)
    # at most the 10 % pruned before and the 10 % pruned after differ
    assert 0 < stats["mask_changed"] == stats["mask_changed_per_layer"]["1"] <= 0.2


def test_the_loop_tests_no_method_and_train_fits_on_a_screen():
    """The method is looked up once: outside `_preflight` (the pre-flight selection check), loop.py compares
    nothing with a method name and never reads `resolved_method`; `train()` is a short list of named steps."""
    tree = ast.parse(Path(loop_module.__file__).read_text())
    found = []
    for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name != "_preflight"):
        for node in ast.walk(function):
            if isinstance(node, ast.Compare):
                names = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                found += [(function.name, v) for v in names if v in METHODS]
            if isinstance(node, ast.Attribute) and node.attr == "resolved_method":
                found.append((function.name, "resolved_method"))
    assert found == []
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 30
