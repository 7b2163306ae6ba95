"""The streaming apply and the `mft apply` / `scripts/apply_masks.py` command, end to end on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mft.cli import main
from mft.errors import MftError
from mft.masking import apply as A
from mft.masking.checkpoint import read_safetensors_header
from mft.masking.config import MaskConfig
from mft.masking.files import MaskSet, read_masks, write_masks
from mft.masking.inject import extract_masks, inject_masks, masked_modules
from mft.masking.rule import local_mask, num_pruned

from tests.conftest import ROOT

LAYERS = [1, 2]


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        if shard.name.startswith("masks"):
            continue
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def raw_bytes(folder: Path) -> dict[str, bytes]:
    """Each tensor's bytes exactly as stored on disk."""
    out = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        header, start = read_safetensors_header(shard)
        data = shard.read_bytes()
        for k, v in header.items():
            if k != "__metadata__":
                out[k] = data[start + v["data_offsets"][0]: start + v["data_offsets"][1]]
    return out


def learned_masks(base: Path, seed=0) -> MaskSet:
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = MaskConfig(masked_layers=LAYERS)
    targets = inject_masks(model, cfg, seed=seed)
    return A._mask_set(extract_masks(model), targets, cfg, "learned", str(base))


def no_leftovers(parent: Path):
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_apply_equals_dense_w_times_m(saved_model, tmp_path, dtype):
    base = saved_model("llama", dtype=dtype, shard_kb=40)
    assert (base / "model.safetensors.index.json").exists() and len(list(base.glob("model-*.safetensors"))) > 2
    ms = learned_masks(base)
    out = A.apply_masks(base, ms, tmp_path / "applied", progress=False)

    before, after = load_all(base), load_all(out)
    before_raw, after_raw = raw_bytes(base), raw_bytes(out)
    assert before.keys() == after.keys()
    masked_keys = {f"{n}.weight" for n in ms.masks}
    assert len(masked_keys) == 14
    for key, w in before.items():
        assert after[key].dtype == w.dtype == dtype
        if key in masked_keys:
            mask = ms.masks[key[: -len(".weight")]]
            assert torch.equal(after[key], w * mask)
            assert bool((after[key][~mask] == 0).all()) and not torch.signbit(after[key][~mask]).any()
            assert torch.equal(after[key][mask], w[mask])
        else:
            assert after_raw[key] == before_raw[key], key  # bit-identical
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "model.safetensors.index.json"):
        if (base / name).exists():
            assert (out / name).read_bytes() == (base / name).read_bytes(), name
    info = json.loads((out / A.APPLY_INFO).read_text())
    assert info["source"] == "learned" and info["fingerprint"] == ms.fingerprint and info["modules"] == 14
    assert no_leftovers(tmp_path)

    # The written folder is an ordinary checkpoint, equal to baking the masks in memory.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    for name, mask in ms.masks.items():
        assert torch.equal(model.get_submodule(name).weight, before[f"{name}.weight"] * mask)


def test_run_bookkeeping_is_not_copied(saved_model, tmp_path):
    """An FFT run folder used as the base: its log, settings and finished marker stay behind, so the masked
    model does not look like a finished FFT run."""
    import shutil

    base = tmp_path / "fft_run"
    shutil.copytree(saved_model("llama"), base)
    for name in ("run_complete.json", "train_log.jsonl", "train_config.yaml"):
        (base / name).write_text("{}")
    out = A.apply_masks(base, learned_masks(base), tmp_path / "out", progress=False)
    names = {p.name for p in out.iterdir()}
    assert not names & {"run_complete.json", "train_log.jsonl", "train_config.yaml"}
    assert {"config.json", "tokenizer.json", "model.safetensors", A.APPLY_INFO} <= names


def test_apply_without_copy_file_range(saved_model, tmp_path, monkeypatch):
    """Where the kernel cannot copy ranges (old kernels, some file systems) plain reads and writes do it."""
    import os

    base = saved_model("llama", shard_kb=40)
    ms = learned_masks(base)
    reference = A.apply_masks(base, ms, tmp_path / "reference", progress=False)

    def unsupported(*args):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    out = A.apply_masks(base, ms, tmp_path / "fallback", progress=False)
    for shard in sorted(reference.glob("model-*.safetensors")):
        assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_masks_read_from_a_file_stay_packed_until_used(saved_model, tmp_path):
    from mft.masking.files import PackedMasks

    base = saved_model("llama", shard_kb=40)
    ms = learned_masks(base)
    write_masks(tmp_path / "masks.safetensors", ms)
    packed = read_masks(tmp_path / "masks.safetensors")
    assert isinstance(packed.masks, PackedMasks)
    assert packed.shapes == ms.shapes and packed.summary() == ms.summary()
    a = A.apply_masks(base, ms, tmp_path / "dense", progress=False)
    b = A.apply_masks(base, packed, tmp_path / "packed", progress=False)
    for shard in sorted(a.glob("model-*.safetensors")):
        assert (b / shard.name).read_bytes() == shard.read_bytes()


