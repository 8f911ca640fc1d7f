"""Parse .flow text into the AST (compiler/frontend/ast.py) with lark, turning lark's errors into
diagnostics that never name lark's terminals."""

from __future__ import annotations

import functools
from importlib import resources

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from flowc.compiler.diagnostics import Diagnostic, FlowError, Label
from flowc.compiler.frontend import ast
from flowc.compiler.source import SourceFile, Span

MAX_SYNTAX_ERRORS = 10


class _PostLexer:
    """Drops newlines inside brackets and parentheses (so lists may span lines) and collects
    comments, which the grammar never sees but the formatter must keep."""

    always_accept = ("COMMENT", "_NL")

    def __init__(self) -> None:
        self.comments: list[Token] = []
        self.open: list[Token] = []  # brackets open at the current token
        self.unmatched: Token | None = None  # a closing bracket with nothing to close

    def process(self, stream):
        self.open = []
        for token in stream:
            kind = token.type
            if kind == "COMMENT":
                self.comments.append(token)
                continue
            if kind in ("LSQB", "LPAR", "CALL"):
                self.open.append(token)
            elif kind in ("RSQB", "RPAR"):
                if not self.open:
                    self.unmatched = token
                else:
                    self.open.pop()
            elif kind == "_NL" and self.open:
                continue
            yield token


@functools.cache
def _parser() -> tuple[Lark, _PostLexer]:
    grammar = resources.files("flowc.grammar").joinpath("flow.lark").read_text(encoding="utf-8")
    postlex = _PostLexer()
    parser = Lark(grammar, parser="lalr", strict=True, postlex=postlex, maybe_placeholders=False,
                  propagate_positions=True, cache=True)
    return parser, postlex


def parse(source: SourceFile) -> ast.Module:
    """Parse one file. Raises FlowError with the syntax errors found (F01xx)."""
    parser, postlex = _parser()
    postlex.comments, postlex.unmatched = [], None
    errors: list[Diagnostic] = []

    def recover(error: UnexpectedInput) -> bool:
        # Keep going to report later mistakes, but only one per line: the rest are echoes.
        # Inside an unclosed bracket newlines are invisible, so recovery would only echo.
        diagnostic = _syntax_diagnostic(error, source, postlex)
        if not errors or diagnostic.span.line != errors[-1].span.line:
            errors.append(diagnostic)
        return len(errors) < MAX_SYNTAX_ERRORS and not isinstance(error, UnexpectedEOF) and not postlex.open

    try:
        tree = parser.parse(source.text, on_error=recover)
    except UnexpectedInput as error:
        diagnostic = _syntax_diagnostic(error, source, postlex)
        if not errors or diagnostic.span.line != errors[-1].span.line:
            errors.append(diagnostic)
        tree = None
    if errors:
        raise FlowError(errors, {source.name: source})
    comments = tuple(ast.Comment(t.value.rstrip(), source.span(t.start_pos, t.end_pos)) for t in postlex.comments)
    try:
        module = _ToAst(source).transform(tree)
    except VisitError as error:  # only a bug can get here: the grammar and the tree agree
        raise error.orig_exc from None
    items = tuple(_attach_docs(module, comments, source))
    return ast.Module(source.name, items, comments)


def _attach_docs(items, comments: tuple[ast.Comment, ...], source: SourceFile):
    """A run of `##` comments on the lines right above a declaration documents it."""
    docs = {c.span.line: c.text[2:].strip() for c in comments
            if c.text.startswith("##") and not c.text.startswith("###")}
    for item in items:
        if not isinstance(item, ast.Decl):
            yield item
            continue
        lines, line = [], item.span.line - 1
        while line in docs and source.line_text(line).lstrip().startswith("##"):
            lines.append(docs[line])
            line -= 1
        yield ast.Decl(item.kind, item.name, item.body, item.span, "\n".join(reversed(lines)) or None)


