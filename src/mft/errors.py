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
    130; a reader that closed stdout early (`| head -1`) gives 141, silently (128 + SIGPIPE). `prog`: the command's name as the user typed it (`mft apply`, `apply_masks.py`)."""
    import sys

    try:
        code = int(func(args) or 0)
        sys.stdout.flush()  # a closed pipe (`mft models list | head -1`) shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader of stdout went away: not an error of the command; quiet from now on (Python's advice), and
        # the status a shell gives a process killed by SIGPIPE
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MftError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return Interrupted.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return Interrupted.exit_code