def test_legacy_bin_checkpoint(saved_model, tmp_path):
    base = saved_model("qwen2")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    state = load_all(base)
    torch.save(state, legacy / "pytorch_model.bin")
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            (legacy / f.name).write_bytes(f.read_bytes())
    ms = learned_masks(base)
    out = A.apply_masks(legacy, ms, tmp_path / "out", progress=False)
    after = load_all(out)
    assert (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()
    for key, w in state.items():
        name = key[: -len(".weight")]
        assert torch.equal(after[key], w * ms.masks[name] if name in ms.masks else w), key


def test_interrupted_apply_leaves_nothing(saved_model, tmp_path, monkeypatch):
    base = saved_model("llama", shard_kb=40)
    ms = learned_masks(base)

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "_copy_side_files", boom)
    with pytest.raises(KeyboardInterrupt):
        A.apply_masks(base, ms, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_a_failing_shard_stops_the_apply_and_leaves_nothing(saved_model, tmp_path, monkeypatch):
    base = saved_model("llama", shard_kb=40)
    ms = learned_masks(base)
    assert len(list(base.glob("*.safetensors"))) > 2  # several shards: they run two at a time
    calls, real = [], A._mask_in_place

    def fails_on_the_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real(*args)

    monkeypatch.setattr(A, "_mask_in_place", fails_on_the_third)
    with pytest.raises(OSError, match="disk full"):
        A.apply_masks(base, ms, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_existing_output_needs_overwrite(saved_model, tmp_path):
    base = saved_model("llama")
    ms = learned_masks(base)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(MftError, match="already exists and is not empty; pass --overwrite"):
        A.apply_masks(base, ms, out, progress=False)
    assert (out / "keep.txt").read_text() == "user data" and no_leftovers(tmp_path)
    A.apply_masks(base, ms, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists() and no_leftovers(tmp_path)


def test_masks_for_another_model_are_refused_before_writing(saved_model, tmp_path):
    base = saved_model("llama")
    ms = learned_masks(base)
    wrong_shape = MaskSet({**ms.masks, "model.layers.1.mlp.up_proj": torch.ones(7, 5, dtype=torch.bool)})
    with pytest.raises(MftError, match=r"mask for model.layers.1.mlp.up_proj has shape \(7, 5\) but the "
                                       r"checkpoint .* has \(72, 32\) there"):
        A.apply_masks(base, wrong_shape, tmp_path / "out", progress=False)
    missing = MaskSet({"model.layers.9.mlp.up_proj": torch.ones(72, 32, dtype=torch.bool)})
    with pytest.raises(MftError, match=r"the masks name module model.layers.9.mlp.up_proj, but checkpoint .* has "
                                       r"no tensor model.layers.9.mlp.up_proj.weight"):
        A.apply_masks(base, missing, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


# -- the command line --------------------------------------------------------------------------------------
def test_random_and_l1_baselines(saved_model, tmp_path):
    base = saved_model("llama")
    common = ["--base_model_name_or_path", str(base), "--masked_layers", "1 2", "--subnet_mode", "both",
              "--sparsity_attn", "0.9", "--sparsity_mlp", "0.8", "--save_masks"]
    assert main(["apply", "--random_masks", "--seed", "7", "--output_dir", str(tmp_path / "r1"), *common]) == 0
    assert main(["apply", "--random_masks", "--seed", "7", "--output_dir", str(tmp_path / "r2"), *common]) == 0
    assert main(["apply", "--random_masks", "--seed", "8", "--output_dir", str(tmp_path / "r3"), *common]) == 0
    r1, r2, r3 = (read_masks(tmp_path / r / "masks.safetensors") for r in ("r1", "r2", "r3"))
    assert r1.source == "random" and len(r1.masks) == 14
    assert all(torch.equal(r1.masks[n], r2.masks[n]) for n in r1.masks)
    assert any(not torch.equal(r1.masks[n], r3.masks[n]) for n in r1.masks)
    kept = {kind: [] for kind in ("attn", "mlp")}
    for n, m in r1.masks.items():
        kept[r1.kinds[n]].append(m.float().mean().item())
    assert abs(sum(kept["attn"]) / len(kept["attn"]) - 0.9) < 0.03
    assert abs(sum(kept["mlp"]) / len(kept["mlp"]) - 0.8) < 0.03

    assert main(["apply", "--use_l1_mask", "--output_dir", str(tmp_path / "l1"), *common]) == 0
    l1 = read_masks(tmp_path / "l1" / "masks.safetensors")
    weights = load_all(base)
    for n, m in l1.masks.items():
        keep = 0.9 if l1.kinds[n] == "attn" else 0.8
        assert torch.equal(m, local_mask(weights[f"{n}.weight"], keep))
    after = load_all(tmp_path / "l1")
    for key, w in weights.items():
        name = key[: -len(".weight")]
        assert torch.equal(after[key], w * l1.masks[name] if name in l1.masks else w)


def original_mft_checkpoint(base: Path, folder: Path, keep_attn=0.9, keep_mlp=0.8) -> dict[str, torch.Tensor]:
    """What the original training wrote: the model's weights plus `<module>.scores`, mask keys in config.json."""
    model = AutoModelForCausalLM.from_pretrained(base)
    inject_masks(model, MaskConfig(masked_layers=LAYERS, keep_ratio_attn=keep_attn, keep_ratio_mlp=keep_mlp), seed=5)
    model.config.update({"sparsity_attn": keep_attn, "sparsity_mlp": keep_mlp, "subnet_mode": "both",
                         "subnet_type": "local", "masked_layers": "1 2"})
    model.save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert sum(k.endswith(".scores") for k in f.keys()) == 14
    return extract_masks(model)


def test_original_checkpoint_with_scores(saved_model, tmp_path):
    base = saved_model("llama")
    expected = original_mft_checkpoint(base, tmp_path / "mft_ckpt")
    assert main(["apply", "--base_model_name_or_path", str(base), "--mask_model_name_or_path",
                 str(tmp_path / "mft_ckpt"), "--output_dir", str(tmp_path / "applied"), "--save_masks"]) == 0
    got = read_masks(tmp_path / "applied" / "masks.safetensors")
    assert got.source == "learned" and got.masks.keys() == expected.keys()
    assert all(torch.equal(got.masks[n], expected[n]) for n in expected)
    assert abs(got.masks["model.layers.1.mlp.up_proj"].float().mean().item() - 0.8) < 0.01
    weights, after = load_all(base), load_all(tmp_path / "applied")
    assert not any(k.endswith(".scores") for k in after)
    for key, w in weights.items():
        name = key[: -len(".weight")]
        assert torch.equal(after[key], w * expected[name] if name in expected else w)


@pytest.mark.parametrize("flag", ["--sparsity_attn", "--keep_ratio_attn", "--keep-ratio-attn"])
def test_command_line_ratios_override_an_original_checkpoints_config(saved_model, tmp_path, flag):
    """break9 #4: config.json says sparsity_attn 0.9 (published spelling); `--sparsity_attn 0.5` (any spelling)
    replaces it, as the README says, instead of failing as two disagreeing spellings of one setting."""
    base = saved_model("llama")
    original_mft_checkpoint(base, tmp_path / "mft_ckpt")
    assert main(["apply", "--base_model_name_or_path", str(base), "--mask_model_name_or_path",
                 str(tmp_path / "mft_ckpt"), "--output_dir", str(tmp_path / "applied"), "--save_masks", flag, "0.5",
                 "--quiet"]) == 0
    got = read_masks(tmp_path / "applied" / "masks.safetensors").masks
    q = got["model.layers.1.self_attn.q_proj"]
    assert int((q == 0).sum()) == num_pruned(q.numel(), 0.5)  # attention at the new ratio
    up = got["model.layers.1.mlp.up_proj"]
    assert int((up == 0).sum()) == num_pruned(up.numel(), 0.8)  # mlp still at config.json's 0.8


def test_run_folder_and_script_with_original_flags(saved_model, tmp_path):
    base = saved_model("llama")
    ms = learned_masks(base, seed=11)
    run = tmp_path / "masktune_run"
    write_masks(run / "masks.safetensors", ms)
    (run / A.RUN_INFO).write_text(json.dumps({"base_model": str(base)}))
    # The original launch line: base model path omitted, taken from the run folder.
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "apply_masks.py"), "--mask_model_name_or_path",
                             str(run), "--output_dir", str(run / "mask_applied"), "--save_masks", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "learned masks on 14 modules" in result.stdout
    after = load_all(run / "mask_applied")
    for name, mask in ms.masks.items():
        assert torch.equal(after[f"{name}.weight"], load_all(base)[f"{name}.weight"] * mask)
    assert torch.equal(read_masks(run / "mask_applied").masks[name], mask)

    # --only_save_masks with the original format
    assert main(["apply", "--mask_model_name_or_path", str(run), "--output_dir", str(tmp_path / "only"),
                 "--only_save_masks", "--save_masks_format", "pt"]) == 0
    assert [p.name for p in (tmp_path / "only").iterdir()] == ["masks.pt"]
    assert torch.equal(torch.load(tmp_path / "only" / "masks.pt", weights_only=True)[name].bool(), mask)
    # --masks_file with that masks.pt
    assert main(["apply", "--base_model_name_or_path", str(base), "--masks_file", str(tmp_path / "only" / "masks.pt"),
                 "--output_dir", str(tmp_path / "from_pt")]) == 0
    assert torch.equal(load_all(tmp_path / "from_pt")[f"{name}.weight"], after[f"{name}.weight"])


@pytest.mark.parametrize("args, message", [
    (["--random_masks", "--masked_layers", "1", "--sparsity_attn", "1.5"], "must be in (0, 1]"),
    (["--random_masks", "--masked_layers", "1", "--sparsity_mlp", "0"], "must be in (0, 1]"),
    (["--random_masks", "--masked_layers", "4"], "masked layer 4 is out of range: the model has 4 decoder layers"),
    (["--use_l1_mask", "--target_modules", "nothing_like_this"], "no module matches the selection"),
    (["--random_masks"], "need --masked_layers"),
    (["--random_masks", "--use_l1_mask", "--masked_layers", "1"], "give exactly one mask source"),
    ([], "give exactly one mask source"),
])
def test_cli_bad_input(saved_model, tmp_path, capsys, args, message):
    base = saved_model("llama")
    out = tmp_path / "out"
    assert main(["apply", "--base_model_name_or_path", str(base), "--output_dir", str(out), *args]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists() and no_leftovers(tmp_path)


def test_cli_bad_mask_files(saved_model, tmp_path, capsys):
    base = saved_model("llama")
    broken = tmp_path / "masks.safetensors"
    write_masks(broken, learned_masks(base))
    broken.write_bytes(broken.read_bytes()[:300])
    assert main(["apply", "--base_model_name_or_path", str(base), "--masks_file", str(broken),
                 "--output_dir", str(tmp_path / "out")]) == 1
    assert "corrupt or truncated" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"
    write_masks(other, MaskSet({"model.layers.1.self_attn.q_proj": torch.ones(16, 16, dtype=torch.bool)}))
    assert main(["apply", "--base_model_name_or_path", str(base), "--masks_file", str(other),
                 "--output_dir", str(tmp_path / "out")]) == 1
    assert "has shape (16, 16) but the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_apply_bar_counts_bytes_and_moves_within_a_shard(saved_model, tmp_path, monkeypatch, capsys):
    """The bar counts the checkpoint's bytes and moves every COPY_CHUNK bytes, not once per shard: a
    one-shard checkpoint copied in 16 KiB chunks logs each 10 % (stderr is not a terminal here: plain lines)."""
    base = saved_model("llama")
    (shard,) = Path(base).glob("*.safetensors")
    monkeypatch.setattr(A, "COPY_CHUNK", 16 << 10)
    monkeypatch.delenv("MFT_QUIET", raising=False)
    A.apply_masks(base, learned_masks(base), tmp_path / "out", progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("apply masks: ")]
    assert shard.stat().st_size > 10 * (16 << 10)
    assert [line.split()[2] for line in lines] == [f"{p}%" for p in range(10, 101, 10)] or len(lines) >= 9
    assert lines[-1].startswith("apply masks: 100% ") and " B [" in lines[-1]
    monkeypatch.setenv("MFT_QUIET", "1")
    masks = learned_masks(base)
    capsys.readouterr()  # the test's own from_pretrained above may draw transformers' loading bar
    A.apply_masks(base, masks, tmp_path / "quiet", progress=True)
    assert capsys.readouterr().err == ""
