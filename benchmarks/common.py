"""Shared pieces of the benchmarks: the model, the batches, the training step, the variants, the timing loop.

Everything is built locally (no downloads). The step benchmarks use one Llama-shaped model for every
variant: 8 decoder layers, hidden 512, 8 heads (head dim 64, no GQA, as LLaMA-2), MLP 1376 (LLaMA's
8/3 x hidden, rounded like LLaMA-2's 11008 for 4096), vocab 32000 (LLaMA-2's), untied embeddings, fp32
(the CPU has no fast bf16 matmul), SDPA attention. A step is what `mft.train.loop` does per optimizer step
without DeepSpeed: `accumulation` micro-batches of `model(input_ids, attention_mask, labels).loss /
accumulation` + backward, then a fused AdamW `step()` and `zero_grad()`.

Variants (one model each, built from the same seed, so all see the same weights and batches):

- `fft`      every parameter trains (fused AdamW over all of them), as `mft train --method fft`.
- `mft`      our product: `inject_masks` (MaskedLinear, mask recomputed once per optimizer step, `W * M`
             rebuilt in the backward instead of kept from the forward).
- `original` an original-style MFT layer written here from the published definition (METHOD.md): a full
             `sort` of |S| on every forward (every micro-batch), mask built by index scatter, `W * M`, STE
             through autograd (`M`'s gradient passed unchanged to |S|, then `abs`'s backward: `* sign(S)`).
- `mft-frozen` our layer with its masks frozen as constants: the masks at the start are pinned (`managed`,
             never recomputed); everything else, the W * M memory policy included, as in `mft`.
- `const`    a hand-written constant-mask layer (`ConstMaskedLinear`): mask and `W * M` computed once and
             kept (F.linear saves it), never again.
- `mft-cache`, `mft-kth`: ablations: our layer keeping `W * M` between optimizer steps
             (`cache_masked_weight=True`: faster, one weight-sized tensor more per masked matrix) / selecting
             the mask with one kthvalue over all |S| (the selection before the radix pass).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:  # run from a fresh checkout without `pip install -e .`
    sys.path.insert(0, str(SRC))

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODEL = dict(num_layers=8, hidden=512, heads=8, intermediate=1376, vocab=32000)


# -- machine -----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def set_threads(n: int | None) -> None:
    """Intra-op threads for torch (None: torch's default, one per core)."""
    if n:
        torch.set_num_threads(n)


def machine_line() -> str:
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, {datetime.date.today().isoformat()}, load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")


# -- model and data ------------------------------------------------------------------------------------------
def build_model(num_layers=MODEL["num_layers"], hidden=MODEL["hidden"], heads=MODEL["heads"],
                intermediate=MODEL["intermediate"], vocab=MODEL["vocab"], seed=0, dtype=torch.float32,
                device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(dtype)
    model.config.use_cache = False
    return model.train()


def make_batches(n, batch=2, seq=256, vocab=MODEL["vocab"], seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": ids.clone().to(device)})
    return out


def masked_names(model, layers) -> list[str]:
    return [f"model.layers.{i}.{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}"
            for i in layers for p in PROJ]


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _freeze_all_but_scores(model):
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".scores"))


def _init_scores(shape, generator):
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)


# -- the reference layers written from the definition (baselines, not product code) -------------------------
class _GetSubnet(torch.autograd.Function):
    """The original's mask: sort |S|, zero the int((1 - k) n) smallest, one the rest; STE backward."""

    @staticmethod
    def forward(ctx, magnitude, keep):
        out = magnitude.clone()
        _, idx = magnitude.flatten().sort()
        j = int((1 - keep) * magnitude.numel())
        flat = out.flatten()
        flat[idx[:j]] = 0
        flat[idx[j:]] = 1
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class OriginalMaskedLinear(nn.Module):
    """Original-style: the mask is recomputed by a full sort in every forward pass (every micro-batch)."""

    def __init__(self, linear: nn.Linear, keep: float, scores: torch.Tensor):
        super().__init__()
        self.weight, self.bias, self.keep = linear.weight, linear.bias, keep
        self.scores = nn.Parameter(scores.to(linear.weight.device))  # fp32 scores, as ours

    def forward(self, x):
        mask = _GetSubnet.apply(self.scores.abs(), self.keep)
        # the original ran scores, mask and weights in one dtype: W * M in the weight's dtype
        return F.linear(x, self.weight * mask.to(self.weight.dtype), self.bias)


class _ConstMaskedWeight(torch.autograd.Function):
    """W_eff is a constant tensor; the backward is the STE gradient, the same arithmetic as the product's."""

    @staticmethod
    def forward(ctx, weight, scores, masked_weight):
        ctx.save_for_backward(weight, scores)
        return masked_weight

    @staticmethod
    def backward(ctx, grad):
        weight, scores = ctx.saved_tensors
        dtype = scores.dtype
        return None, (grad.to(dtype) * weight.to(dtype)).mul_(scores.sign()), None


class ConstMaskedLinear(nn.Module):
    """Masks frozen as constants: the mask and `W_eff = W * M` are computed once, before timing, and never
    again. Per micro-batch it does only what any STE layer must: `F.linear(x, W_eff)`, and in the backward
    dL/dS = (dL/dW_eff * W) * sign(S) (sign(S) is taken fresh, since the scores train). No mask recompute,
    no cache checks, no optimizer hook work: the floor our cached layer is measured against.
    """

    def __init__(self, linear: nn.Linear, mask: torch.Tensor, scores: torch.Tensor):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.scores = nn.Parameter(scores.to(linear.weight.device))  # fp32 scores, as ours
        with torch.no_grad():
            self.register_buffer("masked_weight", linear.weight * mask, persistent=False)

    def forward(self, x):
        return F.linear(x, _ConstMaskedWeight.apply(self.weight, self.scores, self.masked_weight), self.bias)


