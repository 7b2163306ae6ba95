"""Multi-process training on CPU through `accelerate launch`: DeepSpeed ZeRO-2 and ZeRO-3 (gloo), DDP, and the
original's launch line. Real DeepSpeed, real processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from mft.masking.files import read_masks
from mft.masking.rule import local_mask
from mft.run_dir import FINISHED_MARKER
from mft.train.loop import latest_checkpoint

from tests.conftest import ROOT
from tests.train.test_loop import write_chat_data

pytestmark = pytest.mark.slow

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(args: list[str], cwd: Path, env=None, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(["accelerate", "launch", *args], cwd=cwd, env=env or ENV, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def common_overrides(base: Path, data: Path, out: Path, cache: Path) -> list[str]:
    return [f"--model_name_or_path={base}", f"--train_file={data}", f"--output_dir={out}", "--max_seq_length=64",
            "--per_device_train_batch_size=2", "--gradient_accumulation_steps=2", "--num_train_epochs=2",
            "--subnet_mode=both", "--masked_layers=1 2", "--learning_rate=0.05", "--report_to=[none]",
            f"--dataset_local_cache_dir={cache}", "--checkpointing_steps=epoch"]


def check_mft_run(out: Path, processes: int) -> dict:
    """The run finished with identical masks on every rank and a valid mask file; returns the masks."""
    assert (out / FINISHED_MARKER).exists()
    info = json.loads((out / "mft_run.json").read_text())
    digests = info["mask_digest_per_rank"]
    assert len(digests) == processes and len(set(digests)) == 1
    masks = read_masks(out / "masks.safetensors")
    assert len(masks.masks) == 14 and masks.fingerprint == info["fingerprint"]
    for name, mask in masks.masks.items():
        assert int((~mask).sum()) == int((1 - 0.9) * mask.numel()), name
    return masks.masks


@pytest.mark.parametrize("ds_config, precision", [("stage3_no_offloading_accelerate.conf", "bf16"),
                                                   ("stage2_accelerate.conf", "no")], ids=["zero3-bf16", "zero2-fp32"])
def test_deepspeed_two_processes(tmp_path, saved_model, ds_config, precision):
    base, data = saved_model("llama"), write_chat_data(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    launch(["--use_deepspeed", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", precision,
            "--deepspeed_config_file", str(ROOT / "configs/ds_configs" / ds_config),
            str(ROOT / "scripts/finetune.py"), *common_overrides(base, data, out, tmp_path / "cache")], cwd=tmp_path)
    masks = check_mft_run(out, processes=2)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert 0 <= log[-1]["mask_changed"] <= 1 and set(log[-1]["kept_fraction"]) == {"1", "2"}
    assert all(v == pytest.approx(0.9, abs=0.002) for v in log[-1]["kept_fraction"].values())

    # The masks come from the fp32 master scores (gathered from their partitions), not from the bf16 copies
    # the model computes with under bf16.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = latest_checkpoint(str(out))
    assert checkpoint.name == "step_12"  # 48 rows / (2 processes x 2) / 2 accumulation = 6 steps, 2 epochs
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
    assert set(fp32) == {f"{name}.scores" for name in masks}  # frozen weights are not in the checkpoint
    for name, mask in masks.items():
        scores = fp32[f"{name}.scores"]
        assert scores.dtype == torch.float32
        assert torch.equal(mask, local_mask(scores, 0.9)), name


def test_ddp_two_processes(tmp_path, saved_model):
    base, data = saved_model("llama"), write_chat_data(tmp_path / "data.jsonl")
    out = tmp_path / "ddp"
    launch(["--multi_gpu", "--num_processes", "2", str(ROOT / "scripts/finetune.py"),
            *common_overrides(base, data, out, tmp_path / "cache")], cwd=tmp_path,
           env={**ENV, "ACCELERATE_USE_CPU": "1"})
    check_mft_run(out, processes=2)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))


def test_original_launch_line_runs_as_written(tmp_path, tokenizer):
    """The README's/original's line, verbatim, in a folder laid out like the original repository, with a tiny
    8-layer model at output/fft_7b_math. Appended after it: local data instead of the Hub mix, a short run, and
    a local tokenization cache; wandb runs offline without an API key."""
    from mft.tiny import tiny_model

    for name in ("configs", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=8)
    model.save_pretrained(tmp_path / "output/fft_7b_math")
    tokenizer.save_pretrained(tmp_path / "output/fft_7b_math")
    write_chat_data(tmp_path / "math.jsonl", n=64)
    line = ("--mixed_precision bf16 --num_machines 1 --num_processes 8 --use_deepspeed "
            "--deepspeed_config_file configs/ds_configs/stage3_no_offloading_accelerate.conf scripts/finetune.py "
            "configs/train_configs/llama2_7b_math_local_masktune.yaml --model_name_or_path=output/fft_7b_math "
            "--output_dir=output/masktune_7b_local_4-7-layers_0.9_math").split() + ['--masked_layers=4 5 6 7']
    local = ["--dataset_mixer=null", "--train_file=math.jsonl", "--max_train_steps=2", "--max_seq_length=64",
             "--report_to=[wandb]", "--use_flash_attn=false", f"--dataset_local_cache_dir={tmp_path / 'cache'}"]
    launch(line + local, cwd=tmp_path, timeout=900)
    out = tmp_path / "output/masktune_7b_local_4-7-layers_0.9_math"
    info = json.loads((out / "mft_run.json").read_text())
    assert info["steps"] == 2 and len(info["mask_digest_per_rank"]) == 8 and len(set(info["mask_digest_per_rank"])) == 1
    masks = read_masks(out / "masks.safetensors")
    assert {n.split(".")[2] for n in masks.masks} == {"4", "5", "6", "7"} and len(masks.masks) == 28
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb logged offline"
    # ... and the original's apply step on that run folder
    result = subprocess.run(["python", "scripts/apply_masks.py", "--base_model_name_or_path", "output/fft_7b_math",
                             "--mask_model_name_or_path", str(out), "--output_dir", str(out / "mask_applied"),
                             "--quiet"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / "mask_applied" / "model.safetensors").exists() and (out / "mask_applied" / "tokenizer.json").exists()


def test_mft_layout_ddp_with_sharded_optimizer_state(tmp_path, saved_model):
    """Issue 12's layout: plain DDP (frozen weights replicated), the scores' AdamW state sharded over the
    two processes. The scores it trains are bit-identical to DDP with a replicated optimizer, and the masks
    equal those of a single-process run with the same global batch."""
    base, data = saved_model("llama"), write_chat_data(tmp_path / "data.jsonl")
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    runs = {}
    for name, processes, extra in (("sharded", 2, []), ("replicated", 2, ["--shard_optimizer_state=false"]),
                                   ("single", 1, ["--gradient_accumulation_steps=4"])):
        out = tmp_path / name
        result = launch([*(["--multi_gpu"] if processes > 1 else []), "--num_processes", str(processes),
                         str(ROOT / "scripts/finetune.py"), *common_overrides(base, data, out, tmp_path / "cache"),
                         *extra], cwd=tmp_path, env=env)
        sharded_log = "scores' AdamW state sharded over 2 processes" in result.stdout + result.stderr
        assert sharded_log == (name == "sharded"), name
        runs[name] = (out, check_mft_run(out, processes=processes))
    from safetensors.torch import load_file

    scores = {name: load_file(str(latest_checkpoint(str(out)) / "model.safetensors")) for name, (out, _) in runs.items()}
    assert latest_checkpoint(str(runs["sharded"][0])).name == "step_12"
    assert set(scores["sharded"]) == {f"{n}.scores" for n in runs["sharded"][1]}  # trainables only
    for key, value in scores["sharded"].items():
        assert torch.equal(value, scores["replicated"][key]), key
    for name, mask in runs["sharded"][1].items():
        assert torch.equal(mask, runs["replicated"][1][name]), name
        assert torch.equal(mask, runs["single"][1][name]), name
        assert torch.equal(mask, local_mask(scores["sharded"][f"{name}.scores"], 0.9)), name
    # the checkpoint holds the whole optimizer state (rank 0 consolidated both shards): one entry per score tensor
    state = torch.load(latest_checkpoint(str(runs["sharded"][0])) / "optimizer.bin", weights_only=False)
    assert len(state["state"]) == len(runs["sharded"][1])
