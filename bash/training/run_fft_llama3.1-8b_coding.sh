#!/usr/bin/env bash
# Full fine-tuning of LLaMA-3.1-8B on the coding mix (configs/train_configs/). Settings: --help.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mft_fft llama3.1-8b coding "$@"
