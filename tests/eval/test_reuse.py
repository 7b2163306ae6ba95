"""`mft eval` reuses stored work only when the same model files and task config produced it; data sources.

Real tiny models saved to disk, real generation on the CPU, real files: nothing is mocked.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from mft.cli import main
from mft.eval import outputs
from mft.eval.data import MATH500_NOTE, MATH500_SHA256

from .conftest import read_jsonl

SHORT = {"max_gen_toks": 8}


def run(model, out, *tasks: str) -> tuple[int, str]:
    """`mft eval` on the packaged data (2 documents per task); (exit code, stderr)."""
    args = ["eval", "--model", str(model), "--output-dir", str(out), "--model-type", "hf", "--limit", "2",
            "--data-dir", "packaged", "--workers", "1"]
    for task in tasks:
        args += ["--task", json.dumps({"task_name": task, "generation_kwargs": SHORT})]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    return code, err.getvalue()


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A copy of the session's tiny model that a test may overwrite."""
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir, path)
    return path


@pytest.mark.slow
def test_changed_weights_under_the_same_output_are_generated_again(model_copy, tmp_path):
    from mft.tiny import tiny_model

    out = tmp_path / "results"
    code, _ = run(model_copy, out, "gsm8k")
    assert code == 0
    before = read_jsonl(out / "task-000-gsm8k-predictions.jsonl")
    config = json.loads((model_copy / "config.json").read_text())
    # Other weights, same file name, same architecture: a retrained checkpoint saved to the same path.
    tiny_model("llama", seed=1, vocab_size=config["vocab_size"], hidden=64, num_layers=2).save_pretrained(model_copy)
    code, err = run(model_copy, out, "gsm8k")
    assert code == 0
    (line,) = [line for line in err.splitlines() if "recomputing" in line]
    assert line.startswith("gsm8k: recomputing: the model's files changed (") and "model.safetensors rewritten" in line
    assert "loading" in err and "reusing" not in err
    after = read_jsonl(out / "task-000-gsm8k-predictions.jsonl")
    code, _ = run(model_copy, tmp_path / "fresh", "gsm8k")  # what the new weights give in an empty folder
    assert code == 0
    assert after == read_jsonl(tmp_path / "fresh" / "task-000-gsm8k-predictions.jsonl")
    assert [p["model_output"][0]["continuation"] for p in after] != \
        [p["model_output"][0]["continuation"] for p in before]  # the reuse would have kept the old weights' text
    stored = json.loads((out / "task-000-gsm8k-provenance.json").read_text())["model_config"]["fingerprint"]
    assert stored["weights"]["model.safetensors"]["bytes"] == (model_copy / "model.safetensors").stat().st_size
    assert stored["weights"]["model.safetensors"]["mtime_ns"] == (model_copy / "model.safetensors").stat().st_mtime_ns
    # Unchanged files: reused, and the model is not loaded.
    code, err = run(model_copy, out, "gsm8k")
    assert code == 0 and "reusing 2 predictions" in err and "loading" not in err and "recomputing" not in err


@pytest.mark.slow
def test_changed_tokenizer_or_task_config_is_recomputed_and_said_why(model_copy, tmp_path):
    out = tmp_path / "results"
    assert run(model_copy, out, "gsm8k")[0] == 0
    special = model_copy / "tokenizer_config.json"
    special.write_text(special.read_text() + " ")  # same tokens, but the file is not the one that produced them
    code, err = run(model_copy, out, "gsm8k")
    assert code == 0 and "gsm8k: recomputing: the model's files changed (tokenizer_config.json" in err
    (out / "task-000-gsm8k-provenance.json").unlink()  # predictions nobody recorded the producer of
    code, err = run(model_copy, out, "gsm8k")
    assert code == 0 and "gsm8k: recomputing: no record of the model that produced its stored predictions" in err
    provenance = json.loads((out / "task-000-gsm8k-provenance.json").read_text())
    provenance["task_config"]["num_shots"] = 4  # as if an earlier run had used 4 shots
    outputs.write_json(out / "task-000-gsm8k-provenance.json", provenance)
    code, err = run(model_copy, out, "gsm8k")
    assert code == 0 and "gsm8k: recomputing: the task config changed (num_shots 4 -> 8)" in err


