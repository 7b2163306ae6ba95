"""`mft report` on a parent folder: one column per model's result folder, never two models in one column.

The result folders are real files written by the evaluator's own writer (`outputs.write_summary`).
"""

from __future__ import annotations

import json

from mft.cli import main
from mft.eval import outputs
from mft.eval.tasks import GROUPS


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