class _ToAst(Transformer):
    def __init__(self, source: SourceFile):
        super().__init__()
        self.source = source

    def _span(self, token: Token) -> Span:
        return self.source.span(token.start_pos, token.end_pos)

    def _name(self, token: Token) -> ast.Name:
        return ast.Name(str(token), self._span(token))

    def start(self, items):
        return list(items)

    def use(self, children):
        keyword, target = children
        node = self._name(target) if target.type == "WORD" else ast.String(str(target), self._span(target))
        return ast.Use(node, self._span(keyword).to(node.span))

    def decl(self, children):
        kind, name, body = children
        return ast.Decl(self._name(kind), self._name(name), body, self._span(kind).to(body.close))

    def body(self, children):
        open_brace, *statements, close_brace = children
        return ast.Body(tuple(statements), self._span(open_brace), self._span(close_brace))

    def stmt(self, children):
        key, *rest = children
        body = rest.pop() if rest and isinstance(rest[-1], ast.Body) else None
        key_node = self._name(key)
        end = body.close if body else (rest[-1].span if rest else key_node.span)
        return ast.Statement(key_node, tuple(rest), body, key_node.span.to(end))

    def tuple(self, items):
        return ast.TupleExpr(tuple(items), items[0].span.to(items[-1].span))

    def operator(self, children):
        (token,) = children
        return ast.Operator(str(token), self._span(token))

    def binop(self, children):
        left, op, right = children
        return ast.BinOp(str(op), left, right, left.span.to(right.span))

    def number(self, children):
        (token,) = children
        return ast.Number(str(token), self._span(token))

    def quantity(self, children):
        (token,) = children
        text = str(token)
        number_end = _number_length(text)
        unit_start = number_end + (len(text[number_end:]) - len(text[number_end:].lstrip(" \t")))
        start = token.start_pos
        number = ast.Number(text[:number_end], self.source.span(start, start + number_end))
        unit_span = self.source.span(start + unit_start, token.end_pos)
        return ast.Quantity(number, text[unit_start:], unit_span, self._span(token))

    def name(self, children):
        (token,) = children
        return self._name(token)

    def string(self, children):
        (token,) = children
        return ast.String(str(token), self._span(token))

    @v_args(meta=True)
    def list(self, meta, children):
        return ast.ListExpr(tuple(children), self.source.span(meta.start_pos, meta.end_pos))

    @v_args(meta=True)
    def call(self, meta, children):
        head, *args = children
        func = ast.Name(str(head)[:-1], self.source.span(head.start_pos, head.end_pos - 1))
        return ast.Call(func, tuple(args), self.source.span(meta.start_pos, meta.end_pos))

    def callarg(self, children):
        if len(children) == 2:
            label, value = children
            label_node = self._name(label)
            return ast.CallArg(label_node, value, label_node.span.to(value.span))
        (value,) = children
        return ast.CallArg(None, value, value.span)

    @v_args(meta=True)
    def paren(self, meta, children):
        (inner,) = children
        return ast.Paren(inner, self.source.span(meta.start_pos, meta.end_pos))


def _number_length(text: str) -> int:
    i = 0
    while i < len(text) and (text[i].isdigit() or text[i] in "._"):
        i += 1
    if i < len(text) and text[i] in "eE":
        j = i + 1
        if j < len(text) and text[j] in "+-":
            j += 1
        if j < len(text) and text[j].isdigit():
            while j < len(text) and text[j].isdigit():
                j += 1
            i = j
    return i


# ---------------------------------------------------------------------------------- errors

_TOKEN_WORDS = {
    "WORD": "a name",
    "NUMBER": "a number",
    "QUANTITY": "a quantity",
    "STRING": "a string",
    "CALL": "a call such as `uniform(...)`",
    "CMP": "a comparison such as `<=`",
    "USE": "`use`",
    "LBRACE": "`{`",
    "RBRACE": "`}`",
    "LSQB": "`[`",
    "RSQB": "`]`",
    "LPAR": "`(`",
    "RPAR": "`)`",
    "COMMA": "`,`",
    "SEMICOLON": "`;`",
    "PLUS": "`+`",
    "MINUS": "`-`",
    "STAR": "`*`",
    "SLASH": "`/`",
    "_NL": "a new line",
    "$END": "the end of the file",
}


def _describe_token(token: Token) -> str:
    if token.type == "$END":
        return "the end of the file"
    if token.type == "_NL":
        return "the end of the line"
    return f"`{token.value}`"


def _expected(expected) -> str:
    words = sorted({_TOKEN_WORDS.get(name, f"`{name.lower()}`") for name in expected})
    if not words:
        return ""
    if len(words) == 1:
        return f"expected {words[0]}"
    return "expected " + ", ".join(words[:-1]) + " or " + words[-1]


