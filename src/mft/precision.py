"""The dtype a model computes in: bf16/fp16 weights on a CPU without native bf16 matrix instructions run in fp32.

A CPU without AMX-BF16 or AVX512-BF16 (x86) or the BF16 feature (Arm) has no bf16 matrix multiply: PyTorch emulates it, several times slower
than fp32. So a bf16 (or fp16) checkpoint trained or evaluated on such a CPU is upcast to fp32 when it is
loaded (`mft train`, `mft eval`'s transformers backend); `mft apply` never computes and keeps the file's dtype.
The choice is logged at INFO level.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# /proc/cpuinfo flags of x86 CPUs with bf16 matrix instructions (Intel AMX on Sapphire Rapids and later;
# AVX512-BF16 on Cooper Lake, Sapphire Rapids, AMD Zen 4 and later), on its `flags` lines.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# The Arm feature (FEAT_BF16: BFMMLA, BFDOT; Neoverse V1/N2, Graviton 3 and later) on aarch64's `Features` lines.
BF16_ARM_FEATURES = ("bf16",)


def read_cpuinfo() -> str | None:
    """The text of /proc/cpuinfo, or None where it cannot be read (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The bf16 matrix-instruction flags this CPU reports in /proc/cpuinfo (or in `cpuinfo`, its text):
    BF16_CPU_FLAGS on x86 `flags` lines, BF16_ARM_FEATURES on aarch64 `Features` lines; [] where unreadable."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo() or ""
    x86: set[str] = set()
    arm: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            x86.update(line.split(":", 1)[-1].split())
        elif line.startswith("Features"):
            arm.update(line.split(":", 1)[-1].split())
    return [f for f in BF16_CPU_FLAGS if f in x86] + [f for f in BF16_ARM_FEATURES if f in arm]


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU has bf16 matrix instructions.

    Wherever /proc/cpuinfo can be read (or `cpuinfo`, its text, is given), its flags alone decide (see
    `cpu_bf16_flags`). Only where it cannot (not Linux) is PyTorch's oneDNN asked; on x86 its answer is True
    for any CPU with AVX512BW/VL/DQ (Skylake-SP, Cascade Lake, Ice Lake-SP), which emulate bf16 matrix
    products, so it is not used where the flags are available.
    """
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    if cpuinfo is not None:
        return bool(cpu_bf16_flags(cpuinfo))
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def checkpoint_dtype(model_path: str | Path) -> torch.dtype | None:
    """The weight dtype a model folder's config.json records (`dtype`, or `torch_dtype` before transformers 5);
    None when it records none or the folder has no config.json (e.g. a hub id not downloaded yet)."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    text_config = data.get("text_config") or {}
    name = data.get("dtype") or data.get("torch_dtype") or text_config.get("dtype") or text_config.get("torch_dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None


def compute_dtype(wanted: torch.dtype, device: str | torch.device, what: str = "model") -> torch.dtype:
    """`wanted`, or torch.float32 when `wanted` is bf16/fp16 and `device` is a CPU without native bf16.

    `what` names the model in the log line that records the choice (INFO; WARNING-free: it is not an error).
    """
    device = torch.device(device)
    if device.type == "cpu" and wanted in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16():
        logger.info("%s: computing in float32 instead of %s: this CPU has no native bf16 matrix instructions "
                    "(none of the cpuinfo flags %s)", what, str(wanted).removeprefix("torch."),
                    "/".join(BF16_CPU_FLAGS + BF16_ARM_FEATURES))
        return torch.float32
    logger.info("%s: computing in %s on %s", what, str(wanted).removeprefix("torch."), device)
    return wanted


def training_dtype(accelerator, wanted: torch.dtype, what: str = "model", deepspeed: bool = False) -> torch.dtype:
    """The dtype `mft train` loads weights in: `wanted` (the method's choice), through `compute_dtype`.

    On a CPU without native bf16, `accelerate launch --mixed_precision bf16` would still autocast every fp32
    matmul to bf16; that autocast is switched off here (`accelerator.native_amp = False`, before `prepare`),
    so the run computes in fp32 as logged. A DeepSpeed run is left as configured: its bf16 section casts the
    model itself and is an explicit choice of the DeepSpeed file.
    """
    if deepspeed:
        return wanted
    mixed_bf16 = accelerator.mixed_precision == "bf16"
    dtype = compute_dtype(torch.bfloat16 if mixed_bf16 else wanted, accelerator.device, what)
    if dtype == torch.float32 and mixed_bf16:
        accelerator.native_amp = False  # no bf16 autocast in the forward that prepare() wraps
        return torch.float32
    return wanted
