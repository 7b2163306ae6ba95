"""The MFT mask rule: which entries of a weight its mask keeps, given one real-valued score per entry.

Everything that turns scores (or, for the L1 baseline, weights) into a mask goes through this module: the
mask layers (`mft.masking.layer`), masks from an original MFT checkpoint and the baselines
(`mft.masking.apply`), and the demo.

- **local** rule (published `subnet_type: local`): per matrix, prune the `j = int((1 - keep_ratio) * n)`
  entries with the smallest |S| (`num_pruned`) and keep the rest. *Tie rule*: where several entries share
  the cut-off |S|, those with the lowest row-major index are pruned first — exactly what a stable ascending
  sort of |S| gives. With distinct |S| (the normal case for fp32 scores) the mask is bit-identical to the
  published sort. A weight that holds several matrices (a GPT-2 `Conv1D` stored transposed, fused experts,
  a fused gate/up expert weight) is cut into its `[out, in]` matrices first (`matrix_views`), each pruned
  on its own.
- **global** rule (published `subnet_type: global`): `M = (S >= threshold)` on the raw signed scores.
- **random** baseline: each entry kept independently with probability `keep_ratio`.

`MaskRule` names one weight's rule; `compute_mask(scores, rule, layout, split)` applies it and
`compute_masks` applies many at once (every local matrix selected together: one host synchronisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUBNET_TYPES = ("local", "global")


@dataclass(frozen=True)
class MaskRule:
    """One weight's mask rule: `subnet_type` `local` (keep the top `keep_ratio` of |S| per matrix, a fraction
    in [0, 1]) or `global` (keep `S >= threshold`). `MaskConfig.rule(kind)` gives the rule of an attention or
    MLP weight. Raises ValueError for another subnet_type."""

    subnet_type: str = "local"
    keep_ratio: float = 0.9
    threshold: float = 0.0

    def __post_init__(self):
        if self.subnet_type not in SUBNET_TYPES:
            raise ValueError(f"unknown subnet_type {self.subnet_type!r}; expected local or global")

    def __str__(self) -> str:
        value = f"keep_ratio={self.keep_ratio}" if self.subnet_type == "local" else f"threshold={self.threshold}"
        return f"{self.subnet_type}, {value}"


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


def per_matrix_local_mask(scores: torch.Tensor, keep_ratio: float, layout: str = "linear",
                          split: str | None = None) -> torch.Tensor:
    """The local rule applied to each matrix of `matrix_views` alone: each prunes `int((1 - k) * n)` of its own
    `n` entries (tie rule in `[out, in]` row-major order). Bool, `scores`-shaped. All matrices (experts,
    halves) are selected in one batch: one host synchronisation on CUDA."""
    return compute_mask(scores, MaskRule("local", keep_ratio), layout, split)


@torch.no_grad()
def compute_masks(scores_list, rules, layouts=None, splits=None) -> list[torch.Tensor]:
    """The mask of each `scores` under its `MaskRule` (bool, `scores`-shaped, on `scores`' device).

    `layouts` / `splits` (default `linear` / None each) say how a weight holds its matrices (`matrix_views`);
    the local rule prunes each matrix on its own. The matrices of every local-rule weight are selected by one
    `local_masks` call (one host synchronisation); global-rule weights are thresholded. Bits equal
    `compute_mask` weight by weight. Raises ValueError for mismatched lengths or an unknown layout.
    """
    scores_list, rules = list(scores_list), list(rules)
    layouts = ["linear"] * len(scores_list) if layouts is None else list(layouts)
    splits = [None] * len(scores_list) if splits is None else list(splits)
    if not len(scores_list) == len(rules) == len(layouts) == len(splits):
        raise ValueError(f"compute_masks got {len(scores_list)} score tensors, {len(rules)} rules, {len(layouts)} "
                         f"layouts and {len(splits)} splits; expected one of each per weight")
    masks, matrices, keeps, targets = [], [], [], []
    for scores, rule, layout, split in zip(scores_list, rules, layouts, splits):
        if rule.subnet_type != "local":
            masks.append(global_mask(scores, rule.threshold))
            continue
        mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
        views = matrix_views(mask, layout, split)
        matrices += matrix_views(scores.detach(), layout, split)
        keeps += [rule.keep_ratio] * len(views)
        targets += views
        masks.append(mask)
    for target, selected in zip(targets, local_masks(matrices, keeps)):
        target.copy_(selected)
    return masks


def compute_mask(scores: torch.Tensor, rule: MaskRule, layout: str = "linear",
                 split: str | None = None) -> torch.Tensor:
    """The mask `rule` gives for `scores` (any float dtype the rule can order: see `local_masks`), per matrix
    of `layout` / `split` (`matrix_views`); bool, `scores`-shaped, on `scores`' device."""
    return compute_masks([scores], [rule], [layout], [split])[0]


def random_mask(shape, keep_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """The published random baseline: each entry kept independently with probability `keep_ratio`
    (`torch.rand(shape, generator=generator) < keep_ratio`, fp32 on the CPU; the draws follow `generator`)."""
    return torch.rand(shape, generator=generator) < keep_ratio