@torch.no_grad()
def kthvalue_local_mask(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """The product's local mask as it was before the benchmarks (one `kthvalue` over all of |S|): kept here
    only for the ablation variant `mft-kth`."""
    magnitude = scores.detach().abs().flatten()
    j = int((1 - keep_ratio) * magnitude.numel())
    if j <= 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if magnitude.dtype in (torch.bfloat16, torch.float16):
        magnitude = magnitude.float()
    cutoff = magnitude.kthvalue(j).values
    prune = magnitude < cutoff
    at_cutoff = magnitude == cutoff
    still_needed = j - int(prune.sum())
    if int(at_cutoff.sum()) == still_needed:
        prune |= at_cutoff
    else:
        prune[at_cutoff.nonzero().squeeze(1)[:still_needed]] = True
    return (~prune).view(scores.shape)


# -- variants ----------------------------------------------------------------------------------------------
def setup_variant(kind: str, model, layers, keep=0.9, score_seed=3):
    """Turn `model` into variant `kind` in place; returns the list of trainable parameters."""
    if kind == "fft":
        for p in model.parameters():
            p.requires_grad_(True)
    elif kind.startswith("mft"):
        from mft.masking.config import MaskConfig
        from mft.masking.inject import inject_masks, masked_modules

        inject_masks(model, MaskConfig(masked_layers=list(layers), keep_ratio_attn=keep, keep_ratio_mlp=keep),
                     seed=score_seed, refreshed_by_caller=True)  # make_optimizer registers the hook
        for layer in masked_modules(model).values():  # ablations: switch this changes off again
            if kind == "mft-frozen":
                layer.set_mask(layer.mask)
                layer.managed = True  # never recomputed: refresh_after_step's invalidations are ignored
            if kind == "mft-cache":
                layer.cache_masked_weight = True
            if kind == "mft-kth":
                layer.compute_mask = (lambda layer: lambda scores=None: kthvalue_local_mask(
                    layer.scores if scores is None else scores, layer.keep_ratio))(layer)
            elif kind not in ("mft", "mft-cache", "mft-frozen"):
                raise ValueError(kind)
    elif kind in ("original", "const"):
        from mft.masking.layer import local_mask

        g = torch.Generator().manual_seed(score_seed)
        for name in masked_names(model, layers):
            linear = model.get_submodule(name)
            scores = _init_scores(linear.weight.shape, g)
            if kind == "original":
                layer = OriginalMaskedLinear(linear, keep, scores)
            else:
                layer = ConstMaskedLinear(linear, local_mask(scores, keep).to(linear.weight.device), scores)
            _replace(model, name, layer)
        _freeze_all_but_scores(model)
    else:
        raise ValueError(kind)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, lr=2e-5):
    """AdamW as `mft.train.loop` builds it (fused; the published setting), for every variant alike. Hooked by
    `refresh_after_step`, so our layers recompute their masks once per step, as in `mft train` (a no-op for
    the other variants: their parameters carry no mask layer)."""
    from mft.masking.layer import refresh_after_step

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    refresh_after_step(optimizer)
    return optimizer


def train_step(model, optimizer, batches):
    """One optimizer step over `batches` (micro-batches), as mft.train.loop does without DeepSpeed."""
    n = len(batches)
    for batch in batches:
        loss = model(**batch).loss / n
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(runs: dict, repeats: int, warmup: int = 1, device="cpu", progress=True) -> dict[str, list[float]]:
    """Wall time of each callable in `runs`, `repeats` rounds after `warmup` rounds. Every round runs each
    variant once; the order rotates from round to round (ABC, BCA, CAB, ...) so no variant always follows
    the same neighbour."""
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync(device)
            start = time.perf_counter()
            runs[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
        if progress:
            done = "warm-up" if r < warmup else f"round {r - warmup + 1}/{repeats}"
            shown = ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items() if t) if r >= warmup else ""
            print(f"  {done} {shown}", file=sys.stderr, flush=True)
    return times


def median(xs):
    return statistics.median(xs)


def paired_ratio(times, a, b):
    """Median over rounds of a/b, each round's a divided by the same round's b (cancels slow phases)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


# -- memory of this process (Linux) -------------------------------------------------------------------------
def status_mib(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile...), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> float:
    """Reset this process's peak RSS (VmHWM) to its current RSS; returns the current RSS in MiB.

    Writing 5 to /proc/self/clear_refs resets the high-water mark (Linux >= 4.0), so the peak read later
    is the peak of what happened after this call, not of the imports before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not permitted: the peak then includes the imports' (a small overestimate)
        pass
    return status_mib("VmRSS")


def peak_rss_mib() -> float:
    return status_mib("VmHWM")


# -- reporting ---------------------------------------------------------------------------------------------
def table(rows: list[list], header: list[str]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def verdict(checks: list[tuple[str, float, str, bool]]) -> int:
    """Print `name: value (target) PASS/FAIL` lines; returns the exit code (1 if any target is missed)."""
    ok = True
    for name, value, target, passed in checks:
        print(f"RESULT {name} = {value:.3f} (target {target}) {'PASS' if passed else 'FAIL'}")
        ok &= passed
    return 0 if ok else 1


def run_child(args: list[str], env=None) -> str:
    """Run `python args...` in a fresh process; return its stdout (raises on failure)."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout
