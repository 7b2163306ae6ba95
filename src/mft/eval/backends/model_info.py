"""A checkpoint's own limits, read the way vLLM reads them, before any weight is loaded: its config, context
length (`resolve_max_model_len`), the tokens that end a generation (`stop_token_ids`), its dtype and the dtype
vLLM's `auto` gives it on a GPU (`auto_dtype`). Both backends use them, and the runner before loading.
"""

from __future__ import annotations

from pathlib import Path

from mft.errors import MftError

MAX_MODEL_LEN = 2048
DTYPES = ("auto", "bfloat16", "float16", "float32")

# -- the model's own limits and tokens, read the way vLLM reads them ------------------------------------

# vLLM's keys for a model's context length (`derive_max_model_len_and_key`, 0.11.1 and 0.33.0): the smallest
# one present in the text config, `model_max_length` overriding; RoPE scaling multiplies it, except for the
# rope types whose max_position_embeddings is already scaled and for gemma3.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
ROPE_TYPES_ALREADY_SCALED = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def load_config(model: str):
    """The checkpoint's `transformers` config; MftError when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError, KeyError) as exc:
        raise MftError(f"cannot read the config of model {model}: {exc}") from exc


def _rope_parameters(text) -> list[dict]:
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    if not isinstance(rope, dict):
        return []
    if "rope_type" in rope or "type" in rope or "factor" in rope:
        return [rope]
    return [r for r in rope.values() if isinstance(r, dict)]  # one per layer type


def model_context_length(config) -> tuple[int, str] | None:
    """(tokens, the config key it comes from): the longest sequence vLLM lets this model run; None when
    the config names none (vLLM then accepts any max_model_len)."""
    text = config.get_text_config()
    length, key = None, None
    for name in CONTEXT_KEYS:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and (length is None or value < length):
            length, key = value, name
    override = getattr(text, "model_max_length", None)
    if isinstance(override, int) and override:
        length, key = override, "model_max_length"
    if length is None:
        return None
    if "gemma3" not in getattr(text, "model_type", ""):
        factor = 1.0
        for rope in _rope_parameters(text):
            if rope.get("rope_type", rope.get("type")) not in ROPE_TYPES_ALREADY_SCALED:
                factor = rope.get("factor", factor) or 1.0
        if factor != 1.0:
            return int(length * factor), f"{key} x rope factor {factor}"
    return length, key


def resolve_max_model_len(requested: int | None, config, model: str = "the model") -> tuple[int, str | None]:
    """(max_model_len, a line to log or None), the same for both backends.

    `requested` None = the protocol's MAX_MODEL_LEN (2048), capped at the model's context length
    (`model_context_length`) with a line saying so. A requested length above the model's context is refused,
    as vLLM refuses it (`User-specified max_model_len ... is greater than the derived max_model_len`): past
    its trained positions a model gives garbage (RoPE) or fails (learned positions). MftError also for < 1.
    """
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise MftError(f"--max-model-len must be a positive number of tokens, got {requested}")
    context = model_context_length(config)
    if requested is None:
        if context is not None and context[0] < MAX_MODEL_LEN:
            return context[0], (f"max_model_len {context[0]}: the protocol's {MAX_MODEL_LEN} capped at {model}'s "
                                f"context ({context[1]} = {context[0]})")
        return MAX_MODEL_LEN, None
    if context is not None and requested > context[0]:
        raise MftError(f"--max-model-len {requested} is longer than {model}'s context ({context[1]} = "
                       f"{context[0]} in its config); vLLM refuses it and the model cannot use positions past "
                       f"it: pass --max-model-len {context[0]} or less")
    return requested, None


def stop_token_ids(model: str, tokenizer) -> list[int]:
    """The token ids that end a generation, as vLLM ends it: the tokenizer's EOS plus every id in the
    checkpoint's generation config `eos_token_id` (an int or a list; vLLM's
    `SamplingParams.update_from_generation_config` makes the extra ones stop tokens). The generation config
    is generation_config.json, or, when there is none, the one `transformers` derives from config.json.
    Sorted; empty when there is no EOS at all. The stopping token counts in `num_tokens` but adds no text.
    """
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(model)
    except OSError:
        generation = GenerationConfig.from_model_config(load_config(model))
    ids = generation.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted({int(i) for i in ids})


# -- dtype -----------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Model types vLLM refuses to run in float16 (`_FLOAT16_NOT_SUPPORTED_MODELS`, 0.11.1 and 0.33.0 together).
FLOAT16_UNSUPPORTED = ("gemma2", "gemma3", "gemma3_text", "glm4", "plamo2")


def safetensors_dtype(model: str) -> str | None:
    """The dtype of a local checkpoint's floating-point weights from its *.safetensors headers (the common
    type when they differ, e.g. float32 for bfloat16 + float32); None when there are none."""
    import json
    import struct

    import torch

    path = Path(model).expanduser()
    found = set()
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else []:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        found |= {SAFETENSORS_DTYPES[v["dtype"]] for k, v in header.items()
                  if k != "__metadata__" and v.get("dtype") in SAFETENSORS_DTYPES}
    if not found:
        return None
    common = torch.float16 if found == {"float16"} else torch.bfloat16 if found == {"bfloat16"} else None
    if common is None:
        common = torch.float32
        for name in found:
            common = torch.promote_types(common, getattr(torch, name))
    return str(common).removeprefix("torch.")


def checkpoint_dtype(model: str, config) -> tuple[str, str]:
    """(dtype name, where it was read): the config's `dtype`/`torch_dtype` (root, then text config), else
    the weights' dtype from the safetensors headers, else float32 (vLLM's order, `get_torch_dtype`)."""
    import torch

    for c in (config, config.get_text_config()):
        value = getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch."), "config"
        if isinstance(value, str) and value != "auto":
            return value, "config"
    weights = safetensors_dtype(model)
    if weights is not None:
        return weights, "weights"
    return "float32", "default"


def auto_dtype(checkpoint: str, model_type: str, capability: tuple[int, int] | None) -> str:
    """vLLM's `--dtype auto` (`_resolve_auto_dtype`, 0.11.1 and 0.33.0) on a CUDA GPU of compute
    `capability`: the GPU's dtypes are bfloat16, float16, float32 from 8.0 (Ampere), float16, float32 from
    6.0, float32 below, less float16 for FLOAT16_UNSUPPORTED models; a float32 checkpoint gets the first of
    them, another checkpoint dtype is kept when the GPU has it, else the first. `capability` None = a CPU:
    float32 (the hf backend; bfloat16 matmuls on a CPU are slow and inexact)."""
    if capability is None:
        return "float32"
    supported = ["bfloat16", "float16", "float32"] if capability >= (8, 0) else \
        ["float16", "float32"] if capability >= (6, 0) else ["float32"]
    if model_type in FLOAT16_UNSUPPORTED:
        supported = [d for d in supported if d != "float16"]
    if checkpoint == "float32" or checkpoint not in supported:
        return supported[0]
    return checkpoint


def check_dtype_on_gpu(dtype: str, capability: tuple[int, int] | None, model_type: str) -> None:
    """MftError for a dtype the GPU or vLLM cannot run: bfloat16 below compute capability 8.0 (vLLM's
    `check_if_supports_dtype`), float16 for FLOAT16_UNSUPPORTED models."""
    if dtype == "bfloat16" and capability is not None and capability < (8, 0):
        raise MftError(f"--dtype bfloat16 needs a GPU of compute capability 8.0 or newer; this one has "
                       f"{capability[0]}.{capability[1]}: use --dtype float16 (or auto)")
    if dtype == "float16" and model_type in FLOAT16_UNSUPPORTED:
        raise MftError(f"--dtype float16: vLLM refuses {model_type} models in float16 (numerical instability); "
                       "use bfloat16 or float32")


def gpu_capability() -> tuple[int, int] | None:
    """The compute capability of the first visible CUDA GPU; None without one."""
    import torch

    if torch.cuda.device_count() < 1:
        return None
    return tuple(torch.cuda.get_device_capability(0))
