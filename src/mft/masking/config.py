"""What to mask and how: one dataclass shared by training configs, `mft apply` and the Python API.

Naming note (read this once): the published configs call the keep ratio `sparsity_attn` / `sparsity_mlp`.
**`sparsity_* = 0.9` means 90 % of the weights are KEPT and 10 % are zeroed.** Those keys keep working;
`keep_ratio_attn` / `keep_ratio_mlp` are the same numbers under honest names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from mft.errors import MftError

SUBNET_MODES = ("attn", "mlp", "both")
SUBNET_TYPES = ("local", "global")
SCORE_INITS = ("normal", "kaiming_uniform", "magnitude")
# Published key -> our name. Both are accepted everywhere a MaskConfig is built from a mapping.
ALIASES = {"sparsity_attn": "keep_ratio_attn", "sparsity_mlp": "keep_ratio_mlp"}


def parse_layers(value) -> list[int]:
    """`"4 5 6 7"`, `"4,5,6,7"`, `"4-7"`, `[4, 5, 6, 7]` or `4` -> `[4, 5, 6, 7]` (sorted, unique)."""
    if value is None or value == "":
        return []
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = [int(v) for v in value]
    else:
        items = []
        for tok in re.split(r"[\s,]+", str(value).strip().strip("[]")):
            if not tok:
                continue
            m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", tok)
            if not m:
                raise MftError(f"masked_layers: cannot read {tok!r} in {value!r}; expected layer indices like "
                               "\"4 5 6 7\", \"4,5,6,7\" or a range \"4-7\"")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise MftError(f"masked_layers: range {tok!r} is empty; write it low-high, e.g. \"4-7\"")
            items.extend(range(lo, hi + 1))
    if any(i < 0 for i in items):
        raise MftError(f"masked_layers: layer indices start at 0, got {sorted(items)}")
    return sorted(set(items))


@dataclass
class MaskConfig:
    """Selection and mask rule. Defaults are the published MFT settings (local mask, keep 90 %)."""

    masked_layers: list[int] = field(default_factory=list, metadata={
        "help": "decoder-layer indices to mask, e.g. \"4 5 6 7\" or \"4-7\""})
    subnet_mode: str = field(default="both", metadata={
        "help": "which linears of the chosen layers: attn, mlp or both"})
    subnet_type: str = field(default="local", metadata={
        "help": "local: keep the top keep_ratio of |score| per matrix; global: keep score >= threshold"})
    keep_ratio_attn: float = field(default=0.9, metadata={
        "help": "fraction of attention weights KEPT (published key: sparsity_attn)"})
    keep_ratio_mlp: float = field(default=0.9, metadata={
        "help": "fraction of MLP weights KEPT (published key: sparsity_mlp)"})
    threshold_attn: float = field(default=0.0, metadata={"help": "global mode: keep attention score >= this"})
    threshold_mlp: float = field(default=0.0, metadata={"help": "global mode: keep MLP score >= this"})
    target_modules: list[str] = field(default_factory=list, metadata={
        "help": "extra regular expressions matched against full module or weight names (routers and tied weights "
                "are refused); "
                "their keep ratio is keep_ratio_mlp"})
    score_init: str = field(default="normal", metadata={
        "help": "normal (std score_init_std, published), kaiming_uniform, or magnitude (initial mask = L1 mask)"})
    score_init_std: float = field(default=0.02, metadata={"help": "std of the normal score initialisation"})
    score_dtype: str = field(default="float32", metadata={
        "help": "dtype of the scores; float32 avoids the ties bf16 scores have"})

    def __post_init__(self):
        self.masked_layers = parse_layers(self.masked_layers)
        if isinstance(self.target_modules, str):
            self.target_modules = [t for t in self.target_modules.split() if t]
        self.validate()

    def validate(self) -> None:
        _choice("subnet_mode", self.subnet_mode, SUBNET_MODES)
        _choice("subnet_type", self.subnet_type, SUBNET_TYPES)
        _choice("score_init", self.score_init, SCORE_INITS)
        for name in ("keep_ratio_attn", "keep_ratio_mlp"):
            value = getattr(self, name)
            published = {v: k for k, v in ALIASES.items()}[name]
            if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
                raise MftError(f"{name} (published key {published}) must be in (0, 1] — it is the fraction of "
                               f"weights KEPT, e.g. 0.9 keeps 90 %; got {value!r}")
            setattr(self, name, float(value))
        if self.score_dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise MftError(f"score_dtype must be float32, float64, bfloat16 or float16; got {self.score_dtype!r}")
        for pattern in self.target_modules:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise MftError(f"target_modules: {pattern!r} is not a regular expression ({exc})") from None

    @property
    def is_empty(self) -> bool:
        return not self.masked_layers and not self.target_modules

    def keep_ratio(self, kind: str) -> float:
        return self.keep_ratio_attn if kind == "attn" else self.keep_ratio_mlp

    def threshold(self, kind: str) -> float:
        return self.threshold_attn if kind == "attn" else self.threshold_mlp

    def rule(self, kind: str):
        """The `mft.masking.rule.MaskRule` of an `attn` or `mlp` weight (any other kind: mlp's)."""
        from mft.masking.rule import MaskRule

        return MaskRule(self.subnet_type, self.keep_ratio(kind), self.threshold(kind))

    @classmethod
    def from_dict(cls, values: dict, strict: bool = False) -> "MaskConfig":
        """Build from a mapping that may use the published key names; other keys are ignored unless strict."""
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = ALIASES.get(key, key)
            if name not in known:
                if strict:
                    raise MftError(f"unknown mask setting {key!r}; known: {', '.join(sorted(known | set(ALIASES)))}")
                continue
            if name in kwargs and kwargs[name] != value:
                raise MftError(f"{key} and {name} are the same setting and disagree: {value!r} vs {kwargs[name]!r}")
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """JSON-ready, with our names (the published keys are aliases on input only)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise MftError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
