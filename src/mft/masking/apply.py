"""Where masks come from (learned, random, L1) and the streaming apply that bakes them into a checkpoint.

Streaming apply, for safetensors checkpoints: each shard is copied by the kernel (`copy_file_range`), then
each masked tensor's byte range in the copy is memory-mapped and its pruned entries set to 0 in place. Two
shards are processed at a time, so one's copy overlaps the other's masking; one masked tensor and one
unpacked mask per shard are in memory at a time (mask files stay bit-packed until used). Every other byte
is the input's, so unmasked tensors, the header and dtypes are bit-identical by construction. Legacy `.bin`
shards are converted to safetensors one shard at a time. The
result is written to a temporary sibling folder and renamed into place at the very end, so an interrupted
run never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from mft.progress import progress as tqdm

from mft.errors import MftError
from mft.masking.checkpoint import (INDEX_FILES, ST_DTYPES, WEIGHT_SUFFIXES, Checkpoint, WeightLocator,
                                   model_skeleton, read_safetensors_header)
from mft.masking.config import ALIASES, MaskConfig
from mft.masking.files import DEFAULT_NAME, MaskSet, export_original, read_masks, write_masks
from mft.masking.rule import compute_mask, per_matrix_local_mask, random_mask
from mft.masking.select import Target, linear_kind, select_targets
from mft.paths import (check_overwrite_keeps_results, check_writable, follow_umask, make_temp_dir, os_error,
                       remove_leftovers, swap_into_place, temp_sibling)
from mft.run_dir import RUN_FILES, RUN_INFO, SNAPSHOT_INFO

APPLY_INFO = "mft_masks.json"  # written by apply into the output model folder: where its masks came from
COPY_CHUNK = 64 << 20  # bytes per kernel copy call: the progress bar moves at least this often


# -- where masks come from ---------------------------------------------------------------------------------
def targets_of(checkpoint: Checkpoint, cfg: MaskConfig) -> list[Target]:
    """The modules `cfg` selects in the checkpoint's architecture (built on the meta device, no memory)."""
    return select_targets(model_skeleton(checkpoint.path), cfg)


def random_masks(targets: list[Target], cfg: MaskConfig, seed: int = 42) -> MaskSet:
    """Keep each weight independently with probability keep_ratio (published random baseline), seeded."""
    generator = torch.Generator().manual_seed(seed)
    masks = {t.name: random_mask(t.shape, cfg.keep_ratio(t.kind), generator) for t in targets}
    return _mask_set(masks, targets, cfg, "random")


def l1_masks(checkpoint: Checkpoint, targets: list[Target], cfg: MaskConfig) -> MaskSet:
    """Prune the `int((1 - k) * n)` smallest |W| of each matrix (published L1 baseline), same tie rule; per
    expert and per gate / up half of a fused expert weight, as the learned masks (`per_matrix_local_mask`).
    The weights are read as `from_pretrained` would load them from the folder (`WeightLocator`)."""
    masks = {}
    locator = WeightLocator(checkpoint)
    for t in tqdm(targets, desc="L1 masks", unit="matrix", leave=False):
        weight = locator.read(t.name, t.shape, t.layout)
        masks[t.name] = per_matrix_local_mask(weight, cfg.keep_ratio(t.kind), t.layout, t.split)
    return _mask_set(masks, targets, cfg, "l1")


def _mask_set(masks: dict, targets: list[Target], cfg: MaskConfig, source: str, base=None) -> MaskSet:
    return MaskSet(masks, {t.name: t.kind for t in targets}, {t.name: cfg.keep_ratio(t.kind) for t in targets},
                   source, cfg.to_dict(), base, layouts={t.name: t.info() for t in targets})


