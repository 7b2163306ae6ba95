"""Selection must mask every weight of a chosen layer with the right kind or refuse by name (issue 10, break 3):
OPT's fc1/fc2 sit directly on the block; Jamba's mamba mixer is neither attention nor MLP; a tied lm_head shares
its Parameter with the input embedding; DBRX's router is `ffn.router.layer`; routers named by target_modules are
refused, whether the pattern names the weight or its module. Tiny random models from configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers as T

from mft.errors import MftError
from mft.masking.config import MaskConfig
from mft.masking.inject import bake_masks, extract_masks, inject_masks
from mft.masking.select import select_targets
from mft.models import auto_class

from tests.masking.families import build


def _model(config, seed=0):
    torch.manual_seed(seed)
    return auto_class(config).from_config(config).eval()


def _opt():
    return _model(T.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                              word_embed_proj_dim=32, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                              pad_token_id=0))


def test_opt_both_masks_fc1_fc2_as_mlp():
    model = _opt()
    targets = select_targets(model, MaskConfig(masked_layers=[1], subnet_mode="both"))
    got = {t.name.removeprefix("model.decoder.layers.1."): (t.kind, t.shape) for t in targets}
    assert got == {"self_attn.q_proj": ("attn", (32, 32)), "self_attn.k_proj": ("attn", (32, 32)),
                   "self_attn.v_proj": ("attn", (32, 32)), "self_attn.out_proj": ("attn", (32, 32)),
                   "fc1": ("mlp", (48, 32)), "fc2": ("mlp", (32, 48))}
    mlp = select_targets(model, MaskConfig(masked_layers=[1], subnet_mode="mlp"))
    assert [t.name for t in mlp] == ["model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2"]
    # and they are really masked: keep 0.5 of fc1 (48*32 = 1536) -> 768 zeros after baking
    inject_masks(model, MaskConfig(masked_layers=[1], subnet_mode="mlp", keep_ratio_mlp=0.5,
                                   score_init="magnitude"), seed=0)
    bake_masks(model)
    assert int((model.model.decoder.layers[1].fc1.weight == 0).sum()) == 768
    assert int((model.model.decoder.layers[1].fc2.weight == 0).sum()) == 768


def _jamba():
    return _model(T.JambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                                expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_d_conv=4,
                                mamba_expand=2, mamba_dt_rank=4, bos_token_id=1, eos_token_id=2, pad_token_id=0))


@pytest.mark.parametrize("mode", ["both", "mlp"])
def test_unclassified_weights_of_a_chosen_layer_are_refused_by_name(mode):
    model = _jamba()  # layer 0: mamba mixer (neither attention nor MLP) + dense MLP
    with pytest.raises(MftError) as err:
        select_targets(model, MaskConfig(masked_layers=[0], subnet_mode=mode))
    msg = str(err.value)
    assert "layer 0 (`model.layers.0`) holds weights that are neither attention nor MLP" in msg
    for name in ("mamba.in_proj [128, 32]", "mamba.x_proj [12, 64]", "mamba.dt_proj [64, 4]",
                 "mamba.out_proj [32, 64]", "mamba.conv1d.weight [64, 1, 4]"):
        assert f"model.layers.0.{name}" in msg
    assert f"subnet_mode={mode}" in msg
    # attn on the same layer (no attention there) lists them as unclassified
    with pytest.raises(MftError, match=r"layer 0 \(`model.layers.0`\) has no attn weights to mask .*"
                                       r"mamba\.in_proj \(unclassified\)"):
        select_targets(model, MaskConfig(masked_layers=[0], subnet_mode="attn"))
    # layer 1 (attention + experts) still selects fully; the router is skipped
    names = [t.name for t in select_targets(model, MaskConfig(masked_layers=[1]))]
    assert names == ["model.layers.1.self_attn." + p for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                    ["model.layers.1.feed_forward.experts.gate_up_proj", "model.layers.1.feed_forward.experts.down_proj"]
    # an explicit pattern still reaches a mamba projection
    assert [t.name for t in select_targets(model, MaskConfig(target_modules=[r"mamba\.in_proj"]))] == \
        ["model.layers.0.mamba.in_proj"]


def _llama_tied():
    return _model(T.LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def test_tied_lm_head_is_refused_at_selection_naming_the_tie():
    model = _llama_tied()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embed = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(MftError, match=r"^cannot mask lm_head: its weight is tied to the input embedding "
                                       r"\(model\.embed_tokens\.weight\)"):
        select_targets(model, MaskConfig(target_modules=["lm_head"]))
    with pytest.raises(MftError, match=r"cannot mask lm_head: its weight is tied to the input embedding"):
        inject_masks(model, MaskConfig(target_modules=["lm_head"], keep_ratio_mlp=0.5), seed=1)
    # nothing was wrapped or zeroed: the shared weight is untouched, bit for bit
    assert extract_masks(model) == {}
    assert torch.equal(model.model.embed_tokens.weight, embed)
    # layer weights of the same model are not shared, and still select
    assert len(select_targets(model, MaskConfig(masked_layers=[1]))) == 7


def test_weight_shared_across_layers_is_refused():
    model = build("llama")
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(MftError, match=r"cannot mask model\.layers\.1\.mlp\.up_proj: its weight is tied to "
                                       r"\(model\.layers\.0\.mlp\.up_proj\.weight\)"):
        select_targets(model, MaskConfig(masked_layers=[1], subnet_mode="mlp"))


def _dbrx():
    return _model(T.DbrxConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=128,
                               attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
                               ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2)))


def test_router_anywhere_in_the_path_is_a_router():
    model = _dbrx()  # DBRX's router is the nn.Linear `ffn.router.layer`
    with pytest.raises(MftError, match=r"transformer\.blocks\.0\.ffn\.router\.layer\.weight \[4, 32\] "
                                       r"\(a router/gate \(Linear\): it scores tokens"):
        select_targets(model, MaskConfig(target_modules=["router"]))
    assert [t.name for t in select_targets(model, MaskConfig(masked_layers=[1], subnet_mode="attn"))] == \
        ["transformer.blocks.1.norm_attn_norm.attn.Wqkv", "transformer.blocks.1.norm_attn_norm.attn.out_proj"]
    # its MLP (DBRX's flattened 2-D expert weights) is refused by name; the router is not listed as MLP
    with pytest.raises(MftError) as err:
        select_targets(model, MaskConfig(masked_layers=[1], subnet_mode="mlp"))
    assert "layer 1 holds MLP weights that cannot be masked: transformer.blocks.1.ffn.experts.mlp.w1 [192, 32]" \
        in str(err.value)
    assert "router" not in str(err.value)


@pytest.mark.parametrize("family, pattern, refused", [
    ("qwen2_moe", r"shared_expert_gate", "model.layers.0.mlp.shared_expert_gate.weight [1, 32]"),  # a plain Linear
    ("qwen2_moe", r"layers\.1\.mlp\.gate$", "model.layers.1.mlp.gate.weight [4, 32]"),  # pattern names the module
    ("mixtral", r"mlp\.gate$", "model.layers.0.mlp.gate.weight [4, 32]"),
])
def test_target_modules_naming_a_router_is_refused(family, pattern, refused):
    model = build(family)
    with pytest.raises(MftError) as err:
        select_targets(model, MaskConfig(target_modules=[pattern]))
    msg = str(err.value)
    assert f"target_modules {[pattern]} match weights that cannot be masked: {refused} (a router/gate (" in msg
    assert "MFT never masks routers" in msg


def test_refusal_names_the_kinds_not_the_subnet_mode():
    model = build("llama")
    model.model.layers[1].self_attn.odd = torch.nn.Module()
    model.model.layers[1].self_attn.odd.kernel = torch.nn.Parameter(torch.zeros(2, 32, 3))
    with pytest.raises(MftError, match=r"^layer 1 holds attention / MLP weights that cannot be masked: "
                                       r"model\.layers\.1\.self_attn\.odd\.kernel \[2, 32, 3\] \(attention: a 3-D "
                                       r"parameter of Module"):
        select_targets(model, MaskConfig(masked_layers=[1], subnet_mode="both"))


def test_readme_python_example_runs_as_written():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    block = next(b for b in blocks if "inject_masks(model, MaskConfig(" in b)
    config = T.LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=8, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    scope = {"model": _model(config)}
    exec(compile(block, "README.md", "exec"), scope)
    assert [t.name for t in scope["targets"]][:2] == ["model.layers.4.self_attn.q_proj", "model.layers.4.self_attn.k_proj"]
    assert len(scope["targets"]) == 28 and len(scope["masks"]) == 28
    # keep 0.9 per matrix: q_proj [32, 32] -> int(0.1 * 1024) = 102 zeros, now exact zeros in the baked weight
    assert int((~scope["masks"]["model.layers.4.self_attn.q_proj"]).sum()) == 102
    assert int((scope["model"].model.layers[4].self_attn.q_proj.weight == 0).sum()) >= 102
