"""Benchmark: bytes on disk per mask entry of our `masks.safetensors` (target: <= 1.01 bits per entry).

Writes the masks of two mask sets with `mft.masking.files.write_masks` and reports file bytes x 8 / entries:

- `bench`:    the step benchmarks' model, layers 2-5 (28 matrices, 12.6M entries);
- `llama2-7b`: LLaMA-2-7B's published math setting, layers 4-7 (28 matrices of 4096 x 4096, 11008 x 4096 and
               4096 x 11008, 809M entries), built from the shapes alone (no model needed).

Every file is read back with `read_masks` and must equal what was written. For comparison it also writes
the original code's `masks.pt` (dense float32, `torch.save`) for the `bench` set (the 7B one would be 3.2 GB).

    python benchmarks/mask_storage.py [--sets bench,llama2-7b] [--max-bits 1.01]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

LLAMA2_7B = dict(hidden=4096, intermediate=11008, layers=[4, 5, 6, 7])
BENCH = dict(hidden=common.MODEL["hidden"], intermediate=common.MODEL["intermediate"], layers=[2, 3, 4, 5])


def shapes(hidden, intermediate, layers) -> dict[str, tuple[int, int]]:
    out = {}
    for i in layers:
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"model.layers.{i}.self_attn.{p}"] = (hidden, hidden)
        out[f"model.layers.{i}.mlp.gate_proj"] = (intermediate, hidden)
        out[f"model.layers.{i}.mlp.up_proj"] = (intermediate, hidden)
        out[f"model.layers.{i}.mlp.down_proj"] = (hidden, intermediate)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="bench,llama2-7b")
    parser.add_argument("--max-bits", type=float, default=1.01)
    args = parser.parse_args()

    import torch

    from mft.masking.files import MaskSet, export_original, read_masks, write_masks

    print(common.machine_line())
    rows, checks = [], []
    with tempfile.TemporaryDirectory(prefix="mft-bench-masks-") as tmp:
        for name in args.sets.split(","):
            spec = {"bench": BENCH, "llama2-7b": LLAMA2_7B}[name]
            g = torch.Generator().manual_seed(0)
            masks = {m: torch.rand(s, generator=g) < 0.9 for m, s in shapes(**spec).items()}
            kinds = {m: "attn" if "self_attn" in m else "mlp" for m in masks}
            mask_set = MaskSet(masks, kinds, {m: 0.9 for m in masks}, "random",
                               {"masked_layers": spec["layers"], "keep_ratio_attn": 0.9, "keep_ratio_mlp": 0.9})
            entries = sum(m.numel() for m in masks.values())
            path = Path(tmp) / f"{name}.safetensors"
            start = time.perf_counter()
            write_masks(path, mask_set)
            write_s = time.perf_counter() - start
            start = time.perf_counter()
            back = read_masks(path)
            read_s = time.perf_counter() - start
            assert set(back.masks) == set(masks) and all(torch.equal(back.masks[m], masks[m]) for m in masks), name
            size = path.stat().st_size
            bits = size * 8 / entries
            rows.append([f"{name} (ours)", len(masks), f"{entries:,}", f"{size:,}", f"{bits:.4f}",
                         f"{write_s:.2f}", f"{read_s:.2f}"])
            checks.append((f"mask storage {name} bits/entry", bits, f"<= {args.max_bits}", bits <= args.max_bits))
            if name == "bench":
                orig = Path(tmp) / "masks.pt"
                start = time.perf_counter()
                export_original(orig, mask_set)
                write_s = time.perf_counter() - start
                size = orig.stat().st_size
                rows.append([f"{name} (original masks.pt)", len(masks), f"{entries:,}", f"{size:,}",
                             f"{size * 8 / entries:.4f}", f"{write_s:.2f}", "-"])
            del masks, mask_set, back
    print(common.table(rows, ["mask set", "matrices", "entries", "file bytes", "bits/entry", "write s", "read s"]))
    return common.verdict(checks)


if __name__ == "__main__":
    sys.exit(main())
