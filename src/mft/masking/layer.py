"""The mask layer: a linear layer whose frozen weight is multiplied by a binary mask learned through scores.

`MaskedLinear` takes over an existing `nn.Linear`'s `weight` and `bias` Parameters (the same objects, never
copies) and adds one trainable real-valued score per weight. Its forward pass computes
`x @ (W * M(S)).T + b` with

- **local** rule (published): per matrix, prune the `j = int((1 - keep_ratio) * n)` entries with the
  smallest |S| and keep the rest. *Tie rule*: where several entries share the cut-off |S|, those with the
  lowest row-major index are pruned first — exactly what a stable ascending sort of |S| gives. With
  distinct |S| (the normal case for fp32 scores) the mask is bit-identical to the published sort.
- **global** rule: `M = (S >= threshold)` on the raw signed scores.

Gradient (straight-through, as published): the mask's gradient passes unchanged to |S|, so
`dL/dS = (dL/dW_eff * W) * sign(S)`.

The mask is cached and recomputed only when the scores change: after a `torch.optim` optimizer steps over
them (a global step hook marks the mask stale), when they are modified in place outside `.data` (tracked
through the tensor version counter), or on an explicit `refresh_mask()` — which is what a DeepSpeed loop
calls after each step, because DeepSpeed updates parameters behind autograd's back. Recomputing on every
micro-batch, as the original did, gives the same masks at a multiple of the cost. `W * M` is built in the
forward and not kept for the backward (autograd would otherwise hold one weight-sized tensor per masked
matrix from forward to backward): the backward rebuilds it from W and the cached mask, one multiply.
`cache_masked_weight = True` on a layer keeps it between optimizer steps instead (a few per cent faster,
one weight-sized tensor more). benchmarks/README.md has the measurements.
"""

from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def num_pruned(numel: int, keep_ratio: float) -> int:
    """Entries the local rule prunes: the published `int((1 - k) * n)`, float arithmetic included."""
    return int((1 - keep_ratio) * numel)


# Integer views of non-negative floats order exactly like the values (NaN, whose bits are the largest, last
# as in `torch.sort`): `local_mask` selects on them. (int view dtype, shift that leaves ~15 top bits)
_ORDERED_BITS = {torch.float32: (torch.int32, 16), torch.float64: (torch.int64, 48)}


