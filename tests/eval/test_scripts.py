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


def dry_run(script: str, *args: str, cwd=None, **env: str) -> list[str]:
    result = subprocess.run(["bash", str(ROOT / "bash/evaluation" / script), *args], capture_output=True, text=True,
                            env={**os.environ, "DRY_RUN": "1", **env}, check=True, cwd=cwd)
    return result.stdout.splitlines()


@pytest.mark.parametrize("model, path, out", [
    # a bare name whose folder is under output/: that run; an MFT run through its mask_applied/
    ("masktune_llama2-7b_math", "output/masktune_llama2-7b_math/mask_applied",
     "output/masktune_llama2-7b_math/mask_applied/eval_output"),
    ("fft_llama2-7b_math", "output/fft_llama2-7b_math", "output/fft_llama2-7b_math/eval_output"),
    ("mft_run", "output/mft_run/mask_applied", "output/mft_run/mask_applied/eval_output"),  # has mask_applied/
    ("plain_run", "output/plain_run", "output/plain_run/eval_output"),
    # anything else is used as given, results beside it
    ("output/fft_llama2-7b_math", "output/fft_llama2-7b_math", "output/fft_llama2-7b_math/eval_output"),
    ("output/fft_new", "output/fft_new", "output/fft_new/eval_output"),  # not written yet: still no output/output
    ("/data/fft_7b", "/data/fft_7b", "/data/fft_7b/eval_output"),
    ("/data/masktune_7b/", "/data/masktune_7b", "/data/masktune_7b/eval_output"),
    ("models/base", "models/base", "models/base/eval_output"),
    ("./fft_local", "./fft_local", "./fft_local/eval_output"),
    ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf", "output/meta-llama/Llama-2-7b-hf/eval_output"),
    # not a local folder and no "/": a bare hub id or mft short name, results under OUTPUT_ROOT (never ./gpt2/...,
    # which the next run would load as the model); output/gpt2 holding only an earlier run's results is no run
    ("gpt2", "gpt2", "output/gpt2/eval_output"),
    ("smollm2-135m-instruct", "smollm2-135m-instruct", "output/smollm2-135m-instruct/eval_output"),
])
def test_model_argument_and_results_folder(model, path, out, tmp_path):
    for folder in ("output/masktune_llama2-7b_math", "output/fft_llama2-7b_math", "output/mft_run/mask_applied",
                   "output/plain_run", "models/base", "output/gpt2/eval_output"):
        (tmp_path / folder).mkdir(parents=True)
    for run in ("output/plain_run", "output/fft_llama2-7b_math"):  # a run folder holds a model
        (tmp_path / run / "config.json").write_text("{}")
    (line,) = dry_run("llama2-7b_math.sh", model, cwd=tmp_path)
    assert line.startswith(f"mft eval --model {path} --model-type vllm ") and line.endswith(f"--output-dir {out}")
    assert line.count("--task") == 8 and "minerva_math_precalculus" in line and "num_shots\\\":\\ 8" in line
    (line,) = dry_run("llama2-7b_math.sh", model, cwd=tmp_path, EVAL_OUTPUT="/results/x")
    assert line.startswith(f"mft eval --model {path} ") and line.endswith("--output-dir /results/x")


def test_output_root_and_a_name_not_under_it(tmp_path):
    (tmp_path / "runs" / "fft_a").mkdir(parents=True)
    (tmp_path / "runs/fft_a/config.json").write_text("{}")
    (line,) = dry_run("llama2-7b_if.sh", "fft_a", cwd=tmp_path, OUTPUT_ROOT="runs/")
    assert "--model runs/fft_a " in line and line.endswith("--output-dir runs/fft_a/eval_output")
    (line,) = dry_run("llama2-7b_if.sh", "fft_b", cwd=tmp_path, OUTPUT_ROOT="runs")  # no runs/fft_b: a hub id
    assert "--model fft_b " in line and line.endswith("--output-dir runs/fft_b/eval_output")
    (tmp_path / "fft_c").mkdir()  # a model folder in the current folder: results beside it
    (line,) = dry_run("llama2-7b_if.sh", "fft_c", cwd=tmp_path, OUTPUT_ROOT="runs")
    assert "--model fft_c " in line and line.endswith("--output-dir fft_c/eval_output")


def test_an_mft_run_without_mask_applied_is_refused(tmp_path):
    (tmp_path / "output" / "masktune_x").mkdir(parents=True)
    script = str(ROOT / "bash/evaluation/llama2-7b_if.sh")
    env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}
    real = subprocess.run(["bash", script, "masktune_x"], capture_output=True, text=True, env=env, cwd=tmp_path)
    hint = ("mft apply --base_model_name_or_path <the FFT model> --mask_model_name_or_path output/masktune_x "
            "--output_dir output/masktune_x/mask_applied")
    assert real.returncode == 1 and real.stdout == ""
    assert "error: MFT run output/masktune_x has no mask_applied/" in real.stderr and hint in real.stderr
    dry = subprocess.run(["bash", script, "masktune_x"], capture_output=True, text=True, cwd=tmp_path,
                         env={**env, "DRY_RUN": "1"}, check=True)
    assert f"warning: output/masktune_x/mask_applied does not exist yet; create it first: {hint}" in dry.stderr
    assert "--model output/masktune_x/mask_applied " in dry.stdout


def test_domains_and_the_olmes_route(tmp_path):
    (tmp_path / "output" / "fft_x").mkdir(parents=True)
    (tmp_path / "output/fft_x/config.json").write_text("{}")
    (coding,) = dry_run("llama3.1-8b_coding.sh", "fft_x", "--limit", "3", cwd=tmp_path)
    assert "codex_humaneval\\\"" in coding and "codex_humanevalplus" in coding and coding.endswith("--limit 3")
    (instructions,) = dry_run("llama3.1-8b_if.sh", "fft_x", cwd=tmp_path)
    assert instructions.count("--task") == 1 and "ifeval" in instructions
    olmes = dry_run("llama2-7b_math.sh", "fft_x", cwd=tmp_path, EVAL_HARNESS="olmes")
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