def masks_from_scores_checkpoint(checkpoint: Checkpoint, overrides: dict | None = None) -> MaskSet:
    """Learned masks from an original MFT checkpoint: weights with `<module>.scores` tensors, and the mask
    settings (`sparsity_attn`, `sparsity_mlp`, `subnet_mode`, `subnet_type`, `masked_layers`, thresholds) in
    its config.json. `overrides` (explicit command-line values) take precedence."""
    score_keys = [k for k in checkpoint.keys if k.endswith(".scores")]
    if not score_keys:
        raise MftError(f"{checkpoint.path} has no `<module>.scores` tensors: it is neither an original MFT "
                       f"checkpoint nor an mft run folder (which holds {DEFAULT_NAME})")
    # one spelling per setting (config.json's published `sparsity_attn`, a command line's `keep_ratio_attn`), so
    # that an override replaces the file's value instead of disagreeing with it
    settings = {ALIASES.get(k, k): v for k, v in checkpoint.config().items() if k in _MASK_KEYS}
    settings.update({ALIASES.get(k, k): v for k, v in (overrides or {}).items()})
    cfg = MaskConfig.from_dict(settings)
    masks, kinds, ratios = {}, {}, {}
    for key in tqdm(score_keys, desc="masks from scores", unit="matrix", leave=False):
        name = key[: -len(".scores")]
        kind = linear_kind(name) or "mlp"
        scores = checkpoint.read([key])[key]
        masks[name] = compute_mask(scores, cfg.rule(kind))
        kinds[name], ratios[name] = kind, cfg.keep_ratio(kind)
    return MaskSet(masks, kinds, ratios, "learned", cfg.to_dict(), None)


_MASK_KEYS = {"sparsity_attn", "sparsity_mlp", "keep_ratio_attn", "keep_ratio_mlp", "subnet_mode", "subnet_type",
              "masked_layers", "threshold_attn", "threshold_mlp"}


def masks_from_mask_model(path: str, overrides: dict | None = None) -> tuple[MaskSet, str | None]:
    """(masks, base model path or None) from `--mask_model_name_or_path`: an mft run folder (holds
    masks.safetensors and mft_run.json) or an original MFT checkpoint (weights with scores; `overrides`
    replace settings of its config.json)."""
    folder = Path(path)
    if (folder / DEFAULT_NAME).exists():
        if overrides:
            print(f"note: {path} holds finished masks; ignoring {', '.join(sorted(overrides))}", file=sys.stderr)
        info = json.loads((folder / RUN_INFO).read_text()) if (folder / RUN_INFO).exists() else {}
        mask_set = read_masks(folder / DEFAULT_NAME)
        return mask_set, info.get("base_model") or mask_set.base_model
    return masks_from_scores_checkpoint(Checkpoint(path), overrides), None


# -- the streaming apply -----------------------------------------------------------------------------------
def check_against_checkpoint(checkpoint: Checkpoint, mask_set: MaskSet) -> dict[str, list[str]]:
    """{mask name: the checkpoint keys holding its weight} (one key unless the checkpoint stores the weight
    in another layout, e.g. Mixtral's per-expert w1/w3 for a fused gate_up_proj: see `WeightLocator`); a clear
    error, before anything is written, if the masks do not fit."""
    locator = WeightLocator(checkpoint)
    shapes = mask_set.shapes
    return {name: list(locator.locate(name, shapes[name], mask_set.layout(name)["layout"])[0])
            for name in mask_set.masks}


