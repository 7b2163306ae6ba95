"""Issue 10: masks land on the language model's weights, MoE experts included, in every family, or the run refuses.

Tiny random models from configs (tests/masking/families.py): 2 decoder layers, hidden 32, 4 experts. For each
family: what `masked_layers=[1]` selects per `subnet_mode` (language layers only, every expert, routers never),
masks equal to a plain per-matrix sort, a forward and backward, the straight-through gradient of a 3-D expert
tensor, and the streaming apply onto the checkpoint as `save_pretrained` writes it (Mixtral and Qwen-MoE with
per-expert on-disk names, Gemma 3 / Mistral 3 / Llama 4 with multimodal prefixes, Llama 4 / gpt-oss fused).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from torch import nn

from mft.cli import main
from mft.errors import MftError
from mft.masking import apply as A
from mft.masking.checkpoint import Checkpoint
from mft.masking.config import MaskConfig
from mft.masking.files import read_masks, write_masks
from mft.masking.inject import bake_masks, extract_masks, inject_masks, mask_layouts, masked_modules
from mft.masking.select import coverage_table, select_targets
from mft.models import load_pretrained

from tests.masking.families import EXPECTED, FAMILIES, ROUTERS, VOCAB, build

KEEP_ATTN, KEEP_MLP = 0.75, 0.5


def reference_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """The published rule on one matrix alone: a stable ascending sort of |S|, prune the first int((1-k) n)."""
    flat = scores.detach().abs().flatten()
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    mask[torch.sort(flat, stable=True).indices[: int((1 - keep) * flat.numel())]] = False
    return mask.view(scores.shape)


def expert_matrices(t: torch.Tensor, family: str, pname: str) -> list[torch.Tensor]:
    """Each expert's gate / up / down matrix as [out, in], written from each family's forward (not from the
    code under test): Mixtral-style [E, 2I, H] chunks rows, Llama 4 [E, H, 2I] chunks columns, gpt-oss
    [E, H, 2I] interleaves columns."""
    out = []
    for e in range(t.shape[0]):
        m = t[e]
        if family in ("llama4", "llama4_text", "gpt_oss"):
            m = m.t()  # stored [in, out]
        if pname == "gate_up_proj":
            if family == "gpt_oss":
                out += [m[0::2], m[1::2]]
            else:
                half = m.shape[0] // 2
                out += [m[:half], m[half:]]
        else:
            out.append(m)
    return out


def matrices_of(name: str, t: torch.Tensor, family: str) -> list[torch.Tensor]:
    if t.dim() == 3:
        return expert_matrices(t, family, name.rsplit(".", 1)[-1])
    return [t.t()] if family == "gpt2" else [t]  # GPT-2's Conv1D stores [in, out]


def text_forward(model, family: str, x: torch.Tensor):
    # Llama4ForConditionalGeneration's own text-only forward fails in transformers 5.24 (it reads
    # `image_outputs` from the language model's output), unmasked too: run its language model.
    if family == "llama4":
        return model.language_model(input_ids=x, labels=x)
    return model(input_ids=x, labels=x)


# -- selection ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["attn", "mlp", "both"])
def test_selection_is_the_language_layer_with_every_expert_and_no_router(family, mode):
    model = build(family)
    targets = select_targets(model, MaskConfig(masked_layers=[1], subnet_mode=mode))
    prefix, attn, mlp = EXPECTED[family]
    rels = {"attn": attn, "mlp": mlp, "both": attn + mlp}[mode]
    assert sorted(t.name for t in targets) == sorted(f"{prefix}.1.{r}" for r in rels)
    params = dict(model.named_parameters())
    for t in targets:
        assert t.kind == ("attn" if t.name.rsplit(".1.", 1)[1] in attn else "mlp")
        assert t.shape == tuple(params[t.param].shape)
        if t.layout.startswith("experts"):
            assert t.experts == 4 and t.matrices == (8 if t.name.endswith("gate_up_proj") else 4)
    for router in ROUTERS.get(family, []):
        assert not any(t.name.startswith(f"{prefix}.1.{router}") for t in targets)
    assert not any(re.search("vision|audio|projector", t.name) for t in targets)
    table = coverage_table(targets)
    assert f"total: {len(targets)} weights" in table and f"{sum(t.entries for t in targets):,} entries" in table


def test_gemma3_multimodal_masks_the_language_model_not_siglip():
    """The failing scenario of the issue: `masked_layers=1` used to land on vision_tower...encoder.layers.1."""
    model = build("gemma3")
    names = [t.name for t in select_targets(model, MaskConfig(masked_layers=[1]))]
    assert len(names) == 7 and all(n.startswith("model.language_model.layers.1.") for n in names)
    # only an explicit pattern reaches the vision tower
    explicit = select_targets(model, MaskConfig(target_modules=[r"vision_tower.*layers\.1\.self_attn\.q_proj"]))
    assert [t.name for t in explicit] == ["model.vision_tower.encoder.layers.1.self_attn.q_proj"]


# -- the rule, forward and backward ------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_masks_equal_a_per_matrix_sort_and_train(family):
    model = build(family)
    targets = inject_masks(model, MaskConfig(masked_layers=[0, 1], keep_ratio_attn=KEEP_ATTN,
                                             keep_ratio_mlp=KEEP_MLP), seed=0)
    layers = masked_modules(model)
    masks = extract_masks(model)
    assert set(masks) == {t.name for t in targets}
    for t in targets:
        keep = KEEP_ATTN if t.kind == "attn" else KEEP_MLP
        mats = matrices_of(t.name, masks[t.name], family)
        score_mats = matrices_of(t.name, layers[t.name].scores, family)
        assert len(mats) == t.matrices
        for m, s in zip(mats, score_mats):
            assert int((~m).sum()) == int((1 - keep) * m.numel())
            assert torch.equal(m, reference_mask(s, keep))
    model.train()
    x = torch.randint(8, VOCAB, (2, 6))
    text_forward(model, family, x).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.endswith(".scores") for n in with_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(".scores"))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "llama4_text"])
def test_straight_through_gradient_of_a_3d_expert_tensor(family):
    """dL/dS = (dL/dW_eff * W) * sign(S), with dL/dW_eff taken from the same model with W_eff baked in."""
    torch.manual_seed(1)
    model = build(family).float()
    name = f"{EXPECTED[family][0]}.1.{EXPECTED[family][2][0]}"  # the layer's fused gate_up expert tensor
    inject_masks(model, MaskConfig(target_modules=[re.escape(name) + "$"], keep_ratio_mlp=0.6), seed=3)
    layer = masked_modules(model)[name]
    weight = layer.weight.detach().clone()
    mask, scores = layer.mask.clone(), layer.scores.detach().clone()
    x = torch.randint(8, VOCAB, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    grad_scores = layer.scores.grad.clone()

    bake_masks(model)
    baked = dict(model.named_parameters())[name]
    assert torch.equal(baked, weight * mask)
    for p in model.parameters():
        p.requires_grad_(False)
    baked.requires_grad_(True)
    model(input_ids=x, labels=x).loss.backward()
    expected = (baked.grad * weight) * scores.sign()
    assert grad_scores.abs().sum() > 0
    torch.testing.assert_close(grad_scores, expected, rtol=1e-5, atol=1e-7)


# -- refusals ----------------------------------------------------------------------------------------------
def test_llama4_router_is_never_wrapped():
    model = build("llama4_text")
    with pytest.raises(MftError, match=r"model\.layers\.0\.feed_forward\.router\.weight \[4, 32\] "
                                       r"\(a router/gate \(Llama4Router\): it scores tokens, it is not a projection; "
                                       r"MFT never masks routers\)"):
        select_targets(model, MaskConfig(target_modules=[r"layers\.0\.feed_forward\.router"]))
    names = [t.name for t in select_targets(model, MaskConfig(masked_layers=[0], subnet_mode="mlp"))]
    assert not any("router" in n for n in names)


def test_unmaskable_weight_in_a_chosen_layer_is_refused_by_name():
    model = build("llama")

    class Odd(nn.Module):  # a projection that is neither a linear, a Conv1D nor an expert tensor
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.zeros(2, 32, 3))

    model.model.layers[1].mlp.odd = Odd()
    with pytest.raises(MftError, match=r"layer 1 holds MLP weights that cannot be masked: "
                                       r"model\.layers\.1\.mlp\.odd\.kernel \[2, 32, 3\] \(MLP: a 3-D"):
        select_targets(model, MaskConfig(masked_layers=[1], subnet_mode="mlp"))
    # attention alone is unaffected, and says so in its table
    assert len(select_targets(model, MaskConfig(masked_layers=[1], subnet_mode="attn"))) == 4


def test_empty_selection_is_refused():
    with pytest.raises(MftError, match="no module matches the selection"):
        select_targets(build("mixtral"), MaskConfig(target_modules=["nothing_here"]))


# -- apply onto the checkpoint as saved --------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def make(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            build(family, seed=2).save_pretrained(path)
            cache[family] = path
        return cache[family]

    return make


def _disk_keys(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


APPLY_FAMILIES = FAMILIES
ON_DISK = {  # a tensor that shows the on-disk naming differs from memory
    "mixtral": "model.layers.1.block_sparse_moe.experts.3.w1.weight",
    "qwen2_moe": "model.layers.1.mlp.experts.3.up_proj.weight",
    "qwen3_moe": "model.layers.1.mlp.experts.3.up_proj.weight",
    "deepseek_v3": "model.layers.1.mlp.experts.3.down_proj.weight",
    "gemma3": "language_model.model.layers.1.mlp.up_proj.weight",
    "mistral3": "language_model.model.layers.1.mlp.up_proj.weight",
    "llama4": "language_model.model.layers.1.feed_forward.experts.gate_up_proj",
    "granitemoe": "model.layers.1.block_sparse_moe.input_linear.weight",
}


@pytest.mark.parametrize("family", APPLY_FAMILIES)
def test_apply_lands_on_the_on_disk_tensors(family, saved, tmp_path):
    base = saved(family)
    if family in ON_DISK:
        assert ON_DISK[family] in _disk_keys(base)
    model = load_pretrained(base)
    cfg = MaskConfig(masked_layers=[1], keep_ratio_attn=KEEP_ATTN, keep_ratio_mlp=KEEP_MLP)
    targets = inject_masks(model, cfg, seed=4)
    layouts = mask_layouts(masked_modules(model))
    mask_set = A._mask_set(extract_masks(model), targets, cfg, "learned", str(base))
    assert {n: layouts[n] for n in mask_set.layouts} == mask_set.layouts
    write_masks(tmp_path / "masks.safetensors", mask_set)
    from_file = read_masks(tmp_path / "masks.safetensors")
    assert from_file.layouts == mask_set.layouts
    out = A.apply_masks(base, from_file, tmp_path / "out", progress=False)

    before = dict(load_pretrained(base).named_parameters())
    after = dict(load_pretrained(out).named_parameters())
    assert set(before) == set(after)
    masked = {t.param: t for t in targets}
    for name, value in after.items():
        if name not in masked:
            assert torch.equal(value, before[name]), name  # vision tower, routers, norms, other layers: untouched
            continue
        t = masked[name]
        mask = mask_set.masks[t.name]
        assert torch.equal(value, before[name].masked_fill(~mask, 0)), name
        keep = KEEP_ATTN if t.kind == "attn" else KEEP_MLP
        for m, w in zip(matrices_of(t.name, mask, family), matrices_of(t.name, value, family)):
            assert int((~m).sum()) == int((1 - keep) * m.numel())
            assert int((w == 0).sum()) == int((1 - keep) * m.numel())  # random weights have no exact zeros
    assert _disk_keys(out) == _disk_keys(base)  # written in the on-disk layout, nothing renamed


def test_mixtral_expert_mask_is_the_on_disk_w1_w3(saved, tmp_path):
    """Expert 3's gate half of the fused in-memory gate_up_proj is on-disk w1, its up half w3."""
    base = saved("mixtral")
    model = load_pretrained(base)
    cfg = MaskConfig(masked_layers=[1], subnet_mode="mlp", keep_ratio_mlp=KEEP_MLP)
    targets = inject_masks(model, cfg, seed=5)
    mask_set = A._mask_set(extract_masks(model), targets, cfg, "learned")
    out = A.apply_masks(base, mask_set, tmp_path / "out", progress=False)
    fused = mask_set.masks["model.layers.1.mlp.experts.gate_up_proj"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f, \
            safe_open(str(base / "model.safetensors"), framework="pt") as g:
        prefix = "model.layers.1.block_sparse_moe.experts.3"
        assert torch.equal(f.get_tensor(f"{prefix}.w1.weight"), g.get_tensor(f"{prefix}.w1.weight") * fused[3, :48])
        assert torch.equal(f.get_tensor(f"{prefix}.w3.weight"), g.get_tensor(f"{prefix}.w3.weight") * fused[3, 48:])
        down = mask_set.masks["model.layers.1.mlp.experts.down_proj"]
        assert torch.equal(f.get_tensor(f"{prefix}.w2.weight"), g.get_tensor(f"{prefix}.w2.weight") * down[3])
        assert torch.equal(f.get_tensor("model.layers.1.block_sparse_moe.gate.weight"),
                           g.get_tensor("model.layers.1.block_sparse_moe.gate.weight"))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "gpt2"])
