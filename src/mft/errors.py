"""Errors shown to users."""


class MftError(ValueError):
    """Bad input or state, reported as one clear message (what was expected, what was found, what to do).

    The `mft` command prints it without a traceback and exits with status 1.
    """
