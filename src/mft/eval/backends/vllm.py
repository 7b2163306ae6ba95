"""Generation with vLLM on GPUs: every prompt of a task in one `generate` call (olmes sent them one by one).

Sampling as olmes (lm-eval 0.4.3's vLLM model): greedy, `skip_special_tokens=False`,
`spaces_between_special_tokens=False`, the task's stops plus the EOS string. vLLM itself removes the stop
string from the text and keeps the stopping token (stop string or EOS) in `token_ids`; `num_tokens` counts it.
"""

from __future__ import annotations

import sys

from mft.errors import MftError
from mft.eval.backends.decode import DECODE_KWARGS, Generation, cut_at_stop, encode_prompts, prompt_budget, stop_list
from mft.eval.backends.model_info import (auto_dtype, check_dtype_on_gpu, checkpoint_dtype, gpu_capability, load_config,
                                          resolve_max_model_len, stop_token_ids)

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


def checkpoint_settings(model_path: str, config=None) -> tuple[int, int, dict[str, int], str, str]:
    """(attention heads, key/value heads, the other sizes vLLM's linear layers split (`divided_sizes`),
    dtype name, where the dtype was read: `model_info.checkpoint_dtype`) from the checkpoint's config (its
    text config for multimodal models)."""
    config = config if config is not None else load_config(model_path)
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    dtype, source = checkpoint_dtype(model_path, config)
    return heads, kv_heads, divided_sizes(text), dtype, source


def divided_sizes(text_config) -> dict[str, int]:
    """The MLP widths tensor parallelism splits over the GPUs: every positive `*intermediate_size*` of the
    config (`intermediate_size`; MoE's `moe_intermediate_size`, `shared_expert_intermediate_size`; a
    per-layer list gives each entry). vLLM's MergedColumnParallelLinear (gate/up) asserts each output size
    divides by the size, RowParallelLinear (down) `divide()`s its input size, FusedMoEConfig asserts the
    experts' (vllm/model_executor/layers/linear.py, fused_moe/config.py, 0.11.1 and 0.33.0). The vocabulary
    is padded to a multiple and the attention projections follow the heads, so neither adds a rule."""
    sizes = {}
    for name, value in sorted(text_config.to_dict().items()):
        if "intermediate_size" not in name:
            continue
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                sizes[name if len(values) == 1 else f"{name}[{i}]"] = v
    return sizes


def tensor_parallel_fits(size: int, heads: int, kv_heads: int, divided: dict[str, int] | None = None) -> bool:
    """vLLM's rule: the heads split evenly over the GPUs, the key/value heads split evenly or are
    replicated evenly (`kv_heads % size == 0` or `size % kv_heads == 0`), and each of `divided`
    (`divided_sizes`) splits evenly."""
    return not tensor_parallel_misfits(size, heads, kv_heads, divided)


def tensor_parallel_misfits(size: int, heads: int, kv_heads: int, divided: dict[str, int] | None = None) -> list[str]:
    """What does not split over `size` GPUs, in words; empty when the size fits."""
    problems = []
    if heads % size:
        problems.append(f"{heads} attention heads")
    if kv_heads % size and size % kv_heads:
        problems.append(f"{kv_heads} key/value heads (neither divides the other)")
    problems += [f"{name} {value}" for name, value in (divided or {}).items() if value % size]
    return problems


def choose_tensor_parallel_size(requested: int | None, heads: int, kv_heads: int, gpus: int,
                                divided: dict[str, int] | None = None) -> int:
    """`requested`, checked; by default the largest size that fits `gpus` visible GPUs, the heads and the
    `divided` sizes (32 heads on 6 GPUs -> 4; LLaMA-2-13B's 40 heads and intermediate_size 13824 on 6 GPUs
    -> 4, not 5). MftError when no GPU is visible or `requested` cannot work."""
    if gpus < 1:
        raise MftError("the vllm backend needs a CUDA GPU and none is visible; use --model-type hf, or check "
                       "CUDA_VISIBLE_DEVICES and the driver (./setup_eval_env.sh checks them)")
    fits = [size for size in range(1, gpus + 1) if tensor_parallel_fits(size, heads, kv_heads, divided)]
    if requested is None:
        return max(fits)
    if requested > gpus:
        raise MftError(f"--tensor-parallel-size {requested} needs {requested} GPUs; {gpus} visible")
    problems = tensor_parallel_misfits(requested, heads, kv_heads, divided)
    if problems:
        raise MftError(f"--tensor-parallel-size {requested} does not divide the model's {', '.join(problems)}; "
                       f"sizes that fit {gpus} GPU(s): {fits}")
    return requested