@torch.no_grad()
def local_mask(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Boolean mask keeping all but the `num_pruned` entries of smallest |scores| (tie rule: module doc).

    A linear-time selection instead of a full sort: a radix pass over the integer view of |S| finds the
    bucket that holds the cut-off, `kthvalue` runs on that bucket only (a few hundred entries for real
    scores), and ties at the cut-off are resolved by index only when they straddle it.
    """
    magnitude = scores.detach().abs().flatten()  # abs(-0.0) = +0.0: signed zeros tie, as in the sort
    j = num_pruned(magnitude.numel(), keep_ratio)
    if j <= 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    # bf16/fp16 are widened: the cast keeps every value and every tie.
    if magnitude.dtype not in _ORDERED_BITS:
        magnitude = magnitude.float()
    int_dtype, shift = _ORDERED_BITS[magnitude.dtype]
    key = magnitude.view(int_dtype)
    cutoff, below, equal = _kth_smallest(key, j, shift)
    if below + equal == j:  # no tie straddles the cut-off: prune everything <= cutoff
        return (key > cutoff).view(scores.shape)
    # ties straddle it: prune the first `j - below` of them in row-major order
    prune = key < cutoff
    prune[(key == cutoff).nonzero().squeeze(1)[: j - below]] = True
    return (~prune).view(scores.shape)


def _kth_smallest(key: torch.Tensor, j: int, shift: int) -> tuple[torch.Tensor, int, int]:
    """(j-th smallest entry of the non-negative 1-d integer tensor `key` (1-based), entries below it,
    entries equal to it): one histogram of the top bits, then `kthvalue` inside the one bucket."""
    top = key >> shift
    cumulative = torch.bincount(top).cumsum(0)
    bucket = int(torch.searchsorted(cumulative, j))  # the first bucket whose cumulative count reaches j
    below = int(cumulative[bucket - 1]) if bucket else 0
    members = key[top == bucket]
    cutoff = members.kthvalue(j - below).values
    return cutoff, below + int((members < cutoff).sum()), int((members == cutoff).sum())


@torch.no_grad()
def global_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask `scores >= threshold` on the raw signed scores (published `subnet_type: global`)."""
    return scores.detach() >= threshold


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


def matrix_views(t: torch.Tensor, layout: str = "linear", split: str | None = None) -> list[torch.Tensor]:
    """Views of `t`, one per matrix the local rule treats on its own, each as `[out, in]` (nn.Linear's layout).

    `layout` (see `mft.masking.select`): `linear` [out, in] -> itself; `conv1d` [in, out] -> its transpose;
    `experts` [E, out, in] / `experts_t` [E, in, out] -> one matrix per expert, and with `split` a fused
    gate_up expert matrix gives two: `halves` (rows [:I] = gate, [I:] = up; Mixtral's on-disk w1 / w3) or
    `interleaved` (rows 0::2 = gate, 1::2 = up; gpt-oss). Views share `t`'s storage, so writing into the
    views of a mask tensor fills it.
    """
    if layout == "linear":
        return [t]
    if layout == "conv1d":
        return [t.t()]
    if layout not in ("experts", "experts_t"):
        raise ValueError(f"unknown weight layout {layout!r}; expected linear, conv1d, experts or experts_t")
    views = []
    for e in range(t.shape[0]):
        m = t[e] if layout == "experts" else t[e].t()
        if split == "halves":
            half = m.shape[0] // 2
            views += [m[:half], m[half:]]
        elif split == "interleaved":
            views += [m[0::2], m[1::2]]
        else:
            views.append(m)
    return views


@torch.no_grad()
def per_matrix_local_mask(scores: torch.Tensor, keep_ratio: float, layout: str = "linear",
                          split: str | None = None) -> torch.Tensor:
    """The local rule applied to each matrix of `matrix_views` alone: each prunes `int((1 - k) * n)` of its own
    `n` entries (tie rule in `[out, in]` row-major order). Bool, `scores`-shaped."""
    if layout == "linear":
        return local_mask(scores, keep_ratio)
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    for s, m in zip(matrix_views(scores, layout, split), matrix_views(mask, layout, split)):
        m.copy_(local_mask(s, keep_ratio))
    return mask


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
        self.scores._mft_module = weakref.ref(self)  # lets the optimizer step hook find this module
        self._mask: torch.Tensor | None = None
        self._mask_key = None
        self._generation = 0
        self._cached = None  # (mask, weight key, W * M): see _masked_weight
        # True: keep W * M between optimizer steps (faster, one weight-sized tensor more per masked matrix)
        self.cache_masked_weight = False
        # managed: only refresh_mask()/set_mask() change the mask (a DeepSpeed loop owns it, see module doc)
        self.managed = False
        self.mask_updates = 0  # how many times the mask was (re)computed: once per optimizer step, not per forward

    def _rule_repr(self) -> str:
        rule = f"keep_ratio={self.keep_ratio}" if self.subnet_type == "local" else f"threshold={self.threshold}"
        return f"kind={self.kind}, {self.subnet_type}, {rule}, scores={str(self.scores.dtype).split('.')[-1]}"

    # -- the mask ---------------------------------------------------------------------------------------
    def compute_mask(self, scores: torch.Tensor | None = None) -> torch.Tensor:
        """The mask the rule gives for `scores` (default: this layer's own scores); no caching. The local rule
        runs per matrix (`matrix_views`): per expert, and per gate / up half of a fused gate_up."""
        scores = self.scores if scores is None else scores
        if self.subnet_type == "local":
            return per_matrix_local_mask(scores, self.keep_ratio, self.layout, self.split)
        return global_mask(scores, self.threshold)

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
        mask = self.compute_mask(scores).to(self.weight.device)
        if tuple(mask.shape) != tuple(self.scores_shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the weight {self.scores_shape}")
        self._mask, self._mask_key = mask, self._key()
        self._cached = None
        self.mask_updates += 1
        return mask

    @property
    def scores_shape(self) -> tuple[int, ...]:
        return tuple(getattr(self.scores, "ds_shape", self.scores.shape))

    @property
    def mask(self) -> torch.Tensor:
        """The current mask (bool, weight-shaped), recomputed first if the scores changed."""
        if self._mask is None or (not self.managed and self._mask_key != self._key()):
            self.refresh_mask()
        return self._mask

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
    """Global `torch.optim` post-step hook: mark the masks of every stepped score tensor stale."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            ref = getattr(p, "_mft_module", None)
            module = ref() if ref is not None else None
            if module is not None:
                module.invalidate()


register_optimizer_step_post_hook(_invalidate_after_step)
