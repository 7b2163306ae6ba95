"""The `mft` command: mask fine-tuning for Hugging Face decoder models (train, apply, eval, report, plot, demo).

Each subcommand lives next to the code it drives and registers itself here.

A command module exposes `register(subparsers)`; it adds its parser(s) and sets `func` (called with the
parsed namespace, returns an exit code). Heavy imports (torch, transformers) stay inside `func` so that
`mft --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mft.errors import run_command
from mft.settings import ArgumentParser

# Order = order in `mft --help`: the pipeline's order.
COMMAND_MODULES = [
    "mft.train.cli",  # train
    "mft.masking.cli",  # apply, masks
    "mft.eval.cli",  # eval, report
    "mft.plot",  # plot
    "mft.demo",  # demo
    "mft.hub",  # models (list, get)
]


def build_parser() -> argparse.ArgumentParser:
    # every subcommand's parser is a mft.settings.ArgumentParser too: --snake_case and --kebab-case both work
    parser = ArgumentParser(prog="mft", description=__doc__.splitlines()[0])
    from mft import __version__

    parser.add_argument("--version", action="version", version=f"mft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a command whose module is not written yet
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # free-form --key=value overrides: no argparse
        from mft.train.cli import main as train_main

        # its own errors are handled inside; run_command adds the closed-pipe ending (`mft train --help | head`)
        return run_command("mft train", lambda _: train_main(argv[1:]), None)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "quiet", False):  # every command's --quiet: no progress bars at all
        from mft.progress import set_quiet

        set_quiet()
    return run_command(f"mft {args.command}", args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
