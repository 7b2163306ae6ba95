"""Benchmark: baking masks into a ~1 GB checkpoint, our streaming apply vs load-everything vs a plain copy.

Targets (issue 6): our time <= 0.7x load-everything and <= 1.5x the plain copy; our peak memory <= 0.3x
load-everything. Builds, in a temporary folder, a Llama-shaped checkpoint (16 layers x 1024 hidden, MLP 2816,
vocab 32000, fp32: 271M parameters, 1.08 GB) saved by `save_pretrained` in 200 MB safetensors shards, plus
random masks (keep 0.9) for layers 4-7 in our `masks.safetensors`. Then, each in its own process:

- `stream`: `mft.masking.apply.apply_masks` (copies every shard, rewrites only the masked tensors' bytes);
- `load-all`: `from_pretrained` (dtype as stored), `weight.masked_fill_(~mask, 0)` per masked module,
  `save_pretrained` with the same shard size: what the original `apply_masks.py` does, with one model
  instead of its two;
- `copy`: the checkpoint's files copied with `shutil.copyfile`: the physical floor (read + write 1 GB).

Each process imports everything first and reads its RSS, then times the work only; memory is the peak RSS
(VmHWM, reset at the baseline) minus that baseline, and (information) the peak anonymous RSS over its
baseline, sampled every 5 ms (RSS also counts the checkpoint's pages a process maps with mmap). Every run
happens twice, with glibc as configured (the memory target: what a user's process peaks at) and with
MALLOC_MMAP_THRESHOLD_=65536 (freed blocks unmapped at once: the peak of live memory, for diagnosis). Both stream
and load-all read the mask file themselves. Inputs are in the page cache for every variant (the checkpoint
was just written); no variant syncs its output, and the parent calls `sync` between runs, so each starts
with no writeback pending. Rounds rotate the order; ratios are medians of per-round ratios. The stream and
load-all outputs are compared tensor by tensor once. Everything is deleted at the end.

    python benchmarks/apply.py [--repeats 3] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CKPT = dict(num_layers=16, hidden=1024, heads=16, intermediate=2816, vocab=32000)
MASKED_LAYERS = [4, 5, 6, 7]
SHARD = "200MB"


class AnonPeak(threading.Thread):
    """Samples RssAnon every 5 ms (information only; the peak RSS itself comes from ru_maxrss)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, common.status_mib("RssAnon"))
            time.sleep(0.005)


def build(folder: Path) -> dict:
    """Write the checkpoint and the masks (in a child process, so the parent stays small)."""
    import torch

    from mft.masking.files import MaskSet, write_masks

    model = common.build_model(**CKPT)
    model.save_pretrained(folder / "ckpt", max_shard_size=SHARD)
    g = torch.Generator().manual_seed(0)
    masks, kinds = {}, {}
    for name in common.masked_names(model, MASKED_LAYERS):
        masks[name] = torch.rand(model.get_submodule(name).weight.shape, generator=g) < 0.9
        kinds[name] = "attn" if ".self_attn." in name else "mlp"
    write_masks(folder / "masks.safetensors", MaskSet(masks, kinds, {n: 0.9 for n in masks}, "random"))
    files = sorted((folder / "ckpt").iterdir())
    return {"params": sum(p.numel() for p in model.parameters()),
            "bytes": sum(f.stat().st_size for f in files), "shards": sum(f.suffix == ".safetensors" for f in files),
            "masked_entries": sum(m.numel() for m in masks.values())}


def child(kind: str, ckpt: Path, masks: Path, out: Path) -> dict:
    import torch  # noqa: F401  (everything imported before the baseline)
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM

    from mft.masking.apply import apply_masks
    from mft.masking.files import read_masks

    anon_base = common.status_mib("RssAnon")
    base = common.reset_peak()
    sampler = AnonPeak()
    sampler.start()
    start = time.perf_counter()
    if kind == "copy":
        out.mkdir()
        for f in ckpt.iterdir():
            shutil.copyfile(f, out / f.name)
    elif kind == "stream":
        apply_masks(ckpt, read_masks(masks), out, progress=False)
    elif kind == "load-all":
        mask_set = read_masks(masks)
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")
        with torch.no_grad():
            for name, mask in mask_set.masks.items():
                model.get_submodule(name).weight.masked_fill_(~mask, 0)
        model.save_pretrained(out, max_shard_size=SHARD)
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    return {"kind": kind, "seconds": seconds, "peak_mib": common.peak_rss_mib() - base,
            "anon_peak_mib": sampler.peak - anon_base, "base_mib": base}


