"""The mask rule in one module (`mft.masking.rule`, issue 15): `compute_mask` is the local / global dispatch
for every weight layout, `compute_masks` selects all local matrices at once with the same bits, and the
callers (mask layers, masks from an original checkpoint) give what the rule gives."""

from __future__ import annotations

import pytest
import torch

from mft.masking import rule as rule_module
from mft.masking.apply import masks_from_scores_checkpoint
from mft.masking.checkpoint import Checkpoint
from mft.masking.config import MaskConfig
from mft.masking.inject import extract_masks, inject_masks, masked_modules
from mft.masking.rule import MaskRule, compute_mask, compute_masks, num_pruned, per_matrix_local_mask
from mft.masking.select import layer_index
from mft.tiny import tiny_model


def sort_reference(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """The published rule on one [out, in] matrix, literally: stable sort of |S|, prune the first int((1-k) n)."""
    flat = scores.abs().flatten()
    out = torch.ones(flat.shape, dtype=torch.bool)
    out[flat.sort(stable=True).indices[:num_pruned(flat.numel(), keep_ratio)]] = False
    return out.view(scores.shape)


def test_local_rule_prunes_each_matrix_of_each_layout_on_its_own():
    g = torch.Generator().manual_seed(0)
    local = MaskRule("local", 0.7)
    linear = torch.randn(12, 20, generator=g)
    mask = compute_mask(linear, local)
    assert torch.equal(mask, sort_reference(linear, 0.7)) and int((~mask).sum()) == 72  # int(0.3 * 240)
    conv = torch.randn(20, 12, generator=g)  # Conv1D [in, out]: the matrix is its transpose
    assert torch.equal(compute_mask(conv, local, "conv1d"), sort_reference(conv.t(), 0.7).t())
    experts = torch.randn(3, 8, 5, generator=g)  # [E, 2I, H], gate rows [:4], up rows [4:]
    mask = compute_mask(experts, local, "experts", "halves")
    for e in range(3):
        assert torch.equal(mask[e, :4], sort_reference(experts[e, :4], 0.7)), e
        assert torch.equal(mask[e, 4:], sort_reference(experts[e, 4:], 0.7)), e
    assert int((~mask).sum()) == 3 * 2 * 6  # int(0.3 * 20) per matrix: 6 matrices
    experts_t = torch.randn(3, 5, 8, generator=g)  # [E, H, 2I], gate / up interleaved (gpt-oss)
    mask = compute_mask(experts_t, local, "experts_t", "interleaved")
    for e in range(3):
        assert torch.equal(mask[e].t()[0::2], sort_reference(experts_t[e].t()[0::2], 0.7)), e
        assert torch.equal(mask[e].t()[1::2], sort_reference(experts_t[e].t()[1::2], 0.7)), e
    assert torch.equal(per_matrix_local_mask(experts, 0.7, "experts", "halves"),
                       compute_mask(experts, local, "experts", "halves"))


def test_global_rule_is_the_signed_threshold_whatever_the_layout():
    scores = torch.tensor([[[-0.5, 0.1], [0.2, 0.09]], [[0.0, 0.3], [-0.1, 0.1]]])
    rule = MaskRule("global", keep_ratio=0.5, threshold=0.1)  # the keep ratio plays no part
    expected = [[[False, True], [True, False]], [[False, True], [False, True]]]
    assert compute_mask(scores, rule).tolist() == expected
    assert compute_mask(scores, rule, "experts", "halves").tolist() == expected


def test_batched_masks_equal_one_at_a_time_with_one_selection_call(monkeypatch):
    g = torch.Generator().manual_seed(1)
    weights = [(torch.randn(12, 20, generator=g), MaskRule("local", 0.9), "linear", None),
               (torch.randn(3, 8, 5, generator=g), MaskRule("local", 0.5), "experts", "halves"),
               (torch.randn(6, 6, generator=g), MaskRule("global", threshold=0.2), "linear", None),
               (torch.randn(20, 12, generator=g).to(torch.bfloat16), MaskRule("local", 0.8), "conv1d", None)]
    single = [compute_mask(*w) for w in weights]
    calls = []
    real = rule_module.local_masks
    monkeypatch.setattr(rule_module, "local_masks",
                        lambda scores, keeps, method=None: calls.append(list(keeps)) or real(scores, keeps, method))
    batched = compute_masks(*zip(*weights))
    assert calls == [[0.9] + [0.5] * 6 + [0.8]]  # 1 + 3 experts x 2 halves + 1 local matrices, one call
    assert len(batched) == 4
    for got, want in zip(batched, single):
        assert got.dtype == torch.bool and torch.equal(got, want)
    assert compute_masks([], []) == []


def test_bad_rules_and_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown subnet_type 'topk'; expected local or global"):
        MaskRule("topk", 0.9)
    with pytest.raises(ValueError, match="2 score tensors, 1 rules, 2 layouts and 2 splits"):
        compute_masks([torch.zeros(2, 2)] * 2, [MaskRule()])
    with pytest.raises(ValueError, match="unknown weight layout 'rows'"):
        compute_mask(torch.zeros(2, 2), MaskRule(), "rows")


def test_mask_config_gives_the_rule_per_kind():
    cfg = MaskConfig(masked_layers=[1], subnet_type="global", keep_ratio_attn=0.8, threshold_attn=0.1,
                     threshold_mlp=-0.2)
    assert cfg.rule("attn") == MaskRule("global", 0.8, 0.1)
    assert cfg.rule("mlp") == MaskRule("global", 0.9, -0.2)
    published = MaskConfig.from_dict({"masked_layers": [1], "sparsity_mlp": 0.7})
    assert published.rule("mlp") == MaskRule("local", 0.7, 0.0)


def test_layer_index_is_the_first_numbered_component():
    assert layer_index("model.layers.4.self_attn.q_proj") == "4"
    assert layer_index("model.language_model.layers.12.mlp.experts.down_proj") == "12"
    assert layer_index("transformer.h.0.attn.c_attn") == "0"
    assert layer_index("lm_head") is None


def test_layers_and_original_checkpoints_follow_the_global_rule(tmp_path):
    """The same global rule through two callers: the mask layers of a model, and `mft apply`'s masks from an
    original MFT checkpoint's saved scores (a threshold per kind, signed scores)."""
    model = tiny_model("llama", vocab_size=100)
    cfg = MaskConfig(masked_layers=[1], subnet_type="global", threshold_attn=0.01, threshold_mlp=-0.005)
    inject_masks(model, cfg, seed=2)
    layers = masked_modules(model)
    masks = extract_masks(model)
    assert len(masks) == 7
    for name, layer in layers.items():
        threshold = 0.01 if layer.kind == "attn" else -0.005
        assert torch.equal(masks[name], layer.scores.detach() >= threshold), name
        assert 0.2 < masks[name].float().mean().item() < 0.9, name  # neither all kept nor all pruned
    model.config.update({"subnet_type": "global", "threshold_attn": 0.01, "threshold_mlp": -0.005,
                         "sparsity_attn": 0.9, "sparsity_mlp": 0.9, "subnet_mode": "both", "masked_layers": "1"})
    model.save_pretrained(tmp_path / "original")
    from_file = masks_from_scores_checkpoint(Checkpoint(str(tmp_path / "original")))
    assert from_file.masks.keys() == masks.keys()
    for name, mask in masks.items():
        assert torch.equal(from_file.masks[name], mask), name
