#!/usr/bin/env bash
# Mask fine-tuning of the LLaMA-3.1-8B instruction-following FFT model, then mask_applied/. Settings: --help.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mft_masktune llama3.1-8b if "$@"
