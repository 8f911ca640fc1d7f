"""Units and dimensions: exact values, dimension checks and format_value round trips."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from flow_samples import GPU_TEMPLATE, evaluate, load_error
from hypothesis import given, settings
from hypothesis import strategies as st

import flowc
from flowc.compiler import units
from flowc.compiler.units import UNITS, Value, format_value

GiB = 2**30


@pytest.mark.parametrize(("text", "magnitude", "dim"), [
    ("1 GiB", Fraction(2**30), units.BYTES),
    ("1 GB", Fraction(10**9), units.BYTES),
    ("1 kB", Fraction(1000), units.BYTES),
    ("1 KiB", Fraction(1024), units.BYTES),
    ("1 PiB", Fraction(2**50), units.BYTES),
    ("8 b", Fraction(1), units.BYTES),
    ("80GiB", Fraction(80 * GiB), units.BYTES),
    ("400 Gb/s", Fraction(50 * 10**9), units.BANDWIDTH),
    ("3.35 TB/s", Fraction(335 * 10**10), units.BANDWIDTH),
    ("450 GB/s", Fraction(450 * 10**9), units.BANDWIDTH),
    ("1 TiB + 512 GiB", Fraction(2**40 + 512 * GiB), units.BYTES),
    ("2 * 80 GiB", Fraction(160 * GiB), units.BYTES),
    ("(64 + 8) * 1 GiB", Fraction(72 * GiB), units.BYTES),
    ("1 GB/s * 3 s", Fraction(3 * 10**9), units.BYTES),
    ("1 TiB - 1 GiB", Fraction(1023 * GiB), units.BYTES),
    ("80 GiB / 8", Fraction(10 * GiB), units.BYTES),
    ("80 GiB / 10 GiB", Fraction(8), units.NUMBER),
    ("90 %", Fraction(9, 10), units.NUMBER),
    ("12.5 %", Fraction(1, 8), units.NUMBER),
    ("1 min", Fraction(60), units.TIME),
    ("1 h", Fraction(3600), units.TIME),
    ("500 ms", Fraction(1, 2), units.TIME),
    ("2 us", Fraction(2, 10**6), units.TIME),
    ("3 ns", Fraction(3, 10**9), units.TIME),
    ("2.5 usd/h", Fraction(25, 36000), units.PRICE),
    ("2.99 usd/h", Fraction(299, 360000), units.PRICE),
    ("12 req/s", Fraction(12), units.REQUEST_RATE),
    ("600 req/min", Fraction(10), units.REQUEST_RATE),
    ("8192 tok", Fraction(8192), units.TOKENS),
    ("5000 tok/s", Fraction(5000), units.TOKEN_RATE),
    ("989 TFLOP/s", Fraction(989 * 10**12), units.COMPUTE),
    ("1 PFLOP", Fraction(10**15), units.FLOP),
    ("1_000", Fraction(1000), units.NUMBER),
    ("1e-3", Fraction(1, 1000), units.NUMBER),
    ("1.5e3 ms", Fraction(3, 2), units.TIME),
    (".5 GB", Fraction(5 * 10**8), units.BYTES),
])
def test_exact_values(text, magnitude, dim):
    assert evaluate(text) == Value(magnitude, dim)


def test_unit_table_scales():
    assert UNITS["GiB"].scale == 2**30
    assert UNITS["GB"].scale == 10**9
    assert UNITS["Gb"].scale == Fraction(10**9, 8)
    assert UNITS["Gb/s"].scale * 400 == 50 * 10**9
    assert UNITS["Gb/s"].dim == units.BANDWIDTH
    assert UNITS["usd/h"].scale == Fraction(1, 3600)
    assert UNITS["usd/h"].dim == units.PRICE
    assert UNITS["%"].scale == Fraction(1, 100)
    assert UNITS["min"].scale == 60
    for symbol in ("G", "K", "KB", "Gbps", "tokens", "TFLOPS"):
        assert symbol not in UNITS


def test_dimension_names_and_formulas():
    assert units.BANDWIDTH.formula == "B/s"
    assert (units.BYTES * units.BYTES).formula == "B^2"
    assert (units.NUMBER / units.TIME).formula == "1/s"
    assert units.BYTES.name == "a size (bytes)"
    assert units.BANDWIDTH.name == "a bandwidth (bytes/time)"


def test_ir_values_are_normalized():
    spec = flowc.load(GPU_TEMPLATE % "80 GiB" + "\n")
    gpu = spec.gpus["g"]
    assert gpu.memory == 80 * GiB
    assert gpu.memory_bandwidth == 3.35e12
    assert gpu.flops == {"bf16": 989e12}
    priced = flowc.load((GPU_TEMPLATE % "80 GiB").replace("host_link pcie5", "host_link pcie5\n  price 2.99 usd/h"))
    assert priced.gpus["g"].price == pytest.approx(2.99, rel=1e-15)  # usd per GPU-hour
    inline = flowc.load("""\
