"""Batched greedy generation with `transformers`: left padding, stop strings checked incrementally per row.

The decode loop is our own (a forward per step over a `DynamicCache`, greedy `argmax`), not
`model.generate`, so that a row that has finished leaves the batch at once (its cache rows are dropped
with `Cache.batch_select_indices`) instead of being computed until the last row finishes, and the stop
check looks only at the newest tokens of each row instead of decoding every row's whole text at every step.
`hf_settings`: the device, dtype and length it runs with, resolved before the model loads.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from mft.errors import MftError
from mft.eval.backends.decode import (DECODE_KWARGS, Generation, decode_continuation, encode_prompts,
                                      generation_text, prompt_budget, stop_list)
from mft.eval.backends.model_info import (DTYPES, auto_dtype, checkpoint_dtype, gpu_capability, load_config,
                                          resolve_max_model_len, stop_token_ids)

if TYPE_CHECKING:
    import torch

AUTO_MAX_BATCH = {"cuda": 256, "cpu": 32}  # a CPU is compute bound long before; more rows only add padding
AUTO_MEMORY_FRACTION = 0.7  # of the free memory, for the batch's KV cache and activations


def decode_tail(tokenizer, ids) -> str:
    """The text of a window of generated ids, decoded by the backends' rule (`DECODE_KWARGS`)."""
    return tokenizer.decode(ids, **DECODE_KWARGS)


class StopScanner:
    """Finds the first step at which a row's generated text contains a stop string, looking at its tail only.

    The row's text is `decode_continuation(tokenizer, prompt_ids, tokens)` (the backends' decode rule, the
    text the final cut sees). `hit(tokens, prompt_ids)` answers "does that text contain a stop string?" for
    a row whose text did not contain one one token earlier. Such an occurrence must end in the characters
    the newest token added (or changed: a token can complete a multi-byte character begun by the previous
    one), so it lies in the last
    `longest stop + newest token's characters + MARGIN` characters of the text. Only a window of the newest
    tokens that decodes to at least that many characters is decoded (the window doubles until it does or it
    holds every token). The decoded start of a window may differ from the whole text's (a SentencePiece
    leading space is dropped, a cut multi-byte character shows as U+FFFD); MARGIN characters absorb that.
    A window that holds every token, and every hit, is checked on the row's whole text, so the answer is
    exactly "stop in the row's text", the rule the final cut uses. Cost per step: one short decode per open
    row, O(1) in the generation length (the whole-text check was O(length) per step, O(length^2) per row).
    """

    MARGIN = 8

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self._token_chars: dict[int, int] = {}

    def _chars(self, token_id: int) -> int:
        """An upper bound on the characters one token adds to a text: the length of its token string
        (byte-level BPE: one character per byte; SentencePiece: `▁` for the space, `<0x..>` for a byte)."""
        n = self._token_chars.get(token_id)
        if n is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            n = self._token_chars[token_id] = len(piece) if isinstance(piece, str) else 16
        return n

    def hit(self, tokens: list[int], prompt_ids=()) -> bool:
        if not self.stops or not tokens:
            return False
        need = self.longest + self._chars(tokens[-1]) + self.MARGIN
        window = min(len(tokens), need)
        while window < len(tokens):
            tail = decode_tail(self.tokenizer, tokens[-window:])
            if len(tail) >= need:
                if not any(s in tail for s in self.stops):
                    return False
                break
            window = min(len(tokens), 2 * window)
        return any(s in decode_continuation(self.tokenizer, prompt_ids, tokens) for s in self.stops)


def free_memory_bytes(device: str) -> int:
    """Free memory of `device` in bytes: CUDA's free memory, or the host's MemAvailable (/proc/meminfo)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not Linux

    return int(psutil.virtual_memory().available)


def bytes_per_row(config, dtype_bytes: int, prompt_tokens: int, max_gen_toks: int) -> int:
    """Memory one row of a batch needs at its peak, in bytes: its KV cache at full length (2 x layers x
    KV heads x head dim per token) plus the prefill's largest activations (the MLP's intermediate and a few
    hidden-sized tensors per prompt token) and the vocabulary-sized logits of a step."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    layers = text.num_hidden_layers
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    kv = 2 * layers * kv_heads * head_dim * (prompt_tokens + max_gen_toks) * dtype_bytes
    prefill = prompt_tokens * (3 * intermediate + 6 * hidden) * dtype_bytes
    logits = 2 * text.vocab_size * 4
    return kv + prefill + logits


def auto_batch_size(model, device: str, prompt_tokens: int, max_gen_toks: int, n_prompts: int) -> int:
    """The largest batch whose rows fit in AUTO_MEMORY_FRACTION of the free memory, at most
    AUTO_MAX_BATCH[device type] and the number of prompts, at least 1."""
    dtype_bytes = next(model.parameters()).element_size()
    per_row = bytes_per_row(model.config, dtype_bytes, prompt_tokens, max_gen_toks)
    fits = int(AUTO_MEMORY_FRACTION * free_memory_bytes(device)) // per_row
    cap = AUTO_MAX_BATCH["cuda" if device.startswith("cuda") else "cpu"]
    return max(1, min(fits, cap, n_prompts))


