"""Generation backends: which one runs (`resolve_model_type`), with what settings (`resolve_settings`), loaded
(`load_backend`), and the checks made before anything is loaded.

The package: `decode` (the prompt, stop and decode rules both backends follow), `model_info` (context
length, stop tokens and dtype of a checkpoint, read as vLLM reads them), `hf` (transformers, our own batched
greedy loop) and `vllm` (vLLM on GPUs). The backends import only `decode` and `model_info`, never this module.
"""

from __future__ import annotations

from pathlib import Path

from mft.errors import MftError
from mft.eval.backends.model_info import DTYPES, load_config


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


def load_backend(model_type: str, model: str, batch_size: int, max_model_len: int | None = None,
                 tensor_parallel_size=None, dtype: str | None = None, gpu_memory_utilization: float | None = None):
    """The backend, loaded. `max_model_len` None = the protocol's, capped at the model's context
    (`resolve_max_model_len`); `dtype` None or "auto" = `auto_dtype`; the two vLLM settings are refused with
    the hf backend (see `check_backend_options`)."""
    check_backend_options(model_type, tensor_parallel_size, dtype, gpu_memory_utilization)
    if model_type == "vllm":
        from mft.eval.backends.vllm import VLLMBackend

        return VLLMBackend(model, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                           dtype=dtype, gpu_memory_utilization=gpu_memory_utilization)
    if model_type == "hf":
        from mft.eval.backends.hf import HFBackend

        return HFBackend(model, batch_size=batch_size, max_model_len=max_model_len, dtype=dtype)
    raise MftError(f"unknown model type {model_type!r}; expected vllm, hf or auto")


def resolve_settings(model_type: str, model: str, max_model_len: int | None = None,
                     tensor_parallel_size: int | None = None, dtype: str | None = None) -> dict:
    """What the backend of `model_type` will run with, resolved before anything is loaded or created (the
    runner records it, so reuse compares what ran, not what was asked): device, dtype, max_model_len, and
    for vllm tensor_parallel_size; `log` holds the lines that say how each was chosen."""
    config = load_config(model)
    if model_type == "vllm":
        from mft.eval.backends.vllm import resolve_vllm_settings

        return {"device": "cuda", **resolve_vllm_settings(model, max_model_len, tensor_parallel_size, dtype, config)}
    from mft.eval.backends.hf import hf_settings

    return {**hf_settings(model, max_model_len, dtype, config=config), "tensor_parallel_size": None}
