"""Mask files: our compact `masks.safetensors`, the original's `masks.pt`, and dense masks.

Our format (`format_version` 1) is a safetensors file with one tensor per masked module:

    tensor  <module name>   uint8[ceil(n / 8)]  the mask, row-major, bit-packed: entry i is bit (i % 8)
                                                 (least significant first) of byte i // 8; 1 = kept.
                                                 Padding bits of the last byte are 0.
    metadata (all strings)
      format          "mft-masks"
      format_version  "1"
      modules         JSON {name: {"shape": [out, in], "kind": "attn"|"mlp", "keep_ratio": target,
                                   "kept": number of ones, "layout": "linear"|"conv1d"|"experts"|"experts_t",
                                   "split": null|"halves"|"interleaved", "experts": null|number of experts}}
                      (layout, split, experts: see mft.masking.select; absent in older files, where a 3-D
                      mask is a fused expert parameter and a 2-D one a linear weight)
      fingerprint     "sha256:<hex>" of the sorted lines "<name> <out>x<in>" (what the masks fit)
      source          "learned" | "random" | "l1" | "imported"
      mask_config     JSON of the MaskConfig that made them (optional)
      base_model      the checkpoint they were made for (optional)

One bit per entry: a 7B model's four masked layers take 100 MB instead of the original's 3.2 GB of floats.

`read_masks()` also accepts the original's `masks.pt` (`{module name: dense float 0/1 tensor}`) and dense
bool / uint8 / float tensors in `.pt`, `.bin` or `.safetensors` files. Pickle files are only ever read with
`torch.load(weights_only=True)`: a file that carries code is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mft.errors import MftError
from mft.paths import follow_umask

FORMAT = "mft-masks"
FORMAT_VERSION = "1"
DEFAULT_NAME = "masks.safetensors"
_LAYOUT_RANK = {"linear": 2, "conv1d": 2, "experts": 3, "experts_t": 3}  # see mft.masking.select


class PackedMasks(Mapping):
    """Masks kept bit-packed as read from a file, unpacked one at a time on access (never cached), so a
    consumer that goes module by module — the streaming apply — holds one unpacked mask at a time."""

    def __init__(self, packed: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]):
        self.packed, self.shapes = packed, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_bits(self.packed[name], self.shapes[name])

    def __iter__(self):
        return iter(self.packed)

    def __len__(self) -> int:
        return len(self.packed)

    def kept(self, name: str) -> int:
        return popcount(self.packed[name])


@dataclass
class MaskSet:
    """Masks by module name (bool tensors, CPU; possibly a lazy `PackedMasks`) plus what is known of them."""

    masks: Mapping[str, torch.Tensor]
    kinds: dict[str, str] = field(default_factory=dict)
    keep_ratios: dict[str, float] = field(default_factory=dict)
    source: str = "imported"
    mask_config: dict | None = None
    base_model: str | None = None
    format: str = FORMAT  # what the file was: "mft-masks", "original-pt" or "dense"
    # {name: {"layout", "split", "experts"}} (Target.info()); names not listed are linear (2-D) or experts (3-D)
    layouts: dict[str, dict] = field(default_factory=dict)

    def layout(self, name: str) -> dict:
        """{"layout", "split", "experts"} of one mask, recorded or inferred from its shape."""
        if name in self.layouts:
            return self.layouts[name]
        shape = self.shapes[name]
        return {"layout": "experts" if len(shape) == 3 else "linear", "split": None,
                "experts": shape[0] if len(shape) == 3 else None}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        if isinstance(self.masks, PackedMasks):
            return dict(self.masks.shapes)
        return {name: tuple(m.shape) for name, m in self.masks.items()}

    def kept(self, name: str) -> int:
        """Kept entries of one module's mask (from the packed bits when the masks are packed)."""
        if isinstance(self.masks, PackedMasks):
            return self.masks.kept(name)
        return int(self.masks[name].sum())

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.shapes)

    def summary(self) -> list[dict]:
        """Per module: name, shape, entries, kept, kept fraction (and target keep ratio when known)."""
        rows = []
        for name, shape in self.shapes.items():
            kept, entries = self.kept(name), int(np.prod(shape))
            rows.append({"module": name, "shape": list(shape), "entries": entries, "kept": kept,
                         "kept_fraction": kept / entries, "keep_ratio": self.keep_ratios.get(name),
                         **self.layout(name)})
        return rows


