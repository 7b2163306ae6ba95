"""`mft apply` (= `scripts/apply_masks.py`, the original's flags verbatim) and `mft masks info|export`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from mft.errors import MftError
from mft.masking.config import MaskConfig
from mft.settings import ArgumentParser, add_arguments, option

_HELP = {f.name: f.metadata.get("help", "") for f in fields(MaskConfig)}
_SOURCE = "where the masks come from (exactly one)"
_SELECTION = ("selection for --random_masks / --use_l1_mask (and overrides for an original checkpoint's "
              "config.json)")


@dataclass
class ApplyOptions:
    """The flags of `mft apply` and `scripts/apply_masks.py`: the original's names (`--snake_case`; the
    `--kebab-case` spelling is accepted too). `run_apply(ApplyOptions(...))` is the same job in Python."""

    mask_model_name_or_path: str | None = option("an mft MFT run folder (masks.safetensors) or an original MFT "
                                                 "checkpoint (weights with <module>.scores, mask settings in "
                                                 "config.json)", group=_SOURCE)
    masks_file: str | None = option("a mask file: masks.safetensors (ours), the original's masks.pt, or dense 0/1 "
                                    "tensors in .pt/.safetensors", group=_SOURCE)
    random_masks: bool = option("random baseline: keep each weight with probability keep ratio (seeded by --seed)",
                                False, group=_SOURCE)
    use_l1_mask: bool = option("L1 baseline: prune the smallest |W| per matrix", False, group=_SOURCE)
    base_model_name_or_path: str | None = option("the checkpoint to mask (for a run folder: defaults to the base "
                                                 "model recorded in it)")
    output_dir: str | None = option("where the masked model (or, with --only_save_masks, the mask file) is written",
                                    required=True)
    save_masks: bool = option("also write the mask file into --output_dir", False)
    only_save_masks: bool = option("write the mask file only, no model", False)
    save_masks_format: str = option("masks.safetensors (1 bit per entry, default) or the original's dense float "
                                    "masks.pt", "safetensors", choices=("safetensors", "pt"))
    overwrite: bool = option("replace an existing, non-empty --output_dir (only that folder: refused when it is or "
                             "contains an input); the old one is removed only once the new one is complete. With "
                             "--only_save_masks: write the mask file into a non-empty folder, replacing a mask file "
                             "of that name (written beside it and renamed; other files are kept)", False)
    allow_masked_base: bool = option("mask a checkpoint that is already masked (holds mft_masks.json or the pruned "
                                     "fraction of exact zeros); refused otherwise", False)
    seed: int = option("seed of --random_masks", 42)
    masked_layers: str | None = option(_HELP["masked_layers"], group=_SELECTION)
    subnet_mode: str | None = option(_HELP["subnet_mode"] + " (default both)", group=_SELECTION,
                                     choices=("attn", "mlp", "both"))
    subnet_type: str | None = option(_HELP["subnet_type"], group=_SELECTION, choices=("local", "global"))
    keep_ratio_attn: float | None = option("fraction of ATTN weights KEPT (0.9 keeps 90 %; default 0.9)",
                                           group=_SELECTION, flag="sparsity_attn", flags=("keep_ratio_attn",))
    threshold_attn: float | None = option(_HELP["threshold_attn"], group=_SELECTION)
    keep_ratio_mlp: float | None = option("fraction of MLP weights KEPT (0.9 keeps 90 %; default 0.9)",
                                          group=_SELECTION, flag="sparsity_mlp", flags=("keep_ratio_mlp",))
    threshold_mlp: float | None = option(_HELP["threshold_mlp"], group=_SELECTION)
    target_modules: list[str] | None = option(_HELP["target_modules"], group=_SELECTION)
    quiet: bool = option("no progress bars", False)


@dataclass
class MasksInfoOptions:
    """The arguments of `mft masks info`."""

    file: str = option("a mask file (any supported format) or a folder holding one", positional=True)
    json: bool = option("print JSON instead of a table", False)


@dataclass
class MasksExportOptions:
    """The arguments of `mft masks export`."""

    file: str = option("a mask file (any supported format)", positional=True)
    out: str = option("the file to write; its extension picks the format", positional=True)


def add_apply_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ApplyOptions (generated: `mft.settings.add_arguments`)."""
    add_arguments(p, ApplyOptions)


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
    add_arguments(info, MasksInfoOptions)
    info.set_defaults(func=run_info)
    export = msub.add_parser("export", help="convert a mask file: OUT.pt = the original's dense float masks.pt, "
                             "OUT.safetensors = ours")
    add_arguments(export, MasksExportOptions)
    export.set_defaults(func=run_export)


def _mask_config(args) -> tuple[MaskConfig, dict]:
    """(the MaskConfig of the selection flags, {flag: value} of those given explicitly)."""
    explicit = {k: getattr(args, k) for k in ("masked_layers", "subnet_mode", "subnet_type", "keep_ratio_attn",
                                              "keep_ratio_mlp", "threshold_attn", "threshold_mlp", "target_modules")
                if getattr(args, k) is not None}
    return MaskConfig.from_dict(explicit, strict=True), explicit


def run_apply(args) -> int:
    from mft.errors import Interrupted

    out = Path(args.output_dir)
    try:
        return _run_apply(args, out)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; nothing was written to {out} (any earlier output there is unchanged); "
                          "re-run the same command to start again") from None
    except OSError as exc:
        if not exc.errno:
            raise
        from mft.paths import os_error

        raise os_error(exc, out) from None