def choose_dtype(requested: str | None, checkpoint: str, capability: tuple[int, int] | None,
                 model_type: str = "") -> str:
    """`requested` unless None/"auto" (checked against the GPU: `check_dtype_on_gpu`); else vLLM's own
    auto rule on a GPU of compute `capability` (`model_info.auto_dtype`): the checkpoint's dtype, the GPU's
    preferred one (bfloat16 from compute capability 8.0, float16 before) for a float32 checkpoint or a
    dtype the GPU lacks. The project passes the result explicitly, so it is logged and recorded."""
    if requested not in (None, "auto"):
        check_dtype_on_gpu(requested, capability, model_type)
        return requested
    return auto_dtype(checkpoint, model_type, capability or (8, 0))


def resolve_vllm_settings(model_path: str, max_model_len: int | None = None, tensor_parallel_size: int | None = None,
                          dtype: str | None = None, config=None) -> dict:
    """The settings `LLM()` gets, resolved and checked without loading anything: `max_model_len`
    (`model_info.resolve_max_model_len`), `tensor_parallel_size` (`choose_tensor_parallel_size` over the
    visible GPUs), `dtype` (`choose_dtype` for the first GPU's compute capability), and `log`: the lines
    that say how each was chosen. MftError for a setting that cannot work, or for a vLLM older than
    VLLM_MIN_VERSION."""
    import torch
    import vllm  # first: the installed vLLM is checked before anything else, and it initialises CUDA

    check_vllm_version(vllm.__version__)

    config = config if config is not None else load_config(model_path)
    heads, kv_heads, divided, checkpoint, source = checkpoint_settings(model_path, config)
    gpus = torch.cuda.device_count()
    size = choose_tensor_parallel_size(tensor_parallel_size, heads, kv_heads, gpus, divided)
    capability = gpu_capability()
    model_type = getattr(config.get_text_config(), "model_type", "")
    chosen_dtype = choose_dtype(dtype, checkpoint, capability, model_type)
    length, length_note = resolve_max_model_len(max_model_len, config, model_path)
    shown = ", ".join(f"{k} {v}" for k, v in divided.items())
    cc = f"compute capability {capability[0]}.{capability[1]}" if capability else "no GPU"
    lines = [f"tensor_parallel_size {size} ({'given' if tensor_parallel_size else 'largest that fits'}: {gpus} "
             f"GPU(s) visible, {heads} heads, {kv_heads} key/value heads{', ' + shown if shown else ''}), dtype "
             f"{chosen_dtype} ({'given' if dtype not in (None, 'auto') else 'auto'}; checkpoint: {checkpoint} "
             f"from its {source}; {cc}), max_model_len {length}"]
    if length_note:
        lines.append(length_note)
    return {"tensor_parallel_size": size, "dtype": chosen_dtype, "max_model_len": length, "log": lines}


class VLLMBackend:
    """Greedy decoding as olmes, model length 2048 as in the protocol (capped at the model's context).

    `max_model_len` None = `model_info.resolve_max_model_len`; `tensor_parallel_size` None = the largest that
    fits the visible GPUs and the model (`choose_tensor_parallel_size`); `dtype` None/"auto" =
    `choose_dtype`; `gpu_memory_utilization` None = vLLM's default. The choices are logged.
    """

    def __init__(self, model_path: str, max_model_len: int | None = None, tensor_parallel_size: int | None = None,
                 dtype: str | None = None, gpu_memory_utilization: float | None = None):
        import vllm

        check_vllm_version(vllm.__version__)
        settings = resolve_vllm_settings(model_path, max_model_len, tensor_parallel_size, dtype)
        self.tensor_parallel_size = settings["tensor_parallel_size"]
        self.dtype = settings["dtype"]
        self.max_model_len = settings["max_model_len"]
        for line in settings["log"]:
            log(f"vllm {vllm.__version__}: {line}")
        log(f"vllm {vllm.__version__}: gpu_memory_utilization {gpu_memory_utilization or 'vLLM default'}")
        options = {"model": model_path, "tensor_parallel_size": self.tensor_parallel_size,
                   "max_model_len": self.max_model_len, "dtype": self.dtype}
        if gpu_memory_utilization is not None:
            options["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = vllm.LLM(**options)
        self.tokenizer = self.llm.get_tokenizer()
        # What vLLM stops on besides the stop strings (it reads them itself; here for the record and tests).
        self.stop_token_ids = stop_token_ids(model_path, self.tokenizer)

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
