"""mft.settings: one typed parser for every command; flags generated from each command's dataclass, accepted in
both spellings, shown in one."""

from __future__ import annotations

from dataclasses import fields

import pytest

from mft.cli import build_parser
from mft.demo import DemoOptions
from mft.errors import MftError
from mft.eval.cli import EvalOptions, ReportOptions
from mft.masking.cli import ApplyOptions
from mft.settings import ArgumentParser, add_arguments, read_settings


def _subparser(name: str):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action.choices[name]


def _kebab(argv):
    return ["--" + a[2:].replace("_", "-") if a.startswith("--") else a for a in argv]


def _snake(argv):
    return ["--" + a[2:].replace("-", "_") if a.startswith("--") else a for a in argv]


APPLY = ["apply", "--base_model_name_or_path", "fft", "--output_dir", "out", "--use_l1_mask", "--masked_layers",
         "4 5", "--subnet_mode", "mlp", "--sparsity_attn", "0.8", "--keep_ratio_mlp=0.7", "--target_modules", "a", "b",
         "--save_masks_format", "pt", "--allow_masked_base", "--seed", "7"]
EVAL = ["eval", "--model", "m", "--task", "gsm8k", "--task", "ifeval", "--output_dir", "res", "--model_type", "hf",
        "--batch_size", "4", "--max_model_len=512", "--gpu_memory_utilization", "0.5", "--data_dir", "packaged"]


@pytest.mark.parametrize("argv", [APPLY, EVAL, ["demo", "--output_dir", "d", "--seed", "3", "--quick"],
                                  ["report", "r1", "r2", "--labels", "A", "B", "--output", "c.png"]],
                         ids=lambda a: a[0])
def test_each_subcommand_takes_both_spellings_and_gives_the_same_settings(argv):
    snake, kebab = build_parser().parse_args(_snake(argv)), build_parser().parse_args(_kebab(argv))
    assert vars(snake) == vars(kebab)
    mixed = build_parser().parse_args([a if i % 2 else _kebab([a])[0] for i, a in enumerate(argv)])
    assert vars(mixed) == vars(snake)


def test_the_parsed_values():
    args = build_parser().parse_args(_kebab(APPLY))
    assert (args.output_dir, args.use_l1_mask, args.random_masks, args.masked_layers) == ("out", True, False, "4 5")
    assert (args.keep_ratio_attn, args.keep_ratio_mlp, args.target_modules) == (0.8, 0.7, ["a", "b"])
    assert (args.save_masks_format, args.allow_masked_base, args.seed, args.subnet_type) == ("pt", True, 7, None)
    args = build_parser().parse_args(EVAL)
    assert (args.tasks, args.output_dir, args.model_type, args.batch_size) == (["gsm8k", "ifeval"], "res", "hf", "4")
    assert (args.max_model_len, args.gpu_memory_utilization, args.limit, args.dtype) == (512, 0.5, None, "auto")


def test_train_takes_both_spellings(tmp_path):
    from mft.train.config import load_config

    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    common = ["--model_name_or_path=m", f"--train_file={data}"]
    snake = load_config(None, common + ["--max_seq_length=64", "--per_device_train_batch_size", "2", "--use_lora",
                                        "--lora_rank=8"])
    kebab = load_config(None, common + ["--max-seq-length=64", "--per-device-train-batch-size", "2", "--use-lora",
                                        "--lora-rank=8"])
    assert snake == kebab and (kebab.max_seq_length, kebab.per_device_train_batch_size, kebab.lora_rank) == (64, 2, 8)


def test_apply_main_takes_both_spellings():
    """scripts/apply_masks.py's own parser (the original's entry point)."""
    from mft.masking import cli

    seen = []
    parser = ArgumentParser(prog="apply_masks.py")
    cli.add_apply_arguments(parser)
    for argv in (_snake(APPLY[1:]), _kebab(APPLY[1:])):
        seen.append(vars(parser.parse_args(argv)))
    assert seen[0] == seen[1] and seen[0]["keep_ratio_attn"] == 0.8


@pytest.mark.parametrize("name, cls, shown, hidden", [
    ("apply", ApplyOptions, "--output_dir", "--output-dir"),
    ("eval", EvalOptions, "--output-dir", "--output_dir"),
    ("demo", DemoOptions, "--output-dir", "--output_dir"),
])
def test_flags_come_from_the_dataclass_and_help_shows_one_spelling(name, cls, shown, hidden):
    _, sub = _subparser(name)
    by_dest = {a.dest: a for a in sub._actions if a.dest != "help"}
    assert set(by_dest) == {f.name for f in fields(cls)}
    for f in fields(cls):
        assert by_dest[f.name].help.replace("%%", "%") == f.metadata["help"]
    text = sub.format_help()
    assert shown in text and hidden not in text
    spellings = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    assert len(spellings) == len({s.replace("-", "_") for s in spellings})  # one spelling of each flag


def test_unknown_flags_are_still_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["apply", "--output-dir", "o", "--output-dri", "x"])
    assert "unrecognized arguments: --output-dri x" in capsys.readouterr().err


def test_read_settings_into_any_dataclass(tmp_path):
    """The YAML + --key=value reader is not TrainConfig's own: DemoOptions, from a file and overrides."""
    path = tmp_path / "demo.yaml"
    path.write_text("seed: 5\nquick: true\noutput_dir: on\n")
    assert read_settings(DemoOptions, str(path), ["--output-dir=d2", "--overwrite"]) == {
        "seed": 5, "quick": True, "output_dir": "d2", "overwrite": True}
    with pytest.raises(MftError, match=r"unknown setting 'sede' on the command line; did you mean 'seed'\?"):
        read_settings(DemoOptions, None, ["--sede=1"])


def test_add_arguments_types():
    parser = ArgumentParser(prog="x")
    add_arguments(parser, ReportOptions)
    args = parser.parse_args(["a", "b", "--labels", "x", "y"])
    assert (args.dirs, args.labels, args.output) == (["a", "b"], ["x", "y"], "report.png")


def test_apply_options_are_the_python_api_of_the_command(saved_model, tmp_path):
    """run_apply(ApplyOptions(...)) writes what `mft apply` with the same flags (in either spelling) writes."""
    from safetensors.torch import load_file

    from mft.cli import main
    from mft.masking.cli import run_apply

    base = saved_model("llama")
    flags = ["--base_model_name_or_path", str(base), "--random_masks", "--masked_layers", "1", "--sparsity_mlp",
             "0.5", "--seed", "3", "--quiet"]
    assert main(["apply", *flags, "--output_dir", str(tmp_path / "cli")]) == 0
    assert main(["apply", *_kebab(flags), "--output-dir", str(tmp_path / "kebab")]) == 0
    assert run_apply(ApplyOptions(base_model_name_or_path=str(base), random_masks=True, masked_layers="1",
                                  keep_ratio_mlp=0.5, seed=3, quiet=True, output_dir=str(tmp_path / "api"))) == 0
    written = [load_file(str(tmp_path / name / "model.safetensors")) for name in ("cli", "kebab", "api")]
    assert written[0].keys() == written[1].keys() == written[2].keys()
    for key, tensor in written[0].items():
        assert tensor.equal(written[1][key]) and tensor.equal(written[2][key]), key
    down = written[0]["model.layers.1.mlp.down_proj.weight"]
    assert 0.4 < (down != 0).float().mean().item() < 0.6  # the MLP keep ratio 0.5 reached the mask
    assert written[0]["model.layers.0.mlp.down_proj.weight"].count_nonzero() == \
        written[0]["model.layers.0.mlp.down_proj.weight"].numel()  # layer 0 untouched