def _run_apply(args, out: Path) -> int:
    from mft.masking import apply as A
    from mft.masking.files import read_masks
    from mft.hub import resolve_model
    from mft.paths import check_output_vs_inputs, check_writable
    from mft.progress import set_quiet

    if args.quiet:
        set_quiet()  # every bar: the L1 and score passes too, not only the copy

    sources = [bool(args.mask_model_name_or_path), bool(args.masks_file), args.random_masks, args.use_l1_mask]
    if sum(sources) != 1:
        raise MftError("give exactly one mask source: --mask_model_name_or_path, --masks_file, --random_masks or "
                       f"--use_l1_mask ({sum(sources)} given)")
    cfg, explicit = _mask_config(args)  # validates ratios and layers before any heavy work
    # Short names (`mft models list`) become their cached folders before any path check.
    base = resolve_model(args.base_model_name_or_path)
    mask_model = resolve_model(args.mask_model_name_or_path)
    # Nothing the command reads may be replaced by what it writes (checked again below once a run's recorded
    # base model is known).
    inputs = {"base model": base, "mask model": mask_model, "masks file": args.masks_file}
    check_output_vs_inputs(out, inputs)
    check_writable(out)
    # --only_save_masks too (another run's mask file is never replaced silently), but it replaces one file only
    A._check_output(out, args.overwrite, replaces_folder=not args.only_save_masks)
    if args.random_masks or args.use_l1_mask:
        if cfg.is_empty:
            raise MftError("--random_masks / --use_l1_mask need --masked_layers (e.g. \"4 5 6 7\") or --target_modules")
        if not base:
            raise MftError("--random_masks / --use_l1_mask need --base_model_name_or_path (the FFT checkpoint)")
        checkpoint = A.Checkpoint(base)
        targets = A.targets_of(checkpoint, cfg)
        mask_set = (A.random_masks(targets, cfg, args.seed) if args.random_masks
                    else A.l1_masks(checkpoint, targets, cfg))
    elif args.masks_file:
        mask_set = read_masks(args.masks_file)
    else:
        _check_original_settings(mask_model, explicit)
        mask_set, run_base = A.masks_from_mask_model(mask_model, explicit)
        base = base or run_base
        check_output_vs_inputs(out, {"base model recorded in the mask run": base})
    if base and not mask_set.base_model:
        mask_set.base_model = str(base)
    if base:
        checkpoint = A.Checkpoint(base)
        A.check_not_tied(A.model_skeleton(checkpoint.path), mask_set.masks)
        A.check_against_checkpoint(checkpoint, mask_set)
        A.check_not_masked(checkpoint, mask_set, args.allow_masked_base)

    if args.only_save_masks:
        path = A.save_masks_only(out, mask_set, args.save_masks_format, overwrite=args.overwrite)
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


def _check_original_settings(path: str, explicit: dict) -> None:
    """An original MFT checkpoint must state its mask settings (config.json or the command line): refuse, naming
    what is missing, rather than fall back to defaults; and refuse --masked_layers that the scores contradict."""
    from mft.masking import apply as A
    from mft.masking.select import layer_index
    from mft.run_dir import RUN_INFO
    from mft.masking.config import parse_layers
    from mft.masking.files import DEFAULT_NAME
    from mft.masking.select import linear_kind

    folder = Path(path)
    if (folder / DEFAULT_NAME).exists() or (folder / RUN_INFO).exists():
        return  # an mft run folder: finished masks, no settings needed
    checkpoint = A.Checkpoint(path)
    modules = [k[: -len(".scores")] for k in checkpoint.keys if k.endswith(".scores")]
    if not modules:
        return  # masks_from_scores_checkpoint says what is wrong
    config = checkpoint.config()

    def given(key: str):  # the command line wins; config.json may use either name of a keep ratio
        for name in (key, key.replace("sparsity", "keep_ratio")):
            for source in (explicit, config):
                if source.get(name) is not None:
                    return source[name]
        return None

    subnet_type = given("subnet_type")
    missing = [] if subnet_type is not None else ["subnet_type"]
    for kind in sorted({linear_kind(m) or "mlp" for m in modules}):
        key = f"threshold_{kind}" if subnet_type == "global" else f"sparsity_{kind}"
        if given(key) is None:
            missing.append(key)
    if missing:
        flags = " ".join(f"--{k} ..." for k in missing)
        raise MftError(f"{path} is an original MFT checkpoint, but its config.json lacks the mask settings "
                       f"{', '.join(missing)} (no defaults are assumed: they decide which weights are kept); pass "
                       f"them on the command line: {flags}")
    if explicit.get("masked_layers") is not None:
        wanted = parse_layers(explicit["masked_layers"])
        found = sorted({int(i) for i in map(layer_index, modules) if i is not None})
        if sorted(wanted) != found:
            raise MftError(f"--masked_layers {' '.join(map(str, wanted))} does not match {path}: its scores are "
                           f"in layers {' '.join(map(str, found))}; drop --masked_layers or pick that checkpoint's "
                           "layers")


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
    parser = ArgumentParser(prog="apply_masks.py", description="Bake masks into a checkpoint "
                            "(same as `mft apply`).")
    add_apply_arguments(parser)
    args = parser.parse_args(argv)
    from mft.errors import run_command

    return run_command("apply_masks.py", run_apply, args)