def apply_masks(base: str | Path, mask_set: MaskSet, output_dir: str | Path, *, overwrite: bool = False,
                save_masks: bool = False, save_masks_format: str = "safetensors", progress: bool = True) -> Path:
    """Write `base` with `mask_set` baked in to `output_dir` (see the module doc). Returns the folder."""
    output_dir = Path(output_dir)
    check_writable(output_dir)
    remove_leftovers(output_dir)  # first: it may restore an output an interrupted swap left aside
    _check_output(output_dir, overwrite)
    checkpoint = Checkpoint(base)
    keys = check_against_checkpoint(checkpoint, mask_set)
    locator = WeightLocator(checkpoint)
    by_shard: dict[str, list[str]] = {}
    for name, name_keys in keys.items():
        for shard in dict.fromkeys(checkpoint.weight_map[key] for key in name_keys):
            by_shard.setdefault(shard, []).append(name)

    tmp = temp_sibling(output_dir)
    try:
        make_temp_dir(tmp)
        total = sum((checkpoint.path / shard).stat().st_size for shard in checkpoint.shards)
        bar = tqdm(total=total, desc="apply masks", unit="B", unit_scale=True, disable=not progress)  # bytes copied
        if checkpoint.format == "safetensors":
            _for_each(checkpoint.shards, bar, lambda shard: _apply_safetensors_shard(
                checkpoint.path / shard, tmp / shard, by_shard.get(shard, []), locator, mask_set, bar.update))
            for index in INDEX_FILES[:1]:
                if (checkpoint.path / index).exists():
                    shutil.copyfile(checkpoint.path / index, tmp / index)
        else:
            _apply_bin_shards(checkpoint, tmp, keys, locator, mask_set, bar)
        _copy_side_files(checkpoint.path, tmp)
        info = {"base_model": str(base), "source": mask_set.source, "fingerprint": mask_set.fingerprint,
                "modules": len(mask_set.masks), "summary": mask_set.summary()}
        (tmp / APPLY_INFO).write_text(json.dumps(info, indent=1))
        if save_masks:
            _save_mask_file(tmp, mask_set, save_masks_format)
        follow_umask(tmp)
        _move_into_place(tmp, output_dir, overwrite)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno:  # disk full, read-only, ...: one line with path and errno
            raise os_error(exc, output_dir) from None
        raise
    return output_dir


