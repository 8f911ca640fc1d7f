"""The parser: AST shapes, exact spans, doc comments and syntax errors."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flowc
from flowc.compiler.frontend import ast
from flowc.compiler.frontend.parser import parse
from flowc.compiler.source import SourceFile


def module(text: str) -> ast.Module:
    return parse(SourceFile("s.flow", text))


def args(text: str) -> tuple[ast.Expr, ...]:
    """The arguments of the single statement in `x y { k ARGS }`."""
    return module("x y { k %s }" % text).decls[0].body.statements[0].args


def syntax_error(text: str) -> flowc.FlowError:
    with pytest.raises(flowc.FlowError) as info:
        module(text)
    return info.value


def where(span) -> tuple[int, int, int, int]:
    return (span.line, span.col, span.end_line, span.end_col)


# ------------------------------------------------------------------ spans

def test_spans_are_exact_and_one_based():
    m = module("gpu h100 {\n  memory 80 GiB\n}\n")
    (decl,) = m.decls
    assert (decl.span.start, decl.span.end) == (0, 28)
    assert where(decl.span) == (1, 1, 3, 2)
    assert where(decl.kind.span) == (1, 1, 1, 4)
    assert where(decl.name.span) == (1, 5, 1, 9)
    assert where(decl.body.open) == (1, 10, 1, 11)
    assert where(decl.body.close) == (3, 1, 3, 2)
    (stmt,) = decl.body.statements
    assert where(stmt.span) == (2, 3, 2, 16)
    assert (stmt.span.start, stmt.span.end) == (13, 26)
    assert where(stmt.key.span) == (2, 3, 2, 9)
    (quantity,) = stmt.args
    assert isinstance(quantity, ast.Quantity)
    assert where(quantity.span) == (2, 10, 2, 16)
    assert where(quantity.number.span) == (2, 10, 2, 12)
    assert where(quantity.unit_span) == (2, 13, 2, 16)
    assert all(span.file == "s.flow" for span in (decl.span, stmt.span, quantity.unit_span))


def test_spans_of_a_multiline_list_and_a_use():
    m = module('use "common.flow"\nx y {\n  k [1,\n     2]\n}\n')
    (use,) = m.uses
    assert isinstance(use.target, ast.String)
    assert use.target.value == "common.flow"
    assert where(use.span) == (1, 1, 1, 18)
    (stmt,) = m.decls[0].body.statements
    (items,) = stmt.args
    assert isinstance(items, ast.ListExpr)
    assert where(items.span) == (3, 5, 4, 8)
    assert where(stmt.span) == (3, 3, 4, 8)


def test_statement_span_ends_at_its_body():
    m = module("cluster c {\n  node x 2 {\n    gpu h100-sxm x 8\n  }\n}\n")
    (node,) = m.decls[0].body.statements
    assert node.key.text == "node"
    assert where(node.span) == (2, 3, 4, 4)
    assert [type(a) for a in node.args] == [ast.Name, ast.Number]
    (gpu,) = node.body.statements
    assert [a.text for a in gpu.args if isinstance(a, ast.Name)] == ["h100-sxm", "x"]


# ------------------------------------------------------------------ values

def test_names_with_dashes_and_dots():
    m = module("model llama-3.1-70b { x p99.9 std.gpus h100-sxm a_b }")
    assert m.decls[0].name.text == "llama-3.1-70b"
    assert [a.text for a in m.decls[0].body.statements[0].args] == ["p99.9", "std.gpus", "h100-sxm", "a_b"]


def test_use_of_a_std_module_is_one_name():
    (use,) = module("use std.gpus\n").uses
    assert isinstance(use.target, ast.Name)
    assert use.target.text == "std.gpus"


@pytest.mark.parametrize(("text", "value"), [
    ("1e3", 1000), ("1_000", 1000), ("0.6", 0.6), (".5", 0.5), ("1.5e-3", 0.0015), ("8", 8), ("1E+2", 100),
])
def test_numbers_are_numbers_not_quantities(text, value):
    (number,) = args(text)
    assert isinstance(number, ast.Number)
    assert number.text == text
    assert float(number.value) == value


@pytest.mark.parametrize("text", ["80GiB", "80 GiB", "80\tGiB", "80   GiB"])
def test_quantities_with_or_without_space(text):
    (quantity,) = args(text)
    assert isinstance(quantity, ast.Quantity)
    assert quantity.number.text == "80"
    assert quantity.unit == "GiB"


@pytest.mark.parametrize(("text", "number", "unit"), [
    ("450 GB/s", "450", "GB/s"), ("90 %", "90", "%"), ("90%", "90", "%"), ("1e3 ms", "1e3", "ms"),
    ("2.5 usd/h", "2.5", "usd/h"), ("12 req/s", "12", "req/s"), ("1.5e-3 s", "1.5e-3", "s"),
])
def test_quantity_parts(text, number, unit):
    (quantity,) = args(text)
    assert (quantity.number.text, quantity.unit) == (number, unit)


def test_a_number_then_a_digit_exponent_word_is_not_a_unit():
    number, name = args("1 e5")
    assert isinstance(number, ast.Number) and number.text == "1"
    assert isinstance(name, ast.Name) and name.text == "e5"


def test_lists_may_span_lines_and_take_a_trailing_comma():
    (items,) = args("[\n  2,\n  4,\n  8,\n]")
    assert isinstance(items, ast.ListExpr)
    assert [i.text for i in items.items] == ["2", "4", "8"]
    (empty,) = args("[]")
    assert empty.items == ()


def test_calls_with_labelled_and_positional_arguments():
    call, word, bound = args("lognormal(median 1024 tok, sigma 0.6) max 8192 tok")
    assert isinstance(call, ast.Call)
    assert call.func.text == "lognormal"
    assert [a.label.text for a in call.args] == ["median", "sigma"]
    assert isinstance(call.args[0].value, ast.Quantity) and call.args[0].value.unit == "tok"
    assert isinstance(call.args[1].value, ast.Number) and call.args[1].value.text == "0.6"
    assert word.text == "max" and bound.unit == "tok"
    (uniform,) = args("uniform(\n  128 tok,\n  2048 tok\n)")
    assert [a.label for a in uniform.args] == [None, None]
    assert [a.value.number.text for a in uniform.args] == ["128", "2048"]


def test_a_name_and_a_group_are_not_a_call():
    name, group = args("f (1)")
    assert isinstance(name, ast.Name) and isinstance(group, ast.Paren)


def test_tuples_group_comma_separated_values():
    m = module("deploy d { allow disaggregation, offload }")
    (tup,) = m.decls[0].body.statements[0].args
    assert isinstance(tup, ast.TupleExpr)
    assert [i.text for i in tup.items] == ["disaggregation", "offload"]


def test_arithmetic_precedence_and_parentheses():
    (expr,) = args("1 TiB + 2 * 80 GiB - 3")
    # ((1 TiB + (2 * 80 GiB)) - 3)
    assert isinstance(expr, ast.BinOp) and expr.op == "-"
    assert expr.left.op == "+" and expr.left.right.op == "*"
    (grouped,) = args("(64 + 8) * 1 GiB")
    assert grouped.op == "*" and isinstance(grouped.left, ast.Paren) and grouped.left.expr.op == "+"


def test_comparison_operators():
    ttft, limit = module("slo s { ttft p90 <= 500 ms }").decls[0].body.statements[0].args[1:]
    assert isinstance(ttft, ast.Operator) and ttft.op == "<="
    assert limit.unit == "ms"


def test_strings_keep_their_escapes():
    (string,) = args(r'"a \"b\" c\\d"')
    assert string.raw == r'"a \"b\" c\\d"'
    assert string.value == 'a "b" c\\d'


def test_semicolons_separate_statements():
    m = module("x y { a 1; b 2 ;c 3 }\n;\nz w {}")
    assert [s.key.text for s in m.decls[0].body.statements] == ["a", "b", "c"]
    assert [d.name.text for d in m.decls] == ["y", "w"]


# ------------------------------------------------------------------ comments

def test_doc_comments_attach_to_the_next_declaration():
    m = module(
        "# a plain comment\n"
        "## First line\n"
        "## second line\n"
        "gpu g { }\n"
        "\n"
        "## detached by the blank line\n"
        "\n"
        "gpu h { }\n"
        "### a heading, not a doc\n"
        "gpu i { }\n"
        "gpu j { }  ## trailing, not a doc\n"
        "gpu k { }\n"
    )
    docs = {d.name.text: d.doc for d in m.decls}
    assert docs == {"g": "First line\nsecond line", "h": None, "i": None, "j": None, "k": None}
    assert [c.text for c in m.comments][:3] == ["# a plain comment", "## First line", "## second line"]


def test_comments_are_collected_with_spans():
    m = module("x y {  # open\n  k [1,  # in a list\n  2]\n}  # close\n# end")
    assert [(c.text, c.span.line, c.span.col) for c in m.comments] == [
        ("# open", 1, 8), ("# in a list", 2, 10), ("# close", 4, 4), ("# end", 5, 1)]
    assert [a.text for a in m.decls[0].body.statements[0].args[0].items] == ["1", "2"]


# ------------------------------------------------------------------ syntax errors

LARK_NAMES = re.compile(r"LBRACE|RBRACE|LSQB|RSQB|LPAR|RPAR|__ANON|_NL|\bWORD\b|\bNUMBER\b|QUANTITY|SEMICOLON|"
                        r"\bCOMMA\b|\bCMP\b|\bCALL\b|\bSTRING\b|COMMENT|\$END|__IGNORE|Token\(")


def assert_no_lark_names(error: flowc.FlowError) -> None:
    for d in error.diagnostics:
        for text in (d.message, d.help or "", d.label, *d.notes, *(r.message for r in d.related)):
            assert not LARK_NAMES.search(text), text


def test_unexpected_token_f0102():
    error = syntax_error("gpu a b {\n}\n")
    assert error.codes == ["F0102"]
    (d,) = error.diagnostics
    assert d.message == "unexpected `b`"
    assert where(d.span) == (1, 7, 1, 8)
    assert "one name" in d.help
    assert_no_lark_names(error)


def test_unexpected_closing_brace_f0102():
    error = syntax_error("gpu g { a 1 }}\n")
    (d,) = error.diagnostics
    assert (d.code, d.message) == ("F0102", "unexpected `}`")
    assert where(d.span) == (1, 14, 1, 15)
    assert "a new line" in d.help
    assert_no_lark_names(error)


def test_negative_numbers_are_explained():
    error = syntax_error("gpu g { a -1 }\n")
    (d,) = error.diagnostics
    assert d.message == "unexpected `-`"
    assert "never negative" in d.help


def test_unexpected_character_f0101():
    error = syntax_error("gpu g { memory = 80 GiB }\n")
    (d,) = error.diagnostics
    assert (d.code, d.message) == ("F0101", "unexpected character `=`")
    assert where(d.span) == (1, 16, 1, 17)
    assert "not `memory = 80 GiB`" in d.help


def test_unterminated_string_f0104():
    error = syntax_error('workload w {\n  arrival trace "traces/conv.csv\n}\n')
    (d,) = error.diagnostics
    assert (d.code, d.message) == ("F0104", "unterminated string")
    assert where(d.span) == (2, 17, 2, 33)
    assert '`"`' in d.help


def test_end_of_file_f0103_points_at_the_unclosed_brace():
    error = syntax_error("gpu g {\n  node x 2 {\n    a 1\n  }\n")
    (d,) = error.diagnostics
    assert (d.code, d.message) == ("F0103", "unexpected end of file")
    assert where(d.span) == (5, 1, 5, 1)
    (related,) = d.related
    assert where(related.span) == (1, 7, 1, 8)
    assert "never closed" in related.message
    assert_no_lark_names(error)


def test_end_of_file_in_a_nested_block_points_at_the_inner_brace():
    error = syntax_error("gpu g {\n  node x 2 {\n    a 1\n")
    (related,) = error.diagnostics[0].related
    assert where(related.span) == (2, 12, 2, 13)


def test_several_syntax_errors_on_different_lines_are_reported_at_once():
    error = syntax_error("gpu g { a = 1 }\ngpu h {\n  b : 2\n}\nlink l { c } }\ngpu a b {}\n")
    assert [(d.code, d.span.line) for d in error.diagnostics] == [
        ("F0101", 1), ("F0101", 3), ("F0102", 5), ("F0102", 6)]
    assert_no_lark_names(error)


def test_unclosed_bracket_is_named():
    error = syntax_error("gpu g { a [1, 2 }\n")
    (d,) = error.diagnostics
    assert d.code == "F0102"
    assert "`[`" in d.message
    assert [where(r.span)[:2] for r in d.related] == [(1, 11)]
    assert_no_lark_names(error)


def test_rendered_syntax_error_shows_the_line_and_a_caret():
    error = syntax_error("gpu a b {\n}\n")
    text = str(error)
    assert "error[F0102]: unexpected `b`" in text
    assert "--> s.flow:1:7" in text
    assert "1 | gpu a b {" in text
    assert "      ^ unexpected here" in text


GARBAGE = st.lists(st.sampled_from(list('{}[](),;#"=<>*/+-%._ \n0a') + [
    "gpu", "g", "x", "1", "80 GiB", "<=", "f(", "use", "\n", "  ", "std.gpus", '"s"', "1e3", "p99.9"]), max_size=30)


@settings(max_examples=300, deadline=None)
@given(GARBAGE)
def test_syntax_errors_never_name_lark_terminals(pieces):
    text = "".join(pieces)
    try:
        module(text)
    except flowc.FlowError as error:
        assert error.diagnostics
        assert len(error.diagnostics) <= 10
        for d in error.diagnostics:
            assert re.fullmatch(r"F01\d\d", d.code)
            assert d.span is not None and 1 <= d.span.line <= text.count("\n") + 1
        assert_no_lark_names(error)
