"""Mask files: our bit-packed format, the original's masks.pt, dense masks, and hostile or broken files."""

from __future__ import annotations

import json
import os
import pickle
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mft.cli import main
from mft.errors import MftError
from mft.masking.files import FORMAT, MaskSet, export_original, pack_bits, read_masks, unpack_bits, write_masks


def random_mask_set(seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"model.layers.4.self_attn.q_proj": (64, 48), "model.layers.4.mlp.down_proj": (48, 131)}
    masks = {name: torch.rand(shape, generator=g) < 0.9 for name, shape in shapes.items()}
    kinds = {name: "attn" if "attn" in name else "mlp" for name in shapes}
    return MaskSet(masks, kinds, {n: 0.9 for n in shapes}, "learned", {"masked_layers": [4]}, "some/base")


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_pack_unpack_roundtrip(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, (n,)), mask)
    # bit order: entry i is bit i % 8 of byte i // 8, least significant first
    one = torch.zeros(n, dtype=torch.bool)
    one[n - 1] = True
    assert pack_bits(one)[(n - 1) // 8] == 1 << ((n - 1) % 8)


def test_roundtrip_and_metadata(tmp_path):
    ms = random_mask_set()
    path = write_masks(tmp_path / "masks.safetensors", ms)
    back = read_masks(path)
    assert back.masks.keys() == ms.masks.keys()
    for name in ms.masks:
        assert torch.equal(back.masks[name], ms.masks[name]) and back.masks[name].dtype == torch.bool
    assert back.kinds == ms.kinds and back.keep_ratios == ms.keep_ratios
    assert back.source == "learned" and back.base_model == "some/base" and back.mask_config == {"masked_layers": [4]}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT and meta["format_version"] == "1"
    modules = json.loads(meta["modules"])
    assert modules["model.layers.4.mlp.down_proj"]["shape"] == [48, 131]
    assert modules["model.layers.4.mlp.down_proj"]["kept"] == int(ms.masks["model.layers.4.mlp.down_proj"].sum())
    assert meta["fingerprint"] == ms.fingerprint and meta["fingerprint"].startswith("sha256:")
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_one_bit_per_entry(tmp_path):
    ms = random_mask_set(shapes={f"m.layers.{i}.mlp.up_proj": (512, 512) for i in range(4)})
    path = write_masks(tmp_path / "masks.safetensors", ms)
    entries = 4 * 512 * 512
    assert 8 * path.stat().st_size / entries <= 1.01
    original = export_original(tmp_path / "masks.pt", ms)
    assert original.stat().st_size > 30 * path.stat().st_size  # 32-bit floats


def test_fingerprint_depends_on_names_and_shapes():
    a = random_mask_set()
    b = random_mask_set(seed=1)  # same names and shapes, other values
    c = random_mask_set(shapes={"model.layers.4.self_attn.q_proj": (48, 64), "model.layers.4.mlp.down_proj": (48, 131)})
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_original_masks_pt_import_and_export(tmp_path):
    ms = random_mask_set()
    # The original's file: torch.save({module name: dense float mask shaped like the weight}).
    torch.save({name: m.float() for name, m in ms.masks.items()}, tmp_path / "masks.pt")
    back = read_masks(tmp_path / "masks.pt")
    assert back.format == "original-pt"
    assert all(torch.equal(back.masks[n], ms.masks[n]) for n in ms.masks)
    export_original(tmp_path / "exported.pt", ms)
    raw = torch.load(tmp_path / "exported.pt", weights_only=True)
    assert set(raw) == set(ms.masks)
    for name, t in raw.items():
        assert t.dtype == torch.float32 and set(t.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(t.bool(), ms.masks[name])


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("container", ["pt", "safetensors"])
def test_dense_masks(tmp_path, dtype, container):
    ms = random_mask_set()
    tensors = {f"{n}.weight" if container == "pt" else n: m.to(dtype) for n, m in ms.masks.items()}
    path = tmp_path / f"dense.{container}"
    torch.save(tensors, path) if container == "pt" else save_file(tensors, str(path))
    back = read_masks(path)
    assert set(back.masks) == set(ms.masks)  # a ".weight" suffix is dropped
    assert all(torch.equal(back.masks[n], ms.masks[n]) for n in ms.masks)


def test_dense_mask_with_other_values_is_refused(tmp_path):
    torch.save({"a.q_proj": torch.tensor([[0.0, 0.5]])}, tmp_path / "bad.pt")
    with pytest.raises(MftError, match=r"tensor a.q_proj is not a 0/1 mask .* values such as \[0.5\]"):
        read_masks(tmp_path / "bad.pt")


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"model.layers.0.mlp.up_proj": Exploit(marker)}
    path = tmp_path / "masks.pt"
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(MftError, match=r"refusing to load .*masks.pt: it is a pickle holding more than tensors"):
        read_masks(path)
    assert not marker.exists()
    assert main(["masks", "info", str(path)]) == 1 and not marker.exists()


def test_corrupt_and_truncated_files(tmp_path):
    path = write_masks(tmp_path / "masks.safetensors", random_mask_set())
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MftError, match="not a readable safetensors file"):
        read_masks(tmp_path / "short.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(MftError, match="empty or truncated"):
        read_masks(tmp_path / "tiny.safetensors")
    for seed in range(20):  # noise of every kind: pickle opcodes, zip-like, safetensors-like headers
        noise = random.Random(seed).randbytes(4096)
        for head in (b"", b"\x80\x02", b"PK\x03\x04", (100).to_bytes(8, "little") + b"{"):
            (tmp_path / "noise.bin").write_bytes(head + noise)
            with pytest.raises(MftError):
                read_masks(tmp_path / "noise.bin")
    torch.save({"a": torch.ones(3)}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:200])
    with pytest.raises(MftError, match="not a readable torch file"):
        read_masks(tmp_path / "cut.pt")
    # A flipped bit inside a packed mask contradicts the recorded kept count.
    header_len = int.from_bytes(data[:8], "little")
    flipped = bytearray(data)
    flipped[8 + header_len + 3] ^= 0b100
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(MftError, match="kept entries but its metadata says"):
        read_masks(tmp_path / "flip.safetensors")
    with pytest.raises(MftError, match="does not exist"):
        read_masks(tmp_path / "missing.safetensors")


