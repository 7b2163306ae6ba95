"""`mft report`'s chart from fixture result folders: labels, 95 % intervals, n/a, legend, title."""

from __future__ import annotations

import json
import math

import pytest

from mft.cli import main
from mft.eval.report import binomial_interval, chart_figure, collect_counts


def write_results(folder, entries):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"metrics": entries}))


def wilson(k: int, n: int, z: float = 1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_interval_from_num_instances():
    assert binomial_interval(0.5, 64) == pytest.approx(wilson(32, 64), abs=1e-12)
    assert binomial_interval(0.5, 64) == pytest.approx((0.3810, 0.6190), abs=1e-4)
    assert binomial_interval(3 / 164, 164) == pytest.approx(wilson(3, 164), abs=1e-12)
    assert binomial_interval(0.0, 10)[0] == 0.0 and binomial_interval(1.0, 10)[1] == 1.0


def test_chart_labels_intervals_na_legend_and_title(tmp_path, capsys):
    fft, mft = tmp_path / "fft", tmp_path / "mft"
    write_results(fft, [{"task": "gsm8k", "primary_score": 0.5, "num_instances": 64},
                        {"task": "codex_humaneval", "primary_score": 0.25, "num_instances": 164}])
    write_results(mft, [{"task": "gsm8k", "primary_score": 0.546875, "num_instances": 64}])
    assert collect_counts(str(fft)) == {"gsm8k": 64, "codex_humaneval": 164}
    chart = tmp_path / "chart.png"
    assert main(["report", str(fft), str(mft), "--labels", "FFT", "MFT", "--output", str(chart)]) == 0
    assert "| codex_humaneval | 25.0 | – | – |" in capsys.readouterr().out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fig = chart_figure(["gsm8k", "codex_humaneval"], ["FFT", "MFT"],
                       [{"gsm8k": 0.5, "codex_humaneval": 0.25}, {"gsm8k": 0.546875}],
                       [{"gsm8k": 64, "codex_humaneval": 164}, {"gsm8k": 64}])
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["25.0", "50.0", "54.7", "n/a"]
    assert ax.get_title() == "gsm8k (n=64); codex_humaneval (n=164)"
    # one error bar per present bar, spanning the Wilson interval in %
    spans = sorted(tuple(round(v, 6) for v in seg[:, 1]) for c in ax.collections for seg in c.get_segments())
    expected = sorted(tuple(round(100 * v, 6) for v in wilson(k, n)) for k, n in ((32, 64), (41, 164), (35, 64)))
    assert spans == expected
    hatched = [p for p in ax.patches if p.get_hatch() and p.get_height() > 0]
    assert len(hatched) == 1 and hatched[0].get_x() + hatched[0].get_width() / 2 == pytest.approx(1.2)
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["FFT", "MFT", "n/a: no result"]
    fig.canvas.draw()
    assert legend.get_window_extent().x0 > ax.get_window_extent().x1  # outside the axes, covering no bar


def test_no_na_legend_without_na_and_zero_instances_are_na(tmp_path):
    fig = chart_figure(["gsm8k"], ["FFT"], [{"gsm8k": 0.5}], [{"gsm8k": 64}])  # one model, nothing missing
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["FFT"]
    run = tmp_path / "run"
    write_results(run, [{"task": "gsm8k", "primary_score": 0.5, "num_instances": 64},
                        {"task": "ifeval", "primary_score": 0.0, "num_instances": 0}])
    counts = collect_counts(str(run))
    assert counts == {"gsm8k": 64, "ifeval": 0}
    fig = chart_figure(["gsm8k", "ifeval"], ["FFT"], [{"gsm8k": 0.5, "ifeval": 0.0}], [counts])
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["50.0", "n/a"]  # the 0-instance task: an n/a bar, no "0.0"
    hatched = [p for p in ax.patches if p.get_hatch() and p.get_height() > 0]
    assert len(hatched) == 1 and hatched[0].get_x() + hatched[0].get_width() / 2 == pytest.approx(1.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["FFT", "n/a: no result"]


def gsm8k_entry(score, n, limit, max_gen_toks, sha="3730d312" + "0" * 56, shots=8):
    return {"task": "gsm8k", "primary_score": score, "num_instances": n,
            "task_config": {"task_name": "gsm8k", "num_shots": shots, "limit": limit,
                            "data_source": {"file": "/somewhere/gsm8k/test.jsonl", "sha256": sha},
                            "generation_kwargs": {"max_gen_toks": max_gen_toks}}}


def test_columns_scored_on_different_problem_sets_show_n_and_a_warning(tmp_path, capsys):
    """The tester's case: gsm8k run with --limit 8, 5 and 6 and budgets 40, 24 and 48. Each cell names its n,
    a warning line names every setting that differs, and the chart title gives n in legend order."""
    write_results(tmp_path / "fft", [gsm8k_entry(0.0, 8, 8, 40)])
    write_results(tmp_path / "mft", [gsm8k_entry(0.2, 5, 5, 24)])
    write_results(tmp_path / "smol", [gsm8k_entry(0.0, 6, 6, 48, sha="ffff" + "0" * 60)])
    chart = tmp_path / "chart.png"
    assert main(["report", str(tmp_path / "fft"), str(tmp_path / "mft"), str(tmp_path / "smol"),
                 "--labels", "FFT", "MFT", "smol", "--output", str(chart)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| gsm8k | 0.0 (n=8) | 20.0 (n=5) | 0.0 (n=6) | +20.0 | +0.0 |" in lines
    assert ("warning: gsm8k was scored under different settings in these columns, so its scores are not "
            "comparable: num_instances 8 (FFT), 5 (MFT), 6 (smol); limit 8 (FFT), 5 (MFT), 6 (smol); max_gen_toks "
            "40 (FFT), 24 (MFT), 48 (smol); data source 3730d3120000 (FFT), 3730d3120000 (MFT), ffff00000000 (smol)"
            ) in lines
    fig = chart_figure(["gsm8k"], ["FFT", "MFT", "smol"], [{"gsm8k": 0.0}, {"gsm8k": 0.2}, {"gsm8k": 0.0}],
                       [{"gsm8k": 8}, {"gsm8k": 5}, {"gsm8k": 6}])
    assert fig.axes[0].get_title() == "gsm8k (n=8/5/6 in legend order)"
    # the same settings everywhere: no n in the cells, no warning
    for name in ("mft", "smol"):
        (tmp_path / name / "metrics.json").write_text(json.dumps({"metrics": [gsm8k_entry(0.25, 8, 8, 40)]}))
    assert main(["report", str(tmp_path / "fft"), str(tmp_path / "mft"), "--labels", "FFT", "MFT",
                 "--output", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "| gsm8k | 0.0 | 25.0 | +25.0 |" in out.splitlines() and "warning" not in out
    (tmp_path / "mft" / "metrics.json").write_text(json.dumps({"metrics": [gsm8k_entry(0.25, 8, 8, 40, shots=2)]}))
    assert main(["report", str(tmp_path / "fft"), str(tmp_path / "mft"), "--output", str(chart)]) == 0
    assert "so its scores are not comparable: num_shots 8 (fft), 2 (mft)" in capsys.readouterr().out


def test_output_under_a_file_is_a_one_line_error(tmp_path, capsys):
    write_results(tmp_path / "fft", [gsm8k_entry(0.0, 8, 8, 40)])
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert main(["report", str(tmp_path / "fft"), "--output", str(tmp_path / "model.safetensors" / "c.png")]) == 1
    assert capsys.readouterr().err == (
        f"mft report: error: cannot create the --output folder {tmp_path / 'model.safetensors'}: "
        f"{tmp_path / 'model.safetensors'} is a file, not a folder (ENOTDIR)\n")
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
