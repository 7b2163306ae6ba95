"""A strict stand-in for vLLM's offline interface, for tests on machines without CUDA (vLLM needs it).

What vLLM itself would do is replaced, and only that: the tokens come from the checkpoint's own `transformers`
model (greedy), and the text is built the way vLLM builds it. Written from the sources of vLLM 0.33.0 (the
newest release) and 0.11.1 (the project's floor), which agree on everything below:

- `vllm/sampling_params.py`: `SamplingParams` is a msgspec Struct; an unknown keyword is a TypeError. Only
  fields present in BOTH versions are accepted here (`SAMPLING_PARAMS_FIELDS`).
- `vllm/entrypoints/llm.py`: `LLM(model, tensor_parallel_size, dtype, gpu_memory_utilization, **engine_args)`
  (`max_model_len` is an engine argument); `generate(prompts, sampling_params, *, use_tqdm=...)` returns one
  `RequestOutput` per prompt, in order; a prompt is a string or a dict `{"prompt_token_ids": [...]}`.
- `vllm/outputs.py`: `RequestOutput(request_id, prompt, prompt_token_ids, prompt_logprobs, outputs, finished)`,
  `CompletionOutput(index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason)`.
- `vllm/v1/engine/detokenizer.py` (fast tokenizers): the new tokens are decoded one at a time by a
  `tokenizers.decoders.DecodeStream` primed with the prompt, `skip_special_tokens` as given; with
  `spaces_between_special_tokens=False` an added token right after another is its bare content. EOS (unless
  `ignore_eos`) ends the request and is kept in `token_ids` but not decoded. After each token the stop
  strings are searched in the text the token added (plus a stop's length - 1 before it); the one that ends
  first wins, the text is cut at its start (`include_stop_str_in_output=False`), and the token that
  completed it is the last one in `token_ids`.
- `vllm/v1/engine/input_processor.py` (`processor.py` in 0.11): an empty prompt and a prompt of
  `max_model_len` tokens or more are refused; generation also ends when prompt + output reach `max_model_len`.
  `SamplingParams.update_from_generation_config` (there) turns the ids of the checkpoint's generation config
  `eos_token_id` other than the tokenizer's EOS into `stop_token_ids`: such a token ends the request like
  EOS (kept in `token_ids`, not decoded, `stop_reason` = its id). Nothing else of the generation config
  applies when SamplingParams are given (no repetition penalty etc.).
- `vllm/config/model.py`: `max_model_len` above the model's derived length (the smallest of
  `max_position_embeddings`, `n_positions`, ... in the config) is a ValueError; None = the derived length.
  `dtype` bfloat16 on a GPU below compute capability 8.0 is a ValueError (`platforms/cuda.py`).
- `vllm/config/parallel.py`, `model_executor/layers/linear.py`: the attention heads must divide by
  `tensor_parallel_size` (ValueError), and so must the MLP's intermediate size (MergedColumnParallelLinear's
  assert: AssertionError).

To refresh for a new vLLM release: `pip download --no-deps vllm==X -d /tmp/v && cd /tmp/v && unzip -q vllm-*.whl
'vllm/sampling_params.py' 'vllm/outputs.py' 'vllm/entrypoints/llm.py' 'vllm/v1/engine/*'`, then
`python tests/eval/vllm_standin.py /tmp/v` prints the field lists to compare with the ones below; reread the
detokenizer's `update` and `check_stop_strings`. On a machine with vLLM installed,
`test_recorded_fields_match_the_installed_vllm` compares the list with the real class.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

VERSIONS = ("0.11.1", "0.33.0")

# Public SamplingParams fields of both versions (0.33.0 adds watermarking, prompt_logprob_token_ids, ...; 0.11.1
# still has best_of, logits_processors, truncate_prompt_tokens, guided_decoding: neither set is accepted here).
SAMPLING_PARAMS_FIELDS = (
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
    "detokenize", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "output_kind", "output_text_buffer_length", "structured_outputs", "logit_bias", "allowed_token_ids",
    "extra_args", "bad_words", "skip_reading_prefix_cache",
)
SAMPLING_DEFAULTS = {"temperature": 1.0, "max_tokens": 16, "stop": None, "stop_token_ids": None, "ignore_eos": False,
                     "skip_special_tokens": True, "spaces_between_special_tokens": True,
                     "include_stop_str_in_output": False, "min_tokens": 0}
# LLM.__init__ keywords of both versions that the project may pass, and the engine argument it passes.
LLM_KEYWORDS = ("model", "tensor_parallel_size", "dtype", "gpu_memory_utilization", "max_model_len", "seed",
                "enforce_eager", "trust_remote_code", "tokenizer", "revision")
LLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


class SamplingParams:
    """Keyword-only, fields of `SAMPLING_PARAMS_FIELDS` only (vLLM raises TypeError on any other)."""

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(SAMPLING_PARAMS_FIELDS))
        if unknown:
            raise TypeError(f"Unexpected keyword argument(s) {unknown} for SamplingParams (vLLM {VERSIONS})")
        values = {**SAMPLING_DEFAULTS, **kwargs}
        for name in ("skip_special_tokens", "spaces_between_special_tokens", "ignore_eos",
                     "include_stop_str_in_output"):
            if not isinstance(values[name], bool):
                raise TypeError(f"SamplingParams.{name} must be a bool, got {values[name]!r}")
        if not isinstance(values["max_tokens"], int) or values["max_tokens"] < 1:
            raise ValueError(f"max_tokens must be at least 1, got {values['max_tokens']}.")
        stop = values["stop"]
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
        values["stop"] = stop or []
        self.__dict__.update(values)
        self.given = kwargs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: object = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: object = None
    extra: dict = field(default_factory=dict)


def check_stop_strings(text: str, new_chars: int, stops: list[str]) -> tuple[str, int] | None:
    """(stop, where it starts) for the stop that ends first within the text the last token added."""
    best = None
    for stop in stops:
        start = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if start >= 0 and (best is None or start + len(stop) < best[1] + len(best[0])):
            best = (stop, start)
    return best


def detokenize(tokenizer, prompt_ids: list[int], new_ids: list[int], params: SamplingParams, eos_id: int | None,
               stop_ids=()):
    """(text, token_ids, finish_reason, stop_reason) as vLLM's FastIncrementalDetokenizer + stop checks;
    `stop_ids`: the stop token ids (`SamplingParams.stop_token_ids` plus the generation config's extra EOS)."""
    from tokenizers.decoders import DecodeStream

    backend = tokenizer._tokenizer
    stream = DecodeStream(ids=list(prompt_ids), skip_special_tokens=params.skip_special_tokens)
    bare_specials = not (params.skip_special_tokens or params.spaces_between_special_tokens)
    added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
    text, kept, last_special = "", [], False
    for token in new_ids:
        kept.append(token)
        if eos_id is not None and token == eos_id and not params.ignore_eos:
            return text, kept, "stop", None
        if token in stop_ids:
            return text, kept, "stop", token
        piece = stream.step(backend, token) or ""
        if bare_specials and added:
            if token in added and last_special:
                piece = added[token]
            last_special = token in added
        text += piece
        if params.stop and len(kept) > params.min_tokens:
            hit = check_stop_strings(text, len(piece), params.stop)
            if hit:
                return text[: hit[1]], kept, "stop", hit[0]
    return text, kept, "length", None


class LLM:
    """vLLM's LLM over the checkpoint's transformers model (CPU, greedy). `calls` records what it was given."""

    instances: list["LLM"] = []

    def __init__(self, model: str, **kwargs):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        unknown = sorted(set(kwargs) - set(LLM_KEYWORDS))
        if unknown:
            raise TypeError(f"LLM got keyword(s) {unknown} this stand-in does not know from vLLM {VERSIONS}")
        self.init = {"model": model, **kwargs}
        text = AutoConfig.from_pretrained(model).get_text_config()
        keys = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_sequence_length", "max_seq_length", "seq_len")
        derived = min((getattr(text, k) for k in keys if isinstance(getattr(text, k, None), int)), default=None)
        self.max_model_len = kwargs.get("max_model_len") or derived
        if derived is not None and self.max_model_len > derived:
            raise ValueError(f"User-specified max_model_len ({self.max_model_len}) is greater than the derived "
                             f"max_model_len (max_position_embeddings={derived} or model_max_length=None in "
                             "model's config.json).")
        dtype = kwargs.get("dtype", "auto")
        if dtype not in LLM_DTYPES:
            raise ValueError(f"Unknown dtype: {dtype!r}")
        capability = torch.cuda.get_device_capability(0)
        if dtype == "bfloat16" and tuple(capability) < (8, 0):
            raise ValueError("Bfloat16 is only supported on GPUs with compute capability of at least 8.0. Your "
                             f"GPU has compute capability {capability[0]}.{capability[1]}.")
        utilization = kwargs.get("gpu_memory_utilization", 0.9)
        if not 0 < utilization <= 1:
            raise ValueError(f"GPU memory utilization must be within (0, 1]. Got {utilization}.")
        heads = text.num_attention_heads
        tp = kwargs.get("tensor_parallel_size", 1)
        if heads % tp:
            raise ValueError(f"Total number of attention heads ({heads}) must be divisible by tensor parallel "
                             f"size ({tp}).")
        assert text.intermediate_size % tp == 0  # MergedColumnParallelLinear: every output size divides by tp
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        try:  # vLLM's try_get_generation_config: generation_config.json, else derived from config.json
            generation = GenerationConfig.from_pretrained(model)
        except OSError:
            generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model))
        eos_ids = generation.eos_token_id
        eos_ids = set() if eos_ids is None else {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
        self.extra_stop_ids = sorted(eos_ids - {self.tokenizer.eos_token_id})
        # Plain greedy from the library's defaults: none of generation_config.json's processors.
        self.model.generation_config = GenerationConfig()
        self.calls: list[dict] = []
        LLM.instances.append(self)

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None):
        import torch
        from transformers import GenerationConfig

        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        self.calls.append({"prompts": prompts, "params": sampling_params, "use_tqdm": use_tqdm})
        rows = []
        for prompt in prompts:
            if isinstance(prompt, str):
                rows.append(self.tokenizer(prompt)["input_ids"])  # vLLM adds the special tokens (BOS)
            elif isinstance(prompt, dict) and set(prompt) <= {"prompt_token_ids", "prompt"}:
                rows.append(list(prompt["prompt_token_ids"]))
            else:
                raise TypeError(f"a prompt is a string or a TokensPrompt dict, got {prompt!r}")
        for row in rows:  # all checked before anything runs, as vLLM validates on add_request
            if not row:
                raise ValueError("The decoder prompt cannot be empty")
            if self.max_model_len is not None and len(row) >= self.max_model_len:
                raise ValueError(f"The decoder prompt (length {len(row)}) plus the number of requested output "
                                 f"tokens (at least 1) is longer than the maximum model length of "
                                 f"{self.max_model_len}.")
        eos_id = self.tokenizer.eos_token_id
        results = []
        for index, row in enumerate(rows):
            room = sampling_params.max_tokens
            if self.max_model_len is not None:
                room = min(room, self.max_model_len - len(row))
            stop_ids = set(sampling_params.stop_token_ids or ()) | set(
                () if sampling_params.ignore_eos else self.extra_stop_ids)
            ends = sorted(stop_ids | ({eos_id} if eos_id is not None and not sampling_params.ignore_eos else set()))
            config = GenerationConfig(do_sample=False, max_new_tokens=room, eos_token_id=ends or None,
                                      pad_token_id=self.tokenizer.pad_token_id)
            with torch.inference_mode():
                out = self.model.generate(input_ids=torch.tensor([row]), generation_config=config)
            new = out[0, len(row):].tolist()
            text, kept, finish, stop_reason = detokenize(self.tokenizer, row, new, sampling_params, eos_id,
                                                         stop_ids)
            completion = CompletionOutput(0, text, kept, None, None, finish, stop_reason)
            results.append(RequestOutput(str(index), prompts[index] if isinstance(prompts[index], str) else None,
                                         row, None, [completion], True))
        return results


