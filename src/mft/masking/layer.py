"""The mask layer: a linear layer whose frozen weight is multiplied by a binary mask learned through scores.

`MaskedLinear` takes over an existing `nn.Linear`'s `weight` and `bias` Parameters (the same objects, never
copies) and adds one trainable real-valued score per weight. Its forward pass computes
`x @ (W * M(S)).T + b`, `M(S)` given by the layer's `MaskRule` (local: the top `keep_ratio` of |S| per
matrix; global: `S >= threshold`), computed by `mft.masking.rule` (the rule, its tie rule and its selection
live there; `num_pruned`, `local_mask`, `local_masks`, `global_mask`, `matrix_views` and
`per_matrix_local_mask` are importable from here too).

Gradient (straight-through, as published): the mask's gradient passes unchanged to |S|, so
`dL/dS = (dL/dW_eff * W) * sign(S)`.

The mask is cached and recomputed only when the scores change: when they are modified in place outside
`.data` (tracked through the tensor version counter: plain and foreach `torch.optim` steps do that), after a
step of an optimizer that `refresh_after_step(optimizer)` hooked (needed for optimizers that update without
the version counter, e.g. fused AdamW; the hook also selects all layers' masks in one batch), or on an
explicit `refresh_mask()` / `refresh_layers()` — which is what the training loop calls after each optimizer
step, on every path (DeepSpeed updates parameters behind autograd's back). Importing this module registers
nothing global. Recomputing on every micro-batch, as the original did, gives the same masks at a multiple
of the cost. `W * M` is built in the forward and not kept for the backward (autograd would otherwise hold
one weight-sized tensor per masked matrix from forward to backward): the backward rebuilds it from W and the
cached mask, one multiply. `cache_masked_weight = True` on a layer keeps it between optimizer steps instead
(a few per cent faster, one weight-sized tensor more). benchmarks/README.md has the measurements.
"""

from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from mft.masking.rule import (MaskRule, compute_mask, compute_masks, global_mask, local_mask,  # noqa: F401
                              local_masks, matrix_views, num_pruned, per_matrix_local_mask)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _MaskedWeight(torch.autograd.Function):
    """W_eff = W * M, with the straight-through gradient dL/dS = (dL/dW_eff * W) * sign(S).

    `masked_weight`, when given, is `W * M` computed earlier from the same W and M (the layer caches it
    between optimizer steps) and is returned as W_eff instead of multiplying again.
    """

    @staticmethod
    def forward(ctx, weight, scores, mask, masked_weight=None):
        ctx.save_for_backward(weight, scores, mask)
        return weight * mask if masked_weight is None else masked_weight

    @staticmethod
    def backward(ctx, grad):
        weight, scores, mask = ctx.saved_tensors
        grad_weight = grad * mask if ctx.needs_input_grad[0] else None
        grad_scores = None
        if ctx.needs_input_grad[1]:
            dtype = scores.dtype
            # (g * W) * sign(S), the second multiply in place on the product this function owns
            grad_scores = (grad.to(dtype) * weight.to(dtype)).mul_(scores.sign())
        return grad_weight, grad_scores, None, None


class _Recompute:
    """What autograd keeps instead of a saved view of `W * M`: how to make it again."""

    __slots__ = ("weight", "mask", "size", "stride", "offset")

    def __init__(self, weight, mask, view):
        self.weight, self.mask = weight, mask
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def make(self) -> torch.Tensor:
        return torch.as_strided(self.weight * self.mask, self.size, self.stride, self.offset)


def _recompute_hooks(masked_weight: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor):
    """saved_tensors_hooks that store tensors sharing `masked_weight`'s storage (F.linear saves it or its
    transpose) as a `_Recompute` and rebuild them in the backward. Only the storage address is kept, so
    `masked_weight` itself is freed after the forward."""
    storage, dtype = masked_weight.untyped_storage().data_ptr(), masked_weight.dtype  # not the tensor itself

    def pack(t):
        if t.untyped_storage().data_ptr() == storage and t.dtype == dtype:
            return _Recompute(weight, mask, t)
        return t

    def unpack(saved):
        return saved.make() if isinstance(saved, _Recompute) else saved

    return pack, unpack


