"""The selection behind the local rule (`local_mask` / `local_masks`, issue 12) against the published rule
written literally: a stable ascending sort of |S| whose first `int((1 - k) * n)` entries are pruned.

Matrices here are above the direct-sort size (`_DIRECT`), so both methods run: "bracket" (CUDA's default,
run here on CPU tensors: the sampled bracket, the candidate sort, the fallback for a missed bracket) and
"radix" (the CPU's default); every comparison is of the whole mask, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mft.masking import layer as layer_module
from mft.masking import rule as rule_module
from mft.masking.config import MaskConfig
from mft.masking.inject import inject_masks, masked_modules, refresh_after_step
from mft.masking.layer import refresh_layers
from mft.masking.rule import _DIRECT, local_mask, local_masks, num_pruned
from mft.tiny import tiny_model


def sort_reference(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Published rule; bf16/fp16 widened to fp32 first (exact), so the reference sort is the fp32 one."""
    flat = scores.abs().flatten()
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.float()
    idx = flat.sort(stable=True).indices
    out = torch.ones(flat.shape, dtype=torch.bool)
    out[idx[:num_pruned(flat.numel(), keep_ratio)]] = False
    return out.view(scores.shape)


def with_special_values(flat: torch.Tensor) -> torch.Tensor:
    """`flat` (1-D, float) with zeros, negative zeros, a denormal, +-inf and NaN written in at fixed strides
    (in place; returned): the values a selection must order exactly as a stable sort does."""
    flat[::7] = 0.0
    flat[3::11] = -0.0
    flat[5::13] = 1e-45
    flat[6::17] = float("inf")
    flat[8::19] = float("-inf")
    flat[9::23] = float("nan")
    return flat


