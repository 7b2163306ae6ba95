"""`mft demo --model`: the real-model demo's split, interval and table (fast), and its whole pipeline on a tiny
local model folder (the real SmolLM2 run is `mft demo --model smollm2-135m-instruct --quick`, see the README)."""

from __future__ import annotations

import json

import pytest

from mft.demo import real
from mft.demo.settings import MODELS
from mft.errors import MftError
from mft.eval.data import packaged_data_dir

ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
          "in April and May.\n#### 1,072")


def test_gsm8k_target_has_the_exemplars_form():
    assert real.gsm8k_target(ANSWER) == ("Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips "
                                         "altogether in April and May. So the answer is 1072.")


def test_wilson_interval_known_values():
    assert real.wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert real.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert real.wilson_interval(16, 16)[1] == 1.0 and real.wilson_interval(16, 16)[0] == pytest.approx(0.80639, abs=1e-5)


def test_split_is_seeded_disjoint_and_from_the_shipped_test_set():
    rows = [json.loads(line) for line in (packaged_data_dir() / "gsm8k" / "test.jsonl").read_text().splitlines()]
    train, test, record = real.split_gsm8k(30, 20, seed=4)
    assert len(train) == 30 and len(test) == 20
    assert not set(record["train_indices"]) & set(record["heldout_indices"])
    assert [rows[i] for i in record["heldout_indices"]] == test and [rows[i] for i in record["train_indices"]] == train
    assert record["what"] == "demo split of the GSM8K test set: not a benchmark number" and record["seed"] == 4
    assert real.split_gsm8k(30, 20, seed=4)[2] == record and real.split_gsm8k(30, 20, seed=5)[2] != record
    with pytest.raises(MftError, match=r"n_train \+ n_test <= 1319 \(GSM8K test problems\); got 1300 \+ 20"):
        real.split_gsm8k(1300, 20, seed=0)