def test_padding_bits_must_be_zero(tmp_path):
    ms = random_mask_set(shapes={"m.layers.0.mlp.up_proj": (3, 5)})  # 15 entries: one padding bit
    path = write_masks(tmp_path / "masks.safetensors", ms)
    with safe_open(str(path), framework="pt") as f:
        meta, packed = f.metadata(), f.get_tensor("m.layers.0.mlp.up_proj")
    assert packed.numel() == 2 and int(packed[1]) >> 7 == 0
    packed[1] |= 0b1000_0000  # set the padding bit; kept count changes too, so fix the metadata to match
    modules = json.loads(meta["modules"])
    modules["m.layers.0.mlp.up_proj"]["kept"] += 1
    save_file({"m.layers.0.mlp.up_proj": packed}, str(path), metadata={**meta, "modules": json.dumps(modules)})
    with pytest.raises(MftError, match="padding bits are set"):
        read_masks(path)


def test_newer_format_version_is_refused(tmp_path):
    ms = random_mask_set()
    path = write_masks(tmp_path / "masks.safetensors", ms)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**meta, "format_version": "9"})
    with pytest.raises(MftError, match="mask format version 9; this mft reads version 1"):
        read_masks(path)


def test_masks_info_and_export_cli(tmp_path, capsys):
    ms = random_mask_set()
    path = write_masks(tmp_path / "masks.safetensors", ms)
    assert main(["masks", "info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    entries = 64 * 48 + 48 * 131
    kept = sum(int(m.sum()) for m in ms.masks.values())
    assert info["total"]["entries"] == entries and info["total"]["kept"] == kept
    assert info["total"]["kept_fraction"] == pytest.approx(kept / entries)
    assert info["total"]["file_bytes"] == path.stat().st_size
    assert [r["module"] for r in info["modules"]] == list(ms.masks)
    assert main(["masks", "info", str(path)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.4.mlp.down_proj" in table and f"{100 * kept / entries:.3f}%" in table
    assert main(["masks", "export", str(path), str(tmp_path / "out.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True)["model.layers.4.mlp.down_proj"].bool(),
                       ms.masks["model.layers.4.mlp.down_proj"])
    assert main(["masks", "export", str(tmp_path / "out.pt"), str(tmp_path / "again.safetensors")]) == 0
    assert torch.equal(read_masks(tmp_path / "again.safetensors").masks["model.layers.4.self_attn.q_proj"],
                       ms.masks["model.layers.4.self_attn.q_proj"])
    assert main(["masks", "export", str(path), str(tmp_path / "out.txt")]) == 1
    assert "use a .pt (original masks.pt) or .safetensors (ours) name" in capsys.readouterr().err
