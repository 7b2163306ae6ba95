"""The GPU-cluster scripts: the original's path logic, the task lists, the olmes route, get_math_score.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mft.eval import outputs

ROOT = Path(__file__).resolve().parents[2]


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    result = subprocess.run(["bash", str(ROOT / "bash/evaluation" / script), *args], capture_output=True, text=True,
                            env={**os.environ, "DRY_RUN": "1", **env}, check=True)
    return result.stdout.splitlines()


@pytest.mark.parametrize("model, path, out", [
    ("masktune_llama2-7b_math", "output/masktune_llama2-7b_math/mask_applied",
     "output/masktune_llama2-7b_math/mask_applied/eval_output"),
    ("fft_llama2-7b_math", "output/fft_llama2-7b_math", "output/fft_llama2-7b_math/eval_output"),
    ("/models/base", "/models/base", "output//models/base/eval_output"),
])
def test_path_logic_of_the_original_scripts(model, path, out):
    (line,) = dry_run("llama2-7b_math.sh", model)
    assert line.startswith(f"mft eval --model {path} --model-type vllm ") and line.endswith(f"--output-dir {out}")
    assert line.count("--task") == 8 and "minerva_math_precalculus" in line and "num_shots\\\":\\ 8" in line


def test_domains_and_the_olmes_route():
    (coding,) = dry_run("llama3.1-8b_coding.sh", "fft_x", "--limit", "3")
    assert "codex_humaneval\\\"" in coding and "codex_humanevalplus" in coding and coding.endswith("--limit 3")
    (instructions,) = dry_run("llama3.1-8b_if.sh", "fft_x")
    assert instructions.count("--task") == 1 and "ifeval" in instructions
    olmes = dry_run("llama2-7b_math.sh", "fft_x", EVAL_HARNESS="olmes")
    assert len(olmes) == 9 and all(line.startswith("olmes --model output/fft_x --model-type vllm") for line in olmes[:8])
    assert olmes[0].endswith("--output-dir output/fft_x/eval_output/gsm8k")
    assert olmes[1].endswith("--output-dir output/fft_x/eval_output/math/algebra")
    assert olmes[8].endswith("scripts/get_math_score.py output/fft_x/eval_output")


def test_get_math_score_on_olmes_style_folders(tmp_path):
    for subject, flex in (("algebra", 0.25), ("geometry", 0.5)):
        entry = {"task": f"minerva_math_{subject}", "exact_match": 0.1, "exact_match_flex": flex, "primary_score": flex}
        outputs.write_json(tmp_path / "math" / subject / "metrics.json", {"metrics": [entry]})
    result = subprocess.run([sys.executable, str(ROOT / "scripts/get_math_score.py"), str(tmp_path)],
                            capture_output=True, text=True, check=True)
    assert "average: 0.375000" in result.stdout
    lines = [json.loads(line) for line in (tmp_path / "math/task_scores_flex.jsonl").read_text().splitlines()]
    assert lines == [{"task": "minerva_math_algebra", "score": 0.25}, {"task": "minerva_math_geometry", "score": 0.5},
                     {"task": "average", "score": 0.375}]


def test_vllm_settings_pass_through_the_launchers():
    (line,) = dry_run("llama3.1-8b_if.sh", "fft_x", "--limit", "2", TENSOR_PARALLEL_SIZE="4", DTYPE="bfloat16",
                      GPU_MEMORY_UTILIZATION="0.8")
    assert "--tensor-parallel-size 4 --dtype bfloat16 --gpu-memory-utilization 0.8 --output-dir" in line
    (plain,) = dry_run("llama3.1-8b_if.sh", "fft_x")
    assert "--tensor-parallel-size" not in plain and "--dtype" not in plain and "--gpu-memory" not in plain