@pytest.mark.slow
def test_real_demo_pipeline_on_a_local_model_folder(tmp_path, saved_model, capsys):
    """Every stage and file of the real-model demo, on a tiny model folder given as --model (seconds, not minutes)."""
    base = saved_model("llama", max_position_embeddings=1024)
    settings = real.RealSettings(n_train=8, n_test=6, max_seq_length=512, batch_size=4, fft_epochs=1, mft_epochs=1,
                                 masked_layers="1 2", max_gen_toks=8, chat_max_gen_toks=12, eval_batch_size=6,
                                 max_model_len=512)
    out = tmp_path / "demo"
    result = real.run_real_demo(str(base), out, seed=2, settings=settings)
    assert list(result["models"]) == list(MODELS)
    for name, row in result["models"].items():
        assert row["num_instances"] == 6 and 0 <= row["correct"] <= 6
        assert row["accuracy"] == row["correct"] / 6
        assert row["ci95"] == pytest.approx(list(real.wilson_interval(row["correct"], 6)))
        assert (out / "eval" / name / "metrics.json").is_file()
    for name in ("fft", "mft", "random", "l1"):
        assert (out / "models" / name / "model.safetensors").is_file(), name
    split = json.loads((out / "data" / "split.json").read_text())
    assert split["seed"] == 2 and len(split["train_indices"]) == 8 and len(split["heldout_indices"]) == 6
    assert len((out / "data" / "heldout.jsonl").read_text().splitlines()) == 6
    # the second evaluation: the question as the user turn of the tokenizer's chat template, 0-shot
    from transformers import AutoTokenizer

    from mft.eval.tasks.gsm8k import exact_match, extract_answer

    heldout = [json.loads(line) for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(base)
    for name, row in result["models"].items():
        chat = row["chat"]
        predictions = [json.loads(line) for line in (out / "eval_chat" / name / "predictions.jsonl").read_text()
                       .splitlines()]
        assert len(predictions) == 6 and chat["num_instances"] == 6
        for doc, p in zip(heldout, predictions):
            assert p["prompt"] == tokenizer.apply_chat_template([{"role": "user", "content": doc["question"]}],
                                                                tokenize=False, add_generation_prompt=True)
            assert "Question:" not in p["prompt"] and 1 <= p["num_tokens"] <= settings.chat_max_gen_toks
            assert p["model_answer"] == extract_answer(p["continuation"])
            assert p["label"] == doc["answer"].split("####")[-1].strip().replace(",", "")
            assert p["exact_match"] == exact_match(p["model_answer"], p["label"])
        assert chat["correct"] == sum(p["exact_match"] for p in predictions)
        assert chat["ci95"] == pytest.approx(list(real.wilson_interval(chat["correct"], 6)))
    table = (out / "results.md").read_text()
    assert table.startswith(f"{base}, demo split of the GSM8K test set (seed 2: 8 train / 6 held-out problems): "
                            "NOT a benchmark number")
    assert ("| model | GSM8K 8-shot accuracy (held-out) | 95 % interval (Wilson) | correct / n | chat template, "
            "0-shot | 95 % interval (Wilson) | correct / n |") in table
    rows = [line.split("|")[1:-1] for line in table.splitlines()[4:]]
    assert [r[0].strip() for r in rows] == ["base", "FFT", "MFT", "random mask", "L1 mask"]
    for r, name in zip(rows, MODELS):
        chat = result["models"][name]["chat"]
        assert r[6].strip() == f"{chat['correct']} / 6"
        assert r[5].strip() == f"{chat['ci95'][0]:.1%} - {chat['ci95'][1]:.1%}"
    assert table in capsys.readouterr().out
    # the figure: loss, lr, mask flips per layer, accuracy with intervals (looked at by hand, see the README)
    from PIL import Image

    plot = out / "plots" / "demo.png"
    assert result["plot"] == str(plot.resolve()) or result["plot"] == str(plot)
    with Image.open(plot) as image:
        assert image.size == (1300, 850)
    assert set(json.loads((out / "timings.json").read_text())["stage_seconds"]) == \
        {"data", "fft", "mft", "apply", "eval", "chat", "report"}
    with pytest.raises(MftError, match="pass --overwrite"):
        real.run_real_demo(str(base), out, seed=2, settings=settings)


def test_an_empty_model_is_refused_not_the_tiny_demo(tmp_path, monkeypatch, capsys):
    """`mft demo --model ''` (an empty $MODEL): one error, and neither demo writes anything."""
    from mft.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--model", "", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "--model is empty (''): expected a short name from `mft models list`" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MftError, match="--model is empty"):
        real.run_real_demo("  ", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_with_too_few_layers_is_refused_before_anything_is_written(tmp_path, saved_model):
    """The quick settings mask layers 4-7; a 4-layer model (0-3) is refused from its config.json, before FFT."""
    base = saved_model("llama")
    out = tmp_path / "demo"
    with pytest.raises(MftError) as caught:
        real.run_real_demo(str(base), out, quick=True)
    assert str(caught.value) == (f"--model {base} has 4 decoder layers (0-3, config.json num_hidden_layers), but the "
                                 "real-model demo masks layers 4 5 6 7 (4 5 6 7 do not exist): use a model with at "
                                 "least 8 decoder layers")
    assert not out.exists()
    settings = real.RealSettings(masked_layers="2 3 4")
    with pytest.raises(MftError, match=r"has 4 decoder layers \(0-3, .* masks layers 2 3 4 \(4 do not exist\)"):
        real.run_real_demo(str(base), out, settings=settings)
    assert not out.exists()


def test_overwrite_refuses_an_output_folder_that_holds_the_model(tmp_path, saved_model):
    """`mft demo --model OUT/models/fft --output-dir OUT --overwrite` (OUT an earlier demo folder) would delete
    the model before reading it: refused, and every file of OUT is still there."""
    import shutil

    out = tmp_path / "demo"
    model = out / "models" / "fft"
    shutil.copytree(saved_model("llama", num_layers=8), model)
    (out / "mft_demo.json").write_text("{}")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(MftError) as caught:
        real.run_real_demo(str(model), out, quick=True, overwrite=True)
    assert str(caught.value).startswith(f"--output-dir {out} contains the model {model}: writing the output there "
                                        "would delete or change that input")
    with pytest.raises(MftError, match=f"--output-dir {model} is the model {model}"):
        real.run_real_demo(str(model), model, quick=True, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
