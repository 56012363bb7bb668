"""Numbers as short text: SI prefixes for tick labels, tables and notes."""
from __future__ import annotations

import math

_SI_PREFIXES = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def si_format(x: float, pos: int | None = None) -> str:
    """Tick label with an SI prefix and at most three significant digits: 120000 -> "120k",
    1.2e6 -> "1.2M", 7.2e10 -> "72G", 0.5 -> "0.5". (`pos` makes it a matplotlib FuncFormatter.)"""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    x = float(f"{x:.3g}")  # round first, so 999999 becomes "1M", not "1e+03k"
    for scale, prefix in _SI_PREFIXES:
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}"
    return f"{x:.3g}"
