#!/usr/bin/env python
"""Training entry point for `accelerate launch` (same as `mft train`): the original's launch lines work as is.

    accelerate launch --mixed_precision bf16 --num_machines 1 --num_processes 8 --use_deepspeed \
        --deepspeed_config_file configs/ds_configs/stage3_no_offloading_accelerate.conf scripts/finetune.py \
        configs/train_configs/llama2_7b_math_local_masktune.yaml --model_name_or_path=output/fft_7b_math \
        --output_dir=output/masktune_7b_local_4-7-layers_0.9_math --masked_layers="4 5 6 7"
"""

from mft.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="finetune.py"))
