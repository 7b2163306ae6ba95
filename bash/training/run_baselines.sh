#!/usr/bin/env bash
# The random and L1 baselines of an MFT run: masks at the same layers and keep ratio, built on the FFT checkpoint
# (FFT_DIR, default OUTPUT_ROOT/fft_<model>_<domain>), never on a masked one. MODEL, DOMAIN, LAYERS, KEEP_RATIO,
# SEED from the environment; extra arguments go to scripts/apply_masks.py. Settings: --help.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mft_baselines "${MODEL:-llama2-7b}" "${DOMAIN:-math}" "$@"