def _distributions(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    normal = torch.randn(n, generator=generator) * 0.02
    special = with_special_values(torch.randn(n, generator=generator))
    signed_zeros = torch.zeros(n)
    signed_zeros[::2] = -0.0
    signed_zeros[n // 2:] = torch.randn(n - n // 2, generator=generator)
    return {
        "normal(0, 0.02)": normal,
        "all equal": torch.full((n,), -0.25),
        "few distinct": torch.randint(-3, 4, (n,), generator=generator).float() * 0.01,
        "zeros and signed zeros": signed_zeros,
        "special values": special,
        "sorted ascending": normal.abs().sort().values,
        "sorted descending": normal.abs().sort(descending=True).values,
    }


@pytest.mark.parametrize("method", ["bracket", "radix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bracketed_selection_equals_the_stable_sort(dtype, method):
    g = torch.Generator().manual_seed(12)
    for name, flat in _distributions(2 * _DIRECT + 17, g).items():
        scores = flat.to(dtype).view(-1, 1)  # (n, 1): odd shapes are fine
        for keep in (0.9, 0.999, 0.001):
            mask = local_masks([scores], [keep], method=method)[0]
            assert mask.dtype == torch.bool and mask.shape == scores.shape
            expected = sort_reference(scores, keep)
            assert torch.equal(mask, expected), (name, keep)
            assert int((~mask).sum()) == num_pruned(scores.numel(), keep), (name, keep)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_score_dtypes(dtype):
    g = torch.Generator().manual_seed(3)
    scores = (torch.randn(300, 400, generator=g, dtype=torch.float64) * 0.02).to(dtype)
    for keep in (0.9, 0.1):
        assert torch.equal(local_mask(scores, keep), sort_reference(scores, keep))


def test_sizes_around_the_direct_and_sample_edges():
    g = torch.Generator().manual_seed(5)
    # _DIRECT: last direct sort; +1: first bracketed; 256 * 2**14 +- 1: where the sample size starts growing
    for n in (_DIRECT - 1, _DIRECT, _DIRECT + 1, 2 * _DIRECT - 1, 2 * _DIRECT + 1, 256 * 2**14 // 64):
        scores = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
        for keep in (0.9, 1 - 1 / n, 1 / n):
            for method in ("bracket", "radix"):
                assert torch.equal(local_masks([scores], [keep], method=method)[0], sort_reference(scores, keep)), \
                    (n, keep, method)


@pytest.mark.parametrize("dtype,nans", [(torch.bfloat16, (0x7FC0, 0x7FFF, -0x3F)),  # -0x3F: 0xFFC1
                                         (torch.float32, (0x7FC00000, 0x7FFFFFFF, -0x3FFFFF))])
def test_nans_with_different_payloads_tie_as_in_the_sort(dtype, nans):
    # torch.sort puts every NaN last and keeps their index order; their bits (payload, sign) must not matter
    n = 2 * _DIRECT + 1
    int_dtype = torch.int16 if dtype == torch.bfloat16 else torch.int32
    scores = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype)
    bits = scores.view(int_dtype)
    for offset, nan in enumerate(nans):
        bits[offset::5] = nan
    assert int(scores.isnan().sum()) > n // 2
    for keep in (0.001, 0.3, 0.55, 0.9):  # the cut-off among the NaNs, and below them
        assert torch.equal(local_mask(scores, keep), sort_reference(scores, keep)), keep
        assert torch.equal(local_masks([scores], [keep], method="bracket")[0], sort_reference(scores, keep)), keep


def test_cut_off_inside_a_long_run_of_ties_follows_row_major_order():
    # 40 % zeros then ones, interleaved: the cut-off (j = 10 % of n) lies inside the zeros
    n = 4 * _DIRECT
    scores = torch.ones(n)
    scores[::5] = 0.0
    scores[1::5] = -0.0
    j = num_pruned(n, 0.9)
    zero_positions = (scores == 0).nonzero().squeeze(1)
    for method in ("bracket", "radix"):
        mask = local_masks([scores], [0.9], method=method)[0]
        assert torch.equal((~mask).nonzero().squeeze(1), zero_positions[:j]), method  # the first j zeros


def test_a_missed_bracket_falls_back_to_the_sort(monkeypatch):
    # Adversarial for a strided sample: every sampled entry (multiples of the stride) is large, the rest
    # tiny, so the sample puts the bracket far above the true cut-off.
    n = 4 * _DIRECT
    stride = n // rule_module._SAMPLE[0]
    scores = torch.full((n,), 1e-3)
    scores[::stride] = 5.0
    scores[1::3] = 2e-3
    calls = []
    real = rule_module._sorted_mask
    monkeypatch.setattr(rule_module, "_sorted_mask", lambda key, j: calls.append(key.numel()) or real(key, j))
    for keep in (0.9, 0.5):
        assert torch.equal(local_masks([scores], [keep], method="bracket")[0], sort_reference(scores, keep)), keep
    assert calls == [n, n]  # the fallback ran, once per call, over the whole matrix


def test_batched_selection_equals_one_at_a_time():
    g = torch.Generator().manual_seed(9)
    scores = [torch.randn(257, 301, generator=g) * 0.02, torch.randn(64, 64, generator=g),
              (torch.randn(700, 130, generator=g) * 0.02).to(torch.bfloat16), torch.zeros(5, 5),
              torch.randn(1, 70000, generator=g)]
    keeps = [0.9, 0.5, 0.75, 0.9, 1.0]
    masks = local_masks(scores, keeps)
    assert len(masks) == 5
    for s, k, m in zip(scores, keeps, masks):
        assert torch.equal(m, sort_reference(s, k))
        assert torch.equal(m, local_mask(s, k))
    assert bool(masks[4].all())  # keep 1.0 prunes nothing
    assert local_masks([], []) == []
    assert not local_mask(torch.randn(40000), 0.0).any()  # keep 0: everything pruned


def test_bad_input_is_refused_before_any_work():
    with pytest.raises(ValueError, match="2 score tensors but 1 keep ratios"):
        local_masks([torch.zeros(3), torch.zeros(3)], [0.5])
    with pytest.raises(ValueError, match=r"tensor 1 is torch.int32"):
        local_masks([torch.zeros(3), torch.zeros(3, dtype=torch.int32)], [0.5, 0.5])
    with pytest.raises(ValueError, match="unknown selection method 'kth'"):
        local_masks([torch.zeros(3)], [0.5], method="kth")


class _HostReads(TorchFunctionMode):
    """Records the tensor operations that read device values on the host (a synchronisation on CUDA)."""

    READS = ("tolist", "item", "__bool__", "__int__", "__index__", "__float__", "nonzero")

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.READS or name == "nonzero_static":
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_one_host_read_for_all_matrices(monkeypatch):
    # This machine has no GPU: CUDA's default path is taken on CPU tensors by answering "not on the CPU" to
    # the one per-device switch (the CPU's radix path reads counts per matrix: free there).
    monkeypatch.setattr(rule_module, "_on_cpu", lambda t: False)
    g = torch.Generator().manual_seed(4)
    scores = [torch.randn(300, 400, generator=g) * 0.02 for _ in range(5)]
    scores += [(torch.randn(500, 300, generator=g) * 0.02).to(torch.bfloat16) for _ in range(2)]
    with _HostReads() as spy:
        masks = local_masks(scores, [0.9] * 5 + [0.5] * 2)
    for s, k, m in zip(scores, [0.9] * 5 + [0.5] * 2, masks):
        assert torch.equal(m, sort_reference(s, k))
    assert spy.reads == ["tolist"] + ["nonzero_static"] * 7  # the counts of all 7 matrices come over in one read


def two_masked_layers(monkeypatch, measure):
    """(model, its mask layers, calls): a 2-layer Llama masked at both layers, and `measure(scores)` of every
    call of the batched selection `mft.masking.rule.local_masks` from now on, in order."""
    model = tiny_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=176, vocab_size=128)
    inject_masks(model, MaskConfig(masked_layers=[0, 1]), seed=0, refreshed_by_caller=True)
    calls = []
    real = rule_module.local_masks
    monkeypatch.setattr(rule_module, "local_masks",
                        lambda scores, keeps, method=None: calls.append(measure(scores)) or real(scores, keeps, method))
    return model, masked_modules(model), calls


def test_refresh_after_a_step_selects_every_layer_in_one_batch(monkeypatch):
    model, layers, calls = two_masked_layers(monkeypatch, len)
    optimizer = torch.optim.SGD([m.scores for m in layers.values()], lr=1.0)
    refresh_after_step(optimizer)  # the opt-in hook that groups the stepped layers
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for step in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model(input_ids=ids, labels=ids)
    # the first forward: one call per layer (lazy, no group yet); after each of the 2 steps: one batched call
    assert calls == [1] * len(layers) + [len(layers)] * 2
    for name, layer in layers.items():
        assert layer.mask_updates == 3, name
        assert torch.equal(layer.mask, sort_reference(layer.scores.detach(), 0.9)), name


def test_refresh_masks_batches_within_the_entry_budget(monkeypatch):
    model, layers, calls = two_masked_layers(monkeypatch, lambda scores: sum(s.numel() for s in scores))
    monkeypatch.setattr(layer_module, "_BATCH_ENTRIES", 3 * 64 * 176)
    seen = []
    refresh_layers(list(layers.values()), lambda p: seen.append(p) or p.detach() * 2, budget=3 * 64 * 176)
    assert seen == [m.scores for m in layers.values()]  # full_scores: once per layer, in model order
    assert sum(calls) == sum(m.scores.numel() for m in layers.values())
    assert max(calls) <= 3 * 64 * 176 and len(calls) > 1
    for name, layer in layers.items():
        assert torch.equal(layer.mask, sort_reference(layer.scores.detach(), 0.9)), name
