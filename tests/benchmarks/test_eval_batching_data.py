"""The batching benchmark prompts with the GSM8K test set shipped in the package, never a folder beside the
checkout: its questions are the file's first ones, in order, and a missing file is an error, not made-up text."""

from __future__ import annotations

import importlib.util
import json

import pytest

from mft.eval.data import packaged_data_dir
from tests.conftest import ROOT


def _benchmark():
    spec = importlib.util.spec_from_file_location("eval_batching", ROOT / "benchmarks/eval_batching.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_batching_reads_the_packaged_gsm8k_file():
    module = _benchmark()
    with open(packaged_data_dir() / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1319
    texts = module.load_questions(32)
    assert len(texts) == 300  # the tokenizer trains on the first 300 problems, the prompts are the first 32
    assert texts[0] == f"{rows[0]['question']}\n{rows[0]['answer']}"
    assert texts[299] == f"{rows[299]['question']}\n{rows[299]['answer']}"


def test_eval_batching_refuses_a_missing_data_file(tmp_path, monkeypatch):
    module = _benchmark()
    monkeypatch.setattr(module, "GSM8K", tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        module.load_questions(4)
