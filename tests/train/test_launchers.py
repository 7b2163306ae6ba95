"""Cluster launchers (DRY_RUN=1 prints the commands), DeepSpeed configs, setup_train_env.sh."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from mft.train.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TRAINING = ROOT / "bash" / "training"
MODELS = {"llama2-7b": "llama2_7b", "llama3.1-8b": "llama3.1_8b"}
DOMAINS = {"math": [4, 5, 6, 7], "coding": [20, 21, 22, 23], "if": [0, 1, 2, 3]}
SECRETS = {"HF_TOKEN": "hf_do_not_print_me_1234567890", "WANDB_API_KEY": "wandb_do_not_print_me_0987654321"}
CLUSTER_VARS = ("NUM_GPUS", "NUM_MACHINES", "MACHINE_RANK", "MAIN_PROCESS_IP", "MAIN_PROCESS_PORT", "OUTPUT_DIR",
                "OUTPUT_ROOT", "FFT_DIR", "LAYERS", "KEEP_RATIO", "DS_CONFIG", "REPORT_TO", "BASE_MODEL", "WINDOWS",
                "GLOBAL_BATCH_SIZE", "PER_DEVICE_BATCH_SIZE", "MODEL", "DOMAIN", "SEED")


def launch(script: str, *args: str, dry: bool = True, cwd="/", **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
    full.update(SECRETS)
    if dry:
        full["DRY_RUN"] = "1"
    full.update(env)
    return subprocess.run(["bash", str(TRAINING / script), *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=60)


def commands(result: subprocess.CompletedProcess) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    for secret in SECRETS.values():
        assert secret not in result.stdout and secret not in result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def option(cmd: list[str], name: str) -> str:
    """Value of `--name value` or `--name=value` in cmd."""
    for i, tok in enumerate(cmd):
        if tok == name:
            return cmd[i + 1]
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    raise AssertionError(f"{name} not in {cmd}")


def finetune_args(cmd: list[str]) -> tuple[str, list[str]]:
    i = cmd.index(f"{ROOT}/scripts/finetune.py")  # absolute: the printed command runs from any folder
    return cmd[i + 1], cmd[i + 2:]


def test_every_launcher_exists_and_parses():
    scripts = sorted(p.name for p in TRAINING.glob("*.sh"))
    expected = {f"run_{kind}_{m}_{d}.sh" for kind in ("fft", "local_masktune") for m in MODELS for d in DOMAINS}
    assert expected | {"common.sh", "sweep_masktune_layers.sh", "run_baselines.sh"} == set(scripts)
    for path in [*(TRAINING / s for s in scripts), ROOT / "setup_train_env.sh"]:
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, path
        assert os.access(path, os.X_OK), f"{path} is not executable"
    for name in ("common.sh", "../../setup_train_env.sh"):
        assert "set -euo pipefail" in (TRAINING / name).read_text()
    # the per-run scripts and the sweep are thin: they source common.sh, where all the logic lives
    for name in expected | {"sweep_masktune_layers.sh", "run_baselines.sh"}:
        assert 'source "$(dirname "${BASH_SOURCE[0]}")/common.sh"' in (TRAINING / name).read_text()
    assert all(len((TRAINING / s).read_text().splitlines()) <= 5 for s in expected)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("domain", DOMAINS)
def test_fft_launcher_on_one_node(model, domain):
    [cmd] = commands(launch(f"run_fft_{model}_{domain}.sh", NUM_GPUS="8"))
    assert cmd[:3] == ["accelerate", "launch", "--mixed_precision"] and option(cmd, "--mixed_precision") == "bf16"
    assert (option(cmd, "--num_machines"), option(cmd, "--num_processes"), option(cmd, "--machine_rank")) == \
        ("1", "8", "0")
    assert "--use_deepspeed" in cmd
    assert option(cmd, "--deepspeed_config_file") == f"{ROOT}/configs/ds_configs/stage3_no_offloading_accelerate.conf"
    assert "--main_process_ip" not in cmd and "--deepspeed_multinode_launcher" not in cmd
    config, overrides = finetune_args(cmd)
    assert config == f"{ROOT}/configs/train_configs/{MODELS[model]}_{domain}_fft.yaml"
    assert option(cmd, "--output_dir") == f"output/fft_{model}_{domain}"
    assert (option(cmd, "--per_device_train_batch_size"), option(cmd, "--gradient_accumulation_steps")) == ("1", "16")
    # the printed overrides are valid settings of that config, and the global batch is the published 128
    cfg = load_config(str(ROOT / config), overrides)
    assert cfg.resolved_method == "fft"
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * 8 == 128


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("domain", DOMAINS)
def test_masktune_launcher_trains_then_applies(model, domain):
    train, apply = commands(launch(f"run_local_masktune_{model}_{domain}.sh", "--seed=7", NUM_GPUS="8"))
    layers = DOMAINS[domain]
    run = f"output/masktune_{model}_local_{layers[0]}-{layers[-1]}-layers_0.9_{domain}"
    fft = f"output/fft_{model}_{domain}"
    config, overrides = finetune_args(train)
    assert config == f"{ROOT}/configs/train_configs/{MODELS[model]}_{domain}_local_masktune.yaml"
    assert option(train, "--output_dir") == run and option(train, "--model_name_or_path") == fft
    assert option(train, "--masked_layers") == " ".join(map(str, layers))
    assert overrides[-1] == "--seed=7"  # extra arguments reach finetune.py last, so they win
    cfg = load_config(str(ROOT / config), overrides)
    assert (cfg.resolved_method, cfg.masked_layers, cfg.keep_ratio_attn, cfg.seed) == ("mft", layers, 0.9, 7)
    assert apply == ["python", f"{ROOT}/scripts/apply_masks.py", "--base_model_name_or_path", fft,
                     "--mask_model_name_or_path", run, "--output_dir", f"{run}/mask_applied"]
    # MFT's layout by default: DDP, no DeepSpeed (issue 12)
    assert "--multi_gpu" in train and "--use_deepspeed" not in train


def test_masktune_layout_is_overridable():
    stage3 = f"{ROOT}/configs/ds_configs/stage3_no_offloading_accelerate.conf"
    [train, _] = commands(launch("run_local_masktune_llama2-7b_math.sh", NUM_GPUS="8", DS_CONFIG=stage3))
    assert option(train, "--deepspeed_config_file") == stage3 and "--multi_gpu" not in train
    [train, _] = commands(launch("run_local_masktune_llama2-7b_math.sh", NUM_GPUS="1"))
    assert "--multi_gpu" not in train and "--use_deepspeed" not in train  # one process: plain
    [fft] = commands(launch("run_fft_llama2-7b_math.sh", NUM_GPUS="8"))
    assert option(fft, "--deepspeed_config_file") == stage3  # FFT keeps ZeRO-3


@pytest.mark.parametrize("gpus, accumulation", [("1", "128"), ("2", "64"), ("4", "32"), ("16", "8")])
def test_accumulation_keeps_128_sequences(gpus, accumulation):
    [cmd] = commands(launch("run_fft_llama2-7b_math.sh", NUM_GPUS=gpus))
    assert (option(cmd, "--num_processes"), option(cmd, "--gradient_accumulation_steps")) == (gpus, accumulation)


def test_multi_node_and_other_machine_ranks():
    env = dict(NUM_GPUS="4", NUM_MACHINES="2", MACHINE_RANK="1", MAIN_PROCESS_IP="10.1.2.3", MAIN_PROCESS_PORT="29555",
               DS_CONFIG=f"{ROOT}/configs/ds_configs/stage3_no_offloading_accelerate.conf")
    result = launch("run_local_masktune_llama3.1-8b_coding.sh", **env)
    [cmd] = commands(result)  # rank 1 trains, but does not apply
    assert (option(cmd, "--num_machines"), option(cmd, "--num_processes"), option(cmd, "--machine_rank")) == \
        ("2", "8", "1")
    assert (option(cmd, "--main_process_ip"), option(cmd, "--main_process_port")) == ("10.1.2.3", "29555")
    assert option(cmd, "--deepspeed_multinode_launcher") == "standard"
    assert option(cmd, "--gradient_accumulation_steps") == "16"
    assert "machine rank 0 writes" in result.stderr
    train, apply = commands(launch("run_local_masktune_llama3.1-8b_coding.sh", **{**env, "MACHINE_RANK": "0"}))
    assert apply[1] == f"{ROOT}/scripts/apply_masks.py"


def test_environment_settings():
    train, apply = commands(launch("run_local_masktune_llama2-7b_math.sh", NUM_GPUS="1", LAYERS="8-11",
                                   KEEP_RATIO="0.8", FFT_DIR="/ckpt/fft", OUTPUT_ROOT="/runs", DS_CONFIG="none",
                                   REPORT_TO="wandb", PYTHON="python3.11"))
    assert "--use_deepspeed" not in train and "--deepspeed_config_file" not in train
    assert option(train, "--masked_layers") == "8 9 10 11"
    assert (option(train, "--sparsity_attn"), option(train, "--sparsity_mlp")) == ("0.8", "0.8")
    assert option(train, "--output_dir") == "/runs/masktune_llama2-7b_local_8-11-layers_0.8_math"
    assert option(train, "--report_to") == "wandb" and option(train, "--model_name_or_path") == "/ckpt/fft"
    assert apply[:2] == ["python3.11", f"{ROOT}/scripts/apply_masks.py"]
    assert option(apply, "--base_model_name_or_path") == "/ckpt/fft"
    [fft] = commands(launch("run_fft_llama3.1-8b_math.sh", NUM_GPUS="2", BASE_MODEL="/models/Llama-3.1-8B",
                            OUTPUT_DIR="/runs/x", DS_CONFIG="configs/ds_configs/stage2_accelerate.conf", cwd=ROOT))
    assert option(fft, "--model_name_or_path") == "/models/Llama-3.1-8B" and option(fft, "--output_dir") == "/runs/x"
    assert option(fft, "--deepspeed_config_file") == "configs/ds_configs/stage2_accelerate.conf"


def test_gpus_counted_with_nvidia_smi(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: a)'\necho 'GPU 1: NVIDIA H100 (UUID: b)'\n")
    fake.chmod(0o755)
    [cmd] = commands(launch("run_fft_llama2-7b_if.sh", PATH=f"{tmp_path}:{os.environ['PATH']}"))
    assert (option(cmd, "--num_processes"), option(cmd, "--gradient_accumulation_steps")) == ("2", "64")


@pytest.mark.parametrize("env, message", [
    (dict(NUM_GPUS="3"), "GLOBAL_BATCH_SIZE=128 is not a multiple of 3 processes x 1 per device"),
    (dict(NUM_GPUS="8", NUM_MACHINES="2", DRY_RUN="0"), "NUM_MACHINES=2 needs MAIN_PROCESS_IP"),
    (dict(NUM_GPUS="8", NUM_MACHINES="2", MACHINE_RANK="2", MAIN_PROCESS_IP="h"), "MACHINE_RANK=2 but NUM_MACHINES=2"),
    (dict(NUM_GPUS="eight"), "NUM_GPUS must be a whole number, got 'eight'"),
    (dict(NUM_GPUS="8", LAYERS="four"), "LAYERS='four': expected indices"),
])
def test_bad_environment_is_refused(env, message):
    result = launch("run_local_masktune_llama2-7b_math.sh", **env)
    assert result.returncode != 0 and message in result.stderr and result.stdout == ""


def test_no_gpu_count_without_nvidia_smi(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    result = launch("run_fft_llama2-7b_math.sh", dry=False)
    assert result.returncode == 1 and "NUM_GPUS is not set and nvidia-smi is not available" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("script", sorted(p.name for p in TRAINING.glob("*.sh") if p.name != "common.sh"))
def test_dry_run_needs_no_cluster_variable(script):
    """No NUM_GPUS, no nvidia-smi, no machine variables: every launcher prints its commands (8 GPUs shown).
    The baselines launcher runs no training (two `apply_masks.py` lines on one process): it needs none either."""
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    result = launch(script)
    cmds = commands(result)
    if script == "run_baselines.sh":
        assert [c[1] for c in cmds] == [f"{ROOT}/scripts/apply_masks.py"] * 2
        assert "--random_masks" in cmds[0] and "--use_l1_mask" in cmds[1]
        return
    launches = [c for c in cmds if "launch" in c]
    assert launches and all(option(c, "--num_processes") == "8" for c in launches)
    assert all(option(c, "--gradient_accumulation_steps") == "16" for c in launches)
    assert "showing the commands for 8 GPUs per machine" in result.stderr
    two = commands(launch(script, NUM_MACHINES="2"))
    assert all(option(c, "--main_process_ip") == "$MAIN_PROCESS_IP" and option(c, "--num_processes") == "16"
               for c in two if "launch" in c)


def test_masktune_without_fft_model_stops_before_launching(tmp_path):
    result = launch("run_local_masktune_llama2-7b_math.sh", dry=False, NUM_GPUS="1", FFT_DIR=str(tmp_path / "none"),
                    ACCELERATE="/bin/false")
    assert result.returncode == 1
    assert f"FFT model not found: {tmp_path / 'none'} (run bash/training/run_fft_llama2-7b_math.sh first" in \
        result.stderr


def test_paths_are_read_from_the_callers_folder(tmp_path):
    """A relative FFT_DIR / OUTPUT_ROOT / BASE_MODEL / DS_CONFIG names a folder under the caller's folder (the
    launchers never cd), and the printed commands, run from that folder, find the repo's scripts and configs."""
    (tmp_path / "output" / "fft_7b").mkdir(parents=True)
    (tmp_path / "ds.json").write_text("{}")
    real = launch("run_local_masktune_llama2-7b_math.sh", dry=False, cwd=tmp_path, NUM_GPUS="1", ACCELERATE="echo",
                  PYTHON="echo", FFT_DIR="output/fft_7b", OUTPUT_ROOT="runs")
    assert real.returncode == 0, real.stderr  # found output/fft_7b in tmp_path, not in the repo
    train, apply = commands(real)
    run = "runs/masktune_llama2-7b_local_4-7-layers_0.9_math"
    assert option(train, "--model_name_or_path") == "output/fft_7b" and option(train, "--output_dir") == run
    assert apply[0] == f"{ROOT}/scripts/apply_masks.py" and option(apply, "--output_dir") == f"{run}/mask_applied"
    [fft] = commands(launch("run_fft_llama2-7b_math.sh", cwd=tmp_path, NUM_GPUS="8", BASE_MODEL="models/base",
                            DS_CONFIG="ds.json", OUTPUT_DIR="out/fft"))
    assert option(fft, "--deepspeed_config_file") == "ds.json"  # found in tmp_path (a missing one is refused)
    assert (option(fft, "--model_name_or_path"), option(fft, "--output_dir")) == ("models/base", "out/fft")
    for path in (fft[fft.index(f"{ROOT}/scripts/finetune.py") + 1], f"{ROOT}/scripts/finetune.py"):
        assert Path(path).is_file()
    assert "never change folder" in launch("run_fft_llama2-7b_math.sh", "--help").stdout


