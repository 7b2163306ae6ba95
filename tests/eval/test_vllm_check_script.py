"""benchmarks/vllm_check.sh, run here with the vLLM stand-in as the `vllm` package (vLLM needs CUDA): the
script's own steps (tiny model, both `mft eval` runs, the checks) are real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIM = '''import sys
import torch
sys.path.insert(0, {standin!r})
import vllm_standin as _standin
torch.cuda.device_count = lambda: 2  # the stand-in runs on the CPU; two pretend GPUs -> tensor parallel 2
torch.cuda.get_device_capability = lambda device=None: (9, 0)  # of an H100
__version__ = _standin.VERSIONS[-1]
LLM, SamplingParams = _standin.LLM, _standin.SamplingParams
'''


def run(tmp_path, python_path, *args):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": python_path}
    return subprocess.run(["bash", str(ROOT / "benchmarks/vllm_check.sh"), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)


def test_without_vllm_it_says_so(tmp_path):
    result = run(tmp_path, str(ROOT / "src"))
    assert result.returncode == 2 and "vLLM is not importable" in result.stderr


@pytest.mark.slow
def test_vllm_check_runs_mft_eval_with_vllm(tmp_path):
    (tmp_path / "shim" / "vllm").mkdir(parents=True)
    (tmp_path / "shim" / "vllm" / "__init__.py").write_text(SHIM.format(standin=str(ROOT / "tests/eval")))
    result = run(tmp_path, os.pathsep.join([str(tmp_path / "shim"), str(ROOT / "src")]), "--limit", "3",
                 "--keep", str(tmp_path / "work"))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "RESULT vllm eval: 3 predictions" in result.stdout and "vllm_check: ok" in result.stdout
    assert "RESULT vllm vs hf (information): 3/3 identical continuations" in result.stdout
    assert "tensor_parallel_size 2 (largest that fits: 2 GPU(s) visible, 4 heads" in result.stderr
    assert "dtype bfloat16 (auto; checkpoint: float32 from its config; compute capability 9.0)" in result.stderr
    assert (tmp_path / "work" / "vllm" / "metrics.json").is_file()
