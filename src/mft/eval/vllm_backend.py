"""Generation with vLLM on GPUs: every prompt of a task in one `generate` call (olmes sent them one by one).

Sampling as olmes (lm-eval 0.4.3's vLLM model): greedy, `skip_special_tokens=False`,
`spaces_between_special_tokens=False`, the task's stops plus the EOS string. vLLM itself removes the stop
string from the text and keeps the stopping token (stop string or EOS) in `token_ids`; `num_tokens` counts it.
"""

from __future__ import annotations

import sys

from mft.errors import MftError
from mft.eval.backends import (DECODE_KWARGS, MAX_MODEL_LEN, Generation, cut_at_stop, encode_prompts, prompt_budget,
                               stop_list)

# vLLM 0.11.1 is the first release that declares the transformers it works with (`transformers>=4.56,<5`);
# 0.8-0.11.0 ask for any transformers >= 4.4x, so pip pairs them with transformers 5 and `LLM()` then fails
# (`AttributeError: all_special_tokens_extended`). Kept in step with pyproject's `vllm` extra.
VLLM_MIN_VERSION = "0.11.1"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_vllm_version(version: str) -> None:
    """MftError when `version` (vllm.__version__) is older than VLLM_MIN_VERSION."""
    from packaging.version import Version

    if Version(version) < Version(VLLM_MIN_VERSION):
        raise MftError(f"vLLM {version} is older than the supported {VLLM_MIN_VERSION}: it does not cap "
                       "transformers and fails inside LLM() with transformers 5; run "
                       f"pip install 'vllm>={VLLM_MIN_VERSION}' (or ./setup_eval_env.sh)")


def driver_cuda_version() -> tuple[int, int] | None:
    """(major, minor) of the newest CUDA the installed NVIDIA driver supports (`cuDriverGetVersion` of
    libcuda), None when there is no driver library."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value // 1000, version.value % 1000 // 10
    return None


def cuda_problem(driver: tuple[int, int] | None, torch_cuda: str | None, gpus: int) -> tuple[bool, str] | None:
    """(fatal, what is wrong and what to do) for the driver / torch CUDA pairing, or None when it works.

    `driver`: `driver_cuda_version()`; `torch_cuda`: `torch.version.cuda`; `gpus`: torch.cuda.device_count().
    A driver of an older CUDA major version than torch's cannot run it; an older minor version of the same
    major runs it under CUDA's minor-version compatibility (a warning: kernels compiled just in time fail).
    """
    if torch_cuda is None:
        return True, ("this torch is a CPU-only build (torch.version.cuda is None); vLLM needs the CUDA build "
                      "its wheel asks for: do not install a CPU torch into this environment, rebuild it with "
                      "./setup_eval_env.sh")
    if driver is None:
        return True, ("no NVIDIA driver found (libcuda.so.1 cannot be loaded): run on a GPU node, or pass "
                      "--no-check on a login node")
    need = tuple(int(part) for part in torch_cuda.split(".")[:2])
    shown = f"{driver[0]}.{driver[1]}"
    if driver[0] < need[0]:
        return True, (f"the NVIDIA driver supports CUDA up to {shown}, but torch was built for CUDA {torch_cuda}: "
                      f"update the driver to one for CUDA {need[0]}.x, or pin an older vLLM whose torch uses CUDA "
                      f"{driver[0]}.x (./setup_eval_env.sh --vllm 'vllm==...')")
    if gpus < 1:
        return True, (f"driver (CUDA {shown}) and torch (CUDA {torch_cuda}) match, but no GPU is visible: check "
                      "nvidia-smi and CUDA_VISIBLE_DEVICES")
    if driver < need:
        return False, (f"the NVIDIA driver supports CUDA {shown}, older than torch's {torch_cuda}: it runs under "
                       "CUDA's minor-version compatibility, but a driver update is the safe choice")
    return None


def checkpoint_settings(model_path: str) -> tuple[int, int, str]:
    """(attention heads, key/value heads, dtype name) from the checkpoint's config (its text config for
    multimodal models). A config without a dtype is float32, as `transformers` saves it."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    text = config.get_text_config()
    dtype = None
    for c in (config, text):
        dtype = dtype or getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return heads, kv_heads, str(dtype or "float32")


def tensor_parallel_fits(size: int, heads: int, kv_heads: int) -> bool:
    """vLLM's rule: the heads split evenly over the GPUs, and the key/value heads split evenly or are
    replicated evenly (`kv_heads % size == 0` or `size % kv_heads == 0`)."""
    return heads % size == 0 and (kv_heads % size == 0 or size % kv_heads == 0)


