"""The mask layer against the published definition: the sort-based mask, the STE gradient, the cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mft.masking.config import MaskConfig
from mft.errors import MftError
from mft.masking.inject import (bake_masks, extract_masks, inject_masks, load_masks_into, masked_modules,
                                refresh_after_step, remove_masks)
from mft.masking.layer import MaskedLinear
from mft.masking.rule import global_mask, local_mask, num_pruned
from mft.tiny import tiny_model


def sort_reference(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """The published rule, literally: sort |S|, zero the first int((1 - k) * n), one the rest."""
    flat = scores.abs().flatten()
    _, idx = flat.sort(stable=True)
    j = int((1 - keep_ratio) * flat.numel())
    out = torch.ones_like(flat)
    out[idx[:j]] = 0
    return out.view(scores.shape).bool()


@pytest.mark.parametrize("shape", [(7, 13), (64, 32), (1, 1), (3, 1000), (257, 33)])
@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1, 0.999, 1.0, 0.37])
def test_local_mask_equals_sort_reference(shape, keep):
    g = torch.Generator().manual_seed(hash((shape, keep)) % 2**31)
    scores = torch.randn(shape, generator=g)
    mask = local_mask(scores, keep)
    assert torch.equal(mask, sort_reference(scores, keep))
    assert int((~mask).sum()) == int((1 - keep) * scores.numel())


def test_pruned_count_uses_published_float_arithmetic():
    # (1 - 0.9) * 10 = 0.9999999999999998 -> int() = 0: the published code prunes nothing here.
    assert num_pruned(10, 0.9) == 0
    assert num_pruned(100, 0.9) == 9  # 9.999999999999998
    assert num_pruned(4096 * 4096, 0.9) == int((1 - 0.9) * 4096 * 4096) == 1677721


def test_ties_follow_the_stable_sort_rule():
    # bf16 scores tie constantly: many entries share the cut-off value.
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(50, 40, generator=g) * 0.02).to(torch.bfloat16)
    values, counts = scores.abs().flatten().unique(return_counts=True)
    assert counts.max() > 1
    for keep in (0.9, 0.75, 0.5):
        assert torch.equal(local_mask(scores, keep), sort_reference(scores.float(), keep))
    # All equal: the lowest row-major indices are pruned first (int((1 - 0.7) * 10) = 3 of them).
    flat = local_mask(torch.ones(2, 5), 0.7).flatten()
    assert flat.tolist() == [False, False, False, True, True, True, True, True, True, True]
    # Signs do not matter, magnitudes do; -0.0 and 0.0 tie.
    s = torch.tensor([[-0.0, 0.0, -3.0, 2.0, -1.0]])
    assert local_mask(s, 0.6).tolist() == [[False, False, True, True, True]]


def test_global_mask_is_signed_threshold():
    s = torch.tensor([[-0.5, 0.0, 0.2, 0.7]])
    assert global_mask(s, 0.0).tolist() == [[False, True, True, True]]
    assert global_mask(s, 0.3).tolist() == [[False, False, False, True]]


def _make_layer(keep=0.9, dtype=torch.float32, score_dtype="float32", bias=True):
    torch.manual_seed(0)
    linear = nn.Linear(24, 16, bias=bias).to(dtype)
    layer = MaskedLinear(linear, "attn", "local", keep, score_dtype=score_dtype)
    layer.init_scores("normal", generator=torch.Generator().manual_seed(1))
    return linear, layer


def test_wrapper_references_the_weight_never_copies_it():
    linear, layer = _make_layer()
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "scores"}
    assert layer.scores.shape == linear.weight.shape and layer.scores.dtype == torch.float32
    assert layer.unwrap(bake=False) is linear


def test_forward_is_linear_with_masked_weight():
    linear, layer = _make_layer()
    x = torch.randn(5, 24)
    mask = sort_reference(layer.scores.detach(), 0.9)
    assert torch.equal(layer(x), F.linear(x, linear.weight * mask, linear.bias))
    _, full = _make_layer(keep=1.0)
    assert torch.equal(full(x), F.linear(x, full.weight, full.bias))


def test_gradient_is_the_published_straight_through_formula():
    linear, layer = _make_layer()
    layer.weight.requires_grad_(False)
    x = torch.randn(6, 24)
    target = torch.randn(6, 16)
    F.mse_loss(layer(x), target).backward()

    # dL/dW_eff, from a reference graph where W_eff is a leaf.
    w_eff = (linear.weight * layer.mask).detach().requires_grad_()
    F.mse_loss(F.linear(x, w_eff, linear.bias), target).backward()
    expected = (w_eff.grad * linear.weight) * layer.scores.detach().sign()
    assert torch.equal(layer.scores.grad, expected)

    # ... and equal to the original implementation's autograd graph: M = GetSubnet(|S|), STE backward.
    class GetSubnet(torch.autograd.Function):
        @staticmethod
        def forward(ctx, magnitude, k):
            return sort_reference(magnitude, k).to(magnitude.dtype)

        @staticmethod
        def backward(ctx, g):
            return g, None

    s = layer.scores.detach().clone().requires_grad_()
    F.mse_loss(F.linear(x, linear.weight * GetSubnet.apply(s.abs(), 0.9), linear.bias), target).backward()
    assert torch.equal(layer.scores.grad, s.grad)
    assert layer.weight.grad is None


def test_fp32_scores_on_a_bf16_model():
    _, layer = _make_layer(dtype=torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.scores.dtype == torch.float32
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    assert layer.scores.grad.dtype == torch.float32
    _, bf16 = _make_layer(dtype=torch.bfloat16, score_dtype="bfloat16")
    assert bf16.scores.dtype == torch.bfloat16


def test_score_initialisations():
    linear, layer = _make_layer()
    s = layer.scores.detach()
    assert abs(s.std().item() - 0.02) < 0.004 and abs(s.mean().item()) < 0.005
    layer.init_scores("kaiming_uniform", generator=torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(24)
    assert layer.scores.abs().max() <= bound and layer.scores.abs().max() > 0.9 * bound
    layer.init_scores("magnitude")
    assert torch.equal(layer.scores.detach(), linear.weight.detach().abs())
    assert torch.equal(layer.mask, local_mask(linear.weight.detach(), 0.9))


def _train(model, steps, accum, per_forward, fused, seed=0):
    """A few AdamW steps with gradient accumulation; per_forward forces a recompute before every forward."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05,
                            fused=fused, foreach=None if fused else True)
    refresh_after_step(opt)  # fused AdamW steps the scores without bumping their version counter
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        for _ in range(accum):
            if per_forward:
                for layer in masked_modules(model).values():
                    layer.invalidate()
            x = torch.randint(0, 100, (2, 12), generator=g)
            (model(x, labels=x).loss / accum).backward()
        opt.step()
        opt.zero_grad()
        history.append({k: v.clone() for k, v in extract_masks(model).items()})
    return history


