"""Benchmark: the cost of learning the mask, our MFT step vs the same step with masks frozen as constants.

Target (issue 6): ours / constant <= 1.05. Both variants train the same scores with the same STE gradient on
the same model and batches (common.py). The constant variant (`ConstMaskedLinear`) computes its mask and
`W * M` once before timing and never again; ours recomputes the mask from the scores once per optimizer step
(radix selection), re-derives `W * M`, checks its cache on every forward, and runs the optimizer hook that
marks masks stale. The ratio is what those cost. Rounds alternate (order rotating); the ratio is the median
of the per-round ratios.

    python benchmarks/mask_overhead.py [--repeats 8] [--threads 0]

`--variants mft,const,mft-cache` adds our layer with the W * M cache on, for comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="mft,const")
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
        rows.append([kind, f"{common.median(t):.3f}", f"{min(t):.3f}", f"{common.paired_ratio(times, kind, 'const'):.3f}",
                     recomputes, " ".join(f"{x:.2f}" for x in t)])
    print(common.table(rows, ["variant", "median s/step", "min s/step", "/ const", "mask computations per matrix",
                              "per round (s)"]))
    steps = args.warmup + args.repeats
    print(f"(mask computations: one at the first forward, then one per optimizer step = {1 + steps - 1} "
          f"for {steps} steps; the last step's new mask is computed at the next forward)")
    r = common.paired_ratio(times, "mft", "const")
    return common.verdict([("mask overhead ours/constant", r, f"<= {args.max_ratio}", r <= args.max_ratio)])


if __name__ == "__main__":
    sys.exit(main())
