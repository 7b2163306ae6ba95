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

DEFAULT_OUTPUT = "mft_demo"


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a tiny model, offline, on a CPU",
                       description="Train a tiny Llama model on synthetic math word problems (base, then FFT), "
                       "learn a mask with MFT, build the random and L1 baselines, apply all masks, evaluate "
                       "with the GSM8K protocol and print the comparison. Needs no GPU and no network.")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT, help=f"where everything goes (default: {DEFAULT_OUTPUT}/)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same table")
    p.add_argument("--quick", action="store_true", help="a 20-second smoke test of every stage (tiny budgets; the numbers mean nothing)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --output-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--model", default=None, help="run the pipeline on a real pretrained model instead (a short name "
                   "from `mft models list`, e.g. smollm2-135m-instruct, or a local folder) with a seeded demo split "
                   "of the GSM8K test set; --quick: under 10 minutes on a CPU (see mft.demo.real)")
    p.set_defaults(func=run)


def run(args) -> int:
    from mft.progress import set_quiet

    if args.quiet:
        set_quiet()
    if args.model is not None:  # `--model ''` (an empty $MODEL) is refused by run_real_demo, not the tiny demo
        from mft.demo.real import run_real_demo

        output = args.output_dir if args.output_dir != DEFAULT_OUTPUT else f"{DEFAULT_OUTPUT}_real"
        run_real_demo(args.model, output, seed=args.seed, quick=args.quick, overwrite=args.overwrite)
        return 0
    from mft.demo.pipeline import run_demo

    run_demo(args.output_dir, seed=args.seed, quick=args.quick, overwrite=args.overwrite)
    return 0
