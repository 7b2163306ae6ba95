#!/usr/bin/env bash
# Mask fine-tuning of the LLaMA-2-7B instruction-following FFT model, then mask_applied/. Settings: --help.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mft_masktune llama2-7b if "$@"
