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
# as in `torch.sort`): the selection compares these. bf16/fp16 keep their own 16 bits (no widening).
_ORDERED_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
                torch.float16: torch.int16}
# The smallest NaN key (+inf's bits + 1): NaNs with other payloads are clamped to it wherever their order
# among themselves could matter, so that all NaNs tie and fall by index, as in the sort.
_NAN_KEY = {torch.float32: 0x7F800001, torch.float64: 0x7FF0000000000001, torch.bfloat16: 0x7F81,
            torch.float16: 0x7C01}
_SAMPLE = (1 << 14, 1 << 18)  # entries sampled per matrix to place the bracket: n / 256 within these bounds
_DIRECT = 1 << 15  # matrices up to this size are selected by one stable sort: the bracket would not pay


@torch.no_grad()
def local_mask(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Boolean mask keeping all but the `num_pruned` entries of smallest |scores| (tie rule: module doc).

    `scores`: any shape, float32/float64/bfloat16/float16, any device; returns a bool tensor of its shape on
    its device. One matrix of `local_masks`, which selects many with one host synchronisation.
    """
    return local_masks([scores], [keep_ratio])[0]


@torch.no_grad()
def local_masks(scores_list, keep_ratios, method: str | None = None) -> list[torch.Tensor]:
    """`local_mask` of every `(scores, keep_ratio)` pair, bit for bit, with one host synchronisation for all.

    The published rule is a stable ascending sort of |S| whose first `num_pruned(n, k)` entries are pruned.
    Here, per matrix, with |S| viewed as ordered integers:

    1. a strided sample of n / 256 entries (16k to 256k) is sorted and two sample quantiles a few standard errors
       either side of the cut-off's rank give a bracket `[lo, hi]`;
    2. one pass counts the entries below `lo` and up to `hi` (all matrices' counts come to the host together:
       the only synchronisation). When `count(< lo) < j <= count(<= hi)` the cut-off lies in the bracket,
       every entry below `lo` is pruned and the remaining `j - count(< lo)` come from the bracket's
       candidates (about 4 / sqrt(sample) of the entries), taken in row-major order so that ties fall as
       in the stable sort;
    3. the candidates are selected exactly by a stable sort. A bracket that misses (adversarial layouts
       that fool the strided sample) falls back to the full stable sort for that matrix: slower, never
       different.

    That is the `"bracket"` method, the default off the CPU: no histogram (CUDA's `bincount` serialises on
    atomics when N(0, 0.02) scores fill few buckets) and no per-matrix synchronisation. On the CPU, where a
    synchronisation costs nothing and a histogram is one cheap pass, the default is `"radix"`
    (`_radix_mask`: a histogram of the keys' top bits, then `kthvalue` in the cut-off's bucket). Both give
    the stable sort's bits. Raises ValueError for a length mismatch or a dtype it cannot order.
    """
    scores_list = list(scores_list)
    keep_ratios = list(keep_ratios)
    if len(scores_list) != len(keep_ratios):
        raise ValueError(f"local_masks got {len(scores_list)} score tensors but {len(keep_ratios)} keep ratios")
    if method not in (None, "bracket", "radix"):
        raise ValueError(f"unknown selection method {method!r}; expected bracket, radix or None (by device)")
    for i, scores in enumerate(scores_list):
        if scores.dtype not in _ORDERED_INT:
            raise ValueError(f"local_mask: scores must be float32, float64, bfloat16 or float16; tensor {i} is "
                             f"{scores.dtype}")
    masks: list[torch.Tensor | None] = [None] * len(scores_list)
    pending = []  # (i, flat scores, j, keep, in_bracket, counts tensor, lo == hi tensor)
    for i, (scores, keep_ratio) in enumerate(zip(scores_list, keep_ratios)):
        flat = scores.detach().reshape(-1)
        n = flat.numel()
        j = num_pruned(n, keep_ratio)
        if j <= 0 or j >= n:
            masks[i] = torch.full(scores.shape, j <= 0, dtype=torch.bool, device=scores.device)
            continue
        if n <= _DIRECT:
            masks[i] = _sorted_mask(_keys(flat, canonical=True), j).view(scores.shape)
            continue
        if (method or ("radix" if _on_cpu(flat) else "bracket")) == "radix":
            masks[i] = _radix_mask(_keys(flat), j, flat.dtype).view(scores.shape)
            continue
        key = _keys(flat)  # NaN payloads not canonical: lo and hi below are, and the comparisons allow for it
        stride = n // min(max(n >> 8, _SAMPLE[0]), _SAMPLE[1])
        sample = _keys(flat[::stride], canonical=True).sort().values
        m = sample.numel()
        rank = j * m / n  # the cut-off's expected 0-based rank in the sample, give or take one
        margin = 2 * math.isqrt(m) + 2  # > 4 standard errors of a sample quantile's rank
        lo_rank, hi_rank = math.floor(rank) - margin, math.ceil(rank) + margin
        lo = sample[lo_rank] if lo_rank > 0 else None
        hi = sample[hi_rank] if hi_rank < m else None
        if hi is not None:  # hi a NaN: every NaN is a candidate, none above (no synchronisation to find out)
            hi = torch.where(hi == _NAN_KEY[flat.dtype], torch.iinfo(key.dtype).max, hi)
        keep = key >= lo if lo is not None else torch.ones(n, dtype=torch.bool, device=key.device)
        above = key > hi if hi is not None else torch.zeros(n, dtype=torch.bool, device=key.device)
        counts = torch.stack([keep.count_nonzero(), above.count_nonzero()])  # n - count(< lo), n - count(<= hi)
        same = (lo == hi) if lo is not None and hi is not None else torch.zeros((), dtype=torch.bool,
                                                                                   device=key.device)
        in_bracket = keep ^ above  # above implies keep: this is lo <= key <= hi
        del key, above
        pending.append((i, flat, j, keep, in_bracket, counts, same))
    if not pending:
        return masks
    host = torch.cat([torch.cat([p[5], p[6].reshape(1).to(p[5].dtype)]) for p in pending]).tolist()  # the sync
    for index, (i, flat, j, keep, in_bracket, _, _) in enumerate(pending):
        n = flat.numel()
        n_keep, n_above, same = host[3 * index: 3 * index + 3]
        below, upto = n - n_keep, n - n_above
        shape = scores_list[i].shape
        if not below < j <= upto:  # the bracket missed the cut-off: the reference itself
            masks[i] = _sorted_mask(_keys(flat, canonical=True), j).view(shape)
            continue
        k = j - below  # how many candidates to prune, in (value, row-major index) order
        # row-major order, the size known: no synchronisation on CUDA
        idx = torch.nonzero_static(in_bracket, size=upto - below).squeeze(1)
        del in_bracket
        if same:  # all candidates are equal: the first k in row-major order go
            keep_candidate = torch.arange(idx.numel(), device=idx.device) >= k
        else:
            keep_candidate = _sorted_mask(_keys(flat[idx], canonical=True), k)
        keep.index_put_((idx,), keep_candidate)
        masks[i] = keep.view(shape)
    return masks


def _on_cpu(t: torch.Tensor) -> bool:
    """Whether `t` lives where a synchronisation costs nothing (the CPU): selects the per-device paths."""
    return t.device.type == "cpu"


def _keys(flat: torch.Tensor, canonical: bool = False) -> torch.Tensor:
    """|x| as integers ordered like the values (abs(-0.0) = +0.0: signed zeros tie, as in the sort);
    `canonical`: every NaN the same key, so that NaNs tie as in the sort (an extra pass over the keys)."""
    key = flat.abs().view(_ORDERED_INT[flat.dtype])
    return key.clamp_(max=_NAN_KEY[flat.dtype]) if canonical else key


def _sorted_mask(key: torch.Tensor, j: int) -> torch.Tensor:
    """The published rule literally: prune the first j of a stable ascending sort."""
    mask = torch.ones(key.shape, dtype=torch.bool, device=key.device)
    mask[key.sort(stable=True).indices[:j]] = False
    return mask


# bits below the histogram's: about 2^15 buckets for fp32/fp64 keys; bf16/fp16 keys are counted exactly
_RADIX_SHIFT = {torch.int32: 16, torch.int64: 48, torch.int16: 0}


def _radix_mask(key: torch.Tensor, j: int, dtype: torch.dtype) -> torch.Tensor:
    """The CPU path: the keep mask pruning the j smallest of `key` (1-d, non-canonical NaNs allowed), ties
    by row-major index. A histogram of the top bits finds the cut-off's bucket, `kthvalue` runs in that
    bucket only; ties at the cut-off are resolved by index only when they straddle it."""
    shift = _RADIX_SHIFT[key.dtype]
    top = key >> shift if shift else key
    cumulative = torch.bincount(top).cumsum(0)
    bucket = int(torch.searchsorted(cumulative, j))  # the first bucket whose cumulative count reaches j
    below = int(cumulative[bucket - 1]) if bucket else 0
    members = key[top == bucket]
    del top
    cutoff = members.kthvalue(j - below).values
    nan_key = _NAN_KEY[dtype]
    if int(cutoff) >= nan_key:  # the cut-off is a NaN: all NaNs tie, whatever their payload
        cutoff = torch.tensor(nan_key, dtype=key.dtype)
        prune = key < cutoff
        need = j - int(prune.sum())
        prune[(key >= cutoff).nonzero().squeeze(1)[:need]] = True
        return ~prune
    below += int((members < cutoff).sum())
    if below + int((members == cutoff).sum()) == j:  # no tie straddles the cut-off
        return key > cutoff
    prune = key < cutoff
    prune[(key == cutoff).nonzero().squeeze(1)[: j - below]] = True
    return ~prune


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
    views = matrix_views(mask, layout, split)
    # all matrices (experts, halves) selected in one batch: one host synchronisation on CUDA
    for m, selected in zip(views, local_masks(matrix_views(scores, layout, split), [keep_ratio] * len(views))):
        m.copy_(selected)
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
        self._refresh_group = None  # weakrefs to the layers the last optimizer step invalidated with this one

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


_BATCH_ENTRIES = 1 << 28  # score entries selected per `local_masks` call by refresh_layers (bounds the memory)


@torch.no_grad()
def refresh_layers(layers, full_scores=None, budget: int = _BATCH_ENTRIES) -> None:
    """Recompute and cache the masks of `layers` (mask layers, in order) now.

    The matrices of all local-rule layers (`matrix_views`: per expert, per gate / up half, [out, in]) are
    selected together through `local_masks` (one host synchronisation per batch of at most `budget` score
    entries; the bits are those of `refresh_mask`); global-rule layers through their own `refresh_mask`.
    `full_scores(param)`, when given, supplies each layer's scores (e.g. DeepSpeed's
    `safe_get_full_fp32_param`, a collective): it is called once per layer, in order.
    """
    batch, size = [], 0

    def flush():
        matrices, keeps, targets, masks = [], [], [], []
        for layer, scores in batch:
            mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
            views = matrix_views(mask, layer.layout, layer.split)
            matrices += matrix_views(scores, layer.layout, layer.split)
            keeps += [layer.keep_ratio] * len(views)
            targets += views
            masks.append(mask)
        for target, selected in zip(targets, local_masks(matrices, keeps)):
            target.copy_(selected)
        for (layer, _), mask in zip(batch, masks):
            layer._store_mask(mask)
        batch.clear()

    for layer in layers:
        scores = layer.scores if full_scores is None else full_scores(layer.scores)
        if layer.subnet_type != "local":
            layer.refresh_mask(scores)
            continue
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
    """Global `torch.optim` post-step hook: mark the masks of every stepped score tensor stale, and group
    the layers so that the first forward after the step selects all their masks in one batch."""
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


register_optimizer_step_post_hook(_invalidate_after_step)