def fingerprint(shapes: dict[str, tuple[int, ...]]) -> str:
    lines = sorted(f"{name} {'x'.join(map(str, shape))}" for name, shape in shapes.items())
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 tensor of ceil(n / 8) bytes (row-major, least significant bit first)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy(), count=n, bitorder="little")  # 0/1 bytes: viewed as bool, no copy
    return torch.from_numpy(bits.view(bool)).view(shape)


def popcount(packed: torch.Tensor) -> int:
    """Set bits of a packed mask (padding bits are 0), without unpacking it."""
    return int(np.bitwise_count(packed.numpy()).sum(dtype=np.int64))


# -- writing ---------------------------------------------------------------------------------------------
def write_masks(path: str | os.PathLike, mask_set: MaskSet) -> Path:
    """Write `mask_set` in our format, atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    modules = {}
    tensors = {}
    packed = mask_set.masks.packed if isinstance(mask_set.masks, PackedMasks) else None
    for name, shape in mask_set.shapes.items():
        if packed is not None:
            tensors[name] = packed[name]
        else:
            m = mask_set.masks[name]
            if m.dtype != torch.bool:
                raise TypeError(f"mask {name} must be a bool tensor, got {m.dtype}")
            tensors[name] = pack_bits(m)
        modules[name] = {"shape": list(shape), "kind": mask_set.kinds.get(name),
                         "keep_ratio": mask_set.keep_ratios.get(name), "kept": popcount(tensors[name]),
                         **mask_set.layout(name)}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "modules": json.dumps(modules),
                "fingerprint": mask_set.fingerprint, "source": mask_set.source}
    if mask_set.mask_config is not None:
        metadata["mask_config"] = json.dumps(mask_set.mask_config)
    if mask_set.base_model is not None:
        metadata["base_model"] = str(mask_set.base_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        follow_umask(tmp)  # save_file creates 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_original(path: str | os.PathLike, mask_set: MaskSet, dtype: torch.dtype = torch.float32) -> Path:
    """Write the original code's `masks.pt`: `torch.save({module name: dense float 0/1 tensor})`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({name: m.to(dtype) for name, m in mask_set.masks.items()}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- reading ---------------------------------------------------------------------------------------------
