"""Shared fixtures: a tokenizer trained locally, tiny models of every family, saved checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]

# What a command's --quiet sets for its whole process (and the processes it starts): mft.progress.set_quiet.
QUIET_ENV = ("MFT_QUIET", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS")


@pytest.fixture(autouse=True)
def _quiet_does_not_outlive_its_test():
    """A test that runs a command with --quiet leaves the process quiet: put the environment back, so that a
    later test that reads progress lines (e.g. "generating ifeval") sees them whatever ran before it."""
    saved = {name: os.environ.get(name) for name in QUIET_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


TOKENIZER_TEXTS = [
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\nAnswer: 48 / 2 = 24. 48 + 24 = 72. #### 72",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Write a short poem about the sea. The answer must contain at least 3 sentences.",
    "Problem:\nFind $x$ if $2x + 3 = 11$.\n\nSolution: $x = 4$. Final Answer: The final answer is $4$.",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    from mft.tiny import train_tokenizer

    return train_tokenizer(TOKENIZER_TEXTS, vocab_size=400)


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory, tokenizer):
    """Save a tiny model: saved_model(family="llama", dtype=None, shard_kb=None, **config) -> Path."""
    cache = {}

    def make(family: str = "llama", dtype=None, shard_kb: int | None = None, seed: int = 0, **config):
        key = (family, str(dtype), shard_kb, seed, tuple(sorted(config.items())))
        if key not in cache:
            from mft.tiny import tiny_model

            path = tmp_path_factory.mktemp(f"{family}_model")
            model = tiny_model(family, seed=seed, dtype=dtype, vocab_size=len(tokenizer), **config)
            kwargs = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}
            model.save_pretrained(path, **kwargs)
            tokenizer.save_pretrained(path)
            cache[key] = path
        return cache[key]

    return make
