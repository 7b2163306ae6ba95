"""Training: full fine-tuning (FFT), mask fine-tuning (MFT) and LoRA under accelerate / DeepSpeed.

`config` holds the run settings (the published open-instruct / MFT YAML keys plus ours), `data` turns
`messages` datasets into tokenized, label-masked examples; the training loop builds on both.
"""
