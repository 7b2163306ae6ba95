"""`mft report` on a parent folder: one column per model's result folder, never two models in one column.

The result folders are real files written by the evaluator's own writer (`outputs.write_summary`).
"""

from __future__ import annotations

import json

from mft.cli import main
from mft.eval import outputs
from mft.eval.tasks import GROUPS

from .conftest import read_jsonl


def write_results(folder, model: str, gsm8k: float, ifeval: float, math: float | None = None) -> None:
    entries = [outputs.summary_entry("gsm8k", {"exact_match": gsm8k, "primary_score": gsm8k}, 1319, {}),
               outputs.summary_entry("ifeval", {"inst_level_loose_acc": ifeval, "primary_score": ifeval}, 541, {})]
    if math is not None:
        entries += [outputs.summary_entry(s, {"exact_match": math, "exact_match_flex": math, "primary_score": math},
                                          10, {}) for s in GROUPS["minerva_math"]]
    folder.mkdir(parents=True)
    outputs.write_summary(folder, entries, {"model": model, "model_type": "hf", "max_model_len": 2048})


def test_a_parent_folder_with_two_models_gives_two_columns(tmp_path, capsys):
    parent = tmp_path / "results"
    write_results(parent / "mft", "/ckpt/mft", gsm8k=0.45, ifeval=0.35, math=0.10)  # + math/<subject>/metrics.json
    write_results(parent / "fft", "/ckpt/fft", gsm8k=0.40, ifeval=0.30)  # the newest files
    assert len(list(parent.rglob("metrics.json"))) == 2 + 7
    chart = tmp_path / "chart.png"
    assert main(["report", str(parent), "--output", str(chart)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| task | fft | mft | Δ mft |"
    assert "| gsm8k | 40.0 | 45.0 | +5.0 |" in lines
    assert "| minerva_math | – | 10.0 | – |" in lines
    assert "| ifeval | 30.0 | 35.0 | +5.0 |" in lines
    assert f"- fft: {parent / 'fft'}" in lines and f"- mft: {parent / 'mft'}" in lines
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Given folders and found ones mix; --labels names every found folder, in order.
    write_results(tmp_path / "base", "/ckpt/base", gsm8k=0.15, ifeval=0.34)
    assert main(["report", str(tmp_path / "base"), str(parent), "--labels", "base", "FFT", "MFT",
                 "--output", str(chart)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| task | base | FFT | MFT | Δ FFT | Δ MFT |"
    assert "| gsm8k | 15.0 | 40.0 | 45.0 | +25.0 | +30.0 |" in lines
    assert main(["report", str(parent), "--labels", "one", "--output", str(chart)]) == 1
    err = capsys.readouterr().err
    assert f"--labels has 1 names for 2 result folders ({parent / 'fft'}, {parent / 'mft'})" in err


def test_a_folder_mixing_two_models_is_refused(tmp_path, capsys):
    folder = tmp_path / "mixed"
    write_results(folder, "/ckpt/mft", gsm8k=0.45, ifeval=0.35, math=0.10)
    subject = folder / "math" / "algebra" / "metrics.json"
    record = json.loads(subject.read_text())
    record["model_config"]["model"] = "/ckpt/fft"  # an algebra result of another model copied in
    subject.write_text(json.dumps(record))
    assert main(["report", str(folder), "--output", str(tmp_path / "c.png")]) == 1
    err = capsys.readouterr().err
    other = folder / "math" / "counting_and_probability" / "metrics.json"
    assert f"{folder} mixes two models' results: {subject} is /ckpt/fft, {other} is /ckpt/mft" in err


def fingerprinted(model: str, weights_mtime: int) -> dict:
    return {"model": model, "model_type": "hf", "fingerprint": {"weights": {"model.safetensors": {
        "bytes": 100, "mtime_ns": weights_mtime}}, "tokenizer": {}}}


def math_entries(score: float, subjects) -> list[dict]:
    return [outputs.summary_entry(s, {"exact_match": score, "exact_match_flex": score, "primary_score": score}, 10,
                                  {}) for s in subjects]


def test_math_files_of_old_weights_are_not_reported_for_new_ones(tmp_path, capsys):
    """All seven subjects scored on the old weights, then only algebra on new weights at the same path: the
    six old subject files are removed (named on stderr), the MATH average and the report are the new
    weights' alone."""
    folder = tmp_path / "results"
    folder.mkdir()
    old, new = fingerprinted("/ckpt/mft", 1), fingerprinted("/ckpt/mft", 2)
    outputs.write_summary(folder, math_entries(0.9, GROUPS["minerva_math"]), old)
    capsys.readouterr()
    outputs.write_summary(folder, math_entries(0.2, ["minerva_math_algebra"]), new)
    err = capsys.readouterr().err
    assert sorted(p.parent.name for p in (folder / "math").glob("*/metrics.json")) == ["algebra"]
    assert err.count("removed ") == 6 and f"removed {folder / 'math' / 'geometry' / 'metrics.json'}: scored" in err
    assert read_jsonl(folder / "math" / "task_scores_flex.jsonl") == [
        {"task": "minerva_math_algebra", "score": 0.2}, {"task": "average", "score": 0.2}]
    # A folder written before this rule (an old subject file still there): the report leaves it out.
    stale = folder / "math" / "geometry" / "metrics.json"
    stale.parent.mkdir()
    stale.write_text(json.dumps({"metrics": math_entries(0.9, ["minerva_math_geometry"]), "model_config": old}))
    assert main(["report", str(folder), "--output", str(tmp_path / "c.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| minerva_math_algebra | 20.0 |" in lines
    assert not any(line.startswith("| minerva_math_geometry") for line in lines)
    assert f"- {stale}: not counted, scored with other model files or settings than {folder / 'metrics.json'} " \
           "(re-run its task to include it)" in lines


def test_a_folder_named_math_is_a_parent_not_the_authors_layout(tmp_path, capsys):
    parent = tmp_path / "results"
    write_results(parent / "math" / "fft", "/ckpt/fft", gsm8k=0.40, ifeval=0.30)
    write_results(parent / "math" / "mft", "/ckpt/mft", gsm8k=0.45, ifeval=0.35)
    assert main(["report", str(parent), "--output", str(tmp_path / "c.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| task | math/fft | math/mft | Δ math/mft |"
    assert "| gsm8k | 40.0 | 45.0 | +5.0 |" in lines


def test_symlinked_result_folders_are_found_and_unfinished_ones_named(tmp_path, capsys):
    store, parent = tmp_path / "store", tmp_path / "results"
    write_results(store / "fft", "/ckpt/fft", gsm8k=0.40, ifeval=0.30)
    write_results(parent / "mft", "/ckpt/mft", gsm8k=0.45, ifeval=0.35)
    (parent / "fft").symlink_to(store / "fft", target_is_directory=True)
    (parent / "loop").symlink_to(parent, target_is_directory=True)  # followed once, not forever
    unfinished = parent / "lora"
    unfinished.mkdir()
    outputs.write_jsonl(unfinished / "task-000-gsm8k-predictions.jsonl", [{"doc_id": 0}])
    assert main(["report", str(parent), "--output", str(tmp_path / "c.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| task | fft | mft | Δ mft |"
    assert "| gsm8k | 40.0 | 45.0 | +5.0 |" in lines
    assert f"- {unfinished}: task files but no metrics.json (an unfinished run; finish it with the same " \
           "`mft eval` command)" in lines
    assert main(["report", str(unfinished), "--output", str(tmp_path / "c.png")]) == 1
    assert f"no metrics.json under {unfinished} (unfinished runs without one: {unfinished};" in capsys.readouterr().err


def test_a_corrupt_metrics_json_in_a_report_is_one_line(tmp_path, capsys):
    write_results(tmp_path / "fft", "/ckpt/fft", gsm8k=0.40, ifeval=0.30)
    (tmp_path / "fft" / "metrics.json").write_text("{")
    assert main(["report", str(tmp_path / "fft"), "--output", str(tmp_path / "c.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mft report: error: {tmp_path / 'fft' / 'metrics.json'} is not an olmes metrics.json")
    assert len(err.strip().splitlines()) == 1


def test_columns_of_folders_with_the_same_name_or_behind_a_symlink_are_named_apart(tmp_path, capsys):
    write_results(tmp_path / "math" / "fft", "/ckpt/fft-math", gsm8k=0.40, ifeval=0.30)
    write_results(tmp_path / "coding" / "fft", "/ckpt/fft-code", gsm8k=0.20, ifeval=0.10)
    (tmp_path / "latest").symlink_to(tmp_path / "coding" / "fft", target_is_directory=True)
    assert main(["report", str(tmp_path / "math" / "fft"), str(tmp_path / "coding" / "fft"),
                 "--output", str(tmp_path / "c.png")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "| task | math/fft | coding/fft | Δ coding/fft |"
    assert main(["report", str(tmp_path / "latest"), "--output", str(tmp_path / "c.png")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "| task | latest |"