class _MaskedTensor(nn.Module):
    """What every mask layer shares: the scores, the rule, the cached mask and its refresh, score init and the
    cached `W * M`. Subclasses give `weight` and the forward."""

    def __init__(self, weight: torch.Tensor, kind: str, layout: str = "linear", split: str | None = None,
                 subnet_type: str = "local", keep_ratio: float = 0.9, threshold: float = 0.0,
                 score_dtype: str | torch.dtype = "float32"):
        super().__init__()
        self.kind, self.layout, self.split, self.subnet_type = kind, layout, split, subnet_type
        self.keep_ratio, self.threshold = float(keep_ratio), float(threshold)
        dtype = _DTYPES[score_dtype] if isinstance(score_dtype, str) else score_dtype
        # Under DeepSpeed ZeRO-3 the weight may already be partitioned: its full shape is `ds_shape`.
        shape = tuple(getattr(weight, "ds_shape", weight.shape))
        self.scores = nn.Parameter(torch.zeros(shape, dtype=dtype, device=weight.device))
        self.scores._mft_module = weakref.ref(self)  # lets refresh_after_step's hook find this module
        self._mask: torch.Tensor | None = None
        self._mask_key = None
        self._generation = 0
        self._cached = None  # (mask, weight key, W * M): see _masked_weight
        # True: keep W * M between optimizer steps (faster, one weight-sized tensor more per masked matrix)
        self.cache_masked_weight = False
        # managed: only refresh_mask()/set_mask() change the mask (a DeepSpeed loop owns it, see module doc)
        self.managed = False
        self.mask_updates = 0  # how many times the mask was (re)computed: once per optimizer step, not per forward
        self._refresh_group = None  # weakrefs to the layers the last optimizer step invalidated with this one

    @property
    def rule(self) -> MaskRule:
        """This layer's mask rule (`subnet_type`, `keep_ratio`, `threshold`)."""
        return MaskRule(self.subnet_type, self.keep_ratio, self.threshold)

    def _rule_repr(self) -> str:
        return f"kind={self.kind}, {self.rule}, scores={str(self.scores.dtype).split('.')[-1]}"

    # -- the mask ---------------------------------------------------------------------------------------
    def compute_mask(self, scores: torch.Tensor | None = None) -> torch.Tensor:
        """The mask the rule gives for `scores` (default: this layer's own scores); no caching. The local rule
        runs per matrix (`matrix_views`): per expert, and per gate / up half of a fused gate_up."""
        return compute_mask(self.scores if scores is None else scores, self.rule, self.layout, self.split)

    def _key(self):
        # The version counter survives DeepSpeed swapping `.data`; the generation counts optimizer steps.
        return (self._generation, id(self.scores), self.scores._version)

    def invalidate(self) -> None:
        """Mark the cached mask stale; the next forward recomputes it."""
        self._generation += 1
        self._cached = None

    @torch.no_grad()
    def refresh_mask(self, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Recompute and cache the mask, from `scores` if given (e.g. DeepSpeed's full fp32 master copy)."""
        return self._store_mask(self.compute_mask(scores))

    def _store_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Cache `mask` as the one the rule gave for the current scores (refresh_mask, refresh_layers)."""
        mask = mask.to(self.weight.device)
        if tuple(mask.shape) != tuple(self.scores_shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the weight {self.scores_shape}")
        self._mask, self._mask_key = mask, self._key()
        self._cached = None
        self._refresh_group = None
        self.mask_updates += 1
        return mask

    @property
    def scores_shape(self) -> tuple[int, ...]:
        return tuple(getattr(self.scores, "ds_shape", self.scores.shape))

    @property
    def mask(self) -> torch.Tensor:
        """The current mask (bool, weight-shaped), recomputed first if the scores changed."""
        if self._stale():
            # the layers one optimizer step invalidated are selected together, with one synchronisation
            peers = [m for m in (ref() for ref in self._refresh_group or ()) if m is not None and m is not self]
            refresh_layers([self, *[m for m in peers if m._stale()]])
        return self._mask

    def _stale(self) -> bool:
        return self._mask is None or (not self.managed and self._mask_key != self._key())

    def set_mask(self, mask: torch.Tensor) -> None:
        """Pin an externally computed mask (valid until the scores change)."""
        if tuple(mask.shape) != self.scores_shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the weight {self.scores_shape}")
        self._mask, self._mask_key = mask.to(dtype=torch.bool, device=self.weight.device), self._key()
        self._cached = None

    # -- scores -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_scores(self, method: str = "normal", std: float = 0.02, generator: torch.Generator | None = None):
        """`normal` (std 0.02: what the published runs ended up with), `kaiming_uniform` (a = sqrt 5, the
        published module default) or `magnitude` (S = |W|, so the first mask is the L1 mask).

        Random draws are made in fp32 on the CPU from `generator`, so they do not depend on the device.
        """
        if method == "magnitude":
            values = self.weight.detach().abs()
        else:
            values = torch.empty(self.scores_shape, dtype=torch.float32)
            if method == "normal":
                nn.init.normal_(values, 0.0, std, generator=generator)
            elif method == "kaiming_uniform":
                nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
            else:
                raise ValueError(f"unknown score init {method!r}; expected normal, kaiming_uniform or magnitude")
        self.scores.copy_(values)
        self.invalidate()

    @torch.no_grad()
    def _masked_weight(self, mask: torch.Tensor) -> torch.Tensor | None:
        """With `cache_masked_weight`: `W * M`, computed once per mask instead of twice per micro-batch (W is
        frozen, M changes only when the scores do), keyed on the mask object, its and the weight's version
        counters and the weight's storage. None when the cache is off (the default: it holds one
        weight-sized tensor per masked matrix for good) or W may change under the layer (trainable weights,
        ZeRO-3 partitions)."""
        weight = self.weight
        if not self.cache_masked_weight or weight.requires_grad or hasattr(weight, "ds_id"):
            self._cached = None
            return None
        key = (mask._version, weight._version, weight.data_ptr())
        cached = self._cached
        if cached is None or cached[0] is not mask or cached[1] != key:
            cached = self._cached = (mask, key, weight * mask)
        return cached[2]


class MaskedLinear(_MaskedTensor):
    """An `nn.Linear` (layout `linear`) or transformers `Conv1D` (layout `conv1d`, weight `[in, out]`) whose
    weight is masked by a binary mask derived from trainable `scores`.

    State-dict keys are those of the module it replaces (`weight`, `bias`) plus `scores`, so a masked
    model's checkpoint reads like the original MFT's.
    """

    def __init__(self, linear: nn.Module, kind: str, subnet_type: str = "local", keep_ratio: float = 0.9,
                 threshold: float = 0.0, score_dtype: str | torch.dtype = "float32"):
        from transformers.pytorch_utils import Conv1D

        if isinstance(linear, nn.Linear):
            layout = "linear"
            in_features, out_features = linear.in_features, linear.out_features
        elif isinstance(linear, Conv1D):
            layout = "conv1d"
            in_features, out_features = linear.nx, linear.nf
        else:
            raise TypeError(f"MaskedLinear wraps nn.Linear or Conv1D, got {type(linear).__name__}")
        super().__init__(linear.weight, kind, layout, None, subnet_type, keep_ratio, threshold, score_dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight = linear.weight
        self.bias = linear.bias
        object.__setattr__(self, "_linear", linear)  # kept to restore it unchanged; not a submodule

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"layout={self.layout}, {self._rule_repr()}")

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        cached = self._masked_weight(mask)
        weight = _MaskedWeight.apply(self.weight, self.scores, mask, cached)
        linear = weight if self.layout == "linear" else weight.t()  # Conv1D: y = x @ W + b
        if cached is not None or not torch.is_grad_enabled():
            return F.linear(x, linear, self.bias)
        # W * M would live from this forward to its backward (F.linear saves it): save a recipe instead and
        # recompute it in the backward. Same bits, one weight-sized tensor less per masked matrix.
        with torch.autograd.graph.saved_tensors_hooks(*_recompute_hooks(weight, self.weight, mask)):
            return F.linear(x, linear, self.bias)

    # -- back to the plain module -----------------------------------------------------------------------
    def unwrap(self, bake: bool) -> nn.Module:
        """The original `nn.Linear` / `Conv1D`, with masked weights set to exact zeros when `bake`."""
        linear = self._linear
        if bake:
            with torch.no_grad():
                linear.weight.masked_fill_(~self.mask, 0)
        return linear


_BATCH_ENTRIES = 1 << 28  # score entries selected per `compute_masks` call by refresh_layers (bounds the memory)


@torch.no_grad()
def refresh_layers(layers, full_scores=None, budget: int = _BATCH_ENTRIES) -> None:
    """Recompute and cache the masks of `layers` (mask layers, in order) now.

    The layers are cut into batches of at most `budget` score entries and each batch's masks are computed by
    one `compute_masks` call (all local-rule matrices selected together: one host synchronisation per batch;
    the bits are those of `refresh_mask`). `full_scores(param)`, when given, supplies each layer's scores
    (e.g. DeepSpeed's `safe_get_full_fp32_param`, a collective): it is called once per layer, in order.
    """
    batch, size = [], 0

    def flush():
        masks = compute_masks([scores for _, scores in batch], [layer.rule for layer, _ in batch],
                              [layer.layout for layer, _ in batch], [layer.split for layer, _ in batch])
        for (layer, _), mask in zip(batch, masks):
            layer._store_mask(mask)
        batch.clear()

    for layer in layers:
        scores = layer.scores if full_scores is None else full_scores(layer.scores)
        if batch and size + scores.numel() > budget:
            flush()
            size = 0
        batch.append((layer, scores.detach()))
        size += scores.numel()
    if batch:
        flush()


class _Product:
    """`W * M` made at most once, on the first backward use (shared by every saved view of it)."""

    __slots__ = ("weight", "mask", "value")

    def __init__(self, weight, mask):
        self.weight, self.mask, self.value = weight, mask, None

    def get(self) -> torch.Tensor:
        if self.value is None:
            self.value = self.weight * self.mask
        return self.value


class _SharedRecompute:
    __slots__ = ("product", "size", "stride", "offset")

    def __init__(self, product, view):
        self.product = product
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def make(self) -> torch.Tensor:
        return torch.as_strided(self.product.get(), self.size, self.stride, self.offset)


def _shared_recompute_hooks(items):
    """saved_tensors_hooks for several masked weights `(W * M, W, M)`: a saved tensor sharing the storage of
    one of them (an expert's slice, a transpose) is kept as a recipe; the backward makes `W * M` once per
    weight and slices it, and it is freed with the graph."""
    products = {w_eff.untyped_storage().data_ptr(): (w_eff.dtype, _Product(w, m)) for w_eff, w, m in items}

    def pack(t):
        found = products.get(t.untyped_storage().data_ptr())
        if found is not None and t.dtype == found[0]:
            return _SharedRecompute(found[1], t)
        return t

    def unpack(saved):
        return saved.make() if isinstance(saved, _SharedRecompute) else saved

    return pack, unpack


class MaskedExperts(_MaskedTensor):
    """The mask of one fused 3-D expert parameter (`experts.gate_up_proj`, `experts.down_proj`), layout
    `experts` `[E, out, in]` or `experts_t` `[E, in, out]`.

    The parameter stays where it is (same name, same object, so checkpoints and ZeRO-3 see the model as it
    was); this layer is registered beside it as `<param>_mask` and holds the scores. `attach` wraps the
    experts module's forward so that, during it, the module's attribute `<param>` reads `W * M` (through the
    same straight-through function as `MaskedLinear`); saved slices of `W * M` are recomputed in the backward
    instead of being kept from the forward.
    """

    def __init__(self, owner: nn.Module, pname: str, kind: str, layout: str, split: str | None = None,
                 subnet_type: str = "local", keep_ratio: float = 0.9, threshold: float = 0.0,
                 score_dtype: str | torch.dtype = "float32"):
        param = owner._parameters.get(pname)
        if param is None or len(getattr(param, "ds_shape", param.shape)) != 3:
            raise TypeError(f"MaskedExperts masks a 3-D parameter; {type(owner).__name__}.{pname} is not one")
        super().__init__(param, kind, layout, split, subnet_type, keep_ratio, threshold, score_dtype)
        self.pname = pname
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner is this layer's parent

    @property
    def weight(self) -> nn.Parameter:
        return self._owner._parameters[self.pname]

    def extra_repr(self) -> str:
        return (f"{self.pname}: shape={list(self.scores_shape)}, layout={self.layout}, split={self.split}, "
                f"{self._rule_repr()}")

    def forward(self):
        """(W * M with the straight-through gradient, whether it is the cached product)."""
        mask = self.mask
        cached = self._masked_weight(mask)
        return _MaskedWeight.apply(self.weight, self.scores, mask, cached), cached is not None

    def attach(self) -> None:
        """Register this layer on its experts module and route the module's forward through the mask."""
        owner = self._owner
        owner.add_module(f"{self.pname}_mask", self)
        layers = owner.__dict__.setdefault("_mft_masks", {})
        layers[self.pname] = self
        if "_mft_forward" not in owner.__dict__:
            owner.__dict__["_mft_forward"] = (owner.forward, "forward" in owner.__dict__)
            owner.forward = functools.partial(_masked_owner_forward, owner)

    def detach(self, bake: bool) -> None:
        """Undo `attach`; with `bake`, the masked weights become exact zeros first."""
        owner = self._owner
        if bake:
            with torch.no_grad():
                self.weight.masked_fill_(~self.mask, 0)
        layers = owner.__dict__.get("_mft_masks", {})
        layers.pop(self.pname, None)
        delattr(owner, f"{self.pname}_mask")
        if not layers:
            owner.__dict__.pop("_mft_masks", None)
            forward, was_own = owner.__dict__.pop("_mft_forward")
            if was_own:
                owner.forward = forward
            else:
                del owner.forward


def _masked_owner_forward(owner: nn.Module, *args, **kwargs):
    """The experts module's forward with each masked parameter read as `W * M` (see `MaskedExperts`)."""
    original = owner.__dict__["_mft_forward"][0]
    effective, recompute = {}, []
    for pname, layer in owner.__dict__["_mft_masks"].items():
        weight, cached = layer()  # through nn.Module.__call__, so ZeRO-3 gathers the scores
        effective[pname] = weight
        if not cached:
            recompute.append((weight, layer.weight, layer.mask))
    owner.__dict__.update(effective)  # instance attributes win over the registered Parameters on lookup
    try:
        if recompute and torch.is_grad_enabled():
            with torch.autograd.graph.saved_tensors_hooks(*_shared_recompute_hooks(recompute)):
                return original(*args, **kwargs)
        return original(*args, **kwargs)
    finally:
        for pname in effective:
            owner.__dict__.pop(pname, None)


def _invalidate_after_step(optimizer, args, kwargs) -> None:
    """`refresh_after_step`'s hook: mark the masks of every stepped score tensor stale, and group the layers so
    that the first forward after the step selects all their masks in one batch."""
    modules = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            ref = getattr(p, "_mft_module", None)
            module = ref() if ref is not None else None
            if module is not None:
                module.invalidate()
                modules.append(module)
    refresh_group = [weakref.ref(m) for m in modules]
    for module in modules:
        module._refresh_group = refresh_group


def refresh_after_step(optimizer: torch.optim.Optimizer):
    """For your own training loop: after every `optimizer.step()`, the masks of the scores it stepped are
    recomputed (at the next forward, all layers in one batch). Registers a step post-hook on `optimizer` only
    (`Optimizer.register_step_post_hook`; nothing global); returns its handle (`.remove()` undoes it).

    Needed when the optimizer updates the scores without bumping their version counter (fused AdamW does
    not); plain and foreach optimizers are noticed without it, one layer at a time. `mft train` needs none:
    it refreshes every mask after each optimizer step itself.

    A wrapped optimizer (accelerate's `AcceleratedOptimizer`, anything holding the torch optimizer as
    `.optimizer`) is unwrapped to the `torch.optim.Optimizer` inside; anything else is a TypeError.
    """
    inner = optimizer  # AcceleratedOptimizer subclasses Optimizer without its state: hook the one it wraps
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"refresh_after_step needs a torch.optim.Optimizer (or a wrapper holding one as "
                        f".optimizer), not {type(optimizer).__name__}")
    return inner.register_step_post_hook(_invalidate_after_step)
