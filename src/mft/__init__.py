"""Mask Fine-Tuning (MFT) for Hugging Face decoder models.

Pipeline: train (FFT / MFT / LoRA) -> masks -> apply -> evaluate -> report.
"""

__version__ = "0.1.0"
