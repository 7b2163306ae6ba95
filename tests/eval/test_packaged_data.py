"""The benchmark data shipped in the package: the exact reference files, and what `--data-dir packaged` reads."""

from __future__ import annotations

import hashlib

from mft.eval.data import packaged_data_dir
from mft.eval.specs import build_tasks

SHA256 = {
    "gsm8k/test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "math500/test.jsonl": "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
}


def test_shipped_files_are_the_reference_files_with_licences():
    root = packaged_data_dir()
    for relative, digest in SHA256.items():
        assert hashlib.sha256((root / relative).read_bytes()).hexdigest() == digest, relative
        assert "MIT License" in (root / relative).parent.joinpath("LICENSE").read_text()
    assert "MATH-500" in (root / "PROVENANCE.md").read_text()


def test_tasks_read_the_packaged_folder():
    gsm8k, = build_tasks(["gsm8k"], data_dir=str(packaged_data_dir()))
    assert len(gsm8k.load_docs()) == 1319 and gsm8k.source.local
    math = build_tasks(["minerva_math"], data_dir=str(packaged_data_dir()))
    assert sum(len(t.load_docs()) for t in math) == 500