def test_sweep_runs_each_window():
    cmds = commands(launch("sweep_masktune_layers.sh", NUM_GPUS="8", WINDOWS="0-3 28-31", MODEL="llama3.1-8b",
                           DOMAIN="if"))
    assert [c[0] for c in cmds] == ["accelerate", "python", "accelerate", "python"]
    assert [option(c, "--masked_layers") for c in cmds[::2]] == ["0 1 2 3", "28 29 30 31"]
    assert [option(c, "--output_dir") for c in cmds[1::2]] == [
        "output/masktune_llama3.1-8b_local_0-3-layers_0.9_if/mask_applied",
        "output/masktune_llama3.1-8b_local_28-31-layers_0.9_if/mask_applied"]
    default = commands(launch("sweep_masktune_layers.sh", NUM_GPUS="8"))
    assert len(default) == 16 and option(default[-2], "--masked_layers") == "28 29 30 31"
    refused = launch("sweep_masktune_layers.sh", NUM_GPUS="8", OUTPUT_DIR="/x")
    assert refused.returncode == 1 and "OUTPUT_DIR would be shared by every window" in refused.stderr


def test_help_and_no_secrets_in_files():
    result = launch("run_fft_llama2-7b_math.sh", "--help")
    assert result.returncode == 0 and "NUM_GPUS" in result.stdout and "MAIN_PROCESS_IP" in result.stdout
    assert "HF_TOKEN, WANDB_API_KEY" in result.stdout
    for path in [*TRAINING.glob("*.sh"), ROOT / "setup_train_env.sh", *(ROOT / "configs").rglob("*.*")]:
        text = path.read_text()
        assert not re.search(r"(HF_TOKEN|WANDB_API_KEY|HUGGING_FACE_HUB_TOKEN)\s*=", text), path
        assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", text), path


