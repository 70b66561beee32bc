"""The sub-commands, one module each; shared argument types."""

from __future__ import annotations

import argparse
from typing import Any


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
