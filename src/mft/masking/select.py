"""Which linears to mask, found by structure and name in any `transformers` decoder model.

The decoder layers are the `nn.ModuleList` with `config.num_hidden_layers` entries (`model.layers` in
Llama/Mistral/Qwen2/Gemma 2/Phi-3/OLMo 2, `gpt_neox.layers`, `transformer.h`, ...). Inside a layer, a linear
is an *attention* linear when a component of its path names attention (`self_attn`, `attention`, `attn`)
and an *MLP* linear when one names the feed-forward block (`mlp`, `feed_forward`, `ffn`). That covers
separate projections (`q_proj ... down_proj`) and fused ones (`qkv_proj`, `gate_up_proj`,
`query_key_value`, `dense_h_to_4h`) alike. Anything else is reachable with explicit `target_modules`
regular expressions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from mft.errors import MftError
from mft.masking.config import MaskConfig

_ATTN = re.compile(r"attn|attention", re.IGNORECASE)
_MLP = re.compile(r"mlp|feed_?forward|ffn", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    name: str  # full module name, e.g. "model.layers.4.self_attn.q_proj"
    kind: str  # "attn" or "mlp"
    shape: tuple[int, int]  # weight shape (out_features, in_features)


def linear_kind(path: str) -> str | None:
    """'attn', 'mlp' or None, from the components of a module path below the decoder layer."""
    parts = path.split(".")[:-1] or path.split(".")
    for part in parts:
        if _ATTN.search(part):
            return "attn"
        if _MLP.search(part):
            return "mlp"
    return None


def num_layers_of(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the decoder layers; a clear error listing the candidates when ambiguous."""
    n = num_layers_of(model)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    candidates = [(name, m) for name, m in lists if n is None or len(m) == n]
    # Prefer lists whose entries hold linears (decoder blocks) over, say, a list of norms.
    candidates = [(name, m) for name, m in candidates if any(isinstance(x, nn.Linear) for x in m[0].modules())]
    if len(candidates) >= 1:
        return candidates[0]
    found = ", ".join(f"{name} ({len(m)} entries)" for name, m in lists) or "none"
    raise MftError(f"cannot find the decoder layers of {type(model).__name__}: expected an nn.ModuleList of "
                   f"{n} blocks (config.num_hidden_layers); module lists found: {found}. "
                   "Select modules explicitly with target_modules.")


def _linears(module: nn.Module, prefix: str):
    from mft.masking.layer import MaskedLinear

    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, MaskedLinear)):
            yield (f"{prefix}.{name}" if prefix else name), name, m


def _shape(m: nn.Module) -> tuple[int, int]:
    return tuple(getattr(m.weight, "ds_shape", m.weight.shape))


def describe_layer(model: nn.Module) -> str:
    """One line on what the first decoder layer holds, for error messages."""
    try:
        prefix, layers = find_decoder_layers(model)
    except MftError as exc:
        return str(exc)
    groups: dict[str, list[str]] = {"attn": [], "mlp": [], "other": []}
    for _, rel, _m in _linears(layers[0], ""):
        groups[linear_kind(rel) or "other"].append(rel)
    return (f"{len(layers)} decoder layers at `{prefix}`; each has attention linears "
            f"[{', '.join(groups['attn']) or '-'}], MLP linears [{', '.join(groups['mlp']) or '-'}]"
            + (f", other linears [{', '.join(groups['other'])}]" if groups["other"] else ""))


def select_targets(model: nn.Module, cfg: MaskConfig) -> list[Target]:
    """The linears `cfg` selects, in model order. Errors name what was asked and what the model has."""
    chosen: dict[str, Target] = {}
    if cfg.masked_layers:
        prefix, layers = find_decoder_layers(model)
        past = [i for i in cfg.masked_layers if i >= len(layers)]
        if past:
            raise MftError(f"masked layer {past[0]} is out of range: the model has {len(layers)} decoder layers "
                           f"(indices 0-{len(layers) - 1}); masked_layers={cfg.masked_layers}")
        kinds = ("attn", "mlp") if cfg.subnet_mode == "both" else (cfg.subnet_mode,)
        for i in cfg.masked_layers:
            found = [(full, rel, m) for full, rel, m in _linears(layers[i], f"{prefix}.{i}")]
            picked = [(full, rel, m) for full, rel, m in found if linear_kind(rel) in kinds]
            if not picked:
                listing = ", ".join(f"{rel} ({linear_kind(rel) or 'unclassified'})" for _, rel, _ in found) or "none"
                raise MftError(f"layer {i} (`{prefix}.{i}`) has no {' or '.join(kinds)} linears to mask "
                               f"(subnet_mode={cfg.subnet_mode}); its linears: {listing}. "
                               "Select modules explicitly with target_modules.")
            for full, rel, m in picked:
                chosen[full] = Target(full, linear_kind(rel), _shape(m))
    if cfg.target_modules:
        patterns = [re.compile(p) for p in cfg.target_modules]
        for full, rel, m in _linears(model, ""):
            if full not in chosen and any(p.search(full) for p in patterns):
                chosen[full] = Target(full, linear_kind(rel) or "mlp", _shape(m))
    if not chosen:
        raise MftError(f"no module matches the selection (masked_layers={cfg.masked_layers}, "
                       f"subnet_mode={cfg.subnet_mode}, target_modules={cfg.target_modules}); the model has "
                       f"{describe_layer(model)}")
    order = {name: k for k, (name, _) in enumerate(model.named_modules())}
    return sorted(chosen.values(), key=lambda t: order[t.name])
