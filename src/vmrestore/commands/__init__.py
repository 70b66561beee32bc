"""The sub-commands, one module each; shared argument types."""

from __future__ import annotations

import argparse
import re
from typing import Any

from vmrestore.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1M', '64K', '1MiB', '1048576' -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"cannot read size {text!r} (examples: 1M, 64K, 1048576)")
    return int(m.group(1)) << (10 * " kmgt".index((m.group(2) or " ").lower()))


RATE_EXAMPLES = "examples: 200M, 1G, 500MiB/s; 0 = no limit"


def parse_rate(text: str) -> int:
    """Bytes per second: '200M', '500MiB/s', '1G' (binary units); 0 = no limit.

    One reading for `--max-rate` and the job field `max_rate`.
    """
    return parse_size(text.strip().removesuffix("/s"))


def rate(text: str) -> int:
    """An argparse ``type=`` for :func:`parse_rate`."""
    try:
        return parse_rate(text)
    except UsageError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate ({RATE_EXAMPLES})") from None


def number(lo: float, hi: float | None = None, kind: type = int) -> Any:
    """An argparse ``type=`` that accepts kind(text) within [lo, hi], else one usage line.

    A negative thread count or a port past 65535 must be refused where it is
    typed, not turn into a ValueError deep inside (a traceback) or a silent clamp.
    """
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (value >= lo and (hi is None or value <= hi)):  # NaN fails too
            span = f"{lo:g}..{hi:g}" if hi is not None else f">= {lo:g}"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range ({span})")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def point_id(text: str) -> str:
    """An argparse ``type=`` for --point: a file name or id prefix, never empty.

    An empty --point used to mean "the latest point" silently (a script's unset
    variable would restore something else than asked).
    """
    if not text.strip() or any(ord(c) < 32 for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a restore point (a point file name "
                                         "or an id prefix of 4+ hex digits)")
    return text


point_id.__name__ = "point"
