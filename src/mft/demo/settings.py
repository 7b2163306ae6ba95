"""The demo's settings: what decides its numbers (with the seed), for the tiny model (`Settings`, `QUICK`) and
for a real model (`RealSettings`, `REAL_QUICK`); the models it compares and their labels; its output folder.

Read by the pipeline (`mft.demo.pipeline`), the real-model demo (`mft.demo.real`) and the report
(`mft.demo.report`), which imports nothing else of the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MARKER = "mft_demo.json"  # written first into the output folder: proves a folder is the demo's to replace
MODELS = ("base", "fft", "mft", "random", "l1")
LABELS = {"base": "base", "fft": "FFT", "mft": "MFT", "random": "random mask", "l1": "L1 mask"}


@dataclass
class Settings:
    """Everything that decides the demo's numbers (with the seed). `QUICK` is the smoke-test variant."""

    # model: Llama architecture
    layers: int = 6
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 176
    vocab_size: int = 512
    # data
    n_train: int = 200  # FFT / MFT training problems: few, so that FFT overfits
    n_test: int = 400  # held-out problems
    max_seq_length: int = 96
    batch_size: int = 16
    # base model: pre-training on the arithmetic drills until it knows them
    pretrain_epochs: int = 40
    pretrain_lr: float = 2e-3
    # FFT on the word problems, far past the best held-out loss (which comes at about 20 epochs)
    fft_epochs: int = 60
    fft_lr: float = 1e-3
    fft_curve_every: int = 5  # epochs between the FFT checkpoints whose held-out loss is plotted
    # MFT from the FFT model
    masked_layers: str = "0 1 2"  # the window that showed MFT best here (see the README's demo section)
    keep_ratio: float = 0.9
    mft_epochs: int = 30
    mft_lr: float = 3e-3
    score_init: str = "normal"
    mft_curve_every: int = 2  # epochs between the MFT checkpoints (held-out loss, mask changes per layer)
    # evaluation
    max_gen_toks: int = 48
    eval_batch_size: int = 100


QUICK = dict(n_train=64, n_test=64, pretrain_epochs=2, fft_epochs=4, fft_curve_every=2, mft_epochs=2,
             mft_curve_every=1, eval_batch_size=64)


@dataclass
class Paths:
    """The output folder: data/, models/<name>/, runs/ (the MFT run), eval/<name>/, plots/."""

    root: Path
    data: Path = field(init=False)
    models: Path = field(init=False)
    runs: Path = field(init=False)
    evals: Path = field(init=False)
    plots: Path = field(init=False)

    def __post_init__(self):
        self.data, self.models, self.runs = self.root / "data", self.root / "models", self.root / "runs"
        self.evals, self.plots = self.root / "eval", self.root / "plots"

    def model(self, name: str) -> Path:
        return self.models / name


@dataclass
class RealSettings:
    """What decides the real-model demo's numbers (with the seed and the model). `REAL_QUICK`: the CPU variant."""

    n_train: int = 512  # GSM8K test problems used for FFT and MFT
    n_test: int = 400  # held-out problems, evaluated
    max_seq_length: int = 384
    batch_size: int = 8
    fft_epochs: int = 2
    fft_lr: float = 1e-5
    masked_layers: str = "4 5 6 7"
    keep_ratio: float = 0.9
    mft_epochs: int = 2
    mft_lr: float = 1e-2
    num_shots: int = 8
    max_gen_toks: int = 256
    chat_max_gen_toks: int = 512  # the chat-template evaluation: 0-shot answers, no few-shot prompt to pay for
    eval_batch_size: int = 32
    max_model_len: int = 2048


REAL_QUICK = dict(n_train=8, n_test=8, max_seq_length=320, batch_size=4, fft_epochs=1, mft_epochs=1,
                  max_gen_toks=64, chat_max_gen_toks=128, eval_batch_size=8, max_model_len=1536)
