"""Units and dimensions. Values are exact (fractions), so `1 GiB` is 2**30 bytes and `1 GB` is
10**9 bytes, and a spec's numbers are never rounded on the way in.

A dimension is a vector of exponents over the base quantities below; `GB/s` is bytes^1 s^-1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

BASES = ("B", "s", "tok", "req", "FLOP", "usd")


@dataclass(frozen=True, slots=True)
class Dim:
    exponents: tuple[int, ...] = (0,) * len(BASES)

    def __mul__(self, other: Dim) -> Dim:
        return Dim(tuple(a + b for a, b in zip(self.exponents, other.exponents)))

    def __truediv__(self, other: Dim) -> Dim:
        return Dim(tuple(a - b for a, b in zip(self.exponents, other.exponents)))

    @property
    def name(self) -> str:
        return DIM_NAMES.get(self, self.formula)

    @property
    def formula(self) -> str:
        top = [b if e == 1 else f"{b}^{e}" for b, e in zip(BASES, self.exponents) if e > 0]
        bottom = [b if e == -1 else f"{b}^{-e}" for b, e in zip(BASES, self.exponents) if e < 0]
        text = "*".join(top) or "1"
        return text + ("/" + "/".join(bottom) if bottom else "")


def _base(name: str) -> Dim:
    return Dim(tuple(1 if b == name else 0 for b in BASES))


NUMBER = Dim()
BYTES = _base("B")
TIME = _base("s")
TOKENS = _base("tok")
REQUESTS = _base("req")
FLOP = _base("FLOP")
MONEY = _base("usd")
BANDWIDTH = BYTES / TIME
REQUEST_RATE = REQUESTS / TIME
TOKEN_RATE = TOKENS / TIME
COMPUTE = FLOP / TIME
PRICE = MONEY / TIME

DIM_NAMES = {
    NUMBER: "a plain number",
    BYTES: "a size (bytes)",
    TIME: "a duration",
    TOKENS: "a token count",
    REQUESTS: "a request count",
    FLOP: "an amount of compute (FLOP)",
    MONEY: "an amount of money",
    BANDWIDTH: "a bandwidth (bytes/time)",
    REQUEST_RATE: "a request rate (req/time)",
    TOKEN_RATE: "a token rate (tok/time)",
    COMPUTE: "a compute rate (FLOP/s)",
    PRICE: "a price (usd/time)",
}

# An example of each dimension, for "write a size such as `80 GiB`".
DIM_EXAMPLES = {
    BYTES: "80 GiB",
    TIME: "500 ms",
    TOKENS: "2048 tok",
    REQUESTS: "1000 req",
    BANDWIDTH: "450 GB/s",
    REQUEST_RATE: "12 req/s",
    TOKEN_RATE: "5000 tok/s",
    COMPUTE: "989 TFLOP/s",
    PRICE: "2.5 usd/h",
    NUMBER: "8",
}


@dataclass(frozen=True, slots=True)
class Unit:
    symbol: str
    dim: Dim
    scale: Fraction  # base units per one of this unit


def _table() -> dict[str, Unit]:
    units: dict[str, Unit] = {}

    def add(symbol: str, dim: Dim, scale) -> None:
        units[symbol] = Unit(symbol, dim, Fraction(scale))

    amounts: dict[str, tuple[Dim, Fraction]] = {"B": (BYTES, Fraction(1)), "b": (BYTES, Fraction(1, 8))}
    for i, prefix in enumerate("kMGTP", start=1):
        amounts[prefix + "B"] = (BYTES, Fraction(1000**i))
        amounts[prefix + "b"] = (BYTES, Fraction(1000**i, 8))
    for i, prefix in enumerate(["Ki", "Mi", "Gi", "Ti", "Pi"], start=1):
        amounts[prefix + "B"] = (BYTES, Fraction(1024**i))
    amounts["tok"] = (TOKENS, Fraction(1))
    amounts["req"] = (REQUESTS, Fraction(1))
    amounts["usd"] = (MONEY, Fraction(1))
    amounts["FLOP"] = (FLOP, Fraction(1))
    for i, prefix in enumerate(["K", "M", "G", "T", "P"], start=1):
        amounts[prefix + "FLOP"] = (FLOP, Fraction(1000**i))
    times = {"ns": Fraction(1, 10**9), "us": Fraction(1, 10**6), "\u00b5s": Fraction(1, 10**6),
             "ms": Fraction(1, 1000), "s": Fraction(1), "min": Fraction(60), "h": Fraction(3600)}
    for symbol, (dim, scale) in amounts.items():
        add(symbol, dim, scale)
        for per, seconds in (("s", 1), ("min", 60), ("h", 3600)):
            add(f"{symbol}/{per}", dim / TIME, scale / seconds)
    for symbol, scale in times.items():
        add(symbol, TIME, scale)
    add("%", NUMBER, Fraction(1, 100))
    return units


UNITS = _table()

# Spellings people reach for: each with the units to write instead and an optional note.
_MISSPELLINGS: dict[str, tuple[tuple[str, ...], str]] = {
    "K": (("kB", "KiB"), "1000 or 1024 bytes"),
    "KB": (("kB", "KiB"), "1000 or 1024 bytes"),
    "M": (("MB", "MiB"), ""),
    "G": (("GB", "GiB"), "10^9 or 2^30 bytes"),
    "T": (("TB", "TiB"), ""),
    "P": (("PB", "PiB"), ""),
    "Kb": (("kb",), "1000 bits"),
    "Gbps": (("Gb/s",), ""),
    "Mbps": (("Mb/s",), ""),
    "GBps": (("GB/s",), ""),
    "FLOPS": (("FLOP/s",), ""),
    "GFLOPS": (("GFLOP/s",), ""),
    "TFLOPS": (("TFLOP/s",), ""),
    "TFLOPs": (("TFLOP/s",), ""),
    "PFLOPS": (("PFLOP/s",), ""),
    "token": (("tok",), ""),
    "tokens": (("tok",), ""),
    "request": (("req",), ""),
    "requests": (("req",), ""),
    "rps": (("req/s",), ""),
    "qps": (("req/s",), ""),
    "sec": (("s",), ""),
    "secs": (("s",), ""),
    "seconds": (("s",), ""),
    "msec": (("ms",), ""),
    "hr": (("h",), ""),
    "hours": (("h",), ""),
    "minutes": (("min",), ""),
    "m": (("min", "MB"), "minutes or megabytes"),
    "percent": (("%",), ""),
    "pct": (("%",), ""),
    "USD": (("usd",), ""),
}


def unit_suggestion(symbol: str) -> str:
    """A help line for a unit that does not exist."""
    head, slash, per = symbol.partition("/")
    if symbol in _MISSPELLINGS or (slash and head in _MISSPELLINGS):
        choices, note = _MISSPELLINGS[symbol] if symbol in _MISSPELLINGS else _MISSPELLINGS[head]
        if symbol not in _MISSPELLINGS:
            choices, note = tuple(f"{c}/{per}" for c in choices), ""
        written = " or ".join(f"`{c}`" for c in choices)
        return f"write {written}" + (f" ({note})" if note else "")
    folded = {u.lower(): u for u in UNITS}
    if symbol.lower() in folded:
        return f"units are case-sensitive: did you mean `{folded[symbol.lower()]}`?"
    from flowc.compiler.diagnostics import did_you_mean

    best = did_you_mean(symbol, UNITS)
    if best:
        return f"did you mean `{best}`?"
    return "see the unit table in docs/language.md"


@dataclass(frozen=True, slots=True)
class Value:
    """An exact value with a dimension, in base units (bytes, seconds, tokens, ...)."""

    magnitude: Fraction
    dim: Dim = NUMBER


def format_value(value: Value) -> str:
    """Print a value with the unit that states it exactly and most briefly; parsing the result
    gives back the same value."""
    # Rates read per second and prices per hour where that is exact: `3 TB/min` is exact but
    # surprising for 50 GB/s. Other rates fall back to the per-minute and per-hour units.
    per = "/h" if value.dim == PRICE else "/s"
    units = [u for u in UNITS.values() if u.dim == value.dim and u.symbol != "\u00b5s" and value.dim != NUMBER]
    preferred = [u for u in units if "/" not in u.symbol or u.symbol.endswith(per)]
    for candidates in (preferred, units):
        best: tuple[int, str] | None = None
        for unit in candidates:
            text = _decimal(value.magnitude / unit.scale)
            if text is None or (value.magnitude and abs(value.magnitude / unit.scale) < 1):
                continue
            rendered = f"{text} {unit.symbol}"
            key = (len(text.replace(".", "")), rendered)
            if best is None or key < best:
                best = key
        if best is not None:
            return best[1]
    text = _decimal(value.magnitude)
    if text is not None:
        return text if value.dim == NUMBER else f"{text} {_base_symbol(value.dim)}"
    return f"{float(value.magnitude):.6g}" + ("" if value.dim == NUMBER else f" {_base_symbol(value.dim)}")


def _base_symbol(dim: Dim) -> str:
    for unit in UNITS.values():
        if unit.dim == dim and unit.scale == 1:
            return unit.symbol
    return dim.formula


def _decimal(x: Fraction) -> str | None:
    """The exact decimal text of x, or None when it does not terminate."""
    den = x.denominator
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:
        return None
    places = max(twos, fives)
    scaled = x * 10**places
    assert scaled.denominator == 1
    digits = str(abs(scaled.numerator)).rjust(places + 1, "0")
    text = digits if places == 0 else digits[:-places] + "." + digits[-places:]
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return ("-" if x < 0 else "") + text


# ------------------------------------------------------------------ figures in messages and reports

GiB = 2**30


def format_gib(nbytes: float, digits: int = 2) -> str:
    """Bytes as GiB: `12.34 GiB` (2^30-based, as GPU memory is sold)."""
    return f"{nbytes / GiB:,.{digits}f} GiB"


def format_gbps(bytes_per_s: float) -> str:
    """A bandwidth in GB/s (10^9 bytes, as links are sold), three significant digits."""
    return f"{bytes_per_s / 1e9:.3g} GB/s"


def format_ms(ms: float) -> str:
    """Milliseconds to read: whole above 100, else three significant digits; `-` for no value
    and `never served` for the infinite latency of a request that never got a token."""
    if math.isnan(ms):
        return "-"
    if math.isinf(ms):
        return "never served"
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


def format_rps(rps: float, digits: int = 3) -> str:
    """A request rate, `digits` significant digits below 100 req/s (more to tell close rates apart)."""
    return f"{rps:,.0f} req/s" if rps >= 100 else f"{rps:.{digits}g} req/s"


def format_duration(seconds: float) -> str:
    """A duration to read: `850 ms`, `42.5 s`, `12 min 5 s`, `3 h 20 min`; `never` for inf."""
    if math.isinf(seconds):
        return "never"
    if seconds < 1:
        return format_ms(seconds * 1e3)
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, rest = divmod(round(seconds / 60), 60)
    return f"{hours} h {rest} min" if rest else f"{hours} h"
