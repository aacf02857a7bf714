"""Errors a user can act on: library code raises them, the command line prints them (neoplasma.cli)."""

from __future__ import annotations


class NeoplasmaError(Exception):
    """What went wrong and what to do, as one or more lines; `neoplasma` exits with `exit_code`."""

    exit_code = 1


class UsageError(NeoplasmaError):
    """A bad argument or setting."""

    exit_code = 2
