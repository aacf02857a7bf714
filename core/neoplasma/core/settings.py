"""A server's settings as one dataclass: the single source of their defaults, types, bounds and help.

Fields are declared with `setting(...)` on a dataclass derived from `Settings`. Every instance is
checked against the bounds (`InvalidSetting` names the field), and the command line is derived
from the fields (`add_options`, `from_args`); a field without `help` is not a command-line option.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
from collections.abc import Callable, Collection
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Self, get_origin, get_type_hints

from neoplasma.core.errors import UsageError


@dataclass(frozen=True)
class Bound:
    """The numbers a setting allows: finite, from `low` (or above it, when `above`) to `high`;
    `above` is for settings without a `high`."""

    low: float
    high: float = math.inf
    above: bool = False
    note: str = ""  # what special values mean, e.g. "0: any free port"

    def allows(self, value: float) -> bool:
        low_ok = value > self.low if self.above else value >= self.low
        return math.isfinite(value) and low_ok and value <= self.high

    def __str__(self) -> str:
        text = (f"from {self.low:g} to {self.high:g}" if self.high < math.inf
                else f"greater than {self.low:g}" if self.above else f"{self.low:g} or more")
        return f"{text} ({self.note})" if self.note else text


PORT = Bound(0, 65535, note="0: any free port")
POSITIVE = Bound(0, above=True)
NON_NEGATIVE = Bound(0)


class InvalidSetting(UsageError):
    def __init__(self, name: str, value: object, allowed: str) -> None:
        super().__init__(f"{name} must be {allowed}, not {value!r}")
        self.setting = name


def allowed(kind: type, bound: Bound | None) -> str:
    """What a setting of `kind` within `bound` may be, in words."""
    noun = {int: "an integer", float: "a number"}.get(kind, "a string")
    return f"{noun} {bound}" if bound else noun


def argument_type(kind: type, bound: Bound | None = None) -> Callable[[str], Any]:
    """Command-line text as `kind`, within `bound`; else an argparse error saying what is allowed."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (bound is not None and not bound.allows(value)):
            raise argparse.ArgumentTypeError(f"must be {allowed(kind, bound)}, not {text!r}")
        return value

    return convert


def _items(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def setting(default: Any = MISSING, *, help: str | None = None, bound: Bound | None = None,
            flag: str | None = None, env: str | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A field of a `Settings` dataclass. With `help` it is the option `--field-name` (or `flag`),
    whose default may come from the environment variable `env`; a list option takes
    comma-separated values and may be repeated."""
    metadata = {"help": help, "bound": bound, "flag": flag, "env": env}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# Connections the kernel queues on a listening socket before the server accepts them. A connect
# storm larger than this overflows the queue (the kernel drops the SYN or the final ACK: the client
# waits out retransmissions, 1 s, 3 s, 7 s...). The kernel caps it at net.core.somaxconn
# (4096 by default since Linux 5.4; 128 before). Larger is not better without limit: the event loop
# accepts everything queued in one go, and while it does, subscribers already connected wait for
# their events (bench/connect_rate.py, storm of 15,000: their p99 was 1.3-1.7 s with 1024 and
# 8.9-10 s with 4096; with 100, a third to a half of the storm was not admitted within 30 s).
DEFAULT_BACKLOG = 1024


def backlog_setting() -> Any:
    """The `--listen-backlog` setting of a server (a field of its config dataclass; neoplasma.core.net
    binds with it)."""
    return setting(DEFAULT_BACKLOG, bound=Bound(1, 65535, note="the kernel caps it at net.core.somaxconn"),
                   help="connections the kernel may queue on each listening port before they are accepted "
                   "(a connect storm beyond it waits out SYN retransmissions)")


def _help(f: Field[Any]) -> str:
    """A field's help, with what its special values mean and its default."""
    meta = f.metadata
    shown = [meta["bound"].note] if meta["bound"] and meta["bound"].note else []
    if f.default is not MISSING:
        default = f"{f.default:g}" if isinstance(f.default, float) else str(f.default) or "none"
        shown.append(f"default {default}" + (f", or ${meta['env']}" if meta["env"] else ""))
    return f"{meta['help']} ({'; '.join(shown)})" if shown else str(meta["help"])


def _flag(f: Field[Any]) -> str:
    return str(f.metadata["flag"] or "--" + f.name.replace("_", "-"))


def pod_name(tier: str) -> str:
    """A server's default name: $NEOPLASMA_POD_NAME (set in a pod), else TIER-HOST-PID."""
    return os.environ.get("NEOPLASMA_POD_NAME") or f"{tier}-{socket.gethostname()}-{os.getpid()}"


@dataclass
class Settings:
    """Base of the config dataclasses: each instance is checked against its fields' bounds."""

    def __post_init__(self) -> None:
        for f in fields(self):
            bound, value = f.metadata.get("bound"), getattr(self, f.name)
            if bound is not None and not (isinstance(value, int | float) and bound.allows(value)):
                raise InvalidSetting(f.name, value, allowed(get_type_hints(type(self))[f.name], bound))

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                    only: Collection[str] | None = None) -> None:
        """One option per field with `help` (of those named in `only`, when given), typed, bounded and
        defaulted as the field is."""
        hints = get_type_hints(cls)
        for f in fields(cls):
            meta, kind = f.metadata, hints[f.name]
            if not meta.get("help") or (only is not None and f.name not in only):
                continue
            default = f.default_factory() if callable(f.default_factory) else f.default
            if meta["env"]:
                default = os.environ.get(meta["env"], default)  # a string: argparse checks it as if typed
            option: dict[str, Any] = ({"action": "extend", "type": _items} if get_origin(kind) is list
                                      else {"type": argument_type(kind, meta["bound"])})
            flag = _flag(f)
            parser.add_argument(flag, dest=f.name, default=default, help=_help(f),
                                metavar=flag[2:].upper().replace("-", "_"), **option)

    @classmethod
    def option(cls, name: str) -> str:
        """The command-line option of field `name`; KeyError when it is not an option."""
        found = [f for f in fields(cls) if f.name == name and f.metadata.get("help")]
        if not found:
            raise KeyError(f"{cls.__name__}.{name} is not a command-line option")
        return _flag(found[0])

    def to_args(self, only: Collection[str] | None = None, **changes: Any) -> list[str]:
        """The command-line options that give this config (those of the fields named in `only`, when given),
        with `changes` (field name: value)."""
        out: list[str] = []
        for f in fields(self):
            value = changes.get(f.name, getattr(self, f.name))
            if f.metadata.get("help") and value != [] and (only is None or f.name in only):
                out += [_flag(f), ",".join(value) if isinstance(value, list) else str(value)]
        return out

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """The config from options parsed by a parser that has `add_options`."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.metadata.get("help")})
