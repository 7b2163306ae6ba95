"""TrainConfig: YAML + overrides, types, method resolution, validation, published configs, output folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mft.errors import MftError
from mft.train.config import (
    TrainConfig,
    field_help,
    load_config,
    parse_overrides,
    validate_against_model,
)

ROOT = Path(__file__).resolve().parents[2]
TRAIN_CONFIGS = ROOT / "configs" / "train_configs"


@pytest.fixture()
def base(data_file, tmp_path):
    """Overrides giving a minimal valid FFT config."""
    return ["--model_name_or_path=some/model", f"--train_file={data_file}", f"--output_dir={tmp_path / 'run'}"]


def write_yaml(tmp_path, values: dict) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


# --- reading values --------------------------------------------------------------------------------------
def test_yaml_then_overrides_in_all_three_spellings(tmp_path, data_file):
    path = write_yaml(tmp_path, {"model_name_or_path": "a/b", "train_file": data_file, "learning_rate": 1.0e-3,
                                 "seed": 1, "num_train_epochs": 3})
    cfg = load_config(path, ["--learning_rate=2e-5", "--seed", "7", "num_train_epochs=1", "--use_flash_attn",
                             "--gradient_checkpointing", "false"])
    assert cfg.learning_rate == 2e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.seed == 7 and cfg.num_train_epochs == 1
    assert cfg.use_flash_attn is True and cfg.gradient_checkpointing is False
    assert cfg.model_name_or_path == "a/b"  # untouched YAML value survives


def test_value_forms(base):
    cfg = load_config(None, base + ["--subnet_mode=both", "--masked_layers=4 5 6 7", "--checkpointing_steps=500",
                                    "--report_to=wandb,tensorboard", "--output-dir=on", "--max_train_samples=1e3",
                                    "--dataset_local_cache_dir", "/tmp/x"])
    assert cfg.masked_layers == [4, 5, 6, 7]
    assert cfg.checkpointing_steps == 500
    assert cfg.report_to == ["wandb", "tensorboard"]
    assert cfg.output_dir == "on"  # strings stay raw: YAML would read `on` as true
    assert cfg.max_train_samples == 1000
    assert load_config(None, base + ["--checkpointing_steps=epoch"]).checkpointing_steps == "epoch"
    assert load_config(None, base + ["--checkpointing_steps=Epoch/3"]).checkpointing_steps == "epoch/3"
    assert load_config(None, base + ["--subnet_mode=both", "--masked_layers=20-23"]).masked_layers == [20, 21, 22, 23]
    assert parse_overrides(["--use_lora", "seed=3"]) == {"use_lora": True, "seed": 3}


def test_sparsity_keys_are_keep_ratio_aliases(base):
    cfg = load_config(None, base + ["--subnet_mode=mlp", "--masked_layers=1", "--sparsity_attn=0.8",
                                    "--sparsity_mlp=0.7"])
    assert (cfg.keep_ratio_attn, cfg.keep_ratio_mlp) == (0.8, 0.7)
    mask = cfg.mask_config()
    assert (mask.keep_ratio_attn, mask.keep_ratio_mlp, mask.subnet_mode, mask.masked_layers) == (0.8, 0.7, "mlp", [1])


def test_alias_and_name_disagreeing_in_one_file(tmp_path, data_file):
    path = write_yaml(tmp_path, {"model_name_or_path": "m", "train_file": data_file, "sparsity_attn": 0.9,
                                 "keep_ratio_attn": 0.5})
    with pytest.raises(MftError, match=r"(keep_ratio_attn and sparsity_attn|sparsity_attn and keep_ratio_attn) "
                                       r"are the same setting \(in .*cfg.yaml\) and disagree: (0.5 vs 0.9|0.9 vs 0.5)"):
        load_config(path, [])
    # ...while a command-line value replaces the file's under either name
    path = write_yaml(tmp_path, {"model_name_or_path": "m", "train_file": data_file, "sparsity_attn": 0.9})
    assert load_config(path, ["--keep_ratio_attn=0.5"]).keep_ratio_attn == 0.5


def test_unknown_key_suggests_the_nearest(base, tmp_path, data_file):
    with pytest.raises(MftError, match=r"unknown setting 'learnig_rate' on the command line; did you mean "
                                       r"'learning_rate'\?"):
        load_config(None, base + ["--learnig_rate=1e-5"])
    path = write_yaml(tmp_path, {"model_name_or_path": "m", "train_file": data_file, "sparsity_atn": 0.9})
    with pytest.raises(MftError, match=r"unknown setting 'sparsity_atn' in .*cfg.yaml; did you mean 'sparsity_attn'"):
        load_config(path, [])


@pytest.mark.parametrize("arg, message", [
    ("--learning_rate=fast", r"learning_rate: expected a number, got 'fast' \(str\)"),
    ("--num_train_epochs=1.5", r"num_train_epochs: expected an integer, got 1.5 \(float\)"),
    ("--use_lora=maybe", r"use_lora: expected a boolean \(true/false\), got 'maybe' \(str\)"),
    ("--checkpointing_steps=often", r"checkpointing_steps: expected a positive integer, 'epoch' or 'epoch/K', "
                                    r"got 'often'"),
    ("--checkpointing_steps=epoch/0", r"checkpointing_steps: expected a positive integer, 'epoch' or 'epoch/K', "
                                      r"got 'epoch/0'"),
    ("--save_model_snapshots", r"save_model_snapshots writes a snapshot with each checkpoint, but "
                               r"checkpointing_steps is unset"),
    ("--checkpointing_steps=0", r"checkpointing_steps must be a positive integer; got 0"),
    ("--dataset_mixer=[a, b]", r"dataset_mixer: expected a mapping \{key: value\}, got \['a', 'b'\] \(list\)"),
    ("--seed=null", r"seed cannot be null; expected an integer"),
    ("--lr_scheduler_type=cosin", r"lr_scheduler_type must be one of linear, cosine.*got 'cosin'"),
    ("--reduce_loss=max", r"reduce_loss must be one of mean, sum; got 'max'"),
    ("--chat_template_name=chatml", r"chat_template_name must be one of tulu, tokenizer; got 'chatml'"),
    ("--keep_last_n_checkpoints=0", r"keep_last_n_checkpoints must be -1 \(keep all\) or >= 1; got 0"),
    ("--warmup_ratio=2", r"warmup_ratio must be in \[0, 1\]; got 2.0"),
    ("--report_to=slack", r"report_to must be one of all, none, tensorboard, wandb.*got 'slack'"),
    ("--resume_from_checkpoint=/no/such/ckpt", r"resume_from_checkpoint: no such folder '/no/such/ckpt'"),
    ("--model_name_or_path=null", r"model_name_or_path is required"),
    ("--per_device_train_batch_size", r"--per_device_train_batch_size needs a value"),
    ("stray", r"unexpected argument 'stray'; settings are written --key=value"),
])
def test_bad_values_name_key_expectation_and_value(base, arg, message):
    with pytest.raises(MftError, match=message):
        load_config(None, base + [arg])


def test_unsupported_published_keys(base):
    # harmless values are accepted and change nothing
    cfg = load_config(None, base + ["--push_to_hub=false", "--use_qlora=false", "--hf_entity=someone",
                                    "--try_launch_beaker_eval_jobs=false", "--dataset_mixer_list_splits=[train]"])
    assert cfg == load_config(None, base)
    with pytest.raises(MftError, match=r"push_to_hub: True is not supported .*huggingface-cli upload"):
        load_config(None, base + ["--push_to_hub"])
    with pytest.raises(MftError, match=r"use_qlora: True is not supported .*QLoRA is not implemented"):
        load_config(None, base + ["--use_qlora=true"])
    with pytest.raises(MftError, match=r"dataset_mixer_list_splits: \['test'\] is not supported .*only the train"):
        load_config(None, base + ["--dataset_mixer_list_splits=[test]"])


def test_keys_documented_without_effect_are_accepted_only_where_harmless(base, tmp_path, data_file):
    """low_cpu_mem_usage, wandb_project_name and wandb_entity were fields that nothing read: now either value of
    the first (transformers 5 always loads into an empty model), the default of the others, and an error naming
    what to do instead for anything else; none of them is a field any more."""
    plain = load_config(None, base)
    assert load_config(None, base + ["--low_cpu_mem_usage", "--wandb_project_name=mft", "--wandb_entity=null"]) == plain
    assert load_config(None, base + ["--low_cpu_mem_usage=false", "--seed", "42"]) == plain  # still a boolean flag
    path = write_yaml(tmp_path, {"model_name_or_path": "some/model", "train_file": data_file,
                                 "low_cpu_mem_usage": True, "wandb_project_name": "mft", "wandb_entity": None})
    assert load_config(path, [f"--output_dir={tmp_path / 'run'}"]) == plain
    assert not {"low_cpu_mem_usage", "wandb_project_name", "wandb_entity"} & {name for name, *_ in field_help()}
    with pytest.raises(MftError, match=r"wandb_project_name: 'my_project' is not supported \(on the command line\); "
                                       r"the trackers' project is exp_name .*set exp_name"):
        load_config(None, base + ["--wandb_project_name=my_project"])
    with pytest.raises(MftError, match=r"wandb_entity: 'my_team' is not supported \(in .*cfg.yaml\); set the "
                                       r"WANDB_ENTITY environment variable"):
        load_config(write_yaml(tmp_path, {"model_name_or_path": "m", "train_file": data_file,
                                          "wandb_entity": "my_team"}), [])


# --- method ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, method", [
    ([], "fft"),
    (["--use_lora"], "lora"),
    (["--subnet_mode=attn", "--masked_layers=0 1"], "mft"),
    (["--method=mft", "--masked_layers=0"], "mft"),
    (["--method=lora"], "lora"),
])
def test_method_resolution(base, extra, method):
    cfg = load_config(None, base + extra)
    assert cfg.resolved_method == method
    assert cfg.to_dict()["method"] == method


def test_method_mft_without_subnet_mode_masks_both(base):
    assert load_config(None, base + ["--method=mft", "--masked_layers=2"]).mask_config().subnet_mode == "both"


@pytest.mark.parametrize("extra, message", [
    (["--subnet_mode=both"], r"MFT needs something to mask: set masked_layers"),
    (["--subnet_mode=both", "--masked_layers=1", "--use_lora"], r"both subnet_mode \(MFT\) and use_lora \(LoRA\)"),
    (["--method=fft", "--subnet_mode=both", "--masked_layers=1"], r"subnet_mode is set \('both'\).*method is fft"),
    (["--method=mft", "--masked_layers=1", "--use_lora"], r"method mft and use_lora: true contradict"),
    (["--masked_layers=4 5 6 7"], r"masked_layers / target_modules are set but the run is fft"),
    (["--subnet_mode=both", "--masked_layers=1", "--sparsity_attn=0"], r"keep_ratio_attn \(published key "
                                                                       r"sparsity_attn\) must be in \(0, 1\]"),
    (["--subnet_mode=both", "--masked_layers=1", "--sparsity_mlp=1.1"], r"keep_ratio_mlp .* got 1.1"),
    (["--subnet_mode=all", "--masked_layers=1"], r"subnet_mode must be one of attn, mlp, both; got 'all'"),
    (["--subnet_mode=both", "--masked_layers=a b"], r"masked_layers: cannot read 'a'"),
])
def test_method_and_mask_errors(base, extra, message):
    with pytest.raises(MftError, match=message):
        load_config(None, base + extra)


# --- data sources ------------------------------------------------------------------------------------
def test_data_sources_forms(tmp_path, data_file):
    common = ["--model_name_or_path=m"]
    cfg = load_config(None, common + ["--dataset_mixer={org/a: 10000, org/b: 2, org/c: 1}"])
    assert cfg.data_sources() == [("org/a", 10000), ("org/b", 2), ("org/c", 1)]  # counts: 1 is one row
    assert all(isinstance(amount, int) for _, amount in cfg.data_sources())
    cfg = load_config(None, common + ["--dataset_mixer={org/b: 0.5, org/c: 1}"])
    assert cfg.data_sources() == [("org/b", 0.5), ("org/c", 1.0)]  # fractions: 1 is every row
    assert isinstance(cfg.data_sources()[1][1], float)
    cfg = load_config(None, common + [f"--dataset_mixer_list={data_file} 3 org/b 1"])
    assert cfg.data_sources() == [(data_file, 3), ("org/b", 1)]
    with pytest.raises(MftError, match=r"mixes row counts .* \(org/b: 0.5, org/c: 1.0\)"):
        load_config(None, common + ["--dataset_mixer={org/a: 10000, org/b: 0.5, org/c: 1.0}"])
    assert load_config(None, common + ["--dataset_name=org/x"]).data_sources() == [("org/x", 1.0)]


@pytest.mark.parametrize("extra, message", [
    ([], r"no training data: set one of dataset_mixer, dataset_mixer_list, dataset_name or train_file"),
    (["--train_file=/data/missing.jsonl"], r"dataset file not found: /data/missing.jsonl"),
    (["--dataset_mixer={/data/gone.parquet: 10}"], r"dataset file not found: /data/gone.parquet"),
    (["--train_file=./data.csv"], r"unsupported data file type '.csv' for ./data.csv; "
                                  r"expected .json, .jsonl, .parquet"),
    (["--dataset_mixer={org/a: 2.5}"], r"the amount of 'org/a' is 2.5: above 1 it counts rows and must be a whole"),
    (["--dataset_mixer={org/a: -1}"], r"the amount of 'org/a' must be a row count \(> 1\) or a fraction"),
    (["--dataset_mixer_list=org/a 10 org/b"], r"dataset_mixer_list must alternate source and amount"),
    (["--dataset_name=org/a", "--dataset_mixer={org/b: 1}"], r"dataset_name and dataset_mixer are both set"),
])
def test_data_source_errors(extra, message):
    with pytest.raises(MftError, match=message):
        load_config(None, ["--model_name_or_path=m"] + extra)


# --- round trip, help ---------------------------------------------------------------------------------
def test_save_round_trips_the_resolved_config(base, tmp_path):
    cfg = load_config(None, base + ["--subnet_mode=both", "--masked_layers=4-7", "--sparsity_mlp=0.8",
                                    "--dataset_local_cache_dir=/tmp/c", "--report_to=[wandb]"])
    path = tmp_path / "out" / "train_config.yaml"
    cfg.save(str(path))
    saved = yaml.safe_load(path.read_text())
    assert saved["method"] == "mft" and saved["masked_layers"] == [4, 5, 6, 7] and saved["keep_ratio_mlp"] == 0.8
    again = load_config(str(path), [])
    assert again.to_dict() == cfg.to_dict()
    assert again == TrainConfig(**cfg.to_dict())


def test_every_field_has_help():
    rows = field_help()
    assert {name for name, *_ in rows} >= {"learning_rate", "dataset_mixer", "masked_layers", "method",
                                          "overwrite_output_dir", "lora_rank", "checkpointing_steps"}
    assert all(text for _, _, _, text in rows), [name for name, _, _, text in rows if not text]
    defaults = {name: default for name, _, default, _ in rows}
    assert (defaults["lora_rank"], defaults["lora_alpha"], defaults["lora_dropout"]) == (64, 16.0, 0.1)
    assert (defaults["learning_rate"], defaults["warmup_ratio"], defaults["seed"]) == (2e-5, 0.03, 42)
    assert defaults["chat_template_name"] == "tulu" and defaults["reduce_loss"] == "mean"
    assert defaults["clip_grad_norm"] is None  # = 1.0 on every path, see test_loop
    assert (defaults["strict_roles"], defaults["add_pad_token"], defaults["use_slow_tokenizer"]) == (False, False, False)


# --- published configs --------------------------------------------------------------------------------
def _published():
    return sorted(TRAIN_CONFIGS.glob("*.yaml"))


def test_all_published_configs_exist():
    names = {p.name for p in _published()}
    for model in ("llama2_7b", "llama3.1_8b"):
        for domain in ("math", "coding", "if"):
            assert f"{model}_{domain}_fft.yaml" in names
            assert f"{model}_{domain}_local_masktune.yaml" in names
    assert "llama2_7b_math_lora.yaml" in names


@pytest.mark.parametrize("path", _published(), ids=lambda p: p.name)
def test_published_config_loads_with_published_settings(path):
    cfg = load_config(str(path), [])
    expected = "mft" if "masktune" in path.name else "lora" if "lora" in path.name else "fft"
    assert cfg.resolved_method == expected
    assert (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * 8) == 128
    assert (cfg.max_seq_length, cfg.num_train_epochs, cfg.warmup_ratio, cfg.seed) == (4096, 2, 0.03, 42)
    assert (cfg.lr_scheduler_type, cfg.weight_decay, cfg.chat_template_name) == ("linear", 0.0, "tulu")
    assert cfg.learning_rate == (1e-4 if expected == "lora" else 2e-5)
    sources = dict(cfg.data_sources())
    domain = path.name.split("_")[2]
    assert len(sources) == {"math": 6, "coding": 3, "if": 6}[domain]
    if domain == "if":
        assert sources["KKHYA/oasst1_converted"] == 7000 and sources["KKHYA/oasst2_converted"] == 9000
    if expected == "mft":
        layers = {"math": [4, 5, 6, 7], "coding": [20, 21, 22, 23], "if": [0, 1, 2, 3]}[domain]
        mask = cfg.mask_config()
        assert (mask.masked_layers, mask.subnet_mode, mask.subnet_type) == (layers, "both", "local")
        assert (mask.keep_ratio_attn, mask.keep_ratio_mlp) == (0.9, 0.9)
        assert cfg.model_name_or_path.startswith("output/fft_")
    if expected == "lora":
        assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (64, 16.0, 0.1)


def test_original_launch_line_overrides_work():
    cfg = load_config(str(TRAIN_CONFIGS / "llama2_7b_math_local_masktune.yaml"),
                      ["--model_name_or_path=output/fft_7b_math",
                       "--output_dir=output/masktune_7b_local_4-7-layers_0.9_math", "--masked_layers=4 5 6 7"])
    assert (cfg.model_name_or_path, cfg.masked_layers) == ("output/fft_7b_math", [4, 5, 6, 7])
    assert cfg.output_dir == "output/masktune_7b_local_4-7-layers_0.9_math"


# --- against the model, output folder ------------------------------------------------------------------
def test_masked_layer_out_of_range(base):
    from mft.tiny import tiny_config

    cfg = load_config(None, base + ["--subnet_mode=both", "--masked_layers=2 4"])
    with pytest.raises(MftError, match=r"masked_layers \[4\] out of range: some/model has 4 decoder layers, "
                                       r"numbered 0 to 3"):
        validate_against_model(cfg, tiny_config("llama", num_layers=4))
    validate_against_model(load_config(None, base + ["--subnet_mode=both", "--masked_layers=3"]),
                           tiny_config("llama", num_layers=4))


def test_validate_against_model_reads_a_saved_config(tmp_path, data_file):
    from mft.tiny import tiny_config

    tiny_config("qwen2", num_layers=2).save_pretrained(tmp_path / "model")
    cfg = load_config(None, [f"--model_name_or_path={tmp_path / 'model'}", f"--train_file={data_file}",
                             "--subnet_mode=both", "--masked_layers=0-2"])
    with pytest.raises(MftError, match=r"masked_layers \[2\] out of range: .* has 2 decoder layers"):
        validate_against_model(cfg)
