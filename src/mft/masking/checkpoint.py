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


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id at `revision` (branch, tag or commit; None: the
    default branch), downloaded: its top-level files (config, tokenizer, weights), not its subfolders (e.g.
    Llama 3.1's `original/` consolidated weights, which nothing here reads)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise MftError(f"{name_or_path} is a file; expected a model folder (config.json + weights) or a hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision, ignore_patterns=["*/*"]))
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

    def weight_key(self, module: str, suffix: str = ".weight") -> str:
        """The checkpoint key of `module`'s weight: `<module>.weight`, else the one key that equals it up to a
        leading prefix."""
        key = f"{module}{suffix}"
        if key in self.weight_map:
            return key
        # The same module under another prefix (e.g. a bare `LlamaModel` checkpoint without "model."):
        matches = [k for k in self.weight_map if k.endswith("." + key) or key.endswith("." + k)]
        if len(matches) == 1:
            return matches[0]
        raise MftError(f"the masks name module {module}, but checkpoint {self.path} has no tensor {key}"
                       + (f" (candidates: {', '.join(matches[:4])})" if matches else "")
                       + "; were these masks made for another model?")


def model_skeleton(path: Path | str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The model built from config.json on the meta device: module names and shapes, no memory, no weight file
    read. Built with the class `from_pretrained` would use (`mft.models.auto_class`: image-text checkpoints as
    image-text models). `path`: a local folder or a hub id (then only its config.json is fetched, at
    `revision`); `trust_remote_code`: allow a config that names its own code (`auto_map`)."""
    from transformers import AutoConfig

    from mft.models import skeleton_from_config

    try:
        config = AutoConfig.from_pretrained(str(path), revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise MftError(f"cannot read the model config in {path}: {exc}") from None
    return skeleton_from_config(config, trust_remote_code=trust_remote_code)


def param_name(mask_name: str, shape: tuple[int, ...], layout: str | None = None) -> str:
    """The model parameter a mask belongs to: the mask's own name for a 3-D expert parameter (layout `experts*`,
    or any 3-D mask when the layout is not recorded), `<module>.weight` for linear and Conv1D weights."""
    if layout is not None:
        return mask_name if layout.startswith("experts") else f"{mask_name}.weight"
    return mask_name if len(shape) == 3 else f"{mask_name}.weight"


class WeightLocator:
    """Where a model parameter's entries live in a checkpoint folder, as `from_pretrained` would read them.

    1. Under its own name (`model.layers.0.self_attn.q_proj.weight`, Llama 4's fused
       `feed_forward.experts.gate_up_proj`): read and written as stored.
    2. Otherwise through transformers' own weight conversion mapping (`revert_weight_conversion`, what
       `save_pretrained` uses): Mixtral's per-expert `block_sparse_moe.experts.N.w1/w3` hold the gate / up
       halves of `mlp.experts.gate_up_proj[N]`, Qwen-MoE's `mlp.experts.N.gate_proj/up_proj`, Gemma 3's
       `language_model.model.layers...` is memory's `model.language_model.layers...`. A tensor in memory layout
       (a mask, an index map) is converted by the same call into the on-disk tensors and layouts; every key it
       gives must be in the checkpoint with that shape.
    3. Otherwise the one key equal to the name up to a leading prefix (a bare `LlamaModel` checkpoint).
    Anything else is refused naming the parameter and the candidates.
    """

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._skeleton = None

    @property
    def skeleton(self):
        if self._skeleton is None:
            self._skeleton = model_skeleton(self.checkpoint.path)
        return self._skeleton

    def _revert(self, param: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.skeleton, {param: tensor})

    def locate(self, mask_name: str, shape: tuple[int, ...], layout: str | None = None) -> tuple[dict, bool]:
        """({checkpoint key: shape on disk}, whether the conversion mapping is needed)."""
        param = param_name(mask_name, shape, layout)
        shapes = self.checkpoint.shapes()
        if param in shapes:
            if tuple(shapes[param]) != tuple(shape):
                raise MftError(f"mask for {mask_name} has shape {tuple(shape)} but the checkpoint "
                               f"{self.checkpoint.path} has {tuple(shapes[param])} there; were these masks made for "
                               "another model?")
            return {param: tuple(shape)}, False
        try:
            reverted = self._revert(param, torch.empty(shape, dtype=torch.bool, device="meta"))
        except MftError:
            raise
        except Exception:  # a name the mapping does not know: not a conversion case
            reverted = {}
        on_disk = {k: tuple(v.shape) for k, v in reverted.items()}
        if on_disk and param not in on_disk and all(shapes.get(k) == s for k, s in on_disk.items()):
            return on_disk, True
        key = self.checkpoint.weight_key(param[: -len(".weight")] if param.endswith(".weight") else param,
                                         suffix="" if not param.endswith(".weight") else ".weight")
        if tuple(shapes[key]) != tuple(shape):
            raise MftError(f"mask for {mask_name} has shape {tuple(shape)} but the checkpoint {self.checkpoint.path} "
                           f"has {tuple(shapes[key])} at {key}; were these masks made for another model?")
        return {key: tuple(shape)}, False

    def to_disk(self, mask_name: str, tensor: torch.Tensor, layout: str | None = None) -> dict[str, torch.Tensor]:
        """`tensor` (memory layout of the parameter) as the checkpoint stores it: {checkpoint key: tensor}."""
        keys, converted = self.locate(mask_name, tuple(tensor.shape), layout)
        if not converted:
            return {next(iter(keys)): tensor}
        return self._revert(param_name(mask_name, tuple(tensor.shape), layout), tensor)

    def read(self, mask_name: str, shape: tuple[int, ...], layout: str | None = None) -> torch.Tensor:
        """The parameter in memory layout, assembled from the checkpoint exactly as stored (no arithmetic)."""
        keys, converted = self.locate(mask_name, shape, layout)
        if not converted:
            key = next(iter(keys))
            return self.checkpoint.read([key])[key]
        n = int(torch.Size(shape).numel())
        index = torch.arange(n, dtype=torch.int32 if n < 2**31 else torch.int64).view(shape)
        where = self._revert(param_name(mask_name, shape, layout), index)  # memory positions, in disk layout
        tensors = self.checkpoint.read(list(where))
        out = torch.empty(n, dtype=next(iter(tensors.values())).dtype)
        filled = 0
        for key, positions in where.items():
            out[positions.flatten().long()] = tensors[key].flatten()
            filled += positions.numel()
        if filled != n:
            raise MftError(f"the checkpoint tensors {', '.join(where)} hold {filled} entries, but {mask_name} has {n}")
        return out.view(shape)