def parse_batch_size(value) -> int | str:
    """`--batch-size`: a positive integer or `auto`."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        n = int(value)
        if n >= 1:
            return n
    elif isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    raise MftError(f"--batch-size must be a positive integer or 'auto', got {value!r}")


# -- settings: device, dtype and length, known before the model loads ---------------------------------
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


def left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both int64 `[len(rows), longest row]` on `device`: each row of token ids
    right-aligned behind `pad_id`s, mask 0 on the padding and 1 on the tokens (how `generate` batches prompts)."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return input_ids, mask


class HFBackend:
    """Greedy generation with a causal LM from `transformers`, `batch_size` prompts at a time (`"auto"`:
    as many as fit in free memory, see `auto_batch_size`)."""

    def __init__(self, model_path: str, batch_size: int | str = 8, max_model_len: int | None = None,
                 device: str | None = None, dtype=None):
        import torch
        from transformers import AutoTokenizer

        from mft.models import load_pretrained
        from mft.precision import compute_dtype

        from mft.progress import quiet_libraries_off_terminal

        quiet_libraries_off_terminal()
        # device, dtype (`hf_device_dtype`) and max_model_len, checked before loading
        settings = hf_settings(model_path, max_model_len, dtype, device)
        self.device, self.max_model_len = settings["device"], settings["max_model_len"]
        dtype = compute_dtype(getattr(torch, settings["dtype"]), self.device, model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = load_pretrained(model_path, dtype=dtype).to(self.device).eval()  # image-text models too
        self.stop_ids = set(stop_token_ids(model_path, self.tokenizer))  # EOS and the generation config's
        self.batch_size = parse_batch_size(batch_size)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self.last_batch_size: int | None = None

    def generate(self, prompts: list[str], task_stops, max_gen_toks: int, desc: str = "generating") -> list[Generation]:
        """One Generation per prompt, in the order given; prompts are batched longest first.

        The bar counts generated tokens only (its count and tokens/s are of tokens the model produced) and
        moves every step. Its total starts as the most the prompts can generate (`len(prompts) *
        max_gen_toks`) and shrinks by a row's unused budget when that row stops early, so the percentage
        and ETA follow the work left and the bar ends at `sum(num_tokens)` of `sum(num_tokens)`."""
        from mft.progress import progress

        stops = stop_list(task_stops, self.tokenizer.eos_token)
        ids = encode_prompts(self.tokenizer, prompts, prompt_budget(self.max_model_len, max_gen_toks))
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: out-of-memory shows early
        batch_size = self.batch_size
        if batch_size == "auto":
            longest = len(ids[order[0]]) if ids else 0
            batch_size = auto_batch_size(self.model, self.device, longest, max_gen_toks, len(ids))
        self.last_batch_size = batch_size
        results: list[Generation | None] = [None] * len(ids)
        with progress(total=len(ids) * max_gen_toks, desc=f"{desc} (batch {batch_size})", unit="tok",
                      unit_scale=True) as bar:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                generations = self._generate_batch([ids[i] for i in batch], stops, max_gen_toks, bar)
                for index, generation in zip(batch, generations):
                    results[index] = generation
        return results  # type: ignore[return-value]

    def _generate_batch(self, rows: list[list[int]], stops: list[str], max_gen_toks: int, bar=None) -> list[Generation]:
        """Greedy decoding of left-padded `rows`; a row leaves the batch at EOS, at a stop string or at
        `max_gen_toks` tokens. `num_tokens` = the tokens generated up to and including that point."""
        import torch
        from transformers import DynamicCache

        device = self.device
        input_ids, mask = left_padded(rows, self.pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as `generate` numbers left-padded rows
        scanner = StopScanner(self.tokenizer, stops)
        cache = DynamicCache(config=self.model.config)
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        alive = list(range(len(rows)))  # batch position -> row
        new_tokens: list[list[int]] = [[] for _ in rows]
        with torch.inference_mode():
            while alive:
                out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 **{self._cache_arg: cache}, **extra)
                chosen = out.logits[:, -1, :].argmax(dim=-1)
                keep, unused = [], 0
                for j, token in enumerate(chosen.tolist()):
                    tokens = new_tokens[alive[j]]
                    tokens.append(token)
                    if not (token in self.stop_ids or len(tokens) >= max_gen_toks
                            or scanner.hit(tokens, rows[alive[j]])):
                        keep.append(j)
                    else:
                        unused += max_gen_toks - len(tokens)  # budget this row will never generate
                if bar is not None:
                    if unused and bar.total:
                        bar.total -= unused  # the bar counts generated tokens only (see `generate`)
                    bar.update(len(alive))
                if len(keep) < len(alive):
                    if not keep:
                        break
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    chosen, mask, positions = chosen[index], mask[index], positions[index]
                    alive = [alive[j] for j in keep]
                input_ids = chosen[:, None]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                positions = positions[:, -1:] + 1
        return [Generation(generation_text(self.tokenizer, row, tokens, self.stop_ids, stops), len(tokens))
                for row, tokens in zip(rows, new_tokens)]
