"""The training job on one CPU process: FFT, MFT and LoRA on a tiny model, outputs, resume, bad input."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mft.cli import main
from mft.masking.files import read_masks
from mft.masking.inject import masked_modules
from mft.masking.rule import local_mask
from mft.run_dir import FINISHED_MARKER
from mft.train.config import TrainConfig
from mft.train.loop import CHECKPOINTS, TRAIN_LOG, TRAINER_STATE, latest_checkpoint, train


def write_chat_data(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 40), rng.randint(1, 40)
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} + {b} = {a + b}. #### {a + b}"}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, saved_model):
    root = tmp_path_factory.mktemp("train")
    return {"base": saved_model("llama"), "data": write_chat_data(root / "data.jsonl"), "root": root}


def run(workspace, name, **overrides):
    """train() in this process with a fresh accelerate state; returns the TrainResult."""
    from accelerate.state import AcceleratorState, GradientState

    values = {"model_name_or_path": str(workspace["base"]), "train_file": str(workspace["data"]),
              "output_dir": str(workspace["root"] / name), "max_seq_length": 64, "per_device_train_batch_size": 4,
              "gradient_accumulation_steps": 2, "num_train_epochs": 3, "logging_steps": 1, "report_to": ["none"],
              "dataset_local_cache_dir": str(workspace["root"] / "cache"), "seed": 1, **overrides}
    try:
        return train(TrainConfig.from_dict(values))  # published names: test_families passes sparsity_*
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / TRAIN_LOG).read_text().splitlines()]


def base_weights(workspace) -> dict[str, torch.Tensor]:
    return load_file(str(workspace["base"] / "model.safetensors"))


def test_fft_loss_falls_and_saves_a_model(workspace):
    result = run(workspace, "fft", learning_rate=1e-2, warmup_ratio=0.0)
    out = result.output_dir
    curve = losses(out)
    assert len(curve) == result.steps == 3 * 6  # 48 examples / 4 per batch / 2 accumulation, 3 epochs
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / FINISHED_MARKER).exists() and (out / "train_config.yaml").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    before = base_weights(workspace)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])


def test_mft_trains_only_scores_and_writes_masks_not_weights(workspace):
    result = run(workspace, "mft", subnet_mode="both", masked_layers="1 2", learning_rate=0.05, warmup_ratio=0.0,
                 checkpointing_steps=6)
    out = result.output_dir
    curve = losses(out)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3
    # every weight bit-identical to the base checkpoint; the scores moved
    before = base_weights(workspace)
    state = result.model.state_dict()
    assert {k for k in state if not k.endswith(".scores")} == set(before)
    for key, w in before.items():
        assert torch.equal(state[key], w), key
    layers = masked_modules(result.model)
    assert len(layers) == 14
    # the run folder: masks + run info + config, no weights
    names = {p.name for p in out.iterdir()}
    assert {"masks.safetensors", "mft_run.json", "train_config.yaml", TRAIN_LOG, FINISHED_MARKER} <= names
    assert not list(out.glob("model*.safetensors")) and not list(out.glob("*.bin"))
    masks = read_masks(out / "masks.safetensors")
    assert masks.source == "learned" and set(masks.masks) == set(layers)
    for name, layer in layers.items():
        assert torch.equal(masks.masks[name], layer.mask)
        assert torch.equal(masks.masks[name], local_mask(layer.scores.detach(), 0.9))
    info = json.loads((out / "mft_run.json").read_text())
    assert info["base_model"] == str(workspace["base"].resolve()) and info["steps"] == 18
    assert info["mask_config"]["masked_layers"] == [1, 2]
    # MFT logs: changed fraction and kept fraction per layer
    record = json.loads((out / TRAIN_LOG).read_text().splitlines()[0])
    assert 0 < record["mask_changed"] <= 1 and set(record["kept_fraction"]) == {"1", "2"}
    assert record["kept_fraction"]["1"] == pytest.approx(0.9, abs=0.002)
    assert set(record["mask_changed_per_layer"]) == {"1", "2"}
    assert min(record["mask_changed_per_layer"].values()) <= record["mask_changed"] <= max(
        record["mask_changed_per_layer"].values())
    # checkpoints hold the scores, never the frozen weights
    ckpt = latest_checkpoint(str(out))
    assert ckpt.name == "step_18" and (ckpt / TRAINER_STATE).exists()
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"{n}.scores" for n in layers)
    # the original launchers' apply step works on the run folder
    assert main(["apply", "--mask_model_name_or_path", str(out), "--output_dir", str(out / "mask_applied"),
                 "--quiet"]) == 0
    applied = load_file(str(out / "mask_applied" / "model.safetensors"))
    for name, mask in masks.masks.items():
        assert torch.equal(applied[f"{name}.weight"], before[f"{name}.weight"] * mask)


def test_mft_with_fused_adamw_refreshes_every_mask_after_every_step(workspace):
    """No global optimizer hook: the loop itself refreshes the masks after each optimizer step, also when fused
    AdamW steps the scores without bumping their version counter. Once at the start and once per step (each
    of 2 micro-batches), never per micro-batch; every logged step saw its masks move."""
    result = run(workspace, "mft_fused", subnet_mode="both", masked_layers="1", learning_rate=0.05,
                 warmup_ratio=0.0, fused_optimizer=True, max_train_steps=3)
    out = result.output_dir
    records = [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["mask_changed"] > 0 for r in records), [r["mask_changed"] for r in records]
    layers = masked_modules(result.model)
    masks = read_masks(out / "masks.safetensors")
    assert len(layers) == 7 and set(masks.masks) == set(layers)
    for name, layer in layers.items():
        assert layer.mask_updates == 1 + 3, name
        assert torch.equal(masks.masks[name], local_mask(layer.scores.detach(), 0.9)), name


def test_lora_trains_and_merges(workspace):
    result = run(workspace, "lora", use_lora=True, lora_rank=4, lora_alpha=8, learning_rate=5e-3, warmup_ratio=0.0)
    out = result.output_dir
    curve = losses(out)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    before = base_weights(workspace)
    assert keys == set(before)  # merged: a plain model, no lora_A / lora_B
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(merged.model.layers[1].self_attn.q_proj.weight,
                           before["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(merged.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def _train_command(workspace, out: Path) -> list[str]:
    return [sys.executable, "-m", "mft", "train", f"--model_name_or_path={workspace['base']}",
            f"--train_file={workspace['data']}", f"--output_dir={out}", "--max_seq_length=64",
            "--per_device_train_batch_size=2", "--gradient_accumulation_steps=2", "--num_train_epochs=4",
            "--subnet_mode=both", "--masked_layers=0-3", "--learning_rate=0.05", "--checkpointing_steps=10",
            "--report_to=[none]", f"--dataset_local_cache_dir={workspace['root'] / 'cache'}", "--seed=3"]


@pytest.mark.slow
def test_killed_mft_run_resumes_bit_exactly(workspace, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_train_command(workspace, reference), check=True, env=env, capture_output=True)

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(_train_command(workspace, resumed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = resumed / CHECKPOINTS / "step_20" / TRAINER_STATE
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (resumed / FINISHED_MARKER).exists() and not (resumed / "masks.safetensors").exists()

    result = subprocess.run(_train_command(workspace, resumed), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stderr
    ref, res = read_masks(reference / "masks.safetensors"), read_masks(resumed / "masks.safetensors")
    for name in ref.masks:
        assert torch.equal(ref.masks[name], res.masks[name]), name
    # the log was rewound to the checkpoint, so the resumed log equals the uninterrupted one in its steps
    steps = [json.loads(line)["step"] for line in (resumed / TRAIN_LOG).read_text().splitlines()]
    assert steps == list(range(1, 49))
    assert losses(resumed) == pytest.approx(losses(reference), rel=1e-6)


def test_half_written_checkpoints_are_ignored(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False)):
        folder = tmp_path / CHECKPOINTS / f"step_{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / TRAINER_STATE).write_text("{}")
    assert latest_checkpoint(str(tmp_path)).name == "step_10"
    assert latest_checkpoint(str(tmp_path / "nothing")) is None


@pytest.mark.parametrize("args, message", [
    (["--masked_layers=3 4"], "masked_layers [4] out of range: {base} has 4 decoder layers, numbered 0 to 3"),
    (["--masked_layers=[]", "--target_modules=[nothing]"], "no module matches the selection"),
    (["--masked_layers=1", "--sparsity_attn=1.2"], "must be in (0, 1]"),
])
def test_bad_input_fails_before_loading_the_model(workspace, capsys, args, message):
    out = workspace["root"] / "bad"
    code = main(["train", f"--model_name_or_path={workspace['base']}", f"--train_file={workspace['data']}",
                 f"--output_dir={out}", "--subnet_mode=both", "--report_to=[none]", *args])
    assert code == 1
    assert message.format(base=workspace["base"]) in capsys.readouterr().err
    assert not out.exists()


def test_a_bad_row_fails_before_the_run_folder_is_written(workspace, capsys):
    # an empty "messages" once crashed inside transformers' chat template, after train_config.yaml was written
    data = workspace["root"] / "empty_row.jsonl"
    data.write_text(Path(workspace["data"]).read_text().splitlines()[0] + "\n" + '{"messages": []}\n')
    out = workspace["root"] / "bad_row"
    code = main(["train", f"--model_name_or_path={workspace['base']}", f"--train_file={data}",
                 f"--output_dir={out}", "--report_to=[none]", f"--dataset_local_cache_dir={workspace['root'] / 'cache'}"])
    assert code == 1
    assert f'{data}: row 1 (counting from 0): "messages" is empty' in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_a_mask_only_snapshot_as_model_is_refused_naming_its_base(workspace, capsys, tmp_path, with_tokenizer):
    # the files an MFT snapshot holds (snapshots/step_N/): masks and mft_run.json, no config.json or weights;
    # once: "no tokenizer files", and with tokenizer_name a raw "Unrecognized model" from transformers
    snap = tmp_path / "run" / "snapshots" / "step_2"
    snap.mkdir(parents=True)
    (snap / "masks.safetensors").write_bytes(b"")
    (snap / "mft_run.json").write_text(json.dumps({"method": "mft", "steps": 2, "base_model": str(workspace["base"])}))
    out = tmp_path / "out"
    args = ["train", f"--model_name_or_path={snap}", f"--train_file={workspace['data']}", f"--output_dir={out}",
            "--subnet_mode=both", "--masked_layers=0 1", "--report_to=[none]"]
    args += [f"--tokenizer_name={workspace['base']}"] if with_tokenizer else []
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"model_name_or_path {snap} is a mask-only MFT snapshot of {workspace['base']}, not a model; use " \
           f"{workspace['base']} as model_name_or_path (and `mft apply --mask_model_name_or_path {snap}" in err
    assert not out.exists()


def test_finished_run_is_not_overwritten(workspace, capsys):
    out = workspace["root"] / "finished"
    out.mkdir()
    (out / FINISHED_MARKER).write_text(json.dumps({"finished_at": "2026-01-01"}))
    args = ["train", f"--model_name_or_path={workspace['base']}", f"--train_file={workspace['data']}",
            f"--output_dir={out}", "--report_to=[none]"]
    assert main(args) == 1
    assert "already holds a finished run" in capsys.readouterr().err


@pytest.mark.parametrize("clip, expect", [(None, 1.0), ("0", 0.0)])
def test_gradients_are_clipped_to_one_by_default_without_deepspeed(workspace, clip, expect):
    """Every published run clipped at 1.0 (DeepSpeed's `auto`); without DeepSpeed the loop does it too.
    reduce_loss: sum makes the raw gradient norm far above 1; a global optimizer hook reads the norm of the
    gradients the optimizer actually steps with."""
    seen = []

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        extra = {} if clip is None else {"clip_grad_norm": clip}
        result = run(workspace, f"clip_{clip}", reduce_loss="sum", max_train_steps=3, **extra)
    finally:
        handle.remove()
    assert len(seen) == 3
    info = json.loads((result.output_dir / FINISHED_MARKER).read_text())
    assert info["gradient_clipping"] == expect
    if expect:
        logged = [json.loads(line)["grad_norm"] for line in (result.output_dir / TRAIN_LOG).read_text().splitlines()]
        assert len(logged) == 3 and min(logged) > 10  # the norm before clipping
        assert max(seen) <= 1.0 + 1e-5 and min(seen) > 0.99  # what the optimizer stepped with
    else:
        assert min(seen) > 10  # off: the raw gradients


def test_published_tokenizer_handling_grows_to_a_multiple_of_8_and_mft_starts_from_it(workspace, tmp_path):
    """use_slow_tokenizer + add_pad_token, as the published configs set them, on a LLaMA-2-style
    SentencePiece tokenizer without pad (340 tokens): FFT adds <pad> (id 340) and grows the embeddings and
    lm_head to 344 rows; MFT starts from that checkpoint and `mft apply` bakes it, the 344 rows kept."""
    from transformers import AutoTokenizer

    from mft.tiny import save_sentencepiece_tokenizer, tiny_model

    base = tmp_path / "llama_sp"
    texts = [line for line in workspace["data"].read_text().splitlines()] + ["<|user|>\n<|assistant|>\n"] * 20
    save_sentencepiece_tokenizer(texts, base, vocab_size=340)
    tiny_model("llama", vocab_size=340).save_pretrained(base)
    common = {"use_slow_tokenizer": True, "add_pad_token": True, "max_train_steps": 2}
    fft = run(workspace, "fft_padded", model_name_or_path=str(base), **common).output_dir
    model = AutoModelForCausalLM.from_pretrained(fft)
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == 344
    assert model.config.vocab_size == 344
    tok = AutoTokenizer.from_pretrained(fft)
    assert (len(tok), tok.pad_token, tok.pad_token_id, tok.eos_token_id) == (341, "<pad>", 340, 2)
    assert model.config.pad_token_id == 340  # config.json names the added <pad> (it once said null)
    mft = run(workspace, "mft_from_padded", model_name_or_path=str(fft), subnet_mode="both", masked_layers="1",
              **common).output_dir
    assert main(["apply", "--mask_model_name_or_path", str(mft), "--output_dir", str(mft / "mask_applied"),
                 "--quiet"]) == 0
    applied = AutoModelForCausalLM.from_pretrained(mft / "mask_applied")
    assert applied.get_input_embeddings().weight.shape[0] == 344
    assert torch.equal(applied.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_checkpoint_due_for_steps_epochs_and_epoch_fractions():
    from mft.train.loop import checkpoint_due

    # 14 batches, accumulation 2: 7 steps per epoch; epoch/3 saves after steps ceil(7/3)=3, ceil(14/3)=5 and 7
    due = [s for s in range(1, 8) if checkpoint_due("epoch/3", s, 2 * s, 14, 2)]
    assert due == [3, 5, 7]
    assert [s for s in range(1, 8) if checkpoint_due("epoch", s, 2 * s, 14, 2)] == [7]
    assert [s for s in range(1, 8) if checkpoint_due(3, s, 2 * s, 14, 2)] == [3, 6]
    assert not any(checkpoint_due(None, s, 2 * s, 14, 2) for s in range(1, 8))
    # 13 batches: the last step has one batch; it still ends the epoch
    assert [s for s in range(1, 8) if checkpoint_due("epoch/2", s, min(2 * s, 13), 13, 2)] == [4, 7]


def test_epoch_thirds_write_loadable_snapshots_and_mft_starts_from_one(workspace, capsys):
    fft = run(workspace, "fft_thirds", num_train_epochs=1, checkpointing_steps="epoch/3", save_model_snapshots=True,
              keep_last_n_checkpoints=1, learning_rate=1e-3).output_dir
    snapshots = fft / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == ["step_2", "step_4", "step_6"]  # 6 steps per epoch
    assert [p.name for p in (fft / CHECKPOINTS).iterdir()] == ["step_6"]  # pruned; snapshots never are
    models = {n: AutoModelForCausalLM.from_pretrained(snapshots / f"step_{n}") for n in (2, 4, 6)}
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(models[2].state_dict()[key], models[4].state_dict()[key])
    final = AutoModelForCausalLM.from_pretrained(fft).state_dict()
    assert all(torch.equal(final[k], v) for k, v in models[6].state_dict().items())
    assert (snapshots / "step_2" / "tokenizer.json").exists()
    assert json.loads((snapshots / "step_4" / "snapshot.json").read_text())["steps"] == 4
    capsys.readouterr()
    assert main(["checkpoints", str(fft), "--json"]) == 0
    listed = [(r["kind"], r["step"], r["epoch"]) for r in json.loads(capsys.readouterr().out)]
    assert listed == [("snapshot", 2, 0), ("snapshot", 4, 0), ("checkpoint", 6, 0), ("snapshot", 6, 0)]

    # MFT from the middle snapshot, with mask snapshots of its own
    mft = run(workspace, "mft_from_snapshot", model_name_or_path=str(snapshots / "step_4"), subnet_mode="both",
              masked_layers="1", num_train_epochs=1, checkpointing_steps="epoch/3", save_model_snapshots=True,
              learning_rate=0.05).output_dir
    info = json.loads((mft / "mft_run.json").read_text())
    assert info["base_model"] == str((snapshots / "step_4").resolve())
    mask_snapshots = mft / "snapshots"
    assert sorted(p.name for p in mask_snapshots.iterdir()) == ["step_2", "step_4", "step_6"]
    final_masks = read_masks(mft / "masks.safetensors").masks
    last = read_masks(mask_snapshots / "step_6" / "masks.safetensors").masks
    assert set(last) == set(final_masks) and all(torch.equal(last[n], final_masks[n]) for n in last)
    assert not list(mask_snapshots.glob("step_2/*model*.safetensors"))  # the mask file, no weights
    assert main(["apply", "--mask_model_name_or_path", str(mask_snapshots / "step_2"), "--output_dir",
                 str(mft / "applied_2"), "--quiet"]) == 0
    # the base snapshot's snapshot.json ({"method": "fft", "steps": 4}) would misdescribe the applied model
    assert (snapshots / "step_4" / "snapshot.json").exists() and not (mft / "applied_2" / "snapshot.json").exists()
    applied = load_file(str(mft / "applied_2" / "model.safetensors"))
    early = read_masks(mask_snapshots / "step_2" / "masks.safetensors").masks
    base4 = models[4].state_dict()
    for name, mask in early.items():
        assert torch.equal(applied[f"{name}.weight"], base4[f"{name}.weight"] * mask)


def test_epoch_fraction_finer_than_the_steps_of_an_epoch_is_logged(workspace, caplog):
    # 48 rows / (4 x 2) = 6 optimizer steps per epoch; epoch/7 cannot be honoured, so every step is one
    with caplog.at_level(logging.WARNING, logger="mft.train.loop"):
        run(workspace, "fft_sevenths", max_train_steps=1, checkpointing_steps="epoch/7")
    assert "checkpointing_steps epoch/7: an epoch has only 6 optimizer steps, so a checkpoint follows every step" \
        in caplog.text


def test_lora_snapshots_merge_a_copy_and_training_goes_on(workspace):
    out = run(workspace, "lora_halves", use_lora=True, lora_rank=4, num_train_epochs=1, learning_rate=1e-2,
              checkpointing_steps="epoch/2", save_model_snapshots=True).output_dir
    snapshots = out / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == ["step_3", "step_6"]
    half = AutoModelForCausalLM.from_pretrained(snapshots / "step_3").state_dict()
    end = AutoModelForCausalLM.from_pretrained(snapshots / "step_6").state_dict()
    final = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert not any("lora" in k for k in half)  # merged, plain model folders
    assert all(torch.equal(final[k], end[k]) for k in final)
    # the live model was not merged at step 3: the adapters went on training and the final merge differs
    key = "model.layers.0.self_attn.q_proj.weight"
    before = base_weights(workspace)[key]
    assert not torch.equal(half[key], before) and not torch.equal(half[key], end[key])
    assert len(losses(out)) == 6


def test_bf16_mixed_precision_on_a_cpu_without_bf16_says_so_and_records_float32(workspace, monkeypatch, caplog):
    """ACCELERATE_MIXED_PRECISION=bf16 on a CPU without native bf16 (patched: the test CPU has one kind) computes
    in float32: the mft.precision line is emitted at INFO by train() itself (no caplog level set here), and
    run_complete.json and mft_run.json record compute_dtype float32."""
    import logging

    from mft import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setattr(logging.getLogger("mft.precision"), "level", logging.NOTSET)
    result = run(workspace, "mft-bf16-cpu", subnet_mode="both", masked_layers="1", num_train_epochs=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "mft.precision"]
    assert lines == [f"{workspace['base']}: computing in float32 instead of bfloat16: this CPU has no native bf16 "
                     "matrix instructions (none of the cpuinfo flags amx_bf16/avx512_bf16/bf16)"]
    out = result.output_dir
    assert json.loads((out / FINISHED_MARKER).read_text())["compute_dtype"] == "float32"
    assert json.loads((out / "mft_run.json").read_text())["compute_dtype"] == "float32"
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
