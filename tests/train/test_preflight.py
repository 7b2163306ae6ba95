"""The pre-flight selection check of `mft train` (`loop._preflight`): built from the config of the revision that
trains, with its trust_remote_code, and from no weight file."""

from __future__ import annotations

import json
import logging
import re
import shutil

import huggingface_hub
import pytest

from mft.errors import MftError
from mft.tiny import tiny_config
from mft.train import loop
from mft.train.config import load_config

MAIN_SHA, V2_SHA = "a" * 40, "b" * 40


@pytest.fixture()
def hub(tmp_path, monkeypatch, saved_model):
    """A hub cache (read offline) holding org/tiny at two revisions: main = a 2-layer config.json and no weight
    file; v2 = a saved 4-layer Llama with its weights."""
    root = tmp_path / "hub"
    repo = root / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN_SHA)
    (repo / "refs" / "v2").write_text(V2_SHA)
    tiny_config("llama", num_layers=2).save_pretrained(repo / "snapshots" / MAIN_SHA)
    shutil.copytree(saved_model("llama", num_layers=4), repo / "snapshots" / V2_SHA)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return root


def _mft(data_file, out, *extra):
    return load_config(None, [f"--train_file={data_file}", f"--output_dir={out}", "--subnet_mode=both", *extra])


def test_preflight_selects_on_the_revision_that_trains(hub, data_file, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mft.train")
    cfg = _mft(data_file, tmp_path / "out", "--model_name_or_path=org/tiny", "--model_revision=v2",
               "--masked_layers=2 3")
    assert loop._preflight(cfg) == "new"
    table = "\n".join(r.getMessage() for r in caplog.records if "mask selection" in r.getMessage())
    assert "model.layers.3.mlp.down_proj" in table and "model.layers.2.self_attn.q_proj" in table
    assert "model.layers.1." not in table
    # the default branch has 2 layers: the same layers are refused there, by its own config
    cfg = _mft(data_file, tmp_path / "out", "--model_name_or_path=org/tiny", "--masked_layers=2 3")
    with pytest.raises(MftError, match=r"masked_layers \[2, 3\] out of range: org/tiny has 2 decoder layers"):
        loop._preflight(cfg)


def test_preflight_selection_needs_only_the_config_of_a_hub_model(hub, data_file, tmp_path, caplog):
    """main holds config.json alone (no weight file cached, and offline nothing can be fetched): the selection
    and its coverage table come from the meta-device skeleton."""
    caplog.set_level(logging.INFO, logger="mft.train")
    cfg = _mft(data_file, tmp_path / "out", "--model_name_or_path=org/tiny", "--masked_layers=0 1",
               "--allow_masked_base")
    assert loop._preflight(cfg) == "new"
    assert "model.layers.1.mlp.up_proj" in caplog.text


REMOTE_CONFIG = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
'''
REMOTE_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


@pytest.fixture()
def remote_code_model(tmp_path, monkeypatch, tokenizer):
    """A local model folder whose config names its own code (auto_map), and whose weight file is garbage."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # the copied code goes here
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "configuration_tiny_remote.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_tiny_remote.py").write_text(REMOTE_MODEL)
    config = tiny_config("llama", num_layers=3).to_dict()
    config.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors file: reading it would fail
    tokenizer.save_pretrained(folder)
    return folder


def test_preflight_uses_trust_remote_code_and_reads_no_weight_file(remote_code_model, data_file, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mft.train")
    common = [f"--model_name_or_path={remote_code_model}", "--masked_layers=2", "--allow_masked_base"]
    cfg = _mft(data_file, tmp_path / "out", *common, "--trust_remote_code")
    assert loop._preflight(cfg) == "new"
    assert "model.layers.2.self_attn.o_proj" in caplog.text and "model.layers.1." not in caplog.text
    with pytest.raises(MftError, match=re.escape(f"cannot read the model config of '{remote_code_model}'")):
        loop._preflight(_mft(data_file, tmp_path / "out", *common))