@pytest.mark.slow
def test_every_task_names_its_data_source(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "results"
    code, err = run(tiny_model_dir, out, "gsm8k", "minerva_math_algebra")
    assert code == 0
    entries = {e["task"]: e for e in json.loads((out / "metrics.json").read_text())["metrics"]}
    math = entries["minerva_math_algebra"]["task_config"]["data_source"]
    assert math["sha256"] == MATH500_SHA256 and math["note"] == MATH500_NOTE
    assert math["file"].endswith("mft/data/benchmarks/math500/test.jsonl")
    gsm8k = entries["gsm8k"]["task_config"]["data_source"]
    assert gsm8k["sha256"] == "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"
    assert "note" not in gsm8k
    record = json.loads((out / "task-001-minerva_math_algebra-metrics.json").read_text())
    assert record["task_config"]["data_source"] == math
    assert f"minerva_math_algebra: data: {MATH500_NOTE}: local file {math['file']} sha256 {MATH500_SHA256}" in err
    assert f"gsm8k: data: local file {gsm8k['file']} sha256 {gsm8k['sha256']}" in err
    capsys.readouterr()
    assert main(["report", str(out), "--output", str(tmp_path / "chart.png")]) == 0
    report = capsys.readouterr().out
    assert f"- minerva_math_algebra: {MATH500_NOTE}: local file {math['file']} sha256 {MATH500_SHA256}" in report
    assert f"- gsm8k: local file {gsm8k['file']} sha256 {gsm8k['sha256']}" in report


def test_a_hub_dataset_is_recorded_with_its_revision(monkeypatch):
    """The hub cannot be reached here: a stand-in `datasets` module returns rows from a cache path that
    names the commit, as `datasets` lays out its cache for a hub dataset."""
    import sys
    import types

    from mft.eval.data import describe_record
    from mft.eval.tasks.gsm8k import GSM8K

    commit = "e53f048856ff4f594e959d75785d2c2d37b678ee"

    class Rows(list):
        cache_files = [{"filename": f"/cache/openai___gsm8k/main/0.0.0/{commit}/gsm8k-test.arrow"}]

    def load_dataset(path, config, split):
        assert (path, config, split) == ("openai/gsm8k", "main", "test")
        return Rows([{"question": "1+1?", "answer": "#### 2"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = GSM8K(name="gsm8k")
    assert len(task.load_docs()) == 1
    record = task.config()["data_source"]
    assert record == {"hub": "openai/gsm8k", "config": "main", "split": "test", "revision": commit}
    assert describe_record(record) == f"hub dataset openai/gsm8k/main[test] revision {commit}"


def eval_into(model, out, *extra: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["eval", "--model", str(model), "--task", "gsm8k", "--output-dir", str(out), "--model-type", "hf",
                     *extra])
    return code, err.getvalue()


@pytest.fixture
def not_a_model(tmp_path):
    """Passes the path check but no backend could load it: these refusals come before any model loads."""
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_an_interrupted_run_of_another_model_is_not_taken_over(not_a_model, tmp_path):
    """A run stopped before its metrics.json leaves task files and their provenance: another model's run
    into the same folder is refused as when metrics.json exists, and nothing there changes."""
    out = tmp_path / "results"
    out.mkdir()
    outputs.write_jsonl(out / "task-000-gsm8k-predictions.jsonl", [{"doc_id": 0}])
    outputs.write_provenance(out, 0, "gsm8k", {"model": "/ckpt/fft", "model_type": "hf"}, {"task_name": "gsm8k"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = eval_into(not_a_model, out)
    assert code == 1 and "Traceback" not in err
    assert (f"mft eval: error: {out} holds results of model /ckpt/fft (task-000-gsm8k-provenance.json), "
            f"not {not_a_model}; use a separate --output-dir per model") in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_corrupt_metrics_json_is_one_line_naming_it(not_a_model, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.json").write_text('{"metrics": [')  # cut short
    code, err = eval_into(not_a_model, out)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"mft eval: error: {out / 'metrics.json'} is not readable JSON (")
    (out / "metrics.json").write_text("[]")
    code, err = eval_into(not_a_model, out)
    assert code == 1 and f"{out / 'metrics.json'} holds a JSON list, not an object" in err


def test_batch_size_below_one_is_refused(not_a_model, tmp_path):
    code, err = eval_into(not_a_model, tmp_path / "o", "--batch-size", "0")
    assert code == 1 and "--batch-size must be a positive integer or 'auto', got '0'" in err


@pytest.mark.slow
def test_the_hf_device_dtype_and_batch_size_key_the_predictions(model_copy, tmp_path, monkeypatch):
    """What the hf backend generated with is recorded, and predictions made otherwise are not reused: CPU
    float32 text is not passed off as a bfloat16 run. The dtype recorded is the one computed in: on a CPU
    without native bf16 `--dtype bfloat16` computes (and records) float32, so the CPU is patched to have it
    here (this machine's CPU has one answer; tests/models/test_precision.py checks both)."""
    from mft import precision
    from mft.eval.backends.hf import hf_device_dtype

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert hf_device_dtype() == ("cpu", "float32") and hf_device_dtype("bfloat16") == ("cpu", "bfloat16")
    out = tmp_path / "results"
    assert run(model_copy, out, "gsm8k")[0] == 0
    config = json.loads((out / "metrics.json").read_text())["model_config"]
    # the setting is recorded ("auto", the default): the size it resolves to is known only once a model is loaded
    assert (config["device"], config["dtype"], config["batch_size"]) == ("cpu", "float32", "auto")
    stored = json.loads((out / "task-000-gsm8k-provenance.json").read_text())["model_config"]
    assert (stored["device"], stored["dtype"], stored["batch_size"]) == ("cpu", "float32", "auto")
    args = ["eval", "--model", str(model_copy), "--output-dir", str(out), "--model-type", "hf", "--limit", "2",
            "--data-dir", "packaged", "--workers", "1", "--task", json.dumps({"task_name": "gsm8k",
                                                                               "generation_kwargs": SHORT})]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([*args, "--batch-size", "1"]) == 0
    assert "gsm8k: recomputing: the model settings changed (batch_size 'auto' -> 1)" in err.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([*args, "--batch-size", "1", "--dtype", "bfloat16"]) == 0
    assert "gsm8k: recomputing: the model settings changed (dtype 'float32' -> 'bfloat16')" in err.getvalue()


@pytest.mark.slow
def test_the_batch_size_used_is_recorded_beside_the_setting(model_copy, tmp_path):
    """`--batch-size auto` (the default) resolves to a number only once the model is loaded: provenance,
    the task's metrics.json and the summary record it as `batch_size_used` (2 here: auto is capped at the 2
    prompts), while `model_config.batch_size` stays the setting that reuse is keyed by. A reusing run keeps
    the stored number; `--batch-size 1` generates again and records 1."""
    out = tmp_path / "results"

    def recorded():
        provenance = json.loads((out / "task-000-gsm8k-provenance.json").read_text())
        task = json.loads((out / "task-000-gsm8k-metrics.json").read_text())
        summary = json.loads((out / "metrics.json").read_text())
        assert provenance["model_config"] == task["model_config"] == summary["model_config"]
        return (provenance["model_config"]["batch_size"], provenance["batch_size_used"], task["batch_size_used"],
                summary["metrics"][0]["batch_size_used"])

    assert run(model_copy, out, "gsm8k")[0] == 0
    assert recorded() == ("auto", 2, 2, 2)
    code, err = run(model_copy, out, "gsm8k")
    assert code == 0 and "gsm8k: reusing 2 predictions" in err
    assert recorded() == ("auto", 2, 2, 2)
    args = ["eval", "--model", str(model_copy), "--output-dir", str(out), "--model-type", "hf", "--limit", "2",
            "--data-dir", "packaged", "--workers", "1", "--batch-size", "1",
            "--task", json.dumps({"task_name": "gsm8k", "generation_kwargs": SHORT})]
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 0
    assert recorded() == (1, 1, 1, 1)


def test_math500_is_recognised_by_its_content(tmp_path):
    """A re-serialized MATH-500 copy under any name (other sha256) carries the note; a full-MATH-like
    file does not, even in a folder named math500/."""
    from mft.eval.data import is_math500, packaged_data_dir
    from mft.eval.tasks.minerva_math import MinervaMath

    rows = read_jsonl(packaged_data_dir() / "math500" / "test.jsonl")
    copy = tmp_path / "data" / "my_math_test.jsonl"
    copy.parent.mkdir()
    copy.write_text("".join(json.dumps({**row, "problem": row["problem"] + "\n"}) + "\n" for row in rows))
    task = MinervaMath(name="minerva_math_algebra", dataset_path=str(copy))
    docs = task.load_docs()
    record = task.config()["data_source"]
    assert len(docs) == sum(row["subject"] == "Algebra" for row in rows) == 124
    assert record["sha256"] != MATH500_SHA256 and record["note"] == MATH500_NOTE
    other = {"problem": "What is $1+1$?", "solution": "$\\boxed{2}$", "subject": "Algebra"}
    bigger = tmp_path / "math500" / "test.jsonl"  # the folder's name no longer decides
    bigger.parent.mkdir()
    bigger.write_text("".join(json.dumps(row) + "\n" for row in [*rows, other]))
    task = MinervaMath(name="minerva_math_algebra", data_dir=str(tmp_path))
    assert len(task.load_docs()) == 125 and "note" not in task.config()["data_source"]
    assert is_math500(rows[:3]) and not is_math500([]) and not is_math500([{"question": "1+1?"}])


def test_dtype_recorded_is_the_dtype_computed_in_on_a_cpu_without_bf16(tiny_model_dir, tmp_path, monkeypatch):
    """`--dtype bfloat16` on a CPU without native bf16 (patched: the test CPU is one kind) computes in float32:
    metrics.json and the provenance file say float32, stderr says why, and a `--dtype float32` run reuses the
    predictions (they were made in float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from mft import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    model = tmp_path / "bf16"
    shutil.copytree(tiny_model_dir, model)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(model)
    out = tmp_path / "out"
    code, err = run_with(model, out, "--dtype", "bfloat16")
    assert code == 0, err
    assert "hf: dtype float32 instead of --dtype bfloat16: this CPU has no native bf16 matrix instructions" in err
    assert json.loads((out / "metrics.json").read_text())["model_config"]["dtype"] == "float32"
    provenance = json.loads(next(out.glob("task-000-gsm8k-provenance.json")).read_text())
    assert provenance["model_config"]["dtype"] == "float32"
    predictions = next(out.glob("task-000-gsm8k-predictions.jsonl")).read_bytes()
    code, err = run_with(model, out, "--dtype", "float32")
    assert code == 0, err
    assert f"reusing 2 predictions from {out}" in err or "reusing its metrics" in err, err
    assert next(out.glob("task-000-gsm8k-predictions.jsonl")).read_bytes() == predictions


def run_with(model, out, *extra: str) -> tuple[int, str]:
    args = ["eval", "--model", str(model), "--output-dir", str(out), "--model-type", "hf", "--limit", "2",
            "--data-dir", "packaged", "--workers", "1", "--task",
            json.dumps({"task_name": "gsm8k", "generation_kwargs": SHORT}), *extra]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    return code, err.getvalue()
