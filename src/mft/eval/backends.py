"""Generation backends (vLLM, transformers) and the rules both follow.

Both: plain prompts (no chat template), no BOS (`add_special_tokens=False`), the prompt cut from the left
to `max_model_len - max_gen_toks` tokens, greedy decoding, the EOS string added to the stops, the output
cut at the first stop string. Both decode as olmes (lm-eval's vLLM model) did: special tokens kept in the
text (`skip_special_tokens=False`, no spaces inserted between them), so an added special token such as
`<|im_end|>` is a stop string like any other; and the new tokens are decoded after the prompt, as vLLM's
incremental detokenizer does, so a leading space that SentencePiece would strip at the start of a text stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mft.errors import MftError

MAX_MODEL_LEN = 2048


@dataclass
class Generation:
    text: str
    num_tokens: int


# olmes' decoding (lm-eval 0.4.3 `VLLM.generate_until` passes these to vLLM's SamplingParams).
DECODE_KWARGS = {"skip_special_tokens": False, "spaces_between_special_tokens": False}
# Prompt tokens decoded ahead of the new ones (vLLM's slow detokenizer starts from the prompt's last 5).
CONTEXT_TOKENS = 5
REPLACEMENT_CHARACTER = "\ufffd"  # what a decode shows for an incomplete UTF-8 character


def decode_continuation(tokenizer, prompt_ids, new_ids) -> str:
    """The text of `new_ids` as it continues `prompt_ids`: decode(tail + new) minus decode(tail).

    `tail` is the prompt's last `CONTEXT_TOKENS` ids; both decodes use `DECODE_KWARGS`. Decoding the new ids
    alone would drop the leading space of a SentencePiece (Metaspace) first token, e.g. one of the four
    spaces of an indented `return` in HumanEval. Falls back to decoding `new_ids` alone when the tail's text
    is not a prefix of the whole (a tokenizer whose decoder rewrites earlier text). Trailing tokens whose
    text ends in an incomplete UTF-8 character (U+FFFD) are left out of the text, as vLLM leaves them.
    """
    tail = [int(i) for i in prompt_ids[max(0, len(prompt_ids) - CONTEXT_TOKENS):]]
    new = [int(i) for i in new_ids]
    prefix = tokenizer.decode(tail, **DECODE_KWARGS) if tail else ""
    # vLLM's DecodeStream holds back a text that ends in U+FFFD (an incomplete UTF-8 character) until a
    # later token completes it, and never emits it when the request ends there: the text stops after the
    # last token whose decode did not end in U+FFFD.
    end = len(new)
    while True:
        whole = tokenizer.decode(tail + new[:end], **DECODE_KWARGS)
        if end == 0 or not whole.endswith(REPLACEMENT_CHARACTER):
            break
        end -= 1
    if not tail:
        return whole
    return whole[len(prefix):] if whole.startswith(prefix) else tokenizer.decode(new[:end], **DECODE_KWARGS)


def generation_text(tokenizer, prompt_ids, tokens, stop_ids, stops: list[str]) -> str:
    """The text of a finished generation, as vLLM returns it: a last token that is one of `stop_ids` (EOS
    or an extra EOS of the generation config: `stop_token_ids`) counts in `num_tokens` but adds no text;
    the rest is decoded by `decode_continuation` and cut at the first stop string."""
    tokens = [int(t) for t in tokens]
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return cut_at_stop(decode_continuation(tokenizer, prompt_ids, tokens), stops)


def stop_list(task_stops, eos_token: str | None) -> list[str]:
    """The task's stops plus the tokenizer's EOS string, without duplicates, order kept."""
    stops = list(dict.fromkeys([*task_stops, *([eos_token] if eos_token else [])]))
    return [s for s in stops if s]


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def prompt_budget(max_model_len: int, max_gen_toks: int) -> int:
    budget = max_model_len - max_gen_toks
    if budget <= 0:
        raise MftError(f"max_model_len {max_model_len} leaves no room for a prompt with max_gen_toks "
                       f"{max_gen_toks}; raise --max-model-len or lower the task's max_gen_toks")
    return budget


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids without special tokens, each cut from the left to its last `max_prompt_tokens`.

    Raises MftError for a prompt with no tokens (vLLM refuses an empty prompt, and there is nothing to
    continue), naming its position, before any generation.
    """
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise MftError(f"prompt(s) {empty[:10]} of {len(ids)} encode to no tokens; every request needs a "
                       "non-empty prompt (vLLM refuses an empty one)")
    return [row[-max_prompt_tokens:] for row in ids]