@pytest.mark.parametrize("fused", [True, False])
def test_cached_masks_equal_per_forward_masks_across_steps(fused):
    runs = {}
    for per_forward in (False, True):
        torch.manual_seed(0)
        model = tiny_model("llama", vocab_size=100)
        inject_masks(model, MaskConfig(masked_layers=[1, 2]), seed=3)
        runs[per_forward] = (model, _train(model, steps=4, accum=3, per_forward=per_forward, fused=fused))
    (cached, hist_cached), (fresh, hist_fresh) = runs[False], runs[True]
    changed = 0
    for step_cached, step_fresh in zip(hist_cached, hist_fresh):
        for name in step_cached:
            assert torch.equal(step_cached[name], step_fresh[name])
    for name in hist_cached[0]:
        changed += int((hist_cached[0][name] != hist_cached[-1][name]).sum())
    assert changed > 0, "the lr is large enough that the masks move; otherwise the test proves little"
    for (n1, p1), (n2, p2) in zip(cached.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p1, p2), n1
    # Cached: one computation at the start, then one per optimizer step (the last one at extract time).
    layer = masked_modules(cached)["model.layers.1.self_attn.q_proj"]
    assert layer.mask_updates == 1 + 4
    assert masked_modules(fresh)["model.layers.1.self_attn.q_proj"].mask_updates > 4 * 3