def read_masks(path: str | os.PathLike) -> MaskSet:
    """Read any supported mask file (format detected from the content, not trusted from the name)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / DEFAULT_NAME, path / "masks.pt"]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise MftError(f"{path} is a folder without {DEFAULT_NAME} or masks.pt")
        path = found
    if not path.exists():
        raise MftError(f"mask file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise MftError(f"{path} is empty or truncated ({path.stat().st_size} bytes); not a mask file")
    # safetensors: an 8-byte little-endian header length, then the JSON header itself.
    if head[8:9] == b"{":
        return _read_safetensors(path)
    return _read_pickle(path)  # torch.save zip archives and raw pickles alike


def _read_safetensors(path: Path) -> MaskSet:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers and short files
        raise MftError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}") from None
    if metadata.get("format") != FORMAT:
        return MaskSet(_dense_masks(tensors, path), format="dense")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise MftError(f"{path} is mask format version {version}; this mft reads version {FORMAT_VERSION}. "
                       "Upgrade mft to read it.")
    try:
        modules = json.loads(metadata["modules"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise MftError(f"{path}: mask metadata 'modules' is missing or not JSON ({exc})") from None
    packed, shapes, kinds, ratios, layouts = {}, {}, {}, {}, {}
    for name, info in modules.items():
        shape = tuple(info["shape"])
        bits = tensors.get(name)
        n = int(np.prod(shape))
        if bits is None or bits.dtype != torch.uint8 or bits.numel() != (n + 7) // 8:
            got = "missing" if bits is None else f"{bits.dtype} x {bits.numel()}"
            raise MftError(f"{path}: module {name} should hold {(n + 7) // 8} packed bytes for shape {shape}, "
                           f"found {got}; the file is corrupt")
        kept = popcount(bits)
        if kept != info.get("kept", kept) or (n % 8 and int(bits[-1]) >> (n % 8)):
            raise MftError(f"{path}: module {name} has {kept} kept entries but its metadata says "
                           f"{info.get('kept')} (or padding bits are set); the file is corrupt")
        packed[name], shapes[name] = bits, shape
        if info.get("kind"):
            kinds[name] = info["kind"]
        if info.get("keep_ratio") is not None:
            ratios[name] = float(info["keep_ratio"])
        if info.get("layout"):
            if info["layout"] not in _LAYOUT_RANK or len(shape) != _LAYOUT_RANK[info["layout"]] \
                    or info.get("split") not in (None, "halves", "interleaved"):
                raise MftError(f"{path}: module {name} has layout {info['layout']!r} / split {info.get('split')!r} "
                               f"for shape {shape}; expected linear or conv1d (2-D), experts or experts_t (3-D), "
                               "split none, halves or interleaved; the file is corrupt")
            layouts[name] = {"layout": info["layout"], "split": info.get("split"), "experts": info.get("experts")}
    masks = PackedMasks(packed, shapes)
    mask_set = MaskSet(masks, kinds, ratios, metadata.get("source", "imported"),
                       json.loads(metadata["mask_config"]) if "mask_config" in metadata else None,
                       metadata.get("base_model"), FORMAT, layouts)
    if "fingerprint" in metadata and metadata["fingerprint"] != mask_set.fingerprint:
        raise MftError(f"{path}: the fingerprint in the metadata does not match the masks; the file is corrupt")
    return mask_set


def _read_pickle(path: Path) -> MaskSet:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MftError(f"refusing to load {path}: it is a pickle holding more than tensors (code or arbitrary "
                       f"objects: {unpickling_detail(exc)}), and mask files are only read as plain tensors; a mask "
                       "file should hold {module name: 0/1 tensor} and nothing else") from None
    except Exception as exc:  # a damaged file can trip the unpickler in many ways (IndexError, KeyError, ...)
        raise MftError(f"{path} is not a readable torch file (corrupt or truncated?): "
                       f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise MftError(f"{path} holds {type(obj).__name__}, expected a dict {{module name: mask tensor}} "
                       "(the original masks.pt layout)")
    return MaskSet(_dense_masks(obj, path), format="original-pt")


def unpickling_detail(exc: Exception) -> str:
    """What torch's weights-only unpickler refused (e.g. `GLOBAL builtins.print`), without its advice to load
    the file with `weights_only=False` (which would run the code the file carries)."""
    import re

    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"it names {found.group(1)}" if "GLOBAL" in found.group(0) else f"unsupported operand {found.group(1)}"
    return "not a plain tensor file"


def _dense_masks(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Dense masks of any dtype -> bool, checking they are 0/1; keys may carry a `.weight` suffix."""
    if not tensors:
        raise MftError(f"{path} holds no tensors")
    masks = {}
    for key, t in tensors.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        if t.dtype != torch.bool:
            if not bool(((t == 0) | (t == 1)).all()):
                raise MftError(f"{path}: tensor {key} is not a 0/1 mask (dtype {t.dtype}, values such as "
                               f"{t.flatten()[((t != 0) & (t != 1)).flatten()][:3].tolist()})")
            t = t != 0
        masks[name] = t.contiguous()
    return masks
