"""CPU compute dtype: bf16 checkpoints run in fp32 on a CPU without bf16 matrix instructions (issue 13, item 5).

`cpu_has_native_bf16` is patched to both answers: a test machine has one kind of CPU (this one, AVX2 only,
has none of the flags), and the rest of each path (loading, accelerate's autocast) runs for real.
"""

from __future__ import annotations

import logging

import pytest
import torch

from mft import precision

CPUINFO_SPR = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n"
CPUINFO_AVX2 = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse avx avx2 fma\n"


def test_cpu_flags_parsed_from_cpuinfo():
    assert precision.cpu_bf16_flags(CPUINFO_SPR) == ["amx_bf16", "avx512_bf16"]
    assert precision.cpu_bf16_flags(CPUINFO_AVX2) == []
    assert precision.cpu_bf16_flags("Features\t: fp asimd bf16 i8mm\n") == ["bf16"]  # aarch64: BFMMLA
    assert precision.cpu_bf16_flags("Features\t: fp asimd\n") == []


# Skylake-SP / Cascade Lake: AVX-512 (BW, VL, DQ) but no bf16 instruction; oneDNN calls this bf16-capable
CPUINFO_SKX = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni\n"


def test_readable_cpuinfo_decides_and_onednn_answers_only_without_it(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert precision.cpu_has_native_bf16(CPUINFO_SKX) is False  # emulated bf16: fp32
    assert precision.cpu_has_native_bf16(CPUINFO_SPR) is True
    assert precision.cpu_has_native_bf16(CPUINFO_SKX.replace("avx512_vnni", "avx512_vnni avx512_bf16")) is True
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: CPUINFO_SKX)  # the machine's own file, faked
    assert precision.cpu_has_native_bf16() is False
    assert precision.compute_dtype(torch.bfloat16, "cpu") == torch.float32
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: None)  # not Linux: oneDNN's answer
    assert precision.cpu_has_native_bf16() is True
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert precision.cpu_has_native_bf16() is False


@pytest.mark.parametrize("native", [False, True])
def test_compute_dtype_upcasts_only_without_native_bf16(monkeypatch, caplog, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.INFO, logger="mft.precision"):
        got = precision.compute_dtype(torch.bfloat16, "cpu", "ckpt")
    assert got == (torch.bfloat16 if native else torch.float32)
    expected = "ckpt: computing in bfloat16 on cpu" if native else \
        "ckpt: computing in float32 instead of bfloat16: this CPU has no native bf16 matrix instructions"
    assert expected in caplog.text
    assert precision.compute_dtype(torch.float16, "cpu") == (torch.float16 if native else torch.float32)
    assert precision.compute_dtype(torch.float32, "cpu") == torch.float32
    assert precision.compute_dtype(torch.bfloat16, "cuda") == torch.bfloat16  # a GPU keeps bf16


def test_checkpoint_dtype_reads_config(saved_model, tmp_path):
    assert precision.checkpoint_dtype(saved_model(dtype=torch.bfloat16)) == torch.bfloat16
    assert precision.checkpoint_dtype(saved_model()) == torch.float32
    assert precision.checkpoint_dtype(tmp_path) is None  # no config.json


@pytest.mark.parametrize("native", [False, True])
def test_hf_backend_loads_bf16_checkpoint_in_fp32_without_native_bf16(monkeypatch, saved_model, native):
    from mft.eval.backends.hf import HFBackend

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    backend = HFBackend(str(saved_model(dtype=torch.bfloat16)), device="cpu")
    assert {p.dtype for p in backend.model.parameters()} == {torch.bfloat16 if native else torch.float32}
    explicit = HFBackend(str(saved_model(dtype=torch.bfloat16)), device="cpu", dtype=torch.float32)
    assert {p.dtype for p in explicit.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("native", [False, True])
def test_training_dtype_turns_off_bf16_autocast_without_native_bf16(monkeypatch, native):
    from accelerate import Accelerator

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    # MFT under bf16 mixed precision asks for bf16 weights; FFT keeps fp32 master weights.
    assert precision.training_dtype(accelerator, torch.bfloat16, "m") == (torch.bfloat16 if native else torch.float32)
    seen = []

    class Probe(torch.nn.Linear):  # records, inside forward, whether accelerate's autocast is on
        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(x)

    model = accelerator.prepare(Probe(4, 4))
    model(torch.ones(1, 4))
    assert seen == [native]  # bf16 autocast only where the CPU computes bf16 natively
    # DeepSpeed files configure their own precision: left alone.
    assert precision.training_dtype(Accelerator(cpu=True), torch.bfloat16, "m", deepspeed=True) == torch.bfloat16


@pytest.mark.parametrize("native", [False, True])
def test_eval_records_the_dtype_it_computes_in_on_cpu(monkeypatch, saved_model, native):
    """`--dtype bfloat16` on a CPU without native bf16 computes in float32: the settings that key and record the
    predictions say float32, with a line that says why; auto takes the checkpoint's dtype through the same rule
    (bfloat16 where the CPU has it), also when the caller names the device."""
    from mft.eval.backends.hf import hf_settings

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = str(saved_model(dtype=torch.bfloat16))
    asked = hf_settings(model, dtype="bfloat16")
    assert (asked["device"], asked["dtype"]) == ("cpu", "bfloat16" if native else "float32")
    changed = [line for line in asked["log"] if "instead of --dtype bfloat16" in line]
    assert changed == ([] if native else ["dtype float32 instead of --dtype bfloat16: this CPU has no native "
                                          "bf16 matrix instructions (mft.precision)"])
    for device in (None, "cpu"):
        auto = hf_settings(model, dtype=None, device=device)
        assert auto["dtype"] == ("bfloat16" if native else "float32")
        assert auto["log"][0].startswith(f"dtype {auto['dtype']} (auto on cpu; checkpoint: bfloat16")
    assert hf_settings(model, dtype="float32")["dtype"] == "float32"