def test_l1_and_random_baselines_per_expert(family, saved):
    base = saved(family)
    cfg = MaskConfig(masked_layers=[1], subnet_mode="mlp", keep_ratio_mlp=0.7)
    checkpoint = Checkpoint(base)
    targets = A.targets_of(checkpoint, cfg)
    l1 = A.l1_masks(checkpoint, targets, cfg)
    weights = dict(load_pretrained(base).named_parameters())
    for t in targets:
        mats = matrices_of(t.name, l1.masks[t.name], family)
        assert len(mats) == t.matrices
        for m, w in zip(mats, matrices_of(t.name, weights[t.param], family)):
            assert torch.equal(m, reference_mask(w, 0.7))
    random = A.random_masks(targets, cfg, seed=1)
    assert {n: tuple(m.shape) for n, m in random.masks.items()} == {t.name: t.shape for t in targets}
    kept = sum(int(m.sum()) for m in random.masks.values()) / sum(t.entries for t in targets)
    assert abs(kept - 0.7) < 0.03
    assert random.layouts == {t.name: t.info() for t in targets}


def test_cli_apply_l1_on_mixtral_and_masks_info_shows_experts(saved, tmp_path, capsys):
    base = saved("mixtral")
    out = tmp_path / "out"
    assert main(["apply", "--use_l1_mask", "--base_model_name_or_path", str(base), "--output_dir", str(out),
                 "--masked_layers", "1", "--subnet_mode", "mlp", "--sparsity_mlp", "0.5", "--save_masks"]) == 0
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.experts.gate_up_proj" in err and "experts/halves" in err
    assert "total: 2 weights, 12 matrices, 18,432 entries" in err
    assert main(["masks", "info", str(out / "masks.safetensors"), "--json"]) == 0
    rows = {r["module"]: r for r in json.loads(capsys.readouterr().out)["modules"]}
    assert rows["model.layers.1.mlp.experts.gate_up_proj"]["experts"] == 4
    assert rows["model.layers.1.mlp.experts.gate_up_proj"]["split"] == "halves"
    assert rows["model.layers.1.mlp.experts.down_proj"]["kept"] == 4 * 32 * 48 // 2
    after = dict(load_pretrained(out).named_parameters())
    gate_up = after["model.layers.1.mlp.experts.gate_up_proj"]
    for e in range(4):
        for half in (gate_up[e, :48], gate_up[e, 48:]):
            assert int((half == 0).sum()) == 48 * 32 // 2


