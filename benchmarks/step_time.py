"""Benchmark: training step time, FFT vs our MFT vs an original-style MFT (full sort on every forward).

Targets (issue 6): MFT / FFT <= 0.80 and original-style / ours >= 3.5. One model per variant, all built from
the same seed (common.py: Llama-shaped, 8 layers x 512 hidden, vocab 32000, fp32), the same 4 micro-batches
of 2 x 256 tokens per optimizer step, masked layers 2-5 with keep ratio 0.9, fused AdamW for all. The
variants alternate round by round (order rotating), and each ratio is the median over rounds of that
round's ratio, so a slow phase of a shared machine hits both sides of a ratio alike.

    python benchmarks/step_time.py [--repeats 5] [--threads 0] [--vocab 32000]
    python benchmarks/step_time.py --variants fft,mft,mft-cache,mft-kth   # the ablation

    python benchmarks/step_time.py --profile mft   # where the time of one variant's step goes (torch.profiler)

Ablation variants: `mft-cache` keeps W * M between optimizer steps (cache_masked_weight=True), `mft-kth`
selects the mask with one kthvalue over all |S| instead of the radix pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="fft,mft,original")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after --warmup rounds)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    parser.add_argument("--vocab", type=int, default=common.MODEL["vocab"])
    parser.add_argument("--layers", default="2,3,4,5", help="masked decoder layers")
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--max-mft-fft", type=float, default=0.80)
    parser.add_argument("--min-original-mft", type=float, default=3.5)
    parser.add_argument("--profile", metavar="VARIANT", help="profile VARIANT's step instead of timing variants")
    args = parser.parse_args()
    if args.profile:
        return profile(args)

    common.set_threads(args.threads)
    variants = args.variants.split(",")
    layers = [int(x) for x in args.layers.split(",")]
    print(common.machine_line())
    print(f"model: Llama {dict(common.MODEL, vocab=args.vocab)}, fp32, SDPA; step = {args.accumulation} micro-batches "
          f"of 2 x 256 tokens + fused AdamW; masked layers {layers}, keep 0.9; {args.repeats} rounds after "
          f"{args.warmup} warm-up")
    batches = common.make_batches(args.accumulation, vocab=args.vocab)
    runs, trainable = {}, {}
    for kind in variants:
        model = common.build_model(vocab=args.vocab)
        params = common.setup_variant(kind, model, layers)
        optimizer = common.make_optimizer(params)
        trainable[kind] = sum(p.numel() for p in params)
        runs[kind] = (lambda m=model, o=optimizer: common.train_step(m, o, batches))
    times = common.interleaved(runs, args.repeats, args.warmup)

    ref = "fft" if "fft" in variants else variants[0]
    rows = []
    for kind in variants:
        t = times[kind]
        rows.append([kind, f"{trainable[kind]:,}", f"{common.median(t):.3f}", f"{min(t):.3f}",
                     f"{common.paired_ratio(times, kind, ref):.3f}",
                     f"{common.paired_ratio(times, kind, 'mft'):.3f}" if "mft" in times else "-",
                     " ".join(f"{x:.2f}" for x in t)])
    print(common.table(rows, ["variant", "trainable", "median s/step", "min s/step", f"/ {ref}", "/ mft",
                              "per round (s)"]))
    checks = []
    if "fft" in times and "mft" in times:
        r = common.paired_ratio(times, "mft", "fft")
        checks.append(("step MFT/FFT", r, f"<= {args.max_mft_fft}", r <= args.max_mft_fft))
    if "original" in times and "mft" in times:
        r = common.paired_ratio(times, "original", "mft")
        checks.append(("step original-style/ours", r, f">= {args.min_original_mft}", r >= args.min_original_mft))
    return common.verdict(checks)


# Where the self time of an op is booked: the first marker found walking up from the op (autograd nodes and
# labels), else the op's own name.
MARKERS = [("mft::mask_recompute", "mask recompute (local_mask, W * M), once per step"),
           ("_MaskedWeightBackward", "STE backward: (g * W) * sign(S)"),
           ("mft::rebuild", "W * M rebuilt in the backward (not kept from the forward)"),
           ("_MaskedWeight", "STE forward (W * M, or the cached one with mft-cache)"),
           ("_GetSubnetBackward", "original: STE backward"), ("_GetSubnet", "original: sort + scatter (mask)"),
           ("AccumulateGrad", "gradient accumulation into .grad"),
           ("Optimizer.step", "optimizer step (fused AdamW)"), ("Optimizer.zero_grad", "optimizer zero_grad")]
OPS = [(("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"), "matmul (linears, lm_head)"),
       (("aten::_scaled_dot_product",), "attention (SDPA)"),
       (("aten::_log_softmax", "aten::nll_loss", "aten::_log_softmax_backward_data", "aten::nll_loss_backward"),
        "loss (log_softmax, nll)")]


def category(event) -> str:
    e = event
    while e is not None:
        for marker, name in MARKERS:
            if marker in e.name:
                return name
        e = e.cpu_parent
    for names, name in OPS:
        if event.name.startswith(names):
            return name
    return "other elementwise/copies (norms, rotary, SiLU, residuals, views)"


def profile(args) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    from mft.masking.layer import MaskedLinear, _Recompute

    common.set_threads(args.threads)
    refresh = MaskedLinear.refresh_mask

    def labelled_refresh(self, *a, **k):
        with record_function("mft::mask_recompute"):
            return refresh(self, *a, **k)

    def labelled_cache(self, mask, _orig=MaskedLinear._masked_weight):
        with record_function("mft::mask_recompute"):
            return _orig(self, mask)

    def labelled_make(self, _orig=_Recompute.make):
        with record_function("mft::rebuild"):
            return _orig(self)

    MaskedLinear.refresh_mask = labelled_refresh
    _Recompute.make = labelled_make
    MaskedLinear._masked_weight = labelled_cache
    print(common.machine_line())
    layers = [int(x) for x in args.layers.split(",")]
    batches = common.make_batches(args.accumulation, vocab=args.vocab)
    model = common.build_model(vocab=args.vocab)
    optimizer = common.make_optimizer(common.setup_variant(args.profile, model, layers))
    common.train_step(model, optimizer, batches)
    per_step = []
    for _ in range(args.repeats):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            common.train_step(model, optimizer, batches)
        booked: dict[str, float] = {}
        for e in prof.events():
            booked[category(e)] = booked.get(category(e), 0.0) + e.self_cpu_time_total / 1e6
        per_step.append(booked)
    totals = [sum(b.values()) for b in per_step]
    best = per_step[totals.index(min(totals))]  # the least disturbed step
    rows = [[name, f"{sec:.3f}", f"{100 * sec / min(totals):.1f} %"]
            for name, sec in sorted(best.items(), key=lambda kv: -kv[1])]
    print(f"{args.profile}: one optimizer step ({args.accumulation} micro-batches) under torch.profiler, self time by "
          f"where it is spent; the least disturbed of {args.repeats} steps (profiled total {min(totals):.2f} s, "
          f"all: {' '.join(f'{t:.2f}' for t in totals)})")
    print(common.table(rows, ["where", "seconds", "share"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
