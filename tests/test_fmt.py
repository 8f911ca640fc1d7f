"""The formatter: canonical output, comments kept, idempotence, and fixed-point properties on
random valid-syntax text."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
from flow_text_strategy import flow_text
from hypothesis import HealthCheck, given, note, settings

import flowc
import flowc.cli
from flowc.compiler.frontend.fmt import format_source
from flowc.compiler.frontend.parser import _parser, parse
from flowc.compiler.source import SourceFile

ROOT = Path(__file__).resolve().parents[1]


def fmt(text: str) -> str:
    return format_source(SourceFile("t.flow", text))


MESSY = """\


# Top comment
use   std.gpus;use std.models



## A chat cluster
cluster   lab{   # the lab
node x 2 {
    gpu h100-sxm x 8   # eight per node
        host_memory   2TiB
  }


  network ib-ndr x 8
  # about the network
}
workload chat {  arrival poisson 12req/s
  prompt lognormal( median 1024 tok ,sigma 0.6 )   max 8192tok
  output lognormal(median 256 tok, sigma 0.8) max 2048 tok ; requests 2000 req
}
slo interactive { ttft p90<=500 ms; tpot p90 <= 50 ms }
deploy chatbot {
  model llama-3.1-70b {weights fp8;kv fp8}
  on lab
  serve chat under interactive
  tp in [2,4,
         8,]   # narrowed
  price (64+8) * 1 GiB/(2 s)
  allow disaggregation ,offload
  # last comment in the block
}
# end of file"""

CANONICAL = """\
# Top comment
use std.gpus
use std.models

## A chat cluster
cluster lab {  # the lab
  node x 2 {
    gpu h100-sxm x 8  # eight per node
    host_memory 2 TiB
  }

  network ib-ndr x 8
  # about the network
}
workload chat {
  arrival poisson 12 req/s
  prompt lognormal(median 1024 tok, sigma 0.6) max 8192 tok
  output lognormal(median 256 tok, sigma 0.8) max 2048 tok
  requests 2000 req
}
slo interactive { ttft p90 <= 500 ms; tpot p90 <= 50 ms }
deploy chatbot {
  model llama-3.1-70b { weights fp8; kv fp8 }
  on lab
  serve chat under interactive
  tp in [2, 4, 8]  # narrowed
  price (64 + 8) * 1 GiB / (2 s)
  allow disaggregation, offload
  # last comment in the block
}
# end of file
"""


def test_messy_spec_formats_to_the_canonical_text():
    assert fmt(MESSY) == CANONICAL


def test_canonical_text_is_a_fixed_point():
    assert fmt(CANONICAL) == CANONICAL


def test_formatting_keeps_the_meaning():
    # The messy text without its bogus `price` line checks to the same spec as its formatted form.
    messy = MESSY.replace("  price (64+8) * 1 GiB/(2 s)\n", "")
    assert without_locations(flowc.load(messy).model_dump()) == without_locations(flowc.load(fmt(messy)).model_dump())


def without_locations(data):
    if isinstance(data, dict):
        return {k: without_locations(v) for k, v in data.items() if k != "location"}
    if isinstance(data, list):
        return [without_locations(v) for v in data]
    return data


@pytest.mark.parametrize(("text", "expected"), [
    ("", ""),
    ("\n\n\n", ""),
    ("# only a comment", "# only a comment\n"),
    ("x y {}", "x y {}\n"),
    ("x y {   }", "x y {}\n"),
    ("x y {\n}\n", "x y {\n}\n"),
    ("x y { a 1 }", "x y { a 1 }\n"),
    ("x y {\n\n\n  a 1\n\n\n  b 2\n\n\n}", "x y {\n  a 1\n\n  b 2\n}\n"),
    ("x y { a 1 }\n\n\n\nz w { b 2 }", "x y { a 1 }\n\nz w { b 2 }\n"),
    ("x y { a 1 } ; z w { b 2 }", "x y { a 1 }\nz w { b 2 }\n"),
    ("x y { a [1,] f(2,) }", "x y { a [1] f(2) }\n"),
    ("x y { a [\n1,\n2\n] }", "x y {\n  a [1, 2]\n}\n"),
    ("x y { a 1GiB  2\tms 3   % }", "x y { a 1 GiB 2 ms 3 % }\n"),
    ("x y { a 1e3 1_000 .5 1.5e-3 }", "x y { a 1e3 1_000 .5 1.5e-3 }\n"),
    ('x y { a "x\\"y"  "#no" }', 'x y { a "x\\"y" "#no" }\n'),
    ("x y { n x 2 { a 1 } }", "x y {\n  n x 2 { a 1 }\n}\n"),
    ("x y {\ta 1 }", "x y { a 1 }\n"),
    ("x y { a 1 }\r\n# c\r\n", "x y { a 1 }\n# c\n"),
    ("x y { a b ,c,  d }", "x y { a b, c, d }\n"),
    ("x y { a 1 - (2 - 3) * 4/5 }", "x y { a 1 - (2 - 3) * 4 / 5 }\n"),
    ("x y { a<=1 }", "x y { a <= 1 }\n"),
])
def test_canonical_forms(text, expected):
    assert fmt(text) == expected
    assert fmt(expected) == expected


