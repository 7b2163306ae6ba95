"""Selection by layer index and subnet_mode, for every supported family, and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mft.errors import MftError
from mft.masking.config import MaskConfig, parse_layers
from mft.masking.inject import extract_masks, inject_masks
from mft.masking.select import select_targets
from mft.tiny import FAMILIES, tiny_model

EXPECTED = {  # linears of one decoder layer, by kind, as each family names them
    "llama": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    "phi3": (["self_attn.o_proj", "self_attn.qkv_proj"], ["mlp.gate_up_proj", "mlp.down_proj"]),
    "gpt_neox": (["attention.query_key_value", "attention.dense"], ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
}
for family in ("mistral", "qwen2", "gemma2", "olmo2"):
    EXPECTED[family] = EXPECTED["llama"]
PREFIX = {"gpt_neox": "gpt_neox.layers"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["attn", "mlp", "both"])
def test_selection_per_family(family, mode):
    model = tiny_model(family, vocab_size=64)
    targets = select_targets(model, MaskConfig(masked_layers="1 3", subnet_mode=mode))
    attn, mlp = EXPECTED[family]
    rels = {"attn": attn, "mlp": mlp, "both": attn + mlp}[mode]
    prefix = PREFIX.get(family, "model.layers")
    expected = [f"{prefix}.{i}.{rel}" for i in (1, 3) for rel in rels]
    assert sorted(t.name for t in targets) == sorted(expected)
    for t in targets:
        assert t.kind == ("attn" if any(t.name.endswith(a) for a in attn) else "mlp")
        assert t.shape == tuple(model.get_submodule(t.name).weight.shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_inject_train_step_every_family(family):
    model = tiny_model(family, vocab_size=64)
    inject_masks(model, MaskConfig(masked_layers=[2], keep_ratio_attn=0.75, keep_ratio_mlp=0.5), seed=0)
    x = torch.randint(0, 64, (2, 8))
    model(x, labels=x).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith(".scores") for n in grads)
    for name, mask in extract_masks(model).items():
        keep = 0.75 if any(a in name for a in ("attn", "attention")) else 0.5
        assert int((~mask).sum()) == int((1 - keep) * mask.numel()), name


def test_target_modules_regex():
    model = tiny_model("llama", vocab_size=64)
    targets = select_targets(model, MaskConfig(target_modules=[r"layers\.0\..*\.(q|v)_proj$", "lm_head"]))
    assert [t.name for t in targets] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                         "lm_head"]
    assert [t.kind for t in targets] == ["attn", "attn", "mlp"]


def test_layer_out_of_range():
    model = tiny_model("llama", vocab_size=64, num_layers=4)
    with pytest.raises(MftError, match=r"masked layer 4 is out of range: the model has 4 decoder layers \(indices 0-3\)"):
        select_targets(model, MaskConfig(masked_layers=[2, 4]))


def test_empty_selection_lists_what_the_model_has():
    model = tiny_model("llama", vocab_size=64)
    with pytest.raises(MftError) as err:
        select_targets(model, MaskConfig(target_modules=["no_such_module"]))
    msg = str(err.value)
    assert "no module matches the selection" in msg
    assert "4 decoder layers at `model.layers`" in msg and "self_attn.q_proj" in msg and "mlp.down_proj" in msg


def test_unrecognised_architecture_lists_what_it_found():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(4, 4)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    with pytest.raises(MftError, match=r"layer 0 \(`blocks.0`\) has no attn or mlp weights.*mixer \(unclassified\)"):
        select_targets(Odd(), MaskConfig(masked_layers=[0]))


def test_bad_config_values():
    with pytest.raises(MftError, match=r"keep_ratio_attn \(published key sparsity_attn\) must be in \(0, 1\]"):
        MaskConfig.from_dict({"sparsity_attn": 0.0})
    with pytest.raises(MftError, match="must be in"):
        MaskConfig(keep_ratio_mlp=1.01)
    with pytest.raises(MftError, match="subnet_mode must be one of attn, mlp, both; got 'attention'"):
        MaskConfig(subnet_mode="attention")
    with pytest.raises(MftError, match="disagree"):
        MaskConfig.from_dict({"sparsity_mlp": 0.9, "keep_ratio_mlp": 0.8})
    assert MaskConfig.from_dict({"sparsity_attn": 0.8, "sparsity_mlp": 0.7}).keep_ratio("mlp") == 0.7


def test_parse_layers():
    assert parse_layers("4 5 6 7") == parse_layers("4,5,6,7") == parse_layers("4-7") == parse_layers([7, 6, 5, 4])
    assert parse_layers("0-1 20-21") == [0, 1, 20, 21]
    with pytest.raises(MftError, match="cannot read 'x'"):
        parse_layers("4 x")
