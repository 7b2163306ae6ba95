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
