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


def decode_continuation(tokenizer, prompt_ids, new_ids) -> str:
    """The text of `new_ids` as it continues `prompt_ids`: decode(tail + new) minus decode(tail).

    `tail` is the prompt's last `CONTEXT_TOKENS` ids; both decodes use `DECODE_KWARGS`. Decoding the new ids
    alone would drop the leading space of a SentencePiece (Metaspace) first token, e.g. one of the four
    spaces of an indented `return` in HumanEval. Falls back to decoding `new_ids` alone when the tail's text
    is not a prefix of the whole (a tokenizer whose decoder rewrites earlier text).
    """
    tail = [int(i) for i in prompt_ids[max(0, len(prompt_ids) - CONTEXT_TOKENS):]]
    new = [int(i) for i in new_ids]
    if not tail:
        return tokenizer.decode(new, **DECODE_KWARGS)
    prefix = tokenizer.decode(tail, **DECODE_KWARGS)
    whole = tokenizer.decode(tail + new, **DECODE_KWARGS)
    return whole[len(prefix):] if whole.startswith(prefix) else tokenizer.decode(new, **DECODE_KWARGS)


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
    """`auto` -> vllm when it is installed and a GPU is visible, else hf."""
    if model_type != "auto":
        return model_type
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


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
                          gpu_memory_utilization: float | None = None) -> None:
    """Refuse settings that cannot work, before a model is loaded (MftError naming the flag)."""
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
            raise MftError(f"{' and '.join(given)} only apply to the vllm backend, not {model_type}; "
                           "use --model-type vllm or drop them")


def hf_device_dtype(dtype: str | None = None) -> tuple[str, str]:
    """(device, dtype name) the hf backend generates with: cuda when torch sees a GPU, else cpu; `dtype`
    when given (not None/"auto"), else bfloat16 on cuda and float32 on cpu. Known before the model loads,
    so that `mft eval` can key stored predictions by them (CPU float32 text is not reused on a GPU)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype not in (None, "auto"):
        return device, dtype
    return device, "bfloat16" if device == "cuda" else "float32"


def load_backend(model_type: str, model: str, batch_size: int, max_model_len: int, tensor_parallel_size=None,
                 dtype: str | None = None, gpu_memory_utilization: float | None = None):
    """The backend, loaded. `dtype` None or "auto" = each backend's default; the two vLLM settings are
    refused with the hf backend (see `check_backend_options`)."""
    check_backend_options(model_type, tensor_parallel_size, dtype, gpu_memory_utilization)
    if model_type == "vllm":
        from mft.eval.vllm_backend import VLLMBackend

        return VLLMBackend(model, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                           dtype=dtype, gpu_memory_utilization=gpu_memory_utilization)
    if model_type == "hf":
        from mft.eval.hf_backend import HFBackend

        import torch

        device, name = hf_device_dtype(dtype)
        return HFBackend(model, batch_size=batch_size, max_model_len=max_model_len, device=device,
                         dtype=getattr(torch, name))
    raise MftError(f"unknown model type {model_type!r}; expected vllm, hf or auto")
