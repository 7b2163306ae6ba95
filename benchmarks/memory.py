"""Benchmark: peak memory of an FFT training step vs our MFT step (target: MFT / FFT <= 0.60).

Same model, batch, micro-batches, optimizer and precision as `step_time.py` (see common.py). Each variant
runs in its own fresh process: import everything, read the resident set size (RSS), build the model, set the
variant up, run `--steps` optimizer steps (the first one allocates gradients and the AdamW state), then read
the peak RSS (VmHWM, reset at the baseline through /proc/self/clear_refs). Reported: peak - RSS at the
baseline, i.e. everything the step needs, model weights included (the same for both). Before the baseline
the same variant runs one step of a tiny model, so the code of every kernel is already resident (those
file-backed pages count in RSS too), and with `--malloc live` (default) the children run with
MALLOC_MMAP_THRESHOLD_=65536: every tensor above 64 KiB gets its own mapping, returned at once when freed,
so the peak RSS is the peak of live memory rather than of what glibc kept cached. The processes alternate (FFT, MFT, FFT, MFT, ...)
for `--repeats` rounds; the median counts (peak RSS hardly varies).

    python benchmarks/memory.py [--repeats 2] [--steps 2] [--max-ratio 0.60]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def child(kind: str, steps: int, layers, vocab: int) -> dict:
    import torch  # noqa: F401  (imported before the baseline is read)
    import transformers  # noqa: F401

    import mft.masking.inject  # noqa: F401

    # Load the code of every kernel the step uses (file-backed pages count in RSS) on a tiny model first.
    tiny = common.build_model(num_layers=max(layers) + 1, hidden=64, heads=2, intermediate=128, vocab=256)
    tiny_opt = common.make_optimizer(common.setup_variant(kind, tiny, layers))
    common.train_step(tiny, tiny_opt, common.make_batches(2, seq=16, vocab=256))
    del tiny, tiny_opt
    batches = common.make_batches(4, vocab=vocab)
    base = common.reset_peak()
    model = common.build_model(vocab=vocab)
    after_model = common.status_mib("VmRSS")
    params = common.setup_variant(kind, model, layers)
    optimizer = common.make_optimizer(params)
    for _ in range(steps):
        common.train_step(model, optimizer, batches)
    return {"kind": kind, "base_mib": base, "model_mib": after_model - base, "peak_mib": common.peak_rss_mib() - base,
            "trainable": sum(p.numel() for p in params)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layers", default="2,3,4,5")
    parser.add_argument("--vocab", type=int, default=common.MODEL["vocab"])
    parser.add_argument("--max-ratio", type=float, default=0.60)
    parser.add_argument("--variants", default="fft,mft", help="fft,mft and optionally mft-cache, const, original")
    parser.add_argument("--malloc", choices=("live", "default"), default="live",
                        help="live: children run with MALLOC_MMAP_THRESHOLD_=65536, so a freed tensor leaves the RSS "
                             "at once and the peak RSS is the peak of live memory; default: glibc as configured")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    if args.child:
        print(json.dumps(child(args.child, args.steps, layers, args.vocab)))
        return 0

    print(common.machine_line())
    print(f"model: Llama {dict(common.MODEL, vocab=args.vocab)}, fp32; batch 2 x 256, accumulation 4; masked layers {layers}, keep 0.9; "
          f"{args.steps} steps per process; malloc: {args.malloc}")
    env = dict(os.environ)
    if args.malloc == "live":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    results: dict[str, list[dict]] = {kind: [] for kind in args.variants.split(",")}
    for r in range(args.repeats):
        for kind in results:
            out = common.run_child([__file__, "--child", kind, "--steps", str(args.steps), "--layers", args.layers,
                                    "--vocab", str(args.vocab)], env=env)
            results[kind].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  round {r + 1}: {kind} peak {results[kind][-1]['peak_mib']:.0f} MiB", file=sys.stderr)
    med = {k: common.median([x["peak_mib"] for x in v]) for k, v in results.items()}
    rows = [[k, f"{v[0]['trainable']:,}", f"{v[0]['model_mib']:.0f}", f"{med[k]:.0f}",
             " ".join(f"{x['peak_mib']:.0f}" for x in v)] for k, v in results.items()]
    print(common.table(rows, ["variant", "trainable params", "model MiB", "peak MiB (median)", "per process"]))
    ratio = med["mft"] / med["fft"]
    return common.verdict([("memory MFT/FFT", ratio, f"<= {args.max_ratio}", ratio <= args.max_ratio)])


if __name__ == "__main__":
    sys.exit(main())
