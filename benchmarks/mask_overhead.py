"""Benchmark: the cost of learning the mask, our MFT step vs the same step with masks frozen as constants.

Target (issue 6): ours / frozen <= 1.05. All variants train the same scores with the same STE gradient on the
same model and batches (common.py).

- `mft`: our layer as `mft train` uses it: the mask recomputed from the scores once per optimizer step
  (radix selection), the optimizer hook that marks masks stale, the cache checks in every forward, and
  `W * M` rebuilt in the backward instead of kept from the forward (one weight-sized tensor less per
  masked matrix; see memory.py).
- `mft-frozen` (the target's reference): the same layer with its starting masks pinned and never recomputed:
  everything else, the `W * M` policy included, identical. The ratio is exactly what learning the mask costs.
- `mft-cache` / `const` (information): the same comparison when `W * M` is kept between steps
  (`cache_masked_weight=True`), against a hand-written constant-mask layer that computed its mask and
  `W * M` once (`ConstMaskedLinear`).

Rounds alternate (order rotating); ratios are medians of per-round ratios.

    python benchmarks/mask_overhead.py [--repeats 8] [--threads 0] [--variants mft,mft-frozen,...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="mft,mft-frozen,mft-cache,const")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--vocab", type=int, default=common.MODEL["vocab"])
    parser.add_argument("--layers", default="2,3,4,5")
    parser.add_argument("--max-ratio", type=float, default=1.05)
    args = parser.parse_args()

    common.set_threads(args.threads)
    variants = args.variants.split(",")
    layers = [int(x) for x in args.layers.split(",")]
    print(common.machine_line())
    print(f"model: Llama {dict(common.MODEL, vocab=args.vocab)}, fp32, SDPA; step = 4 micro-batches of 2 x 256 "
          f"tokens + fused AdamW; masked layers {layers}, keep 0.9; {args.repeats} rounds after {args.warmup} warm-up")
    batches = common.make_batches(4, vocab=args.vocab)
    runs, updates = {}, {}
    for kind in variants:
        model = common.build_model(vocab=args.vocab)
        optimizer = common.make_optimizer(common.setup_variant(kind, model, layers))
        runs[kind] = (lambda m=model, o=optimizer: common.train_step(m, o, batches))
        updates[kind] = model
    times = common.interleaved(runs, args.repeats, args.warmup)

    rows = []
    for kind in variants:
        t = times[kind]
        recomputes = "-"
        if kind.startswith("mft"):
            from mft.masking.inject import masked_modules

            counts = {m.mask_updates for m in masked_modules(updates[kind]).values()}
            recomputes = "/".join(map(str, sorted(counts)))
        rows.append([kind, f"{common.median(t):.3f}", f"{min(t):.3f}", f"{common.paired_ratio(times, kind, 'mft-frozen'):.3f}",
                     recomputes, " ".join(f"{x:.2f}" for x in t)])
    print(common.table(rows, ["variant", "median s/step", "min s/step", "/ mft-frozen", "mask computations per matrix",
                              "per round (s)"]))
    steps = args.warmup + args.repeats
    print(f"(mask computations: one at the first forward, then one per optimizer step = {1 + steps - 1} "
          f"for {steps} steps; the last step's new mask is computed at the next forward)")
    r = common.paired_ratio(times, "mft", "mft-frozen")
    if "mft-cache" in times and "const" in times:  # the same question with W * M kept, for information
        print(f"with W * M kept between steps: mft-cache / const = {common.paired_ratio(times, 'mft-cache', 'const'):.3f}")
    return common.verdict([("mask overhead ours/frozen masks", r, f"<= {args.max_ratio}", r <= args.max_ratio)])


if __name__ == "__main__":
    sys.exit(main())
