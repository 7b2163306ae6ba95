"""Generation backends (vLLM, transformers) and the rules both follow.

Both: plain prompts (no chat template), no BOS (`add_special_tokens=False`), the prompt cut from the left
to `max_model_len - max_gen_toks` tokens, greedy decoding, the EOS string added to the stops, the output
cut at the first stop string.
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
    """Token ids without special tokens, each cut from the left to its last `max_prompt_tokens`."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
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


def load_backend(model_type: str, model: str, batch_size: int, max_model_len: int):
    if model_type == "vllm":
        from mft.eval.vllm_backend import VLLMBackend

        return VLLMBackend(model, max_model_len=max_model_len)
    if model_type == "hf":
        from mft.eval.hf_backend import HFBackend

        return HFBackend(model, batch_size=batch_size, max_model_len=max_model_len)
    raise MftError(f"unknown model type {model_type!r}; expected vllm, hf or auto")
