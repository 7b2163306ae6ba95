#!/usr/bin/env bash
# Mask fine-tuning of the LLaMA-2-7B coding FFT model, then its mask_applied/ checkpoint. Settings: --help.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mft_masktune llama2-7b coding "$@"
