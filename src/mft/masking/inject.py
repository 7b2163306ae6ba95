"""Model-level operations: inject mask layers, read their masks, bake them into the weights, undo.

    targets = inject_masks(model, MaskConfig(masked_layers=[4, 5, 6, 7]))   # only scores train now
    refresh_after_step(optimizer)         # your own loop: masks follow every optimizer step
    ...train...
    masks = extract_masks(model)          # {module name: bool tensor}
    bake_masks(model)                     # plain model again, masked weights exactly zero
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

from mft.errors import MftError
from mft.masking.config import MaskConfig
from mft.masking.layer import MaskedExperts, MaskedLinear, refresh_after_step, refresh_layers  # noqa: F401
from mft.masking.select import Target, coverage_table, select_targets

logger = logging.getLogger(__name__)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def masked_modules(model: nn.Module) -> dict[str, MaskedLinear | MaskedExperts]:
    """{mask name: mask layer}, in model order: the module name for a `MaskedLinear`, the masked parameter's
    name (`...experts.gate_up_proj`) for a `MaskedExperts`."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, MaskedLinear):
            found[name] = m
        elif isinstance(m, MaskedExperts):
            owner = name.rpartition(".")[0]
            found[f"{owner}.{m.pname}" if owner else m.pname] = m
    return found


def mask_layouts(layers: dict) -> dict[str, dict]:
    """{mask name: {"layout", "split", "experts"}} of `masked_modules(model)`, for the mask file."""
    return {name: {"layout": m.layout, "split": m.split,
                   "experts": m.scores_shape[0] if m.layout.startswith("experts") else None}
            for name, m in layers.items()}


def inject_masks(model: nn.Module, cfg: MaskConfig, *, seed: int | None = None, freeze: bool = True,
                 refreshed_by_caller: bool = False) -> list[Target]:
    """Replace the selected linears / Conv1Ds by `MaskedLinear`s sharing their parameters, attach a
    `MaskedExperts` to each selected 3-D expert parameter; initialise the scores. The selection table
    (`coverage_table`) is logged first.

    With `freeze` (the MFT setting) every parameter but the scores stops requiring gradients. Scores are
    drawn from a generator seeded with `seed` (default: from torch's global RNG), module by module in
    model order, so the same seed gives the same scores on every rank and device.

    Masks follow the scores after an optimizer step only if the training loop says so: `mft train` refreshes
    them itself (`refreshed_by_caller=True`); your own loop calls `refresh_after_step(optimizer)` once (or
    `refresh_masks(model)` after each step). A fused optimizer (AdamW(fused=True)) changes the scores without
    a trace the layers can see, so without either the masks silently stay as they were: a `UserWarning` says
    so, once per process, unless `refreshed_by_caller`.
    """
    if masked_modules(model):
        raise MftError("the model already has mask layers; remove_masks() or bake_masks() first")
    targets = select_targets(model, cfg)
    logger.info("mask selection:\n%s", coverage_table(targets))
    generator = torch.Generator()
    generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed)
    for t in targets:
        args = (t.kind, cfg.subnet_type, cfg.keep_ratio(t.kind), cfg.threshold(t.kind), cfg.score_dtype)
        if t.layout in ("linear", "conv1d"):
            linear = model.get_submodule(t.name)
            layer = MaskedLinear(linear, *args)
        else:
            owner_name, _, pname = t.name.rpartition(".")
            layer = MaskedExperts(model.get_submodule(owner_name), pname, t.kind, t.layout, t.split, *args[1:])
        with _gathered(layer.weight, enabled=cfg.score_init == "magnitude"):
            layer.init_scores(cfg.score_init, cfg.score_init_std, generator)
        if isinstance(layer, MaskedLinear):
            _set_submodule(model, t.name, layer)
        else:
            layer.attach()
    if freeze:
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".scores"))
    if not refreshed_by_caller:
        warnings.warn(REFRESH_WARNING, UserWarning, stacklevel=2)
    return targets


REFRESH_WARNING = ("mask layers injected: if you train them in your own loop, call "
                   "mft.masking.layer.refresh_after_step(optimizer) once (or refresh_masks(model) after each "
                   "optimizer step); a fused optimizer (AdamW(fused=True)) otherwise leaves every mask as it is now. "
                   "`mft train` does this itself")


def _gathered(param: torch.Tensor, enabled: bool):
    """Gather a ZeRO-3 partitioned parameter for reading; a no-op for ordinary tensors."""
    if enabled and hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    import contextlib

    return contextlib.nullcontext()


@torch.no_grad()
def refresh_masks(model: nn.Module, full_scores: Callable[[nn.Parameter], torch.Tensor] | None = None,
                  managed: bool | None = None) -> None:
    """Recompute every cached mask now, from `full_scores(param)` if given, else from the layer's scores.

    A DeepSpeed loop passes `deepspeed.utils.safe_get_full_fp32_param` (a collective: all ranks call it in
    the same order) so the mask comes from the fp32 master scores and is identical on every rank, and sets
    `managed=True` so the layers never recompute masks on their own.
    """
    layers = list(masked_modules(model).values())
    if managed is not None:
        for layer in layers:
            layer.managed = managed
    refresh_layers(layers, full_scores)  # local masks selected in batches, one synchronisation each


def extract_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current masks, {module name: bool tensor on the CPU}."""
    return {name: layer.mask.cpu() for name, layer in masked_modules(model).items()}


def load_masks_into(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Pin given masks on the model's mask layers (e.g. to evaluate a mask file without baking it)."""
    layers = masked_modules(model)
    check_masks_match({n: tuple(m.scores_shape) for n, m in layers.items()},
                      {n: tuple(m.shape) for n, m in masks.items()}, what="the model")
    for name, mask in masks.items():
        layers[name].set_mask(mask)


def check_masks_match(shapes: dict[str, tuple], mask_shapes: dict[str, tuple], what: str) -> None:
    """Raise a clear error unless every mask names a module of `shapes` with the same shape."""
    for name, shape in mask_shapes.items():
        if name not in shapes:
            near = [n for n in shapes if n.endswith(name.split(".", 2)[-1])][:3]
            raise MftError(f"the masks name module {name}, which {what} does not have"
                           + (f" (similar: {', '.join(near)})" if near else "")
                           + "; were these masks made for another model?")
        if tuple(shape) != tuple(shapes[name]):
            raise MftError(f"mask for {name} has shape {tuple(shape)} but {what} has "
                           f"{tuple(shapes[name])} there; were these masks made for another model?")


def bake_masks(model: nn.Module) -> nn.Module:
    """Turn every mask layer back into the plain module, masked weights set to exact zeros (in place)."""
    return _unmask(model, bake=True)


def remove_masks(model: nn.Module) -> nn.Module:
    """Turn every mask layer back into the plain module, weights untouched; scores are discarded."""
    return _unmask(model, bake=False)


def _unmask(model: nn.Module, bake: bool) -> nn.Module:
    for name, layer in masked_modules(model).items():
        if isinstance(layer, MaskedLinear):
            _set_submodule(model, name, layer.unwrap(bake=bake))
        else:
            layer.detach(bake=bake)
    return model