def test_a_long_one_line_body_is_broken_up():
    text = "x y { alpha 1; beta 2; gamma 3; delta 4; epsilon 5; zeta 6; eta 7; theta 8 }"
    assert fmt(text) == "x y {\n" + "".join(f"  {w} {i}\n" for i, w in enumerate(
        ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"], start=1)) + "}\n"


# ------------------------------------------------------------------ comments

def comment_texts(text: str) -> list[str]:
    return [c.text for c in parse(SourceFile("t.flow", text)).comments]


def test_every_kind_of_comment_is_kept():
    text = (
        "# own line at the top\n"
        "x y {  # after the brace\n"
        "  # own line in a block\n"
        "  a 1  # trailing\n"
        "  n {\n"
        "    # alone in a nested block\n"
        "  }\n"
        "  b [1,  # in a list\n"
        "     2]\n"
        "  # before the closing brace\n"
        "}  # after the closing brace\n"
        "# at the end of the file"
    )
    expected = (
        "# own line at the top\n"
        "x y {  # after the brace\n"
        "  # own line in a block\n"
        "  a 1  # trailing\n"
        "  n {\n"
        "    # alone in a nested block\n"
        "  }\n"
        "  b [1, 2]  # in a list\n"
        "  # before the closing brace\n"
        "}  # after the closing brace\n"
        "# at the end of the file\n"
    )
    assert fmt(text) == expected
    assert comment_texts(fmt(text)) == comment_texts(text)


def test_trailing_comments_of_a_run_are_aligned():
    text = "x y {\n  a 1 # one\n  bbbbbb 2 # two\n\n  c 3 # three\n}\n"
    assert fmt(text) == "x y {\n  a 1       # one\n  bbbbbb 2  # two\n\n  c 3  # three\n}\n"


def test_comments_inside_a_multiline_list_stay_in_order():
    text = "x y {\n  a [1,  # one\n     2,  # two\n     3]\n}\n"
    out = fmt(text)
    assert out == "x y {\n  # one\n  a [1, 2, 3]  # two\n}\n"
    assert comment_texts(out) == ["# one", "# two"]


def test_trailing_whitespace_in_comments_is_dropped():
    assert fmt("# c   \nx y {}  # d \t\n") == "# c\nx y {}  # d\n"


def test_doc_comments_stay_attached():
    out = fmt("## doc\ngpu g {\n  a 1\n}\n")
    assert parse(SourceFile("t.flow", out)).decls[0].doc == "doc"


def test_trailing_comment_follows_the_code_it_was_written_after():
    assert fmt("use std.gpus; use std.models  # models\n") == "use std.gpus\nuse std.models  # models\n"
    assert fmt("x y {\n  a 1; b 2  # about b\n}\n") == "x y {\n  a 1\n  b 2  # about b\n}\n"
    assert fmt("x y { a 1\n  b 2 }  # end of y\n") == "x y {\n  a 1\n  b 2\n}  # end of y\n"


def test_nul_characters_in_comments_are_kept():
    assert fmt("# a\0b\nx y {}\n") == "# a\0b\nx y {}\n"


def test_a_nul_character_in_a_string_is_a_syntax_error():
    # Strings name files, and no file name holds a NUL: refused where it is, not at the file system.
    with pytest.raises(flowc.FlowError) as info:
        fmt('x y { a "p\0q" }\n')
    assert info.value.codes == ["F0101"]
    assert (info.value.diagnostics[0].span.line, info.value.diagnostics[0].span.col) == (1, 11)


def test_formatting_a_syntax_error_raises():
    with pytest.raises(flowc.FlowError) as info:
        fmt("x y { a = 1 }")
    assert info.value.codes == ["F0101"]


# ------------------------------------------------------------------ properties

def tokens(text: str) -> list[tuple[str, str]]:
    """The token stream without newlines, `;` and comments, with the blanks inside a quantity
    removed and trailing commas in lists and calls dropped: what formatting must not change."""
    raw = [(t.type, "".join(t.value.split()) if t.type == "QUANTITY" else t.value)
           for t in _parser().lark.lex(text, dont_ignore=False) if t.type not in ("_NL", "SEMICOLON", "COMMENT")]
    return [t for i, t in enumerate(raw)
            if not (t[0] == "COMMA" and i + 1 < len(raw) and raw[i + 1][0] in ("RSQB", "RPAR"))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(flow_text())
def test_format_is_a_fixed_point_that_keeps_tokens_and_comments(text):
    note(repr(text))
    source = SourceFile("t.flow", text)
    module = parse(source)  # the strategy only makes valid syntax
    once = format_source(source)
    note(repr(once))
    assert fmt(once) == once
    assert tokens(once) == tokens(text)
    assert comment_texts(once) == [c.text for c in module.comments]
    assert all(line == line.rstrip() for line in once.splitlines())
    assert once == "" or (once.endswith("\n") and not once.endswith("\n\n"))


def shipped_files() -> list[str]:
    return sorted(glob.glob(str(ROOT / "stdlib" / "*.flow")))


def example_files() -> list[str]:
    return sorted(glob.glob(str(ROOT / "examples" / "*.flow")))


def test_stdlib_files_are_formatted():
    files = shipped_files()
    assert len(files) >= 4
    assert flowc.cli.main(["fmt", "--check", *files]) == 0
    for name in files:
        text = Path(name).read_text(encoding="utf-8")
        assert fmt(text) == text, name


def test_examples_are_formatted():
    files = example_files()
    if not files:
        pytest.skip("no examples/*.flow yet")
    assert flowc.cli.main(["fmt", "--check", *files]) == 0
    for name in files:
        text = Path(name).read_text(encoding="utf-8")
        assert fmt(text) == text, name
