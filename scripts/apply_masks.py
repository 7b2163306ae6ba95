#!/usr/bin/env python
"""Bake masks into a checkpoint; the original MFT entry point with its flags (same as `mft apply`).

    python scripts/apply_masks.py --base_model_name_or_path output/fft_7b_math \
        --mask_model_name_or_path output/masktune_7b_local_4-7-layers_0.9_math \
        --output_dir output/masktune_7b_local_4-7-layers_0.9_math/mask_applied
"""

from mft.masking.cli import apply_main

if __name__ == "__main__":
    raise SystemExit(apply_main())
