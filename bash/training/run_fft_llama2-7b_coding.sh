#!/usr/bin/env bash
# Full fine-tuning of LLaMA-2-7B on the coding mix (configs/train_configs/). Settings: --help.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mft_fft llama2-7b coding "$@"