def _syntax_diagnostic(error: UnexpectedInput, source: SourceFile, postlex: _PostLexer) -> Diagnostic:
    if isinstance(error, UnexpectedCharacters):
        return _unexpected_character(error, source)
    if isinstance(error, UnexpectedEOF) or (isinstance(error, UnexpectedToken) and error.token.type == "$END"):
        return _unexpected_end(source)
    assert isinstance(error, UnexpectedToken)
    token = error.token
    span = (source.span(token.start_pos, token.end_pos) if token.type != "_NL"
            else source.span(token.start_pos, token.start_pos + 1))
    expected = set(error.expected) - {"COMMENT"}
    help_text = _expected(expected)
    if postlex.unmatched is token:
        return Diagnostic("F0102", f"unmatched `{token.value}`", span, "nothing to close here",
                          f"remove it, or add the opening `{'(' if token.value == ')' else '['}` before it")
    if postlex.open and token.type in ("RBRACE", "SEMICOLON", "USE"):
        opener = postlex.open[-1]
        bracket = "(" if opener.type == "CALL" else opener.value
        return Diagnostic("F0102", f"unexpected {_describe_token(token)}: a `{bracket}` is still open", span,
                          "unexpected here", f"close it with `{')' if bracket == '(' else ']'}`",
                          related=(Label(source.span(opener.end_pos - 1, opener.end_pos), "opened here"),))
    if len(expected) > 6 and "_NL" in expected:
        help_text = "expected another value or the end of the statement"
    elif len(expected) > 6:
        help_text = "expected a value: a number, a quantity, a name, a string, a list or a call"
    if token.type == "LBRACE" and "LBRACE" not in expected:
        help_text = "a top-level declaration is `KIND NAME { ... }` with one name, e.g. `gpu my-gpu { ... }`"
    elif token.type == "_NL" and "LBRACE" in expected:
        help_text = "a top-level declaration needs a body: `KIND NAME { ... }`"
    elif token.type == "MINUS" and "NUMBER" in expected:
        help_text = help_text + "; values in flowc are never negative"
    elif token.type == "WORD" and "LBRACE" in expected:
        help_text = "a top-level declaration takes exactly one name: `KIND NAME { ... }`"
    return Diagnostic("F0102", f"unexpected {_describe_token(token)}", span, "unexpected here", help_text)


def _unexpected_character(error: UnexpectedCharacters, source: SourceFile) -> Diagnostic:
    offset = error.pos_in_stream
    char = source.text[offset]
    span = source.span(offset, offset + 1)
    if char == '"':
        end = source.text.find("\n", offset)
        end = len(source.text) if end < 0 else end
        return Diagnostic(
            "F0104", "unterminated string", source.span(offset, end), "this string is never closed",
            'close it with `"` on the same line',
        )
    helps = {
        "=": "attributes take no `=`: write `memory 80 GiB`, not `memory = 80 GiB`",
        ":": "attributes take no `:`: write `memory 80 GiB`, not `memory: 80 GiB`",
        "'": 'strings use double quotes: `"file.csv"`',
    }
    shown = repr(char)[1:-1] if not char.isprintable() else char
    return Diagnostic(
        "F0101", f"unexpected character `{shown}`", span, "not valid here",
        helps.get(char, "remove it; see docs/language.md for the syntax"),
    )


def _unexpected_end(source: SourceFile) -> Diagnostic:
    unclosed = _last_unclosed_brace(source)
    related = (Label(unclosed, "this `{` is never closed"),) if unclosed else ()
    return Diagnostic(
        "F0103", "unexpected end of file", source.end_span, "the file ends here",
        "close every `{` with a `}`" if unclosed else "the last statement is incomplete",
        related=related,
    )


def _last_unclosed_brace(source: SourceFile) -> Span | None:
    parser, _ = _parser()
    stack: list[Token] = []
    try:
        for token in parser.lex(source.text, dont_ignore=False):
            if token.type == "LBRACE":
                stack.append(token)
            elif token.type == "RBRACE" and stack:
                stack.pop()
    except UnexpectedInput:
        pass
    if not stack:
        return None
    return source.span(stack[-1].start_pos, stack[-1].end_pos)
