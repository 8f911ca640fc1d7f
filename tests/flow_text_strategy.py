"""A hypothesis strategy for random .flow text that is syntactically valid (never checked:
kinds, keys and values are arbitrary), written with irregular spacing, `;` separators, blank
lines, comments everywhere a comment may go, lists and calls across lines."""

from __future__ import annotations

from hypothesis import strategies as st

SIMPLE = st.sampled_from(["a", "x", "tp", "gpu", "node", "in", "under", "_k", "max_seqs", "p90", "e5", "E1x",
                          "fp8", "true", "usex", "model"])
DOTTED = st.one_of(SIMPLE, st.sampled_from(["llama-3.1-70b", "h100-sxm", "p99.9", "std.gpus", "a.b-c", "x_1.y"]))
NUMBER = st.one_of(
    st.integers(0, 10**6).map(str),
    st.sampled_from(["0.6", "1_000", "1e3", "1.5e-3", ".5", "3.35", "1E+2", "007", "2_0"]),
)
UNIT = st.sampled_from(["GiB", "GB", "B", "TB/s", "Gb/s", "ms", "s", "us", "min", "h", "tok", "req/s", "TFLOP/s",
                        "%", "usd/h", "KiB", "tok/s", "G", "Gbps", "\u00b5s", "foo"])
SP = st.sampled_from([" ", "  ", "\t", " \t "])
OPT_SP = st.sampled_from(["", " ", "  "])
STRING = st.sampled_from(['""', '"traces/conv.csv"', '"a b"', '"x\\"y"', '"#not a comment"', '"{[(;"'])
COMMENT = st.sampled_from(["#", "# c", "## doc", "### h", "#x { y }", "# a; b", '# "q"', "#\t tab", "# trailing   "])
QUANTITY = st.builds(lambda n, sp, u: n + sp + u, NUMBER, st.sampled_from(["", " ", "  ", "\t"]), UNIT)
CMP = st.sampled_from(["<=", ">=", "==", "<", ">"])
LIST_SEP = st.sampled_from([" ", "", "\n  ", " \n", " # in a list\n", "\n# own line\n "])
CALL_SEP = st.sampled_from([" ", "", "\n", " # in a call\n"])


def _atoms(depth: int):
    base = [NUMBER, QUANTITY, SIMPLE, STRING]
    if depth == 0:
        return st.one_of(*base)
    inner = SUMS[depth - 1]
    list_ = st.builds(lambda items, sep, trail: "[" + ("," + sep).join(items) + ("," if trail and items else "") + "]",
                      st.lists(inner, max_size=3), LIST_SEP, st.booleans())
    callarg = st.one_of(inner, st.builds(lambda label, value: label + " " + value, SIMPLE, inner))
    call = st.builds(lambda f, items, sep: f + "(" + ("," + sep).join(items) + ")",
                     SIMPLE, st.lists(callarg, max_size=3), CALL_SEP)
    paren = st.builds(lambda a, s1, s2: "(" + s1 + a + s2 + ")", inner, OPT_SP, OPT_SP)
    return st.one_of(*base, list_, call, paren)


SUMS: dict = {}
for _depth in range(3):
    _atom = _atoms(_depth)
    SUMS[_depth] = st.one_of(_atom, st.builds(lambda x, s1, op, s2, y: x + s1 + op + s2 + y,
                                              _atom, SP, st.sampled_from(["+", "-", "*", "/"]), SP, _atom))

ARGUMENT = st.one_of(
    CMP,
    st.builds(lambda items, s1, s2: (s1 + "," + s2).join(items), st.lists(SUMS[2], min_size=2, max_size=3), OPT_SP, SP),
    SUMS[2],
    SUMS[1],
)


@st.composite
def _separator(draw):
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 4))
        if kind == 0:
            parts.append(draw(OPT_SP) + ";" + draw(OPT_SP))
        elif kind == 1:
            parts.append(draw(OPT_SP) + draw(COMMENT) + "\n")
        else:
            parts.append(draw(OPT_SP) + "\n" + draw(st.sampled_from(["", "  ", "    ", "\t"])))
    return "".join(parts)


SEPARATOR = _separator()


@st.composite
def _statement(draw, nested):
    key = draw(DOTTED)
    kept: list[str] = []
    for arg in draw(st.lists(ARGUMENT, max_size=4)):
        # `5 abc` would lex as the quantity `5 abc`: keep a number and a following word apart.
        if kept and kept[-1][-1].isdigit() and (arg[0].isalpha() or arg[0] in "_\u00b5"):
            continue
        kept.append(arg)
    text = key + "".join(draw(SP) + arg for arg in kept)
    if nested is not None and draw(st.integers(0, 3)) == 0:
        text += draw(SP) + draw(nested)
    return text


@st.composite
def _body(draw, nested):
    statements = draw(st.lists(_statement(nested), max_size=4))
    opening = draw(SEPARATOR) if statements and draw(st.booleans()) else draw(st.sampled_from([" ", "", "  "]))
    out = "{" + opening
    for i, statement in enumerate(statements):
        out += statement
        if i < len(statements) - 1 or draw(st.booleans()):
            out += draw(SEPARATOR)
        else:
            out += draw(st.sampled_from([" ", ""]))
    return out + "}"


BODIES = {0: _body(None)}
BODIES[1] = _body(BODIES[0])
BODIES[2] = _body(BODIES[1])

_DECL = st.builds(lambda kind, s1, name, s2, body: kind + s1 + name + s2 + body, DOTTED, SP, DOTTED, SP, BODIES[2])
ITEM = st.one_of(st.builds(lambda sp, target: "use" + sp + target, SP, st.one_of(DOTTED, STRING)), _DECL, _DECL)


@st.composite
def flow_text(draw):
    items = draw(st.lists(ITEM, max_size=5))
    out = draw(st.one_of(st.just(""), SEPARATOR))
    for i, item in enumerate(items):
        out += item
        if i < len(items) - 1:
            out += draw(SEPARATOR)
        else:
            out += draw(st.one_of(st.just(""), st.just("\n"), SEPARATOR))
    return out
