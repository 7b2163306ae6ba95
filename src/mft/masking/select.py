"""Which weights to mask, found by structure and name in any `transformers` decoder model, plain or multimodal.

**The decoder layers** are those of the language model: the module whose config is `config.get_text_config()`
(the model itself for plain LMs; `model.language_model` in Gemma 3 / Mistral 3 / LLaVA, `language_model` in
Llama 4), and inside it the `nn.ModuleList` of `num_hidden_layers` blocks that hold weights (`model.layers`,
`transformer.h`, `gpt_neox.layers`, ...). Vision towers, projectors and audio encoders are never reached by
`masked_layers` / `subnet_mode`; only an explicit `target_modules` pattern selects them.

**What is a maskable weight** (a *target*), with its layout:

    linear     nn.Linear (or a subclass whose forward is the plain linear map)   [out, in]
    conv1d     transformers' Conv1D (GPT-2 family)                                [in, out]
    experts    fused 3-D expert parameter (Mixtral, Qwen-MoE, OLMoE, DeepSeek)    [experts, out, in]
    experts_t  the same, stored transposed (Llama 4, gpt-oss)                     [experts, in, out]

A fused `gate_up_proj` of experts holds two matrices per expert (gate and up: split `halves`, or
`interleaved` columns in gpt-oss), so the local rule sees `2 * experts` matrices there and `experts` in a
`down_proj`. Expert biases are not masked (linear biases never are).

**Kinds.** A weight is *attn* when a component of its path below the decoder layer names attention
(`self_attn`, `attention`, `attn`: q/k/v/o, fused qkv, DeepSeek's MLA `q_a_proj ... kv_b_proj`) and *mlp* when
one names the feed-forward block (`mlp`, `feed_forward`, `ffn`, `block_sparse_moe`, `moe`: dense MLPs, shared
experts and routed experts). A linear with a standard feed-forward name (`fc1`, `fc2`, `c_fc`, `up_proj`, ...)
sitting directly on the decoder block, below no attention or MLP module, is *mlp* (OPT's `layers.N.fc1`). Any
other weight of a chosen layer (Jamba's mamba mixer, say) is *unclassified*, and `masked_layers` refuses the
layer naming it rather than leave it dense. *Routers* (a path component containing `router`, e.g. DBRX's
`ffn.router.layer`, `shared_expert_gate`, or a `gate` beside `experts`, and anything below them) score tokens,
they are not projections: `subnet_mode` skips them and a `target_modules` pattern naming one (its weight or its
module) is refused. A weight shared with another module (a tied `lm_head`) is refused at selection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from mft.errors import MftError
from mft.masking.config import MaskConfig

_ATTN = re.compile(r"attn|attention", re.IGNORECASE)
_MLP = re.compile(r"mlp|feed_?forward|ffn|moe", re.IGNORECASE)
_ROUTER_NAMES = {"router", "shared_expert_gate"}
# Standard feed-forward projection names: a linear with one of these names sitting directly on a decoder block
# (no attention or MLP container in its path, e.g. OPT's `layers.N.fc1` / `fc2`) is the block's feed-forward.
_FFN_NAMES = {"fc1", "fc2", "fc_in", "fc_out", "c_fc", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj",
              "gate_up_proj", "dense_h_to_4h", "dense_4h_to_h"}
# 3-D expert parameters, by name; `gate_up_proj` holds two matrices per expert.
_EXPERT_PARAMS = {"gate_up_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}
# nn.Linear subclasses whose forward overrides nn.Linear's but computes the same plain linear map.
_PLAIN_LINEAR_SUBCLASSES = {"FalconLinear"}
LAYOUTS = ("linear", "conv1d", "experts", "experts_t")
_KIND_WORDS = {"attn": "attention", "mlp": "MLP", "router": "router", None: "unclassified"}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """One masked weight. `name` is the mask's name: the module name for linear / conv1d weights (as the
    original MFT's masks.pt), the parameter name for a 3-D expert parameter."""

    name: str  # e.g. "model.layers.4.self_attn.q_proj" or "model.layers.4.mlp.experts.gate_up_proj"
    kind: str  # "attn" or "mlp"
    shape: tuple[int, ...]  # the weight's shape in memory (full shape under ZeRO-3)
    layout: str = "linear"  # see LAYOUTS and the module doc
    split: str | None = None  # fused gate_up of experts: "halves" or "interleaved"

    @property
    def param(self) -> str:
        """The parameter's full name in the model (`<module>.weight` for linear and conv1d weights)."""
        return self.name if self.layout.startswith("experts") else f"{self.name}.weight"

    @property
    def experts(self) -> int | None:
        return self.shape[0] if self.layout.startswith("experts") else None

    @property
    def matrices(self) -> int:
        """How many matrices the local rule treats separately (each prunes int((1 - k) n) of its own)."""
        return (self.experts or 1) * (2 if self.split else 1)

    @property
    def entries(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def info(self) -> dict:
        """What a mask file records about the weight (see files.py)."""
        return {"layout": self.layout, "split": self.split, "experts": self.experts}


def linear_kind(path: str) -> str | None:
    """'attn', 'mlp' or None, from the components of a module path below the decoder layer."""
    parts = path.split(".")[:-1] or path.split(".")
    for part in parts:
        if _ATTN.search(part):
            return "attn"
        if _MLP.search(part):
            return "mlp"
    return None


def layer_index(name: str) -> str | None:
    """The decoder layer a weight or module name sits in, for per-layer counts: the first `.N.` component
    (`model.layers.4.self_attn.q_proj` -> `"4"`, `model.language_model.layers.12.mlp.experts.down_proj` ->
    `"12"`); None when the name has none (e.g. `lm_head`)."""
    found = _LAYER_INDEX.search(name)
    return found.group(1) if found else None


def _is_router(module_path: str, modules: dict[str, nn.Module]) -> bool:
    """Routers score tokens: a module at or below a path component `*router*` or `shared_expert_gate`
    (DBRX's `ffn.router.layer`), or below a `gate` that sits beside `experts`. `modules`: name -> module of
    the searched module (`named_modules()`), to find a `gate`'s parent."""
    parts = module_path.split(".")
    for k, part in enumerate(parts):
        if part in _ROUTER_NAMES or "router" in part.lower():
            return True
        if part == "gate" and hasattr(modules.get(".".join(parts[:k])), "experts"):
            return True
    return False


def _weight_shape(p) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def num_layers_of(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def language_model(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the language model: the outermost module whose config is the text config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return "", model
    text = config.get_text_config()
    if text is config:
        return "", model
    for name, m in model.named_modules():
        if getattr(m, "config", None) is text:
            return name, m
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and decoder is not model:
        name = next(n for n, m in model.named_modules() if m is decoder)
        return name, decoder
    raise MftError(f"cannot find the language model inside {type(model).__name__}: no submodule carries its text "
                   f"config ({type(text).__name__}). Select modules explicitly with target_modules.")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the language model's decoder layers; a clear error listing what was found."""
    n = num_layers_of(model)
    root_name, root = language_model(model)
    lists = [(name, m) for name, m in root.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    candidates = [(name, m) for name, m in lists if n is None or len(m) == n]
    # Prefer lists whose entries hold maskable weights (decoder blocks) over, say, a list of norms.
    candidates = [(name, m) for name, m in candidates if any(True for _ in _weights(m[0], ""))]
    if candidates:
        name, layers = candidates[0]
        return (f"{root_name}.{name}" if root_name else name), layers
    found = ", ".join(f"{name} ({len(m)} entries)" for name, m in lists) or "none"
    where = f" in its language model `{root_name}`" if root_name else ""
    raise MftError(f"cannot find the decoder layers of {type(model).__name__}{where}: expected an nn.ModuleList of "
                   f"{n} blocks (text config num_hidden_layers) holding linear, Conv1D or expert weights; module "
                   f"lists found: {found}. Select modules explicitly with target_modules.")


@dataclass(frozen=True)
class _Weight:
    name: str  # mask name (see Target)
    rel: str  # the same below the searched module
    kind: str | None  # attn, mlp, router or None
    layout: str | None  # None: not maskable
    shape: tuple[int, ...]
    split: str | None = None
    why: str = ""  # why it cannot be masked
    module: str = ""  # the owning module's full name (for patterns naming a module whose weight is a parameter)


def _linear_ok(m: nn.Module) -> bool:
    return type(m).forward is nn.Linear.forward or type(m).__name__ in _PLAIN_LINEAR_SUBCLASSES


def _expert_layout(owner: nn.Module, pname: str, shape: tuple[int, ...], hidden: int | None) -> tuple[str | None, str]:
    """('experts' | 'experts_t' | None, why not) for a 3-D expert parameter."""
    transposed = getattr(owner, "is_transposed", None)
    if transposed is None:  # e.g. Llama 4's experts: infer from which side holds the hidden size
        _, a, b = shape
        out_first = (a == hidden) if pname in ("down_proj", "w2") else (b == hidden)
        in_first = (b == hidden) if pname in ("down_proj", "w2") else (a == hidden)
        if out_first == in_first:
            return None, (f"cannot tell whether {pname} {list(shape)} is stored [experts, out, in] or "
                          f"[experts, in, out] (hidden size {hidden})")
        transposed = in_first
    return ("experts_t" if transposed else "experts"), ""


def _weights(module: nn.Module, prefix: str, hidden: int | None = None, block: bool = False):
    """Every weight (ndim >= 2) below `module`: maskable ones with their layout, the others with why not.
    `block`: `module` is a decoder block, so a feed-forward-named linear directly on it is kind mlp. Routers
    are never maskable (they score tokens; they are not projections)."""
    from transformers.pytorch_utils import Conv1D

    from mft.masking.layer import MaskedExperts, MaskedLinear

    modules = dict(module.named_modules())
    for rel_mod, m in modules.items():
        if isinstance(m, MaskedExperts):
            continue
        full_mod = f"{prefix}.{rel_mod}" if prefix and rel_mod else (prefix or rel_mod)
        router = bool(rel_mod) and _is_router(rel_mod, modules)
        kind = "router" if router else linear_kind(rel_mod + ".weight") if rel_mod else None
        if kind is None and block and rel_mod in _FFN_NAMES and isinstance(m, (nn.Linear, Conv1D)):
            kind = "mlp"
        if isinstance(m, MaskedLinear):
            yield _Weight(full_mod, rel_mod, kind, m.layout, m.scores_shape, module=full_mod)
            continue
        masked_params = getattr(m, "_mft_masks", {})
        for pname, p in m.named_parameters(recurse=False):
            shape = _weight_shape(p)
            if len(shape) < 2 or pname.endswith("bias"):
                continue
            full = f"{full_mod}.{pname}" if full_mod else pname
            rel = f"{rel_mod}.{pname}" if rel_mod else pname
            if pname in masked_params:
                layer = masked_params[pname]
                yield _Weight(full, rel, kind, layer.layout, shape, layer.split, module=full_mod)
            elif router:
                yield _Weight(full, rel, kind, None, shape, why=f"a router/gate ({type(m).__name__}): it scores "
                              "tokens, it is not a projection; MFT never masks routers",
                              module=full_mod)
            elif isinstance(m, nn.Linear) and pname == "weight":
                if _linear_ok(m):
                    yield _Weight(full_mod, rel_mod, kind, "linear", shape, module=full_mod)
                else:
                    yield _Weight(full, rel, kind, None, shape, why=f"{type(m).__name__}.forward is not a plain "
                                  "linear map", module=full_mod)
            elif isinstance(m, Conv1D) and pname == "weight":
                yield _Weight(full_mod, rel_mod, kind, "conv1d", shape, module=full_mod)
            elif len(shape) == 3 and pname in _EXPERT_PARAMS:
                layout, why = _expert_layout(m, pname, shape, hidden)
                split = None
                if pname == "gate_up_proj":
                    split = "halves" if getattr(m, "is_concatenated", True) else "interleaved"
                yield _Weight(full, rel, kind, layout, shape, split, why, module=full_mod)
            else:
                yield _Weight(full, rel, kind, None, shape, why=f"a {len(shape)}-D parameter of "
                              f"{type(m).__name__}, not a linear, Conv1D or expert projection", module=full_mod)


def _hidden(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "hidden_size", None)
    return value if isinstance(value, int) else None


def describe_layer(model: nn.Module) -> str:
    """One line on what the first decoder layer holds, for error messages."""
    try:
        prefix, layers = find_decoder_layers(model)
    except MftError as exc:
        return str(exc)
    groups: dict[str, list[str]] = {"attn": [], "mlp": [], "router": [], "other": []}
    for w in _weights(layers[0], "", _hidden(model), block=True):
        groups[w.kind if w.kind in groups else "other"].append(w.rel + ("" if w.layout else " (not maskable)"))
    return (f"{len(layers)} decoder layers at `{prefix}`; each has attention weights "
            f"[{', '.join(groups['attn']) or '-'}], MLP weights [{', '.join(groups['mlp']) or '-'}]"
            + (f", routers [{', '.join(groups['router'])}]" if groups["router"] else "")
            + (f", other weights [{', '.join(groups['other'])}]" if groups["other"] else ""))


def select_targets(model: nn.Module, cfg: MaskConfig) -> list[Target]:
    """The weights `cfg` selects, in model order. Errors name what was asked and what the model has:
    a layer index past the language model's layers, a chosen layer holding a weight of the requested kind
    that cannot be masked (named), a pattern matching an unmaskable weight, an empty selection."""
    chosen: dict[str, Target] = {}
    hidden = _hidden(model)
    if cfg.masked_layers:
        prefix, layers = find_decoder_layers(model)
        past = [i for i in cfg.masked_layers if i >= len(layers)]
        if past:
            raise MftError(f"masked layer {past[0]} is out of range: the model has {len(layers)} decoder "
                           f"layers (indices 0-{len(layers) - 1}) in its language model; masked_layers={cfg.masked_layers}")
        kinds = ("attn", "mlp") if cfg.subnet_mode == "both" else (cfg.subnet_mode,)
        for i in cfg.masked_layers:
            found = list(_weights(layers[i], f"{prefix}.{i}", hidden, block=True))
            refused = [w for w in found if w.kind in kinds and w.layout is None]
            if refused:
                raise MftError(f"layer {i} holds {' / '.join(_KIND_WORDS[k] for k in kinds)} weights that cannot "
                               "be masked: "
                               + "; ".join(f"{w.name} {list(w.shape)} ({_KIND_WORDS[w.kind]}: {w.why})"
                                           for w in refused)
                               + ". Masking the rest would silently leave them dense; choose another subnet_mode "
                               "or select modules explicitly with target_modules.")
            picked = [w for w in found if w.kind in kinds]
            if not picked:
                listing = ", ".join(f"{w.rel} ({w.kind or 'unclassified'})" for w in found) or "none"
                raise MftError(f"layer {i} (`{prefix}.{i}`) has no {' or '.join(kinds)} weights to mask "
                               f"(subnet_mode={cfg.subnet_mode}); its weights: {listing}. "
                               "Select modules explicitly with target_modules.")
            # A weight that is neither attention, MLP nor router might belong to the requested kind: never guess.
            unclassified = [w for w in found if w.kind is None]
            if unclassified:
                raise MftError(f"layer {i} (`{prefix}.{i}`) holds weights that are neither attention nor MLP by "
                               "name or place: " + "; ".join(f"{w.name} {list(w.shape)}" for w in unclassified)
                               + f". subnet_mode={cfg.subnet_mode} cannot tell whether they belong to it, and "
                               "would leave them dense; select modules explicitly with target_modules.")
            for w in picked:
                chosen[w.name] = Target(w.name, w.kind, w.shape, w.layout, w.split)
    if cfg.target_modules:
        patterns = [re.compile(p) for p in cfg.target_modules]
        # A pattern may name the weight or its module (Mixtral's router `mlp.gate` owns the parameter
        # `mlp.gate.weight`; a fused expert parameter's module is `experts`).
        matched = [w for w in _weights(model, "", hidden) if w.name not in chosen
                   and any(p.search(w.name) or p.search(w.module) for p in patterns)]
        refused = [w for w in matched if w.layout is None]
        if refused:
            raise MftError(f"target_modules {cfg.target_modules} match weights that cannot be masked: "
                           + "; ".join(f"{w.name} {list(w.shape)} ({w.why})" for w in refused)
                           + ". Narrow the patterns.")
        for w in matched:
            kind = w.kind if w.kind in ("attn", "mlp") else "mlp"
            chosen[w.name] = Target(w.name, kind, w.shape, w.layout, w.split)
    if not chosen:
        raise MftError(f"no module matches the selection (masked_layers={cfg.masked_layers}, "
                       f"subnet_mode={cfg.subnet_mode}, target_modules={cfg.target_modules}); the model has "
                       f"{describe_layer(model)}")
    _refuse_shared(model, list(chosen.values()))
    order = {name: k for k, (name, _) in enumerate(model.named_parameters())}
    return sorted(chosen.values(), key=lambda t: order.get(t.param, order.get(t.name + ".weight", -1)))


def _refuse_shared(model: nn.Module, targets: list[Target]) -> None:
    """Refuse a target whose weight Parameter is shared with another module (a tied `lm_head`, weights shared
    across layers): masking one user and baking the mask would zero the weight for every other user too."""
    users: dict[int, list[str]] = {}
    by_name = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), []).append(name)
        by_name[name] = p
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embedding = getattr(embeddings, "weight", None)
    tied = []
    for t in targets:
        p = by_name.get(t.param)
        others = [n for n in users.get(id(p), []) if n != t.param] if p is not None else []
        if others:
            what = "the input embedding " if embedding is not None and p is embedding else ""
            tied.append(f"cannot mask {t.name}: its weight is tied to {what}({', '.join(others)})")
    if tied:
        raise MftError("; ".join(tied) + ". Its mask would zero the shared Parameter for every module that uses it "
                       "(tie_word_embeddings ties lm_head to the input embedding); narrow target_modules, or untie "
                       "the weights first.")


def targets_of_masks(mask_set) -> list[Target]:
    """The `Target`s a `MaskSet` covers (for its coverage table)."""
    return [Target(name, mask_set.kinds.get(name, "mlp"), tuple(shape), mask_set.layout(name)["layout"],
                   mask_set.layout(name)["split"]) for name, shape in mask_set.shapes.items()]


def coverage_table(targets: list[Target]) -> str:
    """The selection as a table (module, kind, layout, shape, experts, matrices, entries) with per-layer totals,
    logged before training and apply."""
    rows = [("weight", "kind", "layout", "shape", "experts", "matrices", "entries")]
    per_layer: dict[str, list[int]] = {}
    for t in targets:
        rows.append((t.name, t.kind, t.layout + (f"/{t.split}" if t.split else ""), "x".join(map(str, t.shape)),
                     str(t.experts or "-"), str(t.matrices), f"{t.entries:,}"))
        total = per_layer.setdefault(layer_index(t.name) or t.name, [0, 0, 0])
        total[0] += 1
        total[1] += t.matrices
        total[2] += t.entries
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    for layer, (weights, matrices, entries) in per_layer.items():
        lines.append(f"layer {layer}: {weights} weights, {matrices} matrices, {entries:,} entries")
    lines.append(f"total: {len(targets)} weights, {sum(t.matrices for t in targets)} matrices, "
                 f"{sum(t.entries for t in targets):,} entries")
    return "\n".join(lines)
