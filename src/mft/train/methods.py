"""The training methods, fft / mft / lora: each a small record that `mft.train.loop.train` looks up once.

A `Method` says what the loaded model becomes (`setup`), what runs after every optimizer step (`after_step`:
MFT recomputes its masks), what the run folder receives (`save`: a `from_pretrained` folder, LoRA merged, or
MFT's mask file and mft_run.json), whether the base weights stay frozen (`frozen_weights`), what the log
records per step (`tracker`) and what to do with the finished folder (`next_step`). `method_of(cfg)` picks
the one `cfg.resolved_method` names (`method: auto` follows the original's keys, see `TrainConfig`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mft.errors import MftError

logger = logging.getLogger("mft.train")


@dataclass(frozen=True)
class Method:
    """One training method, as the loop uses it.

    setup(cfg, model) -> (model to train, one-line description): after loading, before the optimizer.
    after_step(model, ds): after every optimizer step and once before the first (`model` unwrapped; `ds`:
        under DeepSpeed).
    save(accelerator, cfg, model, tokenizer, info, out, snapshot_info=None): the method's files in `out`, on
        every rank (collectives inside); `info` (method, steps, base model, ...) is recorded with them, and
        the run's run_complete.json records it after. `snapshot_info`: a file name, for a snapshot of a run
        that goes on training.
    frozen_weights: the base weights never change (loaded in the training precision, no fp32 master; no
        embedding rows can be added).
    shard_optimizer_state: `shard_optimizer_state` applies (DDP without DeepSpeed: the trained tensors'
        AdamW state sharded over the processes).
    tracker(model) -> an object whose `stats()` adds to each log record; None: nothing to add.
    next_step: logged when the run is done, `{out}` the run folder; empty: nothing.
    """

    name: str
    setup: Callable
    save: Callable
    after_step: Callable = lambda model, ds: None
    frozen_weights: bool = False
    shard_optimizer_state: bool = False
    tracker: Callable | None = None
    next_step: str = ""


# -- setup -----------------------------------------------------------------------------------------------------
def _setup_fft(cfg, model):
    return model, f"FFT: {sum(p.numel() for p in model.parameters()):,} parameters"


def _setup_mft(cfg, model):
    from mft.masking.inject import inject_masks

    targets = inject_masks(model, cfg.mask_config(), seed=cfg.seed, refreshed_by_caller=True)
    entries = sum(t.entries for t in targets)
    return model, f"MFT: {len(targets)} masked matrices, {entries:,} scores"


def _setup_lora(cfg, model):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, f"LoRA rank {cfg.lora_rank}: {trainable:,} trainable parameters"


# -- after each step ---------------------------------------------------------------------------------------------
def _refresh_masks(model, ds: bool) -> None:
    """MFT: every mask from the stepped scores, all in one batch. Under DeepSpeed from the fp32 master scores
    (the same on every rank); without it from the scores themselves (fused AdamW steps them without bumping
    their version counter, so the layers would not notice on their own)."""
    from mft.masking.inject import refresh_masks

    if ds:
        from deepspeed.utils import safe_get_full_fp32_param

        refresh_masks(model, safe_get_full_fp32_param, managed=True)
    else:
        refresh_masks(model)


class MaskTracker:
    """For MFT logs: the fraction of mask entries that changed since the last log and the kept fraction, in all
    and per decoder layer."""

    def __init__(self, model):
        from mft.masking.inject import masked_modules

        self.layers = masked_modules(model)
        self.previous = {name: layer.mask for name, layer in self.layers.items()}

    def stats(self) -> dict:
        from mft.masking.select import layer_index

        per_layer: dict[str, list[int]] = {}  # layer -> [changed, kept, entries]
        for name, layer in self.layers.items():
            mask = layer.mask
            entry = per_layer.setdefault(layer_index(name) or name, [0, 0, 0])
            entry[0] += int((mask != self.previous[name]).sum())
            entry[1] += int(mask.sum())
            entry[2] += mask.numel()
            self.previous[name] = mask
        changed, entries = sum(v[0] for v in per_layer.values()), sum(v[2] for v in per_layer.values())
        return {"mask_changed": changed / entries,
                "mask_changed_per_layer": {k: v[0] / v[2] for k, v in per_layer.items()},
                "kept_fraction": {k: v[1] / v[2] for k, v in per_layer.items()}}


# -- save --------------------------------------------------------------------------------------------------------
def _masks_digest(masks: dict[str, torch.Tensor]) -> str:
    from mft.masking.files import pack_bits

    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(pack_bits(masks[name]).numpy().tobytes())
    return h.hexdigest()


def _save_mft(accelerator, cfg, model, tokenizer, info, out: Path, snapshot_info: str | None = None) -> None:
    """masks.safetensors and mft_run.json (which is also a snapshot's record), never the weights; `info` gains
    the mask settings, digests and kept fraction."""
    from accelerate.utils import gather_object

    from mft.masking.apply import RUN_INFO
    from mft.masking.files import DEFAULT_NAME, MaskSet, write_masks
    from mft.masking.inject import extract_masks, mask_layouts, masked_modules

    unwrapped = accelerator.unwrap_model(model)
    masks = extract_masks(unwrapped)
    digests = gather_object([_masks_digest(masks)])
    if len(set(digests)) != 1:
        raise MftError(f"the ranks hold different masks at the end of training (digests {digests}); this is a bug")
    if accelerator.is_main_process:
        layers = masked_modules(unwrapped)
        mask_cfg = cfg.mask_config()
        mask_set = MaskSet(masks, {n: m.kind for n, m in layers.items()}, {n: m.keep_ratio for n, m in layers.items()},
                           "learned", mask_cfg.to_dict(), info["base_model"], layouts=mask_layouts(layers))
        write_masks(out / DEFAULT_NAME, mask_set)
        entries = sum(m.numel() for m in masks.values())
        info.update({"mask_config": mask_cfg.to_dict(), "mask_digest_per_rank": digests,
                     "fingerprint": mask_set.fingerprint,
                     "kept_fraction": sum(int(m.sum()) for m in masks.values()) / entries})
        (out / RUN_INFO).write_text(json.dumps(info, indent=1))


def _save_model(accelerator, cfg, model, tokenizer, info, out: Path, snapshot_info: str | None = None,
                merge_lora: bool = False) -> None:
    """A from_pretrained folder in `out` (LoRA merged). snapshot_info: the live model goes on training (a
    snapshot), so LoRA merges a copy, and `info` is written to `out / snapshot_info`."""
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards onto the main process
    unwrapped = accelerator.unwrap_model(model)
    if merge_lora:
        keep_training = snapshot_info is not None
        if keep_training and accelerator.is_main_process and not any(p.numel() == 0 for p in unwrapped.parameters()):
            import copy

            unwrapped = copy.deepcopy(unwrapped)
        unwrapped, state_dict = _merged_lora(cfg, unwrapped, state_dict, accelerator)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if snapshot_info is not None:
            (out / snapshot_info).write_text(json.dumps(info, indent=1))


def _merged_lora(cfg, peft_model, state_dict, accelerator):
    """(merged plain model, its state dict). Under ZeRO-3 the live model is partitioned, so the main process
    rebuilds it on the CPU from the gathered state dict and merges there."""
    if accelerator.is_main_process and state_dict is not None and any(p.numel() == 0 for p in peft_model.parameters()):
        from peft import get_peft_model
        from mft.models import load_pretrained

        base = load_pretrained(cfg.model_name_or_path, dtype=torch.float32)
        peft_model = get_peft_model(base, peft_model.peft_config["default"])
        peft_model.load_state_dict(state_dict)
    merged = peft_model.merge_and_unload() if accelerator.is_main_process else peft_model
    return merged, (merged.state_dict() if accelerator.is_main_process else None)


METHODS = {
    "fft": Method("fft", setup=_setup_fft, save=_save_model),
    "mft": Method("mft", setup=_setup_mft, save=_save_mft, after_step=_refresh_masks, frozen_weights=True,
                  shard_optimizer_state=True, tracker=MaskTracker,
                  next_step="bake the masks: mft apply --mask_model_name_or_path {out} --output_dir "
                            "{out}/mask_applied"),
    "lora": Method("lora", setup=_setup_lora, save=functools.partial(_save_model, merge_lora=True),
                   frozen_weights=True),
}


def method_of(cfg) -> Method:
    """The `Method` of `cfg.resolved_method` (fft, mft or lora)."""
    return METHODS[cfg.resolved_method]
