"""Errors shown to users."""


class MftError(ValueError):
    """Bad input or state, reported as one clear message (what was expected, what was found, what to do).

    The `mft` command prints it without a traceback and exits with status 1.
    """


class Interrupted(Exception):
    """The user stopped the command (Ctrl-C / SIGINT). Printed as one line, without a traceback; exit status 130
    (128 + SIGINT, what shells report for a process stopped by Ctrl-C). The message says where it stopped and how
    to go on."""

    exit_code = 130


def run_command(prog: str, func, args) -> int:
    """`func(args)` ended as every mft command ends, without a traceback: its return value is the exit status;
    an MftError prints `PROG: error: MESSAGE` and gives 1; an Interrupted (or Ctrl-C) prints one line and gives
    130. `prog`: the command's name as the user typed it (`mft apply`, `apply_masks.py`)."""
    import sys

    try:
        return int(func(args) or 0)
    except MftError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return Interrupted.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return Interrupted.exit_code
