"""Read a Hugging Face model folder's weights without loading the model.

Safetensors shards are read through their headers: shapes and byte ranges come from the JSON header, and a
tensor is materialised only when asked for. Legacy `pytorch_model*.bin` shards are read whole, with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from mft.errors import MftError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def resolve_model_dir(name_or_path: str) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloaded (config, tokenizer, weights)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise MftError(f"{name_or_path} is a file; expected a model folder (config.json + weights) or a hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path))
    except Exception as exc:
        raise MftError(f"{name_or_path} is not a local folder and could not be fetched from the Hugging Face "
                       f"hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset where the data starts) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise MftError(f"{path} is truncated: no safetensors header")
        (size,) = struct.unpack("<Q", raw)
        header = f.read(size)
    if len(header) < size:
        raise MftError(f"{path} is truncated: header of {size} bytes, file shorter")
    try:
        return json.loads(header), 8 + size
    except json.JSONDecodeError as exc:
        raise MftError(f"{path} has a corrupt safetensors header ({exc})") from None


class Checkpoint:
    """The weight files of a model folder: which tensor lives in which shard, with which shape."""

    def __init__(self, name_or_path: str | Path):
        self.path = resolve_model_dir(str(name_or_path))
        self.weight_map = self._weight_map()  # tensor name -> shard file name
        self.shards = sorted(set(self.weight_map.values()))
        self.format = "safetensors" if all(s.endswith(".safetensors") for s in self.shards) else "bin"
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def _weight_map(self) -> dict[str, str]:
        for index in INDEX_FILES:
            if (self.path / index).exists():
                weight_map = json.loads((self.path / index).read_text())["weight_map"]
                missing = sorted({s for s in weight_map.values() if not (self.path / s).exists()})
                if missing:
                    raise MftError(f"{self.path / index} lists shards that are missing: {', '.join(missing)}")
                return weight_map
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / single).exists():
                return {name: single for name in self._keys_of(single)}
        raise MftError(f"{self.path} holds no model weights (expected model.safetensors, pytorch_model.bin or "
                       "a sharded index)")

    def _keys_of(self, shard: str) -> list[str]:
        if shard.endswith(".safetensors"):
            header, _ = read_safetensors_header(self.path / shard)
            return [k for k in header if k != "__metadata__"]
        return list(self._load_bin(shard))

    def _load_bin(self, shard: str) -> dict[str, torch.Tensor]:
        try:
            return torch.load(self.path / shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            import pickle

            from mft.masking.files import unpickling_detail

            if isinstance(exc, pickle.UnpicklingError):
                raise MftError(f"refusing to load {self.path / shard}: it is a pickle holding more than tensors "
                               f"({unpickling_detail(exc)}); weights are only read as plain tensors. Convert the "
                               "checkpoint to safetensors where it was made") from None
            raise MftError(f"cannot read {self.path / shard} (corrupt or truncated?): {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

    @property
    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape (safetensors: from the headers alone)."""
        if self._shapes is None:
            shapes = {}
            for shard in self.shards:
                if shard.endswith(".safetensors"):
                    header, _ = read_safetensors_header(self.path / shard)
                    shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
                else:
                    shapes.update({k: tuple(v.shape) for k, v in self._load_bin(shard).items()})
            self._shapes = shapes
        return self._shapes

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Materialise the named tensors only (grouped by shard)."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        for shard, shard_names in by_shard.items():
            if shard.endswith(".safetensors"):
                with safe_open(str(self.path / shard), framework="pt") as f:
                    out.update({n: f.get_tensor(n) for n in shard_names})
            else:
                tensors = self._load_bin(shard)
                out.update({n: tensors[n].clone() for n in shard_names})
        return out

    def config(self) -> dict:
        path = self.path / "config.json"
        if not path.exists():
            raise MftError(f"{self.path} has no config.json")
        return json.loads(path.read_text())

    def weight_key(self, module: str) -> str:
        """The checkpoint key of `module`'s weight: `<module>.weight`, else the one key that equals it up to a
        leading prefix."""
        key = f"{module}.weight"
        if key in self.weight_map:
            return key
        # The same module under another prefix (e.g. a bare `LlamaModel` checkpoint without "model."):
        matches = [k for k in self.weight_map if k.endswith("." + key) or key.endswith("." + k)]
        if len(matches) == 1:
            return matches[0]
        raise MftError(f"the masks name module {module}, but checkpoint {self.path} has no tensor {key}"
                       + (f" (candidates: {', '.join(matches[:4])})" if matches else "")
                       + "; were these masks made for another model?")


def model_skeleton(path: Path):
    """The model built from config.json on the meta device: module names and shapes, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise MftError(f"cannot read the model config in {path}: {exc}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
