"""The fast paths of the mask layer give exactly what the plain definitions give (equality, never time).

- `local_mask` selects the cut-off with a radix pass + `kthvalue` in one bucket: it must equal the stable
  sort of |S| in every case, ties, signed zeros, infinities, NaN and every score dtype included.
- `MaskedLinear` caches `W * M` between optimizer steps: outputs and score gradients must be bit-identical
  to the layer computing `W * M` in every forward, and the cache must follow every change of W or M.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mft.masking.config import MaskConfig
from mft.masking.inject import extract_masks, inject_masks, masked_modules
from mft.masking.layer import MaskedLinear
from mft.masking.rule import local_mask
from mft.tiny import tiny_model

from tests.masking.test_selection import with_special_values


def sort_reference(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    flat = scores.abs().flatten()
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.float()
    _, idx = flat.sort(stable=True)
    j = int((1 - keep_ratio) * flat.numel())
    out = torch.ones(flat.shape, dtype=torch.bool)
    out[idx[:j]] = False
    return out.view(scores.shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 and 0.0 (equal under torch.equal) count as different."""
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keep", [0.9, 0.5, 0.37, 0.999, 0.01])
def test_radix_selection_equals_the_stable_sort(dtype, keep):
    g = torch.Generator().manual_seed(7)
    for shape, scale in (((300, 257), 0.02), ((64, 64), 1.0), ((1, 5000), 1e-30), ((513, 3), 1e30)):
        scores = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        assert torch.equal(local_mask(scores, keep), sort_reference(scores, keep)), (shape, scale)


def test_radix_selection_with_ties_zeros_infinities_and_nan():
    g = torch.Generator().manual_seed(0)
    # few distinct values: the cut-off bucket is one value shared by thousands of entries
    few = torch.randint(-3, 4, (100, 100), generator=g).float()
    # signed zeros, denormals, infinities and NaN mixed in
    special = torch.randn(40, 50, generator=g)
    with_special_values(special.view(-1))
    equal = torch.full((30, 30), -0.5)
    for scores in (few, special, equal, torch.zeros(10, 10)):
        for keep in (0.99, 0.9, 0.75, 0.5, 0.2, 0.05):
            assert torch.equal(local_mask(scores, keep), sort_reference(scores, keep)), keep


def test_radix_selection_at_bucket_edges():
    # cut-off exactly at the first / last entry of a bucket (the top 16 bits change between neighbours)
    base = torch.tensor([1.0, 1.0 + 2**-7, 2.0, 4.0]).repeat_interleave(25)
    for keep in [1 - i / 100 for i in range(1, 100)]:
        perm = base[torch.randperm(100, generator=torch.Generator().manual_seed(int(keep * 1000)))]
        assert torch.equal(local_mask(perm, keep), sort_reference(perm, keep)), keep


def _pair(dtype=torch.float32, score_dtype="float32"):
    layers = []
    for cache in (True, False):
        torch.manual_seed(0)
        linear = nn.Linear(48, 40).to(dtype)
        linear.weight.requires_grad_(False)
        linear.bias.requires_grad_(False)
        layer = MaskedLinear(linear, "mlp", keep_ratio=0.8, score_dtype=score_dtype)
        layer.init_scores("normal", generator=torch.Generator().manual_seed(1))
        layer.cache_masked_weight = cache
        layers.append(layer)
    return layers


@pytest.mark.parametrize("dtype,score_dtype", [(torch.float32, "float32"), (torch.bfloat16, "float32"),
                                               (torch.bfloat16, "bfloat16"), (torch.float32, "bfloat16")])
def test_cached_masked_weight_is_bit_identical(dtype, score_dtype):
    cached, plain = _pair(dtype, score_dtype)
    opts = [torch.optim.AdamW([m.scores], lr=0.05) for m in (cached, plain)]
    g = torch.Generator().manual_seed(2)
    for _ in range(4):  # optimizer steps, 3 micro-batches each: the cache is reused and then renewed
        for _ in range(3):
            x = torch.randn(5, 7, 48, generator=g).to(dtype)
            outs = [m(x) for m in (cached, plain)]
            assert torch.equal(bits(outs[0]), bits(outs[1]))
            assert cached._cached is not None and plain._cached is None
            for out in outs:
                (out.float() ** 2).mean().backward()
            assert torch.equal(bits(cached.scores.grad), bits(plain.scores.grad))
        for opt in opts:
            opt.step()
            opt.zero_grad()
        assert torch.equal(cached.mask, plain.mask)
    assert cached.mask_updates == plain.mask_updates == 5


def test_cached_masked_weight_follows_weight_and_mask_changes():
    layer, _ = _pair()
    x = torch.randn(3, 48)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: the version counter moves
    assert torch.equal(layer(x), F.linear(x, layer.weight * layer.mask, layer.bias))
    pinned = torch.rand(40, 48) < 0.5
    layer.set_mask(pinned)
    assert torch.equal(layer(x), F.linear(x, layer.weight * pinned, layer.bias))
    pinned[:, :10] = False  # the pinned tensor itself edited in place
    assert torch.equal(layer(x), F.linear(x, layer.weight * pinned, layer.bias))
    layer.weight.requires_grad_(True)  # trainable weights take the general path (gradient to W too)
    layer(x).sum().backward()
    assert layer._cached is None and torch.equal(layer.weight.grad, (torch.ones(3, 40).T @ x) * pinned)


def test_no_autograd_below_the_lowest_masked_layer():
    model = tiny_model("llama", vocab_size=100, num_layers=4)
    inject_masks(model, MaskConfig(masked_layers=[2]), seed=0)
    seen = {}
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(
            i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    x = torch.randint(0, 100, (2, 9))
    model(x, labels=x).loss.backward()
    assert seen == {0: False, 1: False, 2: True, 3: True}
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(".scores"))
    assert set(extract_masks(model)) == set(masked_modules(model))


def test_masked_weight_is_recomputed_in_backward_not_kept(monkeypatch):
    """Without the cache, W * M is freed after the forward (autograd keeps a recipe) and rebuilt in the
    backward: same gradients as the cached layer, one weight-sized tensor less held per masked matrix."""
    import gc
    import weakref

    from mft.masking import layer as L

    kept = []
    apply = L._MaskedWeight.apply

    def recording_apply(*args):
        out = apply(*args)
        kept.append(weakref.ref(out))
        return out

    monkeypatch.setattr(L._MaskedWeight, "apply", recording_apply)
    made = []
    make = L._Recompute.make
    monkeypatch.setattr(L._Recompute, "make", lambda self: made.append(1) or make(self))

    cached, fresh = _pair()
    x = torch.randn(3, 5, 48, requires_grad=True)
    out = fresh(x)
    gc.collect()
    assert kept and kept[-1]() is None, "W * M outlived the forward"
    out.square().sum().backward()
    assert len(made) == 1
    cached(x).square().sum().backward()
    assert bits(fresh.scores.grad).equal(bits(cached.scores.grad))