# --- DeepSpeed configs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, stage, offload", [("stage2_accelerate", 2, "none"),
                                                  ("stage3_no_offloading_accelerate", 3, "none"),
                                                  ("stage3_offloading_accelerate", 3, "cpu")])
def test_deepspeed_configs_are_accepted_by_accelerate(name, stage, offload):
    from accelerate.utils import DeepSpeedPlugin

    path = ROOT / "configs" / "ds_configs" / f"{name}.conf"
    raw = json.loads(path.read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert raw[key] == "auto", key
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    plugin.set_mixed_precision("bf16")  # what accelerate launch --mixed_precision bf16 does
    assert plugin.zero_stage == stage and plugin.deepspeed_config["bf16"]["enabled"] is True
    assert (plugin.offload_param_device, plugin.offload_optimizer_device) == (offload, offload)
    if stage == 3:
        assert plugin.zero3_save_16bit_model is True
        assert raw["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


# --- setup_train_env.sh --------------------------------------------------------------------------------------
def test_setup_train_env_help():
    result = subprocess.run(["bash", str(ROOT / "setup_train_env.sh"), "--help"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0
    for flag in ("--prefix", "--conda", "--cuda", "--torch", "--flash-attn", "DS_BUILD_OPS=0"):
        assert flag in result.stdout
    bad = subprocess.run(["bash", str(ROOT / "setup_train_env.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr


def test_baselines_launcher_masks_the_fft_checkpoint():
    random_cmd, l1_cmd = commands(launch("run_baselines.sh", "--quiet", DOMAIN="coding", KEEP_RATIO="0.8"))
    for cmd, flag, kind in ((random_cmd, "--random_masks", "random"), (l1_cmd, "--use_l1_mask", "l1")):
        assert cmd[:2] == ["python", f"{ROOT}/scripts/apply_masks.py"] and flag in cmd and cmd[-1] == "--quiet"
        assert option(cmd, "--base_model_name_or_path") == "output/fft_llama2-7b_coding"  # the FFT checkpoint
        assert option(cmd, "--masked_layers") == "20 21 22 23" and option(cmd, "--subnet_mode") == "both"
        assert option(cmd, "--sparsity_attn") == option(cmd, "--sparsity_mlp") == "0.8"
        assert option(cmd, "--output_dir") == f"output/{kind}_llama2-7b_20-23-layers_0.8_coding"
    assert option(random_cmd, "--seed") == "42"
    [cmd, _] = commands(launch("run_baselines.sh", FFT_DIR="/ckpt/fft", LAYERS="4-5", SEED="3", MODEL="llama3.1-8b"))
    assert (option(cmd, "--base_model_name_or_path"), option(cmd, "--masked_layers"), option(cmd, "--seed")) == \
        ("/ckpt/fft", "4 5", "3")
    assert option(cmd, "--output_dir") == "output/random_llama3.1-8b_4-5-layers_0.9_math"
    missing = launch("run_baselines.sh", dry=False, OUTPUT_ROOT="/nonexistent_root")
    assert missing.returncode == 1 and "FFT model not found: /nonexistent_root/fft_llama2-7b_math" in missing.stderr