@pytest.mark.slow
def test_mft_train_then_apply_on_mixtral_with_per_expert_names(tmp_path, tokenizer):
    """`mft train` (a few steps) -> `mft apply` -> from_pretrained: exactly int((1 - k) n) zeros per masked
    matrix or expert half, every other tensor bit-identical, on a checkpoint saved with per-expert names."""
    from tests.train.test_loop import run, write_chat_data

    base = tmp_path / "base"
    build("mixtral", seed=3, vocab_size=len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    assert "model.layers.1.block_sparse_moe.experts.0.w1.weight" in _disk_keys(base)
    workspace = {"base": base, "data": write_chat_data(tmp_path / "data.jsonl", n=16), "root": tmp_path}
    result = run(workspace, "run", subnet_mode="both", masked_layers="1", sparsity_attn=0.75, sparsity_mlp=0.5,
                 learning_rate=0.05, warmup_ratio=0.0, num_train_epochs=1, gradient_accumulation_steps=1)
    assert result.steps == 4
    masks = read_masks(result.output_dir / "masks.safetensors")
    assert masks.layout("model.layers.1.mlp.experts.gate_up_proj") == {"layout": "experts", "split": "halves",
                                                                       "experts": 4}
    out = tmp_path / "applied"
    assert main(["apply", "--mask_model_name_or_path", str(result.output_dir), "--output_dir", str(out),
                 "--quiet"]) == 0
    assert _disk_keys(out) == _disk_keys(base)
    before = dict(load_pretrained(base).named_parameters())
    after = dict(load_pretrained(out).named_parameters())
    masked = {"model.layers.1.self_attn." + p + ".weight": 0.75 for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    masked.update({"model.layers.1.mlp.experts.gate_up_proj": 0.5, "model.layers.1.mlp.experts.down_proj": 0.5})
    for name, value in after.items():
        if name not in masked:
            assert torch.equal(value, before[name]), name
            continue
        mats = matrices_of(name.removesuffix(".weight"), value, "mixtral")
        assert len(mats) == (8 if "gate_up" in name else 4 if value.dim() == 3 else 1)
        for m in mats:
            assert int((m == 0).sum()) == int((1 - masked[name]) * m.numel()), name
        assert torch.equal(value, before[name] * (value != 0)), name


def test_mask_file_with_a_wrong_layout_is_refused(tmp_path):
    from mft.masking.files import MaskSet

    mask = torch.ones(4, 6, 5, dtype=torch.bool)
    write_masks(tmp_path / "m.safetensors", MaskSet({"x.experts.down_proj": mask},
                                                    layouts={"x.experts.down_proj": {"layout": "linear",
                                                                                     "split": None,
                                                                                     "experts": None}}))
    with pytest.raises(MftError, match=r"module x\.experts\.down_proj has layout 'linear' / split None for shape "
                                       r"\(4, 6, 5\)"):
        read_masks(tmp_path / "m.safetensors")
    write_masks(tmp_path / "ok.safetensors", MaskSet({"x.experts.down_proj": mask}))  # layout inferred: experts
    assert read_masks(tmp_path / "ok.safetensors").layout("x.experts.down_proj") == {
        "layout": "experts", "split": None, "experts": 4}


@pytest.mark.slow
def test_zero3_two_processes_on_mixtral_experts(tmp_path, tokenizer):
    """DeepSpeed ZeRO-3 (bf16, gloo, two CPU processes) with fused expert masks: both ranks end with the same
    masks, and each expert half prunes exactly int((1 - k) n) entries."""
    from tests.conftest import ROOT
    from tests.train.test_distributed import common_overrides, launch
    from tests.train.test_loop import write_chat_data

    base = tmp_path / "base"
    build("mixtral", seed=3, vocab_size=len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "run"
    overrides = [o for o in common_overrides(base, write_chat_data(tmp_path / "data.jsonl", n=16), out,
                                             tmp_path / "cache") if not o.startswith("--masked_layers")]
    launch(["--use_deepspeed", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "bf16",
            "--deepspeed_config_file", str(ROOT / "configs/ds_configs/stage3_no_offloading_accelerate.conf"),
            str(ROOT / "scripts/finetune.py"), *overrides, "--masked_layers=1", "--sparsity_mlp=0.5",
            "--num_train_epochs=1"], cwd=tmp_path)
    info = json.loads((out / "mft_run.json").read_text())
    assert len(info["mask_digest_per_rank"]) == 2 and len(set(info["mask_digest_per_rank"])) == 1
    masks = read_masks(out / "masks.safetensors")
    gate_up = masks.masks["model.layers.1.mlp.experts.gate_up_proj"]
    assert tuple(gate_up.shape) == (4, 96, 32)
    for m in matrices_of("model.layers.1.mlp.experts.gate_up_proj", gate_up, "mixtral"):
        assert int((~m).sum()) == 48 * 32 // 2


def test_model_class_per_checkpoint():
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, ViTConfig

    from mft.models import auto_class
    from tests.masking.families import FAMILY_CONFIGS

    assert auto_class(FAMILY_CONFIGS["mistral3"]()) is AutoModelForImageTextToText  # CausalLM cannot build it
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_config(FAMILY_CONFIGS["mistral3"]())
    assert auto_class(FAMILY_CONFIGS["llama4"]()) is AutoModelForImageTextToText  # not the text-only Llama4ForCausalLM
    assert auto_class(FAMILY_CONFIGS["llama4_text"]()) is AutoModelForCausalLM
    assert auto_class(FAMILY_CONFIGS["mixtral"]()) is AutoModelForCausalLM
    with pytest.raises(MftError, match=r"ViTConfig \(model_type 'vit'\) is neither a causal language model nor an "
                                       "image-text-to-text model"):
        auto_class(ViTConfig())
