"""Fixtures of the training tests."""

from __future__ import annotations

import json

import pytest


@pytest.fixture()
def data_file(tmp_path):
    """One chat row (user "hi", assistant "hello") in a .jsonl file: the smallest valid train_file (path str)."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    return str(path)