def _for_each(items: list, bar, work, workers: int = 2) -> None:
    """`work(item)` for every item, `workers` at a time (threads: the kernel copy of one shard and the masking
    of another both release the GIL, so they overlap). The first error is raised once every running item has
    stopped; items not started yet are dropped."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        futures = [pool.submit(work, item) for item in items]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        finally:
            bar.close()


def _apply_safetensors_shard(src: Path, dst: Path, names: list[str], locator: WeightLocator,
                             mask_set: MaskSet, copied=lambda n: None) -> None:
    """Write `dst` = `src` with the named masks applied to the tensors of this shard that hold their weights:
    the kernel copies the file, then each masked tensor's byte range of the copy is mapped and zeroed where its
    mask (converted to the on-disk layout by `locator`) prunes, in place (no user-space copy of the data, one
    tensor mapped at a time)."""
    with open(src, "rb") as fin, open(dst, "w+b") as fout:
        _copy_range(fin.fileno(), fout.fileno(), 0, os.fstat(fin.fileno()).st_size, copied)
        if not names:
            return
        header, data_start = read_safetensors_header(src)
        for name in names:
            on_disk = locator.to_disk(name, mask_set.masks[name], mask_set.layout(name)["layout"])
            for key, mask in on_disk.items():
                if key not in header:
                    continue  # in another shard
                info = header[key]
                begin, end = (data_start + o for o in info["data_offsets"])
                _mask_in_place(fout.fileno(), begin, end, ST_DTYPES[info["dtype"]], tuple(info["shape"]), mask)


def _mask_in_place(fd: int, begin: int, end: int, dtype: torch.dtype, shape: tuple, mask: torch.Tensor) -> None:
    """Zero the pruned entries of the tensor stored in bytes [begin, end) of the open file `fd`."""
    if end == begin:
        return
    start = begin - begin % mmap.ALLOCATIONGRANULARITY  # mappings start on a page boundary
    with mmap.mmap(fd, end - start, offset=start) as mapped:
        tensor = torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin - start)
        tensor.view(shape).masked_fill_(~mask, 0)
        del tensor  # release the buffer before the mapping closes


def _copy_range(fd_in: int, fd_out: int, start: int, end: int, copied=lambda n: None) -> None:
    """Bytes [start, end) of fd_in to the same offsets of fd_out, by the kernel where it can; `copied(n)` after
    each chunk of at most COPY_CHUNK bytes (the progress bar counts bytes)."""
    while start < end:
        try:
            n = os.copy_file_range(fd_in, fd_out, min(end - start, COPY_CHUNK), start, start)
        except OSError:  # not supported here (old kernel, some file systems): plain reads and writes
            n = os.pwrite(fd_out, os.pread(fd_in, min(end - start, 1 << 26), start), start)
        if n == 0:
            raise MftError(f"unexpected end of file while copying bytes {start}-{end}")
        start += n
        copied(n)


def _apply_bin_shards(checkpoint: Checkpoint, tmp: Path, keys: dict, locator: WeightLocator, mask_set: MaskSet,
                      bar) -> None:
    """Legacy pickled shards: load one (weights_only), mask, write it as a safetensors shard."""
    from safetensors.torch import save_file

    masked_key = {key: name for name, name_keys in keys.items() for key in name_keys}
    n = len(checkpoint.shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(checkpoint.shards, start=1):
        out_name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors, seen = {}, set()
        for key, t in checkpoint._load_bin(shard).items():
            t = t.clone() if t.untyped_storage().data_ptr() in seen else t  # tied weights share storage
            seen.add(t.untyped_storage().data_ptr())
            if key in masked_key:
                name = masked_key[key]
                mask = locator.to_disk(name, mask_set.masks[name], mask_set.layout(name)["layout"])[key]
                t = t.masked_fill(~mask, 0)
            tensors[key] = t.contiguous()
            weight_map[key] = out_name
            total += t.numel() * t.element_size()
        save_file(tensors, str(tmp / out_name), metadata={"format": "pt"})
        bar.update((checkpoint.path / shard).stat().st_size)
    bar.close()
    if n > 1:
        (tmp / INDEX_FILES[0]).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))


def _copy_side_files(src: Path, dst: Path) -> None:
    """config, generation config, tokenizer files, chat template...: every top-level file but weights,
    weight indices, mask files and a training run's bookkeeping (`mft.run_dir.RUN_FILES`: log, settings, launch
    and input records, finished marker; and snapshot.json, which would misdescribe the applied model)."""
    skip = set(INDEX_FILES) | set(RUN_FILES) | {RUN_INFO, APPLY_INFO, DEFAULT_NAME, "masks.pt", SNAPSHOT_INFO}
    for item in src.iterdir():
        if item.is_file() and item.name not in skip and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, dst / item.name)


def _save_mask_file(folder: Path, mask_set: MaskSet, fmt: str) -> Path:
    if fmt == "pt":
        return export_original(folder / "masks.pt", mask_set)
    return write_masks(folder / DEFAULT_NAME, mask_set)


def _check_output(output_dir: Path, overwrite: bool, replaces_folder: bool = True) -> None:
    """A non-empty `output_dir` needs `overwrite`; one that the command would replace whole (`replaces_folder`:
    every mode but --only_save_masks, which replaces one file) must hold no evaluation results another command
    wrote into it (`mft.paths.check_overwrite_keeps_results`). Raises MftError."""
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise MftError(f"output folder {output_dir} already exists and is not empty; pass --overwrite to "
                       "replace it")
    if replaces_folder and output_dir.exists():
        check_overwrite_keeps_results(output_dir, "--overwrite")


def _move_into_place(tmp: Path, output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists():
        _check_output(output_dir, overwrite)
    swap_into_place(tmp, output_dir)


def save_masks_only(output_dir: str | Path, mask_set: MaskSet, fmt: str = "safetensors", *,
                    overwrite: bool = False) -> Path:
    """`--only_save_masks`: the mask file alone, in `output_dir`.

    A non-empty `output_dir` (e.g. another run's folder with its own mask file) is refused unless `overwrite`;
    then only the mask file of that name is replaced, written beside it and renamed into place (a kill leaves the
    old file whole). Raises MftError.
    """
    output_dir = Path(output_dir)
    _check_output(output_dir, overwrite, replaces_folder=False)
    output_dir.mkdir(parents=True, exist_ok=True)
    return _save_mask_file(output_dir, mask_set, fmt)


# -- provenance: is the checkpoint masked already? -----------------------------------------------------------
MASKED_ZERO_FRACTION = 0.01  # exact zeros in a targeted matrix from which it counts as masked already

def already_masked(checkpoint: Checkpoint, pruned: dict[str, tuple[int, tuple, str | None]]) -> str | None:
    """Why `checkpoint` looks masked already, or None.

    `pruned`: {mask name: (entries the new mask would prune, weight shape, layout)}. Masked when the folder holds
    the record an apply writes (`mft_masks.json`), or when a weight to be masked holds a non-trivial number of
    exact zeros: at least `MASKED_ZERO_FRACTION` (1 %) of its entries, or the count the new mask prunes if that is
    lower (less one per matrix of an expert stack, for rounding). A trained dense weight holds next to none; a
    baked mask of keep ratio k leaves `int((1 - k) n)`, so any usual ratio (k <= 0.99) is caught whatever the
    new ratio. Reads one weight at a time. Where the rule comes from: masking twice compounds the masks (0.5 on
    0.9 keeps about 45 %, not the 50 % reported), and an L1 mask of a masked matrix selects the same zeros again.
    """
    from mft.masking.checkpoint import WeightLocator

    record = checkpoint.path / APPLY_INFO
    if record.exists():
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            info = {}
        return (f"it holds {APPLY_INFO}, the record of {info.get('source', 'unknown')} masks applied to "
                f"{info.get('base_model', 'an unknown checkpoint')}")
    locator = WeightLocator(checkpoint)
    for name, (count, shape, layout) in pruned.items():
        if count <= 0:
            continue
        n = math.prod(shape)
        matrices = math.prod(shape[:-2]) * 2 if len(shape) > 2 else 0  # rounding slack: per matrix and half
        limit = max(1, min(count - matrices, math.ceil(MASKED_ZERO_FRACTION * n)))
        weight = locator.read(name, tuple(shape), layout)
        zeros = int((weight == 0).sum())
        if zeros >= limit:
            return (f"{name} already holds {zeros} exact zeros of {n} ({zeros / n:.2%}); a trained dense weight "
                    f"holds next to none, and {limit} or more mean a baked mask")
    return None


def check_not_masked(checkpoint: Checkpoint, mask_set: MaskSet, allow: bool, flag: str = "--allow_masked_base") -> None:
    """Refuse to mask a checkpoint that is masked already (see `already_masked`) unless `allow`."""
    if allow:
        return
    # what a mask of this keep ratio prunes, int((1 - k) n) (a random mask's own count varies around it); the
    # mask's own count where the ratio is unknown
    pruned = {}
    for name, shape in mask_set.shapes.items():
        n, ratio = math.prod(shape), mask_set.keep_ratios.get(name)
        count = int((1 - ratio) * n) if ratio else n - mask_set.kept(name)
        pruned[name] = (count, tuple(shape), mask_set.layout(name).get("layout"))
    why = already_masked(checkpoint, pruned)
    if why:
        raise MftError(f"{checkpoint.path} is already masked: {why}. Masking it again compounds both masks while "
                       f"the output records only the new one; build masks on the unmasked (FFT) checkpoint, or "
                       f"pass {flag} if this is intended")


def check_not_tied(model, names) -> None:
    """Refuse masks on a module whose weight is the input embedding (a tied `lm_head`): masking it would mask
    the embedding too. `model`: a (meta) model as built from its config; `names`: module names."""
    embedding = model.get_input_embeddings()
    if embedding is None:
        return
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if getattr(module, "weight", None) is embedding.weight:
            raise MftError(f"cannot mask {name}: its weight is tied to the input embedding (tie_word_embeddings "
                           "is true), so masking it would also mask the embedding; leave it out of target_modules")

