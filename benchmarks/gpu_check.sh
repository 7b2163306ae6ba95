#!/usr/bin/env bash
# GPU check (issues 6 and 12): FFT vs our MFT step time and peak memory, the mask overhead, and the
# original-style MFT (full sort on every forward), on a ~1B-parameter Llama-shaped model built in place (no
# downloads); then (issue 12) the mask selection on one LLaMA-2-7B layer's scores (benchmarks/selection.py),
# the published micro-batching (16 micro-batches of 1 x 2048), and scripts/finetune.py MFT tokens/s plain vs
# DeepSpeed ZeRO-2 vs ZeRO-3 vs the MFT layout (DDP, scores' optimizer state sharded).
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine: ~1B model, bf16, about 3-5 minutes
#   bash benchmarks/gpu_check.sh --tiny          # smoke test of the same code path, on the CPU if no GPU
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh --rounds 8
#
# Model: Llama, 16 layers x 2048 hidden, 16 heads (MHA), MLP 5632, vocab 32000: 0.95B parameters. Step: 4
# micro-batches of 4 x 1024 tokens, fused AdamW, masked layers 4-7 (keep 0.9), SDPA attention, autocast
# bf16. Precision as `mft train` sets it up on one GPU: FFT keeps fp32 master weights (AdamW state fp32),
# MFT loads the frozen weights in bf16 and trains fp32 scores. `fft-bf16` (information) is FFT with bf16
# weights and bf16 AdamW state, the smallest FFT there is.
# Memory: torch.cuda.max_memory_allocated of one variant at a time (built, 2 steps, freed), over what was
# allocated before it was built. Time: all variants built side by side, rounds interleaved (order
# rotating), medians of per-round ratios. Prints the same RESULT lines as the CPU benchmarks and exits 1
# when a target is missed. Whole run capped at 8 minutes; --skip selection,microbatch,finetune leaves parts out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec timeout 480 "$PY" - "$@" <<'PYEOF'
import argparse, gc, os, platform, sys, time

sys.path[:0] = ["benchmarks", "src"]
parser = argparse.ArgumentParser(prog="gpu_check.sh")
parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke test; runs on the CPU without a GPU)")
parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--variants", default="fft,mft,mft-frozen,original")
parser.add_argument("--skip", default="", help="comma-separated parts to leave out: selection,microbatch,finetune")
args = parser.parse_args()

try:
    import torch
    import transformers
    import common
    from mft.masking.inject import masked_modules
except ImportError as exc:
    sys.exit(f"gpu_check: missing a package ({exc}); install the project first: pip install -e . "
             "(torch with CUDA, transformers)")

device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
if args.tiny:
    size = dict(num_layers=8, hidden=64, heads=4, intermediate=176, vocab=512)
    batch, seq, layers = 2, 64, [2, 3, 4, 5]
else:
    size = dict(num_layers=16, hidden=2048, heads=16, intermediate=5632, vocab=32000)
    batch, seq, layers = 4, 1024, [4, 5, 6, 7]
    if device != "cuda":
        sys.exit("gpu_check: no CUDA device; use --tiny for the CPU smoke test")