def install(monkeypatch, version: str = VERSIONS[-1], gpus: int | None = None,
            capability: tuple[int, int] = (9, 0)) -> types.ModuleType:
    """Put the stand-in in place of `vllm` (and, with `gpus`, pretend that many CUDA devices of compute
    `capability` are visible: an H100's 9.0 by default)."""
    import sys

    import torch

    import importlib.machinery

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # importlib.util.find_spec("vllm") finds it
    module.__version__ = version
    module.LLM, module.SamplingParams = LLM, SamplingParams
    module.RequestOutput, module.CompletionOutput = RequestOutput, CompletionOutput
    monkeypatch.setitem(sys.modules, "vllm", module)
    if gpus is not None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    LLM.instances.clear()
    return module


if __name__ == "__main__":  # python tests/eval/vllm_standin.py UNZIPPED_WHEEL_DIR: the lists to record
    import ast
    import sys

    def class_fields(path, name):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return [n.target.id for n in node.body if isinstance(n, ast.AnnAssign)
                        and isinstance(n.target, ast.Name) and not n.target.id.startswith("_")]

    root = sys.argv[1]
    print("SamplingParams:", class_fields(f"{root}/vllm/sampling_params.py", "SamplingParams"))
    print("CompletionOutput:", class_fields(f"{root}/vllm/outputs.py", "CompletionOutput"))
