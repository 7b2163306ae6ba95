"""`mft train CONFIG.yaml [--key=value ...]` and `scripts/finetune.py` (the same, for `accelerate launch`);
`mft checkpoints RUN` lists a run's checkpoints and snapshots."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from mft.settings import option

USAGE = """usage: mft train [CONFIG.yaml] [--key=value ...]
       accelerate launch [accelerate flags] scripts/finetune.py [CONFIG.yaml] [--key=value ...]

Full fine-tuning, mask fine-tuning or LoRA, as the config says (subnet_mode set -> MFT, use_lora -> LoRA,
else FFT; or method: fft|mft|lora). Any key of the YAML file can be overridden on the command line:
--key=value, --key value or key=value (--kebab-case keys too); values are read as YAML. Re-running a command
resumes an interrupted run from its newest checkpoint, if every setting that changes the result is the same
(else it lists the differences); --overwrite_output_dir starts over, replacing output_dir only once the new run
has finished.
--quiet: no progress bars (away from a terminal the bar is one plain log line per 10 % or minute either way).

keys:
"""


@dataclass
class CheckpointsOptions:
    """The arguments of `mft checkpoints`."""

    run: str = option("the run's output_dir", positional=True)
    json: bool = option("print a JSON list instead", False)


def register(sub) -> None:
    from mft.settings import add_arguments

    # Only for `mft --help`: `mft train ...` is dispatched before argparse (its --key=value overrides are free
    # form), see main() below and mft.cli.main.
    sub.add_parser("train", help="FFT, MFT or LoRA from a YAML config, under accelerate launch", add_help=False)
    p = sub.add_parser("checkpoints", help="list a training run's checkpoints (resumable) and snapshots (loadable)",
                       description="List the complete checkpoints (resume state) and snapshots (save_model_snapshots: "
                                   "a model folder, or for MFT the mask file) of a training run folder, one per line: "
                                   "kind, step, epoch, path.")
    add_arguments(p, CheckpointsOptions)
    p.set_defaults(func=_checkpoints)


def _checkpoints(args) -> int:
    import json
    import os

    from mft.errors import MftError
    from mft.run_dir import list_checkpoints

    if not os.path.isdir(args.run):
        raise MftError(f"no such run folder: {args.run}")
    rows = list_checkpoints(args.run)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"{args.run}: no complete checkpoints or snapshots")
        return 0
    print("kind        step  epoch  path")
    for r in rows:
        epoch = "-" if r["epoch"] is None else r["epoch"]
        print(f"{r['kind']:<10} {r['step']:>5}  {epoch!s:>5}  {r['path']}")
    return 0


def usage() -> str:
    from mft.train.config import field_help

    lines = [USAGE]
    for key, kind, default, text in field_help():
        lines.append(f"  --{key}  ({kind.replace('typing.', '')}, default {default!r})\n      {text}")
    return "\n".join(lines)


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """(config path or None, overrides): the config is a first argument that is not an option."""
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        return argv[0], argv[1:]
    return None, argv


def main(argv: list[str] | None = None, prog: str = "mft train") -> int:
    from mft.errors import MftError

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    quiet = [a for a in argv if a == "--quiet" or a.startswith("--quiet=")]
    if quiet:  # `--quiet`, or `--quiet=true|false` as every other boolean setting (the last one wins)
        from mft.progress import set_quiet

        argv = [a for a in argv if a not in quiet]
        value = quiet[-1].partition("=")[2].strip().lower() or "true"
        if value not in ("true", "false", "1", "0", "yes", "no"):
            print(f"{prog}: error: --quiet takes true or false, not {value!r}", file=sys.stderr)
            return 1
        set_quiet(value in ("true", "1", "yes"))
    cfg = None
    try:
        from mft.hub import resolve_model
        from mft.train.config import load_config
        from mft.train.loop import train

        config, overrides = split_args(argv)
        cfg = load_config(config, overrides)
        # A short name (`mft models list`) becomes its cached folder; the saved config records that folder.
        cfg.model_name_or_path = resolve_model(cfg.model_name_or_path)
        cfg.tokenizer_name = resolve_model(cfg.tokenizer_name)
        train(cfg)
    except MftError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: where it stopped and how to go on, no traceback
        from mft.errors import Interrupted
        from mft.train.guard import close_progress_bars, interrupted_message

        close_progress_bars()
        print(f"{prog}: {interrupted_message()}", file=sys.stderr)
        return Interrupted.exit_code
    except OSError as exc:
        if not exc.errno or cfg is None:
            raise
        from mft.paths import os_error

        print(f"{prog}: error: {os_error(exc, cfg.output_dir)}", file=sys.stderr)
        return 1
    return 0