def test_mft_freezes_everything_but_scores_and_keeps_weights():
    model = tiny_model("qwen2", vocab_size=100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inject_masks(model, MaskConfig(masked_layers=[0, 3], subnet_mode="mlp"), seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".scores") for n in trainable)
    assert all(".mlp." in n and (".0." in n or ".3." in n) for n in trainable)
    _train(model, steps=2, accum=1, per_forward=False, fused=True)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_bake_and_remove():
    model = tiny_model("llama", vocab_size=100)
    inject_masks(model, MaskConfig(masked_layers=[2], keep_ratio_attn=0.5, keep_ratio_mlp=0.8), seed=0)
    masks = extract_masks(model)
    x = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        masked_logits = model(x).logits
    originals = {n: m.weight.detach().clone() for n, m in masked_modules(model).items()}
    bake_masks(model)
    assert not masked_modules(model)
    assert all(".scores" not in k for k in model.state_dict())
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert type(model.get_submodule(name)) is nn.Linear
        assert torch.equal(w, originals[name] * mask)
        assert bool((w[~mask] == 0).all()) and not torch.signbit(w[~mask]).any()  # exact +0.0
    with torch.no_grad():
        assert torch.allclose(model(x).logits, masked_logits, atol=1e-6)
    assert abs(float(masks["model.layers.2.self_attn.q_proj"].float().mean()) - 0.5) < 1e-9

    model2 = tiny_model("llama", vocab_size=100)
    ref = {k: v.clone() for k, v in model2.state_dict().items()}
    inject_masks(model2, MaskConfig(masked_layers=[2]), seed=0)
    remove_masks(model2)
    assert all(torch.equal(v, ref[k]) for k, v in model2.state_dict().items())