accumulation = 4
variants = args.variants.split(",")
gpu = torch.cuda.get_device_name() if device == "cuda" else common.cpu_model()
print(f"device: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
      f"{transformers.__version__}, python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
print(f"model: Llama {size}; step: {accumulation} micro-batches of {batch} x {seq} tokens, fused AdamW, "
      f"masked layers {layers} (keep 0.9), autocast bf16; {args.rounds} timed rounds")


def build(kind):
    """(step function, trainable parameter count) for one variant, as `mft train` sets it up."""
    dtype = torch.float32 if kind == "fft" else torch.bfloat16
    model = common.build_model(**size, dtype=dtype, device=device)
    params = common.setup_variant("fft" if kind.startswith("fft") else kind, model, layers)
    optimizer = common.make_optimizer(params)
    batches = common.make_batches(accumulation, batch=batch, seq=seq, vocab=size["vocab"], device=device)

    def step():
        for b in batches:
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                loss = model(**b).loss / accumulation
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return model, step, sum(p.numel() for p in params)


def allocated():
    return torch.cuda.memory_allocated() if device == "cuda" else 0


# 1. memory, one variant at a time
peak, trainable, total = {}, {}, None
for kind in variants:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = allocated()
    model, step, trainable[kind] = build(kind)
    total = sum(p.numel() for p in model.parameters())
    step()
    step()
    common.sync(device)
    peak[kind] = (torch.cuda.max_memory_allocated() - before) / 2**30 if device == "cuda" else float("nan")
    if kind == "mft":
        updates = {m.mask_updates for m in masked_modules(model).values()}
        print(f"  mft: mask computations per matrix after 2 steps: {sorted(updates)} (expected [2])")
    print(f"  memory {kind}: peak {peak[kind]:.2f} GiB", file=sys.stderr, flush=True)
    del model, step
print(f"parameters: {total:,}")

# 2. time, all variants side by side
gc.collect()
runs = {}
for kind in variants:
    runs[kind] = build(kind)[1]
times = common.interleaved(runs, args.rounds, warmup=2, device=device)

rows = []
for kind in variants:
    t = times[kind]
    rows.append([kind, f"{trainable[kind]:,}", f"{common.median(t):.3f}", f"{min(t):.3f}",
                 f"{common.paired_ratio(times, kind, 'fft'):.3f}" if "fft" in times else "-",
                 f"{peak[kind]:.2f}", f"{peak[kind] / peak['fft']:.3f}" if "fft" in peak else "-"])
print(common.table(rows, ["variant", "trainable", "median s/step", "min s/step", "time / fft", "peak GiB",
                          "memory / fft"]))
checks = []
if {"fft", "mft"} <= set(times):
    r = common.paired_ratio(times, "mft", "fft")
    checks.append(("gpu step MFT/FFT", r, "<= 0.70", r <= 0.70))
    if device == "cuda":
        m = peak["mft"] / peak["fft"]
        checks.append(("gpu memory MFT/FFT", m, "<= 0.6", m <= 0.6))
if {"mft", "mft-frozen"} <= set(times):
    r = common.paired_ratio(times, "mft", "mft-frozen")
    checks.append(("gpu mask overhead ours/frozen masks", r, "<= 1.03", r <= 1.03))
if {"mft", "original"} <= set(times):  # issue 12: on a GPU the honest figure is ~1.35x; information only
    r = common.paired_ratio(times, "original", "mft")
    print(f"information: step original-style/ours = {r:.3f}")
del runs
skip = set(filter(None, args.skip.split(",")))
failed = common.verdict(checks)

# 3. the selection micro-benchmark (issue 12): one LLaMA-2-7B layer's scores, ours vs sort vs the floor
if "selection" not in skip:
    import selection

    print("\n== selection: one LLaMA-2-7B layer's scores", flush=True)
    failed |= selection.main(["--device", device, "--repeats", "3" if args.tiny else "10",
                              "--scale", "16" if args.tiny else "1"])

# 4. the published micro-batching: 16 micro-batches of 1 x 2048 tokens (tiny: 4 of 1 x 64)
if "microbatch" not in skip:
    print("\n== published micro-batching", flush=True)
    accumulation, batch, seq = (4, 1, 64) if args.tiny else (16, 1, 2048)
    gc.collect()
    runs = {kind: build(kind)[1] for kind in ("mft", "mft-frozen", "original")}
    times = common.interleaved(runs, args.rounds, warmup=1, device=device)
    print(f"{accumulation} micro-batches of {batch} x {seq}: median s/step " +
          ", ".join(f"{k} {common.median(t):.3f}" for k, t in times.items()))
    r = common.paired_ratio(times, "mft", "mft-frozen")
    print(f"information: published micro-batching original-style/ours = "
          f"{common.paired_ratio(times, 'original', 'mft'):.3f}")
    failed |= common.verdict([("gpu published micro-batching mask overhead ours/frozen masks", r, "<= 1.03",
                               r <= 1.03)])
    del runs

# 5. scripts/finetune.py MFT tokens/s: plain vs ZeRO-2 vs ZeRO-3 vs the MFT layout (issue 12)
if "finetune" not in skip:
    import finetune_speed

    print("\n== finetune.py MFT tokens/s", flush=True)
    failed |= finetune_speed.main(["--tiny"] if args.tiny else [])
sys.exit(failed)
PYEOF
