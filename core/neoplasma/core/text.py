"""Quoting untrusted values in messages: short, whatever their size."""

from __future__ import annotations

import reprlib

EXCERPT_LENGTH = 40

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = EXCERPT_LENGTH + 2
_REPR.maxlevel = 3


def clip(text: str) -> str:
    """`text`, or its first characters and "..." when it is long."""
    return text if len(text) <= EXCERPT_LENGTH else text[:EXCERPT_LENGTH] + "..."


def excerpt(value: object) -> str:
    """`repr(value)` when short; else the repr of a clipped string, or an abridged repr of anything else."""
    return repr(clip(value)) if isinstance(value, str) else _REPR.repr(value)