def test_load_masks_into_pins_given_masks_and_refuses_foreign_ones():
    model = tiny_model("llama", vocab_size=100)
    inject_masks(model, MaskConfig(masked_layers=[1]), seed=0)
    layers = masked_modules(model)
    g = torch.Generator().manual_seed(1)
    given = {n: torch.rand(m.scores_shape, generator=g) < 0.5 for n, m in layers.items()}
    load_masks_into(model, given)
    assert all(torch.equal(extract_masks(model)[n], given[n]) for n in given)  # not the scores' own masks
    name = "model.layers.1.mlp.up_proj"
    x = torch.randn(3, layers[name].weight.shape[1])
    with torch.no_grad():
        assert torch.equal(layers[name](x), F.linear(x, layers[name].weight * given[name]))

    with pytest.raises(MftError, match=r"model.layers.1.mlp.up_proj has shape \(3, 3\) but the model has"):
        load_masks_into(model, {name: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(MftError, match="which the model does not have"):
        load_masks_into(model, {"model.layers.5.mlp.up_proj": given[name]})


def test_importing_mft_registers_no_global_optimizer_hook():
    """Importing the package changes no process-wide state: torch's global optimizer hook dicts are the same
    before and after importing every module that touches the mask layer and the training loop."""
    import json
    import subprocess
    import sys

    script = (
        "import json, torch.optim.optimizer as o\n"
        "before = [len(o._global_optimizer_pre_hooks), len(o._global_optimizer_post_hooks)]\n"
        "import mft, mft.cli, mft.masking.layer, mft.masking.inject, mft.masking.apply, mft.masking.rule\n"
        "import mft.train.loop\n"
        "print(json.dumps({'before': before,\n"
        "                  'after': [len(o._global_optimizer_pre_hooks), len(o._global_optimizer_post_hooks)]}))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["after"] == counts["before"], counts


def test_refresh_after_step_hooks_that_optimizer_only(monkeypatch):
    """Fused AdamW steps the scores without bumping their version counter, so without a hook the masks stay
    those of the old scores; `refresh_after_step(optimizer)` hooks that optimizer (not torch globally): after
    each of its steps every mask is the rule's for the new scores, all layers selected in one batch."""
    import torch.optim.optimizer as optimizer_module

    from mft.masking import rule as rule_module

    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=100)
    inject_masks(model, MaskConfig(masked_layers=[1, 2]), seed=3)
    layers = masked_modules(model)
    scores = [m.scores for m in layers.values()]
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))

    def step(opt):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        model(x, labels=x)  # the forward after the step reads every mask

    def follow_the_scores():
        return [torch.equal(m.mask, sort_reference(m.scores.detach(), 0.9)) for m in layers.values()]

    hooked = torch.optim.AdamW(scores, lr=0.05, fused=True)
    other = torch.optim.AdamW(scores, lr=0.05, fused=True)
    step(hooked)
    assert not all(follow_the_scores())  # the premise: fused steps go unnoticed without the hook
    global_hooks = len(optimizer_module._global_optimizer_post_hooks)
    handle = refresh_after_step(hooked)
    assert len(optimizer_module._global_optimizer_post_hooks) == global_hooks
    assert len(hooked._optimizer_step_post_hooks) == 1 and not other._optimizer_step_post_hooks
    calls = []
    real = rule_module.local_masks
    monkeypatch.setattr(rule_module, "local_masks", lambda s, k, method=None: calls.append(len(s)) or real(s, k, method))
    updates = [m.mask_updates for m in layers.values()]
    for _ in range(2):
        step(hooked)
        assert all(follow_the_scores())
    assert calls == [len(layers)] * 2  # one batched selection of all 14 matrices per step
    assert [m.mask_updates for m in layers.values()] == [u + 2 for u in updates]
    step(other)  # not hooked: its step goes unnoticed
    assert not all(follow_the_scores())
    handle.remove()
    step(hooked)  # unhooked again
    assert not all(follow_the_scores())


def test_refresh_after_step_unwraps_accelerates_optimizer():
    """break9 #2: the optimizer `accelerator.prepare` returns (AcceleratedOptimizer) is hooked through the torch
    optimizer it wraps, and the masks follow a fused step; anything that is no optimizer is a TypeError."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=100)
    inject_masks(model, MaskConfig(masked_layers=[1]), seed=3, refreshed_by_caller=True)
    layers = masked_modules(model)
    raw = torch.optim.AdamW([m.scores for m in layers.values()], lr=0.05, fused=True)
    try:
        model, opt = Accelerator(cpu=True).prepare(model, raw)
        assert type(opt).__name__ == "AcceleratedOptimizer"
        refresh_after_step(opt)
        assert len(raw._optimizer_step_post_hooks) == 1
        x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
        model(x, labels=x).loss.backward()
        opt.step()
        model(x, labels=x)
        assert all(torch.equal(m.mask, sort_reference(m.scores.detach(), 0.9)) for m in layers.values())
    finally:  # accelerate's state is process-wide: leave none behind for later tests' Accelerators
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    with pytest.raises(TypeError, match="refresh_after_step needs a torch.optim.Optimizer .*not list"):
        refresh_after_step([])


def test_injecting_masks_warns_that_your_loop_must_refresh_them():
    """break9 #1: in your own loop, a fused optimizer's steps leave the masks unchanged unless the loop asks for
    the refresh: `inject_masks` says so (a UserWarning naming refresh_after_step), except for callers that
    refresh themselves (`mft train`)."""
    import warnings

    with pytest.warns(UserWarning, match=r"refresh_after_step\(optimizer\)"):
        inject_masks(tiny_model("llama", vocab_size=100), MaskConfig(masked_layers=[1]), seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_masks(tiny_model("llama", vocab_size=100), MaskConfig(masked_layers=[1]), seed=3,
                     refreshed_by_caller=True)
