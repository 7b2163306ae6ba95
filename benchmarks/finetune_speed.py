"""`scripts/finetune.py` MFT tokens/s: plain vs DeepSpeed ZeRO-2 vs ZeRO-3 vs the MFT layout (issue 12).

    python benchmarks/finetune_speed.py           # on a CUDA machine (gpu_check.sh runs this): ~1B Llama
    python benchmarks/finetune_speed.py --tiny    # the same code path on the CPU with a tiny model

Builds a Llama-shaped model in place (GPU: 16 x 2048, MLP 5632, bf16; its vocabulary is that of a BPE
tokenizer trained here, no downloads), writes chat rows long enough to fill `--seq` tokens, and runs
`accelerate launch scripts/finetune.py` once per variant: masked layers 4-7 (tiny: 1-2), keep 0.9,
`--steps` optimizer steps of 4 micro-batches of 1 x seq, logging every step. tokens/s = the median of
`train_log.jsonl`'s per-step `tokens_per_s` after the first step (warm-up).

Variants: `plain` (one process, no DeepSpeed: what the MFT launchers run on one GPU), `zero2`/`zero3`
(configs/ds_configs/stage2_accelerate.conf / stage3_no_offloading_accelerate.conf), `layout` (DDP over
every visible GPU with the scores' AdamW state sharded, `shard_optimizer_state`; per-GPU tokens/s; with one
GPU it is the plain run's code path, and the ratio is reported as information only). Targets: ZeRO-2 >= 0.8x
plain, ZeRO-3 >= 0.5x, layout >= 0.95x. Exit 1 on a miss. On the CPU (--tiny) the DeepSpeed and layout
runs use 2 processes over gloo: a smoke test of the path, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import common
from common import verdict

ROOT = Path(__file__).resolve().parents[1]
DS = {"zero2": "stage2_accelerate.conf", "zero3": "stage3_no_offloading_accelerate.conf"}
TARGETS = {"zero2": 0.8, "zero3": 0.5, "layout": 0.95}


def write_data(path: Path, rows: int, words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(500)]
    with open(path, "w") as f:
        for _ in range(rows):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            f.write(json.dumps({"messages": [{"role": "user", "content": "Continue."},
                                             {"role": "assistant", "content": text}]}) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--variants", default=None, help="default: plain,zero2,zero3,layout (tiny: plain,zero2,layout)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        sys.exit("finetune_speed: no CUDA device; use --tiny for the CPU smoke test")
    variants = (args.variants or ("plain,zero2,layout" if args.tiny else "plain,zero2,zero3,layout")).split(",")
    steps = args.steps or (3 if args.tiny else 6)
    seq = args.seq or (64 if args.tiny else 1024)
    gpus = torch.cuda.device_count() if cuda else 2
    from mft.tiny import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="mft-finetune-speed-"))
    write_data(work / "data.jsonl", rows=64 * max(gpus, 1), words=seq)
    tokenizer = train_tokenizer([json.loads(line)["messages"][1]["content"] for line in open(work / "data.jsonl")],
                                vocab_size=1000)
    if args.tiny:
        from mft.tiny import tiny_model

        model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=4)
        layers = "1 2"
    else:
        model = common.build_model(num_layers=16, hidden=2048, heads=16, intermediate=5632, vocab=len(tokenizer),
                                   dtype=torch.bfloat16)
        layers = "4 5 6 7"
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    del model
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if not cuda:
        env.update(DS_ACCELERATOR="cpu", ACCELERATE_USE_CPU="1")
    speed = {}
    for variant in variants:
        out = work / variant
        processes = gpus if variant == "layout" or (not cuda and variant != "plain") else 1
        cmd = ["accelerate", "launch", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "bf16" if cuda else "no"]
        if variant in DS:
            cmd += ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "configs/ds_configs" / DS[variant])]
        elif processes > 1:
            cmd += ["--multi_gpu"]
        cmd += [str(ROOT / "scripts/finetune.py"), f"--model_name_or_path={work / 'model'}",
                f"--train_file={work / 'data.jsonl'}", f"--output_dir={out}", f"--max_seq_length={seq}",
                "--per_device_train_batch_size=1", "--gradient_accumulation_steps=4", f"--max_train_steps={steps}",
                "--subnet_mode=both", f"--masked_layers={layers}", "--learning_rate=1e-5", "--report_to=[none]",
                "--logging_steps=1",
                f"--dataset_local_cache_dir={work / 'cache'}", "--use_flash_attn=false"]
        result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"  {variant}: finetune.py failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
            shutil.rmtree(work)
            return 1
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        per_process = [r["tokens_per_s"] / processes for r in log[1:]] or [log[-1]["tokens_per_s"] / processes]
        speed[variant] = statistics.median(per_process)
        print(f"  {variant}: {processes} process(es), {speed[variant]:,.0f} tokens/s per process "
              f"(steps {[r['step'] for r in log]})", flush=True)
    checks = []
    for variant, target in TARGETS.items():
        if variant in speed and "plain" in speed:
            r = speed[variant] / speed["plain"]
            if variant == "layout" and cuda and gpus == 1:
                print(f"information: layout/plain = {r:.3f} (one GPU: the same code path as plain)")
                continue
            if not cuda:
                print(f"information (CPU smoke run): {variant}/plain tokens/s = {r:.3f}")
                continue
            checks.append((f"gpu finetune.py MFT tokens/s {variant}/plain", r, f">= {target}", r >= target))
    shutil.rmtree(work)  # this run's own temporary folder (model, data, outputs)
    return verdict(checks)


if __name__ == "__main__":
    sys.exit(main())