def resolve_model_type(model_type: str) -> str:
    """`auto` -> vllm when it is installed and a GPU is visible, else hf. `vllm` when vLLM is not
    installed: MftError (before anything is loaded or created)."""
    return resolve_model_type_why(model_type)[0]


def resolve_model_type_why(model_type: str) -> tuple[str, str | None]:
    """(backend, why `auto` chose it; None when the type was given)."""
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    if model_type == "vllm" and not has_vllm:
        raise MftError("--model-type vllm but vLLM is not installed in this environment; install it with "
                       "./setup_eval_env.sh (or pip install 'mft[vllm]'), or use --model-type hf")
    if model_type != "auto":
        return model_type, None
    if not has_vllm:
        return "hf", "--model-type auto resolved to hf (vLLM is not installed)"
    import torch

    if torch.cuda.is_available():
        return "vllm", "--model-type auto resolved to vllm (vLLM installed, a GPU visible)"
    return "hf", "--model-type auto resolved to hf (no GPU visible)"


def check_model_path(model: str) -> None:
    """A local model folder must exist and hold a config.json; `owner/name` without a folder is a hub id."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MftError(f"model folder {model} has no config.json; expected a Hugging Face checkpoint folder")
        return
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1 or path.parent.is_dir()
    if looks_local:  # `output/run_name` with an existing `output/` is a mistyped folder, not a hub id
        raise MftError(f"model path {model} does not exist; pass a checkpoint folder or a hub id like owner/name")


DTYPES = ("auto", "bfloat16", "float16", "float32")


def check_backend_options(model_type: str, tensor_parallel_size=None, dtype: str | None = None,
                          gpu_memory_utilization: float | None = None, why: str | None = None) -> None:
    """Refuse settings that cannot work, before a model is loaded (MftError naming the flag). `why`: how
    `--model-type auto` chose `model_type` (`resolve_model_type_why`), said when a vllm flag is refused."""
    if dtype is not None and dtype not in DTYPES:
        raise MftError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if tensor_parallel_size is not None and (isinstance(tensor_parallel_size, bool) or tensor_parallel_size < 1):
        raise MftError(f"--tensor-parallel-size must be a positive number of GPUs, got {tensor_parallel_size}")
    if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
        raise MftError(f"--gpu-memory-utilization is the fraction of each GPU's memory vLLM may use, in (0, 1]; "
                       f"got {gpu_memory_utilization}")
    if model_type != "vllm":
        given = [flag for flag, value in (("--tensor-parallel-size", tensor_parallel_size),
                                          ("--gpu-memory-utilization", gpu_memory_utilization)) if value is not None]
        if given:
            chosen = f" ({why})" if why else ""
            raise MftError(f"{' and '.join(given)} only apply to the vllm backend, not {model_type}{chosen}; "
                           "use --model-type vllm or drop them")


def hf_device_dtype(dtype: str | None = None, model: str | None = None, config=None) -> tuple[str, str]:
    """(device, dtype name) the hf backend generates with: cuda when torch sees a GPU, else cpu; `dtype`
    when given (not None/"auto"), else on cpu the checkpoint `model`'s dtype where the CPU has native bf16,
    float32 where not (`mft.precision.compute_dtype`), and on cuda `auto_dtype` for the checkpoint (vLLM's
    rule for this GPU); float32 on cpu and bfloat16 on cuda when no model is named). Known before the model loads, so that
    `mft eval` can key stored predictions by them (CPU float32 text is not reused on a GPU)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device, cpu_dtype(dtype, model)
    if dtype not in (None, "auto"):
        return device, dtype
    if model is None:
        return device, "bfloat16"
    config = config if config is not None else load_config(model)
    checkpoint = checkpoint_dtype(model, config)[0]
    return device, auto_dtype(checkpoint, getattr(config.get_text_config(), "model_type", ""), gpu_capability())