use std.gpus
cluster c {
  node x 2 {
    gpu h100-sxm x 8
    link nvlink 450 GB/s
  }
  network infiniband 400 Gb/s x 4
}
""")
    cluster = inline.clusters["c"]
    assert cluster.nodes[0].link.bandwidth == 450e9
    assert cluster.network.bandwidth == 50e9
    assert cluster.network.kind == "infiniband"
    assert cluster.network_nics == 4
    assert cluster.total_gpus == 16


# ------------------------------------------------------------------ dimension and unit errors

def test_bandwidth_where_size_expected_is_f0302():
    error = load_error(GPU_TEMPLATE % "450 GB/s")
    assert error.codes == ["F0302"]
    (d,) = error.diagnostics
    assert d.message == "expected a size (bytes), found a bandwidth (bytes/time)"
    assert (d.span.line, d.span.col, d.span.end_col) == (4, 10, 18)
    assert "80 GiB" in d.help


def test_plain_number_where_size_expected_is_f0302():
    error = load_error(GPU_TEMPLATE % "80")
    assert error.codes == ["F0302"]
    assert error.diagnostics[0].message == "`80` needs a unit"


def test_adding_mismatched_dimensions_is_f0303():
    error = load_error(GPU_TEMPLATE % "80 GiB + 5 ms")
    assert error.codes == ["F0303"]
    (d,) = error.diagnostics
    assert d.message == "cannot add a duration to a size (bytes)"
    assert (d.span.col, d.span.end_col) == (10, 23)


def test_product_of_sizes_is_not_a_size():
    error = load_error(GPU_TEMPLATE % "80 GiB * 80 GiB")
    assert error.codes == ["F0302"]
    assert "B^2" in error.diagnostics[0].message


@pytest.mark.parametrize(("unit", "suggestions"), [
    ("G", ["`GB`", "`GiB`"]),
    ("K", ["`kB`", "`KiB`"]),
    ("KB", ["`kB`", "`KiB`"]),
    ("Gbps", ["`Gb/s`"]),
    ("gib", ["`GiB`"]),
])
def test_misspelt_units_are_f0301_with_a_suggestion(unit, suggestions):
    error = load_error(GPU_TEMPLATE % f"80 {unit}")
    assert error.codes == ["F0301"]
    (d,) = error.diagnostics
    assert d.message == f"unknown unit `{unit}`"
    for suggestion in suggestions:
        assert suggestion in d.help
    # The span covers the unit only.
    assert (d.span.line, d.span.col, d.span.end_col) == (4, 13, 13 + len(unit))


def test_tokens_spelt_out_is_f0301():
    text = ("model m {\n  architecture llama\n  layers 2\n  hidden 64\n  heads 4\n  ffn 128\n  vocab 256\n"
            "  max_context 512 tokens\n}\n")
    error = load_error(text)
    assert error.codes == ["F0301"]
    assert error.diagnostics[0].help == "write `tok`"


def test_division_by_zero_is_f0312():
    error = load_error(GPU_TEMPLATE % "80 GiB / (1 - 1)")
    assert error.codes == ["F0312"]


def test_negative_result_is_f0307():
    error = load_error(GPU_TEMPLATE % "1 GiB - 2 GiB")
    assert error.codes == ["F0307"]


# ------------------------------------------------------------------ format_value

@pytest.mark.parametrize(("value", "text"), [
    (Value(Fraction(2**30), units.BYTES), "1 GiB"),
    (Value(Fraction(10**9), units.BYTES), "1 GB"),
    (Value(Fraction(3 * 2**39), units.BYTES), "1.5 TiB"),
    (Value(Fraction(10**12), units.BANDWIDTH), "1 TB/s"),
    (Value(Fraction(60), units.TIME), "1 min"),
    (Value(Fraction(1, 2), units.TIME), "500 ms"),
    (Value(Fraction(12), units.REQUEST_RATE), "12 req/s"),
    (Value(Fraction(989 * 10**12), units.COMPUTE), "989 TFLOP/s"),
    (Value(Fraction(1, 2)), "0.5"),
    (Value(Fraction(0), units.BYTES), "0 B"),
])
def test_format_value_examples(value, text):
    assert format_value(value) == text


def test_format_value_states_bandwidths_per_second():
    assert format_value(Value(Fraction(50 * 10**9), units.BANDWIDTH)) == "50 GB/s"
    spec = flowc.load("use std.gpus\ncluster c {\n  node x 2 { gpu h100-sxm x 8 }\n"
                      "  network infiniband 400 Gb/s x 4\n}\n")
    assert spec.clusters["c"].network.name == "infiniband-50GB/s"


TERMINATING = st.builds(
    lambda n, twos, fives: Fraction(n, 2**twos * 5**fives),
    st.integers(0, 10**15), st.integers(0, 24), st.integers(0, 24),
)
DIMS = st.sampled_from([
    units.BYTES, units.TIME, units.BANDWIDTH, units.TOKENS, units.REQUEST_RATE, units.COMPUTE,
    units.TOKEN_RATE, units.PRICE, units.REQUESTS, units.FLOP, units.MONEY, units.NUMBER,
])


@settings(max_examples=400, deadline=None)
@given(TERMINATING, DIMS)
def test_format_value_round_trips_exactly(magnitude, dim):
    value = Value(magnitude, dim)
    assert evaluate(format_value(value)) == value


def test_format_value_round_trips_through_the_unit_table():
    # Every unit's own scale prints as something that evaluates back to it.
    for unit in UNITS.values():
        value = Value(unit.scale, unit.dim)
        assert evaluate(format_value(value)) == value, unit.symbol


@pytest.mark.parametrize("seconds, text", [(0.85, "850 ms"), (42.5, "42.5 s"), (725, "12 min 5 s"), (600, "10 min"),
                                           (12000, "3 h 20 min"), (7200, "2 h"), (math.inf, "never")])
def test_format_duration(seconds, text):
    assert units.format_duration(seconds) == text
