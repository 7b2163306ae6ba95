"""Fixtures of the evaluation tests: the benchmark data shipped in the package and a tiny model saved to disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The package's own benchmark folder (GSM8K test, MATH-500): what `--data-dir` reads in these tests."""
    from mft.eval.data import packaged_data_dir

    return packaged_data_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, shared_data) -> Path:
    """A tiny random Llama with a tokenizer trained on real GSM8K/MATH/code text, saved like a checkpoint."""
    from mft.tiny import tiny_model, train_tokenizer

    texts = [r["question"] + "\n" + r["answer"] for r in read_jsonl(shared_data / "gsm8k" / "test.jsonl")[:300]]
    texts += [r["problem"] + "\n" + r["solution"] for r in read_jsonl(shared_data / "math500" / "test.jsonl")[:100]]
    texts += ["def add(a, b):\n    return a + b\n\nclass A:\n    pass\n\nif x:\n    print(x)\n"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=600)
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", vocab_size=len(tokenizer), hidden=64, num_layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Generate on one thread while these tests run (restored afterwards).

    On the 2-core CI machine, shared with other work, torch's 2-thread kernels keep waiting for a busy
    sibling core: the same tiny generation took 0.5 s to 15 s from run to run, against a steady 0.5 s
    on one thread.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