def cpu_dtype(dtype: str | None, model: str | None) -> str:
    """The dtype name the hf backend computes in on a CPU: `mft.precision.compute_dtype` of `dtype` (when given,
    not None/"auto"), else of the checkpoint `model`'s dtype (float32 when it records none): bf16/fp16 become
    float32 on a CPU without native bf16 matrix instructions. This is the dtype recorded with the predictions."""
    import torch

    from mft.precision import checkpoint_dtype as config_dtype, compute_dtype

    wanted = getattr(torch, dtype) if dtype not in (None, "auto") else \
        (config_dtype(model) if model is not None else None) or torch.float32
    return str(compute_dtype(wanted, "cpu", model or "model")).removeprefix("torch.")


def load_backend(model_type: str, model: str, batch_size: int, max_model_len: int | None = None,
                 tensor_parallel_size=None, dtype: str | None = None, gpu_memory_utilization: float | None = None):
    """The backend, loaded. `max_model_len` None = the protocol's, capped at the model's context
    (`resolve_max_model_len`); `dtype` None or "auto" = `auto_dtype`; the two vLLM settings are refused with
    the hf backend (see `check_backend_options`)."""
    check_backend_options(model_type, tensor_parallel_size, dtype, gpu_memory_utilization)
    if model_type == "vllm":
        from mft.eval.vllm_backend import VLLMBackend

        return VLLMBackend(model, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                           dtype=dtype, gpu_memory_utilization=gpu_memory_utilization)
    if model_type == "hf":
        from mft.eval.hf_backend import HFBackend

        return HFBackend(model, batch_size=batch_size, max_model_len=max_model_len, dtype=dtype)
    raise MftError(f"unknown model type {model_type!r}; expected vllm, hf or auto")


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


def hf_settings(model: str, max_model_len: int | None = None, dtype=None, device: str | None = None,
                config=None) -> dict:
    """The hf backend's settings, resolved and checked without loading the weights: `device` (cuda when a
    GPU is visible, else cpu), `dtype` (a name; None/"auto" = `auto_dtype`, the dtype vLLM would pick on
    this GPU, float32 on a CPU; a torch.dtype is taken as given), `max_model_len`
    (`resolve_max_model_len`) and `log`: the lines that say how they were chosen."""
    import torch

    config = config if config is not None else load_config(model)
    log_lines = []
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in (None, *DTYPES):
        raise MftError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    found, name = hf_device_dtype(dtype, model, config)
    if device is None:
        device = found
    elif device == "cpu":  # a device given by the caller: the CPU rule (`cpu_dtype`)
        name = cpu_dtype(dtype, model)
    if dtype in (None, "auto"):
        checkpoint, source = checkpoint_dtype(model, config)
        log_lines.append(f"dtype {name} (auto on {device}; checkpoint: {checkpoint} from its {source})")
    elif name != dtype:  # asked for bf16/fp16 on a CPU without native bf16
        log_lines.append(f"dtype {name} instead of --dtype {dtype}: this CPU has no native bf16 matrix "
                         f"instructions (mft.precision)")
    length, note = resolve_max_model_len(max_model_len, config, model)
    log_lines += [note] if note else []
    return {"device": device, "dtype": name, "max_model_len": length, "log": log_lines}


def resolve_settings(model_type: str, model: str, max_model_len: int | None = None,
                     tensor_parallel_size: int | None = None, dtype: str | None = None) -> dict:
    """What the backend of `model_type` will run with, resolved before anything is loaded or created (the
    runner records it, so reuse compares what ran, not what was asked): device, dtype, max_model_len, and
    for vllm tensor_parallel_size; `log` holds the lines that say how each was chosen."""
    config = load_config(model)
    if model_type == "vllm":
        from mft.eval.vllm_backend import resolve_vllm_settings

        return {"device": "cuda", **resolve_vllm_settings(model, max_model_len, tensor_parallel_size, dtype, config)}
    return {**hf_settings(model, max_model_len, dtype, config=config), "tensor_parallel_size": None}
