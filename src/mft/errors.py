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
