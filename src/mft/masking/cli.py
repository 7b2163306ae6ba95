"""`mft apply` (= `scripts/apply_masks.py`, the original's flags verbatim) and `mft masks info|export`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from mft.errors import MftError
from mft.masking.config import MaskConfig

_HELP = {f.name: f.metadata.get("help", "") for f in fields(MaskConfig)}


def add_apply_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("where the masks come from (exactly one)")
    src.add_argument("--mask_model_name_or_path", help="an mft MFT run folder (masks.safetensors) or an original "
                     "MFT checkpoint (weights with <module>.scores, mask settings in config.json)")
    src.add_argument("--masks_file", help="a mask file: masks.safetensors (ours), the original's masks.pt, or "
                     "dense 0/1 tensors in .pt/.safetensors")
    src.add_argument("--random_masks", action="store_true", help="random baseline: keep each weight with "
                     "probability keep ratio (seeded by --seed)")
    src.add_argument("--use_l1_mask", action="store_true", help="L1 baseline: prune the smallest |W| per matrix")
    p.add_argument("--base_model_name_or_path", help="the checkpoint to mask (for a run folder: defaults to the "
                   "base model recorded in it)")
    p.add_argument("--output_dir", required=True, help="where the masked model (or, with --only_save_masks, the "
                   "mask file) is written")
    p.add_argument("--save_masks", action="store_true", help="also write the mask file into --output_dir")
    p.add_argument("--only_save_masks", action="store_true", help="write the mask file only, no model")
    p.add_argument("--save_masks_format", choices=("safetensors", "pt"), default="safetensors",
                   help="masks.safetensors (1 bit per entry, default) or the original's dense float masks.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output_dir")
    p.add_argument("--seed", type=int, default=42, help="seed of --random_masks")
    sel = p.add_argument_group("selection for --random_masks / --use_l1_mask (and overrides for an original "
                               "checkpoint's config.json)")
    sel.add_argument("--masked_layers", help=_HELP["masked_layers"])
    sel.add_argument("--subnet_mode", choices=("attn", "mlp", "both"), help=_HELP["subnet_mode"] + " (default both)")
    sel.add_argument("--subnet_type", choices=("local", "global"), help=_HELP["subnet_type"])
    for kind in ("attn", "mlp"):
        sel.add_argument(f"--sparsity_{kind}", f"--keep_ratio_{kind}", dest=f"keep_ratio_{kind}", type=float,
                         help=f"fraction of {kind.upper()} weights KEPT (0.9 keeps 90 %%; default 0.9)")
        sel.add_argument(f"--threshold_{kind}", type=float, help=_HELP[f"threshold_{kind}"])
    sel.add_argument("--target_modules", nargs="+", help=_HELP["target_modules"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser("apply", help="bake masks into a checkpoint (learned, random or L1), streaming",
                       description="Bake a binary mask into a model checkpoint: masked weights become exact "
                       "zeros, every other tensor is copied bit for bit. Same flags as the original "
                       "scripts/apply_masks.py.")
    add_apply_arguments(p)
    p.set_defaults(func=run_apply)

    masks = sub.add_parser("masks", help="inspect and convert mask files")
    msub = masks.add_subparsers(dest="masks_command", metavar="ACTION", required=True)
    info = msub.add_parser("info", help="kept fraction per module and in total, entries, file size")
    info.add_argument("file", help="a mask file (any supported format) or a folder holding one")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=run_info)
    export = msub.add_parser("export", help="convert a mask file: OUT.pt = the original's dense float masks.pt, "
                             "OUT.safetensors = ours")
    export.add_argument("file", help="a mask file (any supported format)")
    export.add_argument("out", help="the file to write; its extension picks the format")
    export.set_defaults(func=run_export)


def _mask_config(args) -> MaskConfig:
    explicit = {k: getattr(args, k) for k in ("masked_layers", "subnet_mode", "subnet_type", "keep_ratio_attn",
                                              "keep_ratio_mlp", "threshold_attn", "threshold_mlp", "target_modules")
                if getattr(args, k) is not None}
    return MaskConfig.from_dict(explicit, strict=True), explicit


def run_apply(args) -> int:
    from mft.masking import apply as A
    from mft.masking.files import read_masks

    sources = [bool(args.mask_model_name_or_path), bool(args.masks_file), args.random_masks, args.use_l1_mask]
    if sum(sources) != 1:
        raise MftError("give exactly one mask source: --mask_model_name_or_path, --masks_file, --random_masks or "
                       f"--use_l1_mask ({sum(sources)} given)")
    cfg, explicit = _mask_config(args)  # validates ratios and layers before any heavy work
    out = Path(args.output_dir)
    if not args.only_save_masks:
        A._check_output(out, args.overwrite)
    base = args.base_model_name_or_path
    if args.random_masks or args.use_l1_mask:
        if cfg.is_empty:
            raise MftError("--random_masks / --use_l1_mask need --masked_layers (e.g. \"4 5 6 7\") or --target_modules")
        if not base:
            raise MftError("--random_masks / --use_l1_mask need --base_model_name_or_path")
        checkpoint = A.Checkpoint(base)
        targets = A.targets_of(checkpoint, cfg)
        mask_set = (A.random_masks(targets, cfg, args.seed) if args.random_masks
                    else A.l1_masks(checkpoint, targets, cfg))
    elif args.masks_file:
        mask_set = read_masks(args.masks_file)
    else:
        mask_set, run_base = A.masks_from_mask_model(args.mask_model_name_or_path, explicit)
        base = base or run_base
    if base and not mask_set.base_model:
        mask_set.base_model = str(base)

    if args.only_save_masks:
        path = A.save_masks_only(out, mask_set, args.save_masks_format)
        print(f"wrote {path} ({_describe(mask_set)})")
        return 0
    if not base:
        raise MftError("--base_model_name_or_path is required: the masks do not record which checkpoint to mask")
    if not args.quiet:
        from mft.masking.select import coverage_table, targets_of_masks

        print(f"masks to apply ({mask_set.source}):\n{coverage_table(targets_of_masks(mask_set))}", file=sys.stderr)
    A.apply_masks(base, mask_set, out, overwrite=args.overwrite, save_masks=args.save_masks,
                  save_masks_format=args.save_masks_format, progress=not args.quiet)
    print(f"wrote {out}: {base} with {_describe(mask_set)}")
    return 0


def _describe(mask_set) -> str:
    rows = mask_set.summary()
    entries = sum(r["entries"] for r in rows)
    kept = sum(r["kept"] for r in rows)
    return f"{mask_set.source} masks on {len(rows)} modules, {kept}/{entries} entries kept ({kept / entries:.4%})"


def run_info(args) -> int:
    import json

    from mft.masking.files import read_masks

    path = Path(args.file)
    mask_set = read_masks(path)
    file = path if path.is_file() else next(p for p in (path / "masks.safetensors", path / "masks.pt") if p.exists())
    rows = mask_set.summary()
    entries = sum(r["entries"] for r in rows)
    kept = sum(r["kept"] for r in rows)
    size = file.stat().st_size
    total = {"modules": len(rows), "entries": entries, "kept": kept, "kept_fraction": kept / entries,
             "file": str(file), "file_bytes": size, "bits_per_entry": 8 * size / entries,
             "format": mask_set.format, "source": mask_set.source, "fingerprint": mask_set.fingerprint}
    if args.json:
        print(json.dumps({"modules": rows, "total": total}, indent=1))
        return 0
    width = max(len(r["module"]) for r in rows)
    print(f"{'module':<{width}}  {'shape':>12}  {'layout':>21}  {'experts':>7}  {'entries':>10}  {'kept':>10}  "
          f"{'kept %':>8}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        layout = r["layout"] + (f"/{r['split']}" if r["split"] else "")
        print(f"{r['module']:<{width}}  {shape:>12}  {layout:>21}  {r['experts'] or '-':>7}  {r['entries']:>10}  "
              f"{r['kept']:>10}  {100 * r['kept_fraction']:>7.3f}%")
    print(f"{'total':<{width}}  {'':>12}  {'':>21}  {'':>7}  {entries:>10}  {kept:>10}  {100 * kept / entries:>7.3f}%")
    print(f"file {file}: {size} bytes, {total['bits_per_entry']:.3f} bits per entry, format {mask_set.format}, "
          f"source {mask_set.source}, {mask_set.fingerprint}")
    return 0


def run_export(args) -> int:
    from mft.masking.files import export_original, read_masks, write_masks

    mask_set = read_masks(args.file)
    out = Path(args.out)
    if out.suffix == ".pt":
        export_original(out, mask_set)
    elif out.suffix == ".safetensors":
        write_masks(out, mask_set)
    else:
        raise MftError(f"cannot tell the format of {out}: use a .pt (original masks.pt) or .safetensors (ours) name")
    print(f"wrote {out} ({_describe(mask_set)})")
    return 0


def apply_main(argv: list[str] | None = None) -> int:
    """`python scripts/apply_masks.py ...`: the original entry point, same flags."""
    parser = argparse.ArgumentParser(prog="apply_masks.py", description="Bake masks into a checkpoint "
                                     "(same as `mft apply`).")
    add_apply_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_apply(args)
    except MftError as exc:
        print(f"apply_masks.py: error: {exc}", file=sys.stderr)
        return 1