def choose_tensor_parallel_size(requested: int | None, heads: int, kv_heads: int, gpus: int) -> int:
    """`requested`, checked; by default the largest size that fits `gpus` visible GPUs and the heads
    (32 heads on 6 GPUs -> 4). MftError when no GPU is visible or `requested` cannot work."""
    if gpus < 1:
        raise MftError("the vllm backend needs a CUDA GPU and none is visible; use --model-type hf, or check "
                       "CUDA_VISIBLE_DEVICES and the driver (./setup_eval_env.sh checks them)")
    if requested is None:
        return max(size for size in range(1, gpus + 1) if tensor_parallel_fits(size, heads, kv_heads))
    if requested > gpus:
        raise MftError(f"--tensor-parallel-size {requested} needs {requested} GPUs; {gpus} visible")
    if not tensor_parallel_fits(requested, heads, kv_heads):
        fits = [size for size in range(1, gpus + 1) if tensor_parallel_fits(size, heads, kv_heads)]
        raise MftError(f"--tensor-parallel-size {requested} does not divide the model's {heads} attention heads "
                       f"({kv_heads} key/value heads); sizes that fit {gpus} GPU(s): {fits}")
    return requested


def choose_dtype(requested: str | None, checkpoint_dtype: str) -> str:
    """`requested` unless None/"auto"; else the checkpoint's dtype, bfloat16 for a float32 checkpoint
    (vLLM 0.11+ does the same for "auto"; older vLLM, as in olmes, picked float16)."""
    if requested not in (None, "auto"):
        return requested
    return "bfloat16" if checkpoint_dtype == "float32" else checkpoint_dtype


class VLLMBackend:
    """Greedy decoding as olmes, model length 2048 as in the protocol.

    `tensor_parallel_size` None = the largest that fits the visible GPUs and the model's heads; `dtype`
    None/"auto" = `choose_dtype`; `gpu_memory_utilization` None = vLLM's default. The choices are logged.
    """

    def __init__(self, model_path: str, max_model_len: int = MAX_MODEL_LEN, tensor_parallel_size: int | None = None,
                 dtype: str | None = None, gpu_memory_utilization: float | None = None):
        import torch
        import vllm

        check_vllm_version(vllm.__version__)
        heads, kv_heads, checkpoint_dtype = checkpoint_settings(model_path)
        gpus = torch.cuda.device_count()
        self.tensor_parallel_size = choose_tensor_parallel_size(tensor_parallel_size, heads, kv_heads, gpus)
        self.dtype = choose_dtype(dtype, checkpoint_dtype)
        self.max_model_len = max_model_len
        log(f"vllm {vllm.__version__}: tensor_parallel_size {self.tensor_parallel_size} "
            f"({'given' if tensor_parallel_size else 'largest that fits'}: {gpus} GPU(s) visible, {heads} heads, "
            f"{kv_heads} key/value heads), dtype {self.dtype} (checkpoint: {checkpoint_dtype}), "
            f"gpu_memory_utilization {gpu_memory_utilization or 'vLLM default'}")
        options = {"model": model_path, "tensor_parallel_size": self.tensor_parallel_size,
                   "max_model_len": max_model_len, "dtype": self.dtype}
        if gpu_memory_utilization is not None:
            options["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = vllm.LLM(**options)
        self.tokenizer = self.llm.get_tokenizer()

    def sampling_params(self, stops: list[str], max_gen_toks: int):
        from vllm import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=max_gen_toks, stop=stops, **DECODE_KWARGS)

    def generate(self, prompts: list[str], task_stops, max_gen_toks: int, desc: str = "generating") -> list[Generation]:
        stops = stop_list(task_stops, self.tokenizer.eos_token)
        ids = encode_prompts(self.tokenizer, prompts, prompt_budget(self.max_model_len, max_gen_toks))
        # Token ids, not text: vLLM would otherwise tokenize again and add a BOS token.
        params = self.sampling_params(stops, max_gen_toks)
        outputs = self.llm.generate([{"prompt_token_ids": row} for row in ids], params, use_tqdm=True)
        if len(outputs) != len(ids):
            raise MftError(f"vLLM returned {len(outputs)} outputs for {len(ids)} prompts")
        # vLLM cuts at the stop that completes first; a second stop inside the same token is cut here too.
        return [Generation(cut_at_stop(out.outputs[0].text, stops), len(out.outputs[0].token_ids)) for out in outputs]
