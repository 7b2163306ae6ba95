"""`mft demo`: the whole pipeline offline on a CPU — train, learn a mask, apply it, compare against baselines.

    mft demo                      # about 3 minutes on 2 CPU cores; output in mft_demo/
    mft demo --quick              # a 20-second smoke test of every stage (numbers mean nothing)
    mft demo --output-dir D --seed 3 --overwrite
    mft demo --model smollm2-135m-instruct --quick   # a real model, GSM8K demo split (mft.demo.real)

Stages (see `mft.demo.pipeline`): synthetic data -> tokenizer and tiny Llama model -> pre-training (base) ->
FFT -> MFT -> random and L1 baselines -> streaming apply -> GSM8K-protocol evaluation -> held-out loss ->
`results.md`, `results.json`, `plots/demo.png`. The README's "The demo" section explains the settings and
the result.
"""

from __future__ import annotations

from dataclasses import dataclass

from mft.settings import option

DEFAULT_OUTPUT = "mft_demo"


@dataclass
class DemoOptions:
    """The flags of `mft demo` (`--kebab-case`; `--snake_case` is accepted too)."""

    output_dir: str = option(f"where everything goes (default: {DEFAULT_OUTPUT}/, with --model: "
                                     f"{DEFAULT_OUTPUT}_real/)", DEFAULT_OUTPUT)
    seed: int = option("random seed; the same seed gives the same table", 0)
    quick: bool = option("a 20-second smoke test of every stage (tiny budgets; the numbers mean nothing)", False)
    overwrite: bool = option("replace an earlier demo run in --output-dir", False)
    quiet: bool = option("no progress bars", False)
    model: str | None = option("run the pipeline on a real pretrained model instead (a short name from `mft models "
                               "list`, e.g. smollm2-135m-instruct, or a local folder) with a seeded demo split of the "
                               "GSM8K test set; --quick: under 10 minutes on a CPU (see mft.demo.real)")


def register(sub) -> None:
    from mft.settings import add_arguments

    p = sub.add_parser("demo", help="run the whole pipeline on a tiny model, offline, on a CPU",
                       description="Train a tiny Llama model on synthetic math word problems (base, then FFT), "
                       "learn a mask with MFT, build the random and L1 baselines, apply all masks, evaluate "
                       "with the GSM8K protocol and print the comparison. Needs no GPU and no network.")
    add_arguments(p, DemoOptions, spelling="kebab")
    p.set_defaults(func=run)


def run(args) -> int:
    """`mft demo` (--quiet is set by mft.cli.main)."""
    if args.model is not None:  # `--model ''` (an empty $MODEL) is refused by run_real_demo, not the tiny demo
        from mft.demo.real import run_real_demo

        output = args.output_dir if args.output_dir != DEFAULT_OUTPUT else f"{DEFAULT_OUTPUT}_real"
        run_real_demo(args.model, output, seed=args.seed, quick=args.quick, overwrite=args.overwrite)
        return 0
    from mft.demo.pipeline import run_demo

    run_demo(args.output_dir, seed=args.seed, quick=args.quick, overwrite=args.overwrite)
    return 0
