"""The front end never crashes: regression tests for what fuzzing found (issue 14), the limits
that bound every input's cost (F0105), and a short deterministic run of tools/fuzz_frontend.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import flowc
from flowc.api import check_sources
from flowc.compiler.frontend import parser
from flowc.compiler.frontend.fmt import format_source
from flowc.compiler.source import SourceFile

ROOT = Path(__file__).resolve().parents[1]


def _fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_frontend", ROOT / "tools" / "fuzz_frontend.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def codes(text: str) -> list[str]:
    """The codes `flowc check` reports for the text (it must report some)."""
    with pytest.raises(flowc.FlowError) as info:
        flowc.load(text)
    return info.value.codes


def fmt_codes(text: str) -> list[str]:
    with pytest.raises(flowc.FlowError) as info:
        format_source(SourceFile("t.flow", text))
    return info.value.codes


def workload(prompt: str) -> str:
    return f"workload w {{\n  arrival poisson 1 req/s\n  prompt {prompt}\n  output 10 tok\n}}\n"


# ---------------------------------------------------------------------------------- nesting

DEEP = {
    "lists": lambda n: workload("[" * n + "1" + "]" * n),
    "groups": lambda n: workload("(" * n + "1 tok" + ")" * n),
    "calls": lambda n: workload("f(" * n + ")" * n),
    "sums": lambda n: workload(" + ".join(["1 tok"] * n)),
    "products": lambda n: workload(" * ".join(["2"] * n) + " tok"),
    "blocks": lambda n: "cluster c {" + " node x 1 {" * n + "}" * n + " }\n",
}


@pytest.mark.parametrize("kind", DEEP)
def test_ten_thousand_levels_of_nesting_are_f0105_not_a_recursion_error(kind):
    text = DEEP[kind](10_000)
    assert codes(text) == ["F0105"]
    assert fmt_codes(text) == ["F0105"]


@pytest.mark.parametrize("kind", [*DEEP, "groups then sums"])
def test_the_deepest_input_within_the_limit_checks_and_formats(kind):
    depth = parser.MAX_DEPTH - 1  # the workload's or cluster's brace is a level too
    if kind == "groups then sums":  # the tree is deepest here: a group at the bottom of a long sum
        text = workload("(" * depth + "1 tok" + ")" * depth + " + 1 tok" * depth)
    else:
        text = DEEP[kind](depth)
    try:
        flowc.load(text)
    except flowc.FlowError as error:
        assert "F0105" not in error.codes
    assert format_source(SourceFile("t.flow", format_source(SourceFile("t.flow", text)))) is not None


def test_the_nesting_limit_counts_brackets_braces_and_operators():
    # `x y {` is one level; each bracket and each operator of an open item another.
    within = "x y { a " + "[" * (parser.MAX_DEPTH - 1) + "1" + "]" * (parser.MAX_DEPTH - 1) + " }"
    parser.parse(SourceFile("t.flow", within))
    assert fmt_codes(within.replace("[1]", "[[1]]")) == ["F0105"]
    operators = "x y { a " + " + ".join(["1"] * parser.MAX_DEPTH) + " }"  # 63 operators
    parser.parse(SourceFile("t.flow", operators))
    assert fmt_codes(operators.replace(" }", " + 1 }")) == ["F0105"]
    # an item's operators end at its comma, a statement's at its end
    parser.parse(SourceFile("t.flow", "x y {\n  a [" + ", ".join(["1 + 1"] * 100) + "]\n  b 1 + 1\n}"))


def test_the_diagnostic_names_the_limit_and_where_it_was_crossed():
    with pytest.raises(flowc.FlowError) as info:
        flowc.load(DEEP["groups"](100))
    (d,) = info.value.diagnostics
    assert d.message == "nesting too deep: the limit is 64 levels of brackets, braces and operators"
    assert (d.span.line, d.span.col) == (3, 10 + parser.MAX_DEPTH - 1)  # the 64th `(` is the 65th level


# ---------------------------------------------------------------------------------- sizes

def test_a_hundred_thousand_call_arguments_are_f0105():
    assert codes(workload("uniform(" + ", ".join(["1 tok"] * 100_000) + ")")) == ["F0105"]


def test_the_item_limit_is_exact():
    items = ", ".join(str(i + 1) for i in range(parser.MAX_ITEMS))
    parser.parse(SourceFile("t.flow", f"x y {{ tp in [{items}] }}"))
    assert fmt_codes(f"x y {{ tp in [{items}, 1] }}") == ["F0105"]


def test_a_ten_megabyte_string_is_f0105_not_an_os_error():
    text = 'workload w {\n  arrival trace "' + "a" * 10_000_000 + '"\n}\n'
    with pytest.raises(flowc.FlowError) as info:
        flowc.load(text)
    (d,) = info.value.diagnostics
    assert d.code == "F0105"
    assert d.message == f"`<spec>` is too long: the limit is {parser.MAX_SOURCE_CHARS} characters"


def test_a_string_past_the_token_limit_is_f0105():
    assert codes('use "' + "a" * parser.MAX_TOKEN_CHARS + '"') == ["F0105"]


@pytest.mark.parametrize("text", ['use "' + "a" * 300 + '"', "use std." + "a" * 300])
def test_file_names_no_file_system_can_hold_are_diagnostics(text):
    # 300 characters is past NAME_MAX: looking such a file up raised OSError (file name too long)
    assert codes(text) == ["F0205"]


def test_a_path_past_path_max_is_a_diagnostic(tmp_path):
    # within the token limit, but past PATH_MAX (4096 on Linux) once joined to the spec's directory
    (tmp_path / "spec.flow").write_text('use "' + "a/" * 2045 + '"\n', encoding="utf-8")
    with pytest.raises(flowc.FlowError) as info:
        check_sources(tmp_path / "spec.flow")
    assert info.value.codes == ["F0205"]
    assert info.value.diagnostics[0].label == "File name too long"


def test_a_loop_of_symbolic_links_is_a_diagnostic(tmp_path):
    (tmp_path / "a.flow").symlink_to(tmp_path / "b.flow")
    (tmp_path / "b.flow").symlink_to(tmp_path / "a.flow")
    (tmp_path / "spec.flow").write_text('use "a.flow"\n', encoding="utf-8")
    with pytest.raises(flowc.FlowError) as info:
        check_sources(tmp_path / "spec.flow")  # pathlib raised RuntimeError
    assert info.value.codes == ["F0205"]
    assert info.value.diagnostics[0].label == "a loop of symbolic links"


@pytest.mark.parametrize("text", ['use "a\0b.flow"', 'workload w {\n  arrival trace "t\0.csv"\n}\n'])
def test_a_nul_in_a_file_name_is_a_syntax_error_not_a_value_error(text):
    # Byte mutations put NULs in strings; resolving such a path raised ValueError.
    assert codes(text) == ["F0101"]


def test_a_number_with_thousands_of_digits_is_f0105_not_a_value_error():
    # Python refuses to convert more than 4300 digits to an int: the token limit comes first.
    assert codes("use std.models\nmodel m { layers 1" + "0" * 5000 + " }") == ["F0105"]


def test_a_file_past_the_size_limit_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "big.flow"
    path.write_text("#" * (3 * parser.MAX_SOURCE_CHARS), encoding="utf-8")
    with pytest.raises(flowc.FlowError) as info:
        check_sources(path)
    assert info.value.codes == ["F0105"]
    assert len(info.value.sources[info.value.diagnostics[0].span.file].text) == parser.MAX_SOURCE_CHARS + 1


def test_a_phase_stops_after_max_errors():
    with pytest.raises(flowc.FlowError) as info:
        flowc.load("".join(f"gpuu g{i} {{}}\n" for i in range(1000)))
    assert info.value.codes == ["F0203"] * parser.MAX_ERRORS + ["F0105"]
    assert info.value.diagnostics[-1].message == f"too many errors: the limit is {parser.MAX_ERRORS} errors"


def test_import_errors_stop_after_max_errors():
    text = "".join(f'use "missing{i}.flow"\n' for i in range(1000))
    assert codes(text) == ["F0205"] * parser.MAX_ERRORS + ["F0105"]


def test_a_second_unterminated_string_on_a_line_ends_the_line():
    # Lexing each `"` to the end of the line again was quadratic: 40,000 quotes took minutes.
    text = "workload w {\n  use std." + '\\"' * 20_000 + "\n}\n"
    assert codes(text) == ["F0102"]  # `use` inside a block; the rest of the line only echoes


# ---------------------------------------------------------------------------------- fmt keeps the meaning

def without_locations(data):
    if isinstance(data, dict):
        return {k: without_locations(v) for k, v in data.items() if k != "location"}
    if isinstance(data, list):
        return [without_locations(v) for v in data]
    return data


def same_after_fmt(text: str) -> None:
    formatted = format_source(SourceFile("t.flow", text))
    assert formatted != text
    assert without_locations(flowc.load(formatted).model_dump()) == without_locations(flowc.load(text).model_dump())


def test_a_doc_comment_documents_only_the_declaration_that_starts_the_next_line():
    # `b` took the doc comment of `a` while both sat on one line, and lost it once formatted.
    text = "## interactive\nslo a { ttft p90 <= 1 s }; slo b { ttft p90 <= 2 s }\n"
    spec = flowc.load(text)
    assert (spec.slos["a"].doc, spec.slos["b"].doc) == ("interactive", None)
    same_after_fmt(text)


def test_a_form_feed_between_a_number_and_its_unit_keeps_the_quantity():
    # `80\fGiB` lexed as a number and a name, which fmt printed as the quantity `80 GiB`.
    text = ("use std.links\ngpu g {\n  vendor nvidia\n  memory 80\fGiB\n  memory_bandwidth 1 TB/s\n"
            "  flops bf16 1 TFLOP/s\n  interconnect nvlink4\n  host_link pcie5\n}\n")
    assert flowc.load(text).gpus["g"].memory == 80 * 2**30
    same_after_fmt(text)


def test_fmt_decides_an_inline_block_by_its_printed_width():
    # 58 characters as written, 65 as printed: kept inline once, then broken up by a second fmt.
    text = "x y { a 1GiB; b 1GiB; c 1GiB; d 1GiB; e 1GiB; f 1GiB; g 1GiB }\n"
    once = format_source(SourceFile("t.flow", text))
    assert once == "x y {\n" + "".join(f"  {key} 1 GiB\n" for key in "abcdefg") + "}\n"
    assert format_source(SourceFile("t.flow", once)) == once


# ---------------------------------------------------------------------------------- the fuzzers

def test_a_short_fuzz_run_finds_no_failure(tmp_path):
    fuzz = _fuzzer()
    report = fuzz.fuzz(300, seed=0, save=tmp_path)
    assert sum(report.tried.values()) == 300
    assert set(report.tried) == set(fuzz.GENERATORS)
    assert report.failures == [], [where for where, _ in report.failures]
    assert list(tmp_path.iterdir()) == []
    assert report.exits["check", 0] > 0 and report.exits["check", 1] > 0  # inputs reach both verdicts


def test_the_fuzzer_flags_an_exception(tmp_path, monkeypatch):
    fuzz = _fuzzer()
    monkeypatch.setattr(fuzz, "check_sources", lambda path: 1 / 0)
    outcome = fuzz.run_input(b"gpu g {}\n", tmp_path)
    assert (outcome.check_exit, outcome.fmt_exit) == (3, 3)
    assert "ZeroDivisionError" in outcome.failure


def test_a_trace_name_no_file_can_have_is_a_diagnostic():
    """Regression (29 of 100,000 fuzzed inputs): a 300-character trace name raised OSError
    (File name too long) out of the checker."""
    text = (ROOT / "examples" / "tiny-cpu.flow").read_text().replace(
        "arrival poisson 4 req/s", 'arrival trace "' + "x" * 300 + '.csv"')
    with pytest.raises(flowc.FlowError) as caught:
        flowc.load(text)
    (d,) = caught.value.diagnostics
    assert d.code == "F0208" and d.label == "File name too long"


def test_a_diagnostic_on_a_long_line_shows_the_columns_around_it():
    """A diagnostic printed its whole source line: on a 1 MiB line, 1 MiB of output."""
    from flowc.compiler.diagnostics import render_text

    text = "slo s { ttft p90 <= 2 s }  # " + "x" * 3000 + "\nslo t { ttft p90 <= 2 G }  # " + "y" * 3000 + "\n"
    with pytest.raises(flowc.FlowError) as caught:
        flowc.load(text)
    out = render_text(caught.value.diagnostics, caught.value.sources)
    assert max(map(len, out.splitlines())) < 200
    shown = [line for line in out.splitlines() if line.startswith(("2 |", "  |"))]
    code, caret = [line for line in shown if "^" in line or "y" in line]
    assert code[caret.index("^")] == "G"