def same_outputs(a: Path, b: Path) -> bool:
    """Every tensor of the two checkpoints equal (one tensor in memory at a time)."""
    import torch
    from safetensors import safe_open

    def where(folder):
        return {k: f for f in folder.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}

    wa, wb = where(a), where(b)
    if set(wa) != set(wb):
        return False
    for key in wa:
        with safe_open(str(wa[key]), "pt") as fa, safe_open(str(wb[key]), "pt") as fb:
            if not torch.equal(fa.get_tensor(key), fb.get_tensor(key)):
                return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="where the temporary checkpoint goes (default: $TMPDIR or /tmp)")
    parser.add_argument("--max-time-load", type=float, default=0.7)
    parser.add_argument("--max-time-copy", type=float, default=1.5)
    parser.add_argument("--max-memory-load", type=float, default=0.3)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, ckpt, masks, out = args.child
        print(json.dumps(child(kind, Path(ckpt), Path(masks), Path(out))))
        return 0
    if args.build:
        print(json.dumps(build(Path(args.build))))
        return 0

    print(common.machine_line())
    tmp_root = Path(args.tmp or tempfile.gettempdir())
    free = shutil.disk_usage(tmp_root).free
    if free < 4 * 2**30:
        print(f"need 4 GiB free under {tmp_root} (checkpoint + one output at a time); {free / 2**30:.1f} GiB free")
        return 2
    variants = ["copy", "stream", "load-all"]
    results = {k: [] for k in variants + [v + "/live" for v in variants]}
    with tempfile.TemporaryDirectory(prefix="mft-bench-apply-", dir=tmp_root) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        info = json.loads(common.run_child([__file__, "--build", str(tmp)]).strip().splitlines()[-1])
        print(f"checkpoint: Llama {CKPT}, fp32, {info['params']:,} parameters, {info['bytes'] / 1e9:.2f} GB in "
              f"{info['shards']} shards (built in {time.perf_counter() - start:.0f} s); masks: layers "
              f"{MASKED_LAYERS}, {info['masked_entries']:,} entries; {args.repeats} rounds")
        compared = None
        live_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        for r in range(args.repeats):
            k = r % len(variants)
            for kind in variants[k:] + variants[:k]:
                for mode, env in (("default", None), ("live", live_env)):
                    os.sync()
                    out = tmp / f"out-{kind}"
                    shutil.rmtree(out, ignore_errors=True)
                    res = json.loads(common.run_child([__file__, "--child", kind, str(tmp / "ckpt"),
                                                       str(tmp / "masks.safetensors"), str(out)], env=env
                                                      ).strip().splitlines()[-1])
                    results[kind if mode == "default" else kind + "/live"].append(res)
                    print(f"  round {r + 1}: {kind} ({mode} malloc) {res['seconds']:.2f} s, peak RSS "
                          f"+{res['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
                if compared is None and (tmp / "out-stream").exists() and (tmp / "out-load-all").exists():
                    compared = same_outputs(tmp / "out-stream", tmp / "out-load-all")
                if kind == "copy" or compared is not None:
                    shutil.rmtree(out)
            for kind in ("stream", "load-all"):
                shutil.rmtree(tmp / f"out-{kind}", ignore_errors=True)
    # (the temporary folder and everything in it is gone here)

    def paired(a, b, field):  # per round; the runs with glibc as configured (the live ones page-fault more)
        return common.median([x[field] / y[field] for x, y in zip(results[a], results[b])])

    rows = []
    for kind in variants:
        rs, live = results[kind], results[kind + "/live"]
        rows.append([kind, f"{common.median([x['seconds'] for x in rs]):.2f}",
                     " ".join(f"{x['seconds']:.2f}" for x in rs) + " / " + " ".join(f"{x['seconds']:.2f}" for x in live),
                     f"{common.median([x['peak_mib'] for x in rs]):.0f}",
                     f"{common.median([x['peak_mib'] for x in live]):.0f}",
                     f"{common.median([x['anon_peak_mib'] for x in rs]):.0f}"])
    print(common.table(rows, ["variant", "median s", "per round (s): default / live malloc",
                              "peak RSS MiB", "peak RSS MiB, live malloc", "peak anon MiB (sampled)"]))
    print(f"stream output == load-all output, tensor by tensor: {compared}")
    t_load = paired("stream", "load-all", "seconds")
    t_copy = paired("stream", "copy", "seconds")
    m_load = paired("stream", "load-all", "peak_mib")
    m_live = common.median([x["peak_mib"] / y["peak_mib"] for x, y in zip(results["stream/live"],
                                                                         results["load-all/live"])])
    print(f"peak memory stream/load-all with glibc told to unmap freed blocks at once (live memory): {m_live:.3f}")
    return common.verdict([
        ("apply time stream/load-all", t_load, f"<= {args.max_time_load}", t_load <= args.max_time_load),
        ("apply time stream/copy", t_copy, f"<= {args.max_time_copy}", t_copy <= args.max_time_copy),
        ("apply memory stream/load-all", m_load, f"<= {args.max_memory_load}", m_load <= args.max_memory_load),
        ("apply outputs identical", float(bool(compared)), "= 1", bool(compared)),
    ])


if __name__ == "__main__":
    sys.exit(main())
