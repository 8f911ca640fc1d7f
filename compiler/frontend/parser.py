"""Parse .flow text into the AST (compiler/frontend/ast.py) with lark, turning lark's errors into
diagnostics that never name lark's terminals.

lark's LALR parser calls `_ToAst` as it reduces each rule, so the AST is built bottom-up
without a parse tree and without recursion; the post-lexer checks the limits below on the
token stream first, so no input can build a tree deeper or wider than they allow."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from flowc.compiler.diagnostics import Diagnostic, FlowError, Label
from flowc.compiler.frontend import ast
from flowc.compiler.source import SourceFile, Span

# ---------------------------------------------------------------------------------- limits
# What one input may cost is bounded here, far above any real spec (docs/language.md, "Limits").
# Going past one is F0105. Sizes, token lengths, nesting and item counts are checked on the text
# and the token stream, before a tree exists; MAX_ERRORS is checked as diagnostics are collected.
MAX_SOURCE_CHARS = 2**20  # characters in one file; dense with tokens, that is ~10 s of parsing
MAX_TOKEN_CHARS = 4096  # characters in one string, name or number
MAX_DEPTH = 64  # open brackets and braces, plus the operators so far in each open item
MAX_ITEMS = 4096  # items of one list or call, or comma-separated values of one argument
MAX_SYNTAX_ERRORS = 10  # per file; later ones are mostly echoes of the first
MAX_ERRORS = 100  # diagnostics of one phase (imports, names and types, ...); flowc stops there

_OPENERS = ("LSQB", "LPAR", "CALL", "LBRACE")
_CLOSERS = ("RSQB", "RPAR", "RBRACE")
_OPERATORS = ("PLUS", "MINUS", "STAR", "SLASH")
_SIZED = ("WORD", "CALL", "NUMBER", "QUANTITY", "STRING")


@dataclass(frozen=True)
class Limit:
    """One of the limits above: what goes past it, the limit and what it counts."""

    what: str
    limit: int
    unit: str
    help: str

    def diagnostic(self, span: Span | None, label: str = "") -> Diagnostic:
        return Diagnostic("F0105", f"{self.what}: the limit is {self.limit} {self.unit}", span, label, self.help,
                          notes=("the front end's limits are listed in docs/language.md, under Limits",))


def capped(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    """The diagnostics of a phase, cut at MAX_ERRORS with an F0105 saying that flowc stopped there."""
    if len(diagnostics) < MAX_ERRORS:
        return diagnostics
    limit = Limit("too many errors", MAX_ERRORS, "errors", "fix the errors above and check again")
    return diagnostics[:MAX_ERRORS] + [limit.diagnostic(None)]


class _LimitExceeded(Exception):
    """Raised by the post-lexer at the first token past a limit."""

    def __init__(self, limit: Limit, token: Token, label: str):
        super().__init__(limit.what)
        self.limit, self.token, self.label = limit, token, label


@dataclass
class _Level:
    """An open bracket or brace (or the file itself): operators in its current item, items so far."""

    opener: Token | None
    operators: int = 0
    items: int = 1


class _Limits:
    """Checks each token against the limits. The nesting depth counts open brackets and braces
    plus the operators of each open item, which bounds the depth of the tree the parser builds:
    `1 + 1 + 1` is a tree two operators deep."""

    def __init__(self) -> None:
        self.levels = [_Level(None)]
        self.operators = 0  # over all open levels

    def feed(self, token: Token) -> None:
        kind, level = token.type, self.levels[-1]
        if kind in _SIZED and len(token.value) > MAX_TOKEN_CHARS:
            what = "string" if kind == "STRING" else "name" if kind in ("WORD", "CALL") else "number"
            raise _LimitExceeded(Limit(f"this {what} has {len(token.value)} characters", MAX_TOKEN_CHARS,
                                       "characters", f"no {what} in a spec needs to be this long"),
                                 token, f"a {what} longer than the limit")
        if kind in _OPENERS:
            if kind == "LBRACE":  # a statement's arguments end at its block
                self._end_item(level)
            self.levels.append(_Level(token))
        elif kind in _CLOSERS and len(self.levels) > 1:
            self._end_item(self.levels.pop())
        elif kind in _OPERATORS:
            level.operators += 1
            self.operators += 1
        elif kind == "COMMA":
            self._end_item(level)
            level.items += 1
            if level.items > MAX_ITEMS:
                raise _LimitExceeded(Limit("too many items in one list, call or argument", MAX_ITEMS, "items",
                                           "list fewer values; no choice of knobs or distribution needs this many"),
                                     token, "one item too many")
        elif kind in ("_NL", "SEMICOLON") and (level.opener is None or level.opener.type == "LBRACE"):
            self._end_item(level)  # a statement ends: its values and operators are done
            level.items = 1
        if len(self.levels) - 1 + self.operators > MAX_DEPTH:
            raise _LimitExceeded(Limit("nesting too deep", MAX_DEPTH, "levels of brackets, braces and operators",
                                       "write the value with fewer brackets and operators: compute it and "
                                       "write the result"), token, "one level too deep")

    def _end_item(self, level: _Level) -> None:
        self.operators -= level.operators
        level.operators = 0


class _PostLexer:
    """Checks the limits, drops newlines inside brackets and parentheses (so lists may span
    lines) and collects comments, which the grammar never sees but the formatter must keep."""

    always_accept = ("COMMENT", "_NL")

    def __init__(self) -> None:
        self.comments: list[Token] = []
        self.open: list[Token] = []  # brackets open at the current token
        self.braces: list[Token] = []  # braces open at the current token
        self.unmatched: Token | None = None  # a closing bracket with nothing to close

    def process(self, stream):
        self.comments, self.open, self.braces, self.unmatched = [], [], [], None
        limits = _Limits()
        for token in stream:
            kind = token.type
            if kind == "COMMENT":
                self.comments.append(token)
                continue
            limits.feed(token)
            if kind in ("LSQB", "LPAR", "CALL"):
                self.open.append(token)
            elif kind in ("RSQB", "RPAR"):
                if not self.open:
                    self.unmatched = token
                else:
                    self.open.pop()
            elif kind == "LBRACE":
                self.braces.append(token)
            elif kind == "RBRACE" and self.braces:
                self.braces.pop()
            elif kind == "_NL" and self.open:
                continue
            yield token


@dataclass(frozen=True)
class _Machine:
    lark: Lark
    postlex: _PostLexer
    to_ast: _ToAst


@functools.cache
def _parser() -> _Machine:
    grammar = resources.files("flowc.grammar").joinpath("flow.lark").read_text(encoding="utf-8")
    postlex, to_ast = _PostLexer(), _ToAst()
    lark = Lark(grammar, parser="lalr", strict=True, postlex=postlex, maybe_placeholders=False,
                transformer=to_ast, cache=True)
    return _Machine(lark, postlex, to_ast)


def parse(source: SourceFile) -> ast.Module:
    """Parse one file. Raises FlowError with the syntax errors found (F01xx), or with the
    limit the file goes past (F0105)."""
    check_size(source)
    machine = _parser()
    postlex = machine.postlex
    machine.to_ast.source = source
    errors: list[Diagnostic] = []

    def add(error: UnexpectedInput) -> bool:
        """Record the error unless it echoes one on the same line; whether it was new."""
        diagnostic = _syntax_diagnostic(error, source, postlex)
        if errors and diagnostic.span.line == errors[-1].span.line:
            return False
        errors.append(diagnostic)
        return True

    def recover(error: UnexpectedInput) -> bool:
        # Keep going to report later mistakes. Inside an unclosed bracket newlines are
        # invisible, so recovery would only echo.
        new = add(error)
        if isinstance(error, UnexpectedCharacters) and source.text[error.pos_in_stream] == '"':
            _skip_string(error, source, to_line_end=not new)
        return len(errors) < MAX_SYNTAX_ERRORS and not isinstance(error, UnexpectedEOF) and not postlex.open

    try:
        items = machine.lark.parse(source.text, on_error=recover)
    except UnexpectedInput as error:
        add(error)
    except _LimitExceeded as error:
        start = error.token.start_pos
        errors.append(error.limit.diagnostic(source.span(start, start + 1), error.label))
    if errors:
        raise FlowError(errors, {source.name: source})
    comments = tuple(ast.Comment(t.value.rstrip(), source.span(t.start_pos, t.end_pos)) for t in postlex.comments)
    return ast.Module(source.name, tuple(_attach_docs(items, comments, source)), comments)


# A string as the lexer would take it if NUL characters were allowed.
_STRING_WITH_NUL = re.compile(r'"(?:[^"\\\n]|\\.)*"')


def _skip_string(error: UnexpectedCharacters, source: SourceFile, to_line_end: bool) -> None:
    """Resume lexing after a string that holds a NUL (reported once, at the NUL), or at the end
    of the line for a second unterminated string on one line: each `"` would otherwise be
    lexed to the end of the line again, quadratic in the line's length."""
    counter = error.interactive_parser.lexer_thread.state.line_ctr
    string = _STRING_WITH_NUL.match(source.text, counter.char_pos)
    if string and "\0" in string.group():
        end = string.end()
    elif to_line_end:
        end = source.text.find("\n", counter.char_pos)
        end = len(source.text) if end < 0 else end
    else:
        return
    counter.feed(source.text[counter.char_pos:end])


def check_size(source: SourceFile) -> None:
    """F0105 for a file longer than MAX_SOURCE_CHARS, pointing where the limit is crossed."""
    if len(source.text) > MAX_SOURCE_CHARS:
        limit = Limit(f"`{source.name}` is too long", MAX_SOURCE_CHARS, "characters",
                      'split the spec into files that `use "..."` each other')
        span = source.span(MAX_SOURCE_CHARS, MAX_SOURCE_CHARS + 1)
        raise FlowError([limit.diagnostic(span, "the file goes past the limit here")], {source.name: source})


def _attach_docs(items, comments: tuple[ast.Comment, ...], source: SourceFile):
    """A run of `##` comments on the lines right above a declaration documents it, when the
    declaration starts its line: in `slo a {}; slo b {}` the comment documents `a` alone, as it
    does once `flowc fmt` has put `b` on a line of its own."""
    docs = {c.span.line: c.text[2:].strip() for c in comments
            if c.text.startswith("##") and not c.text.startswith("###")}
    for item in items:
        if not isinstance(item, ast.Decl) or source.line_text(item.span.line)[:item.span.col - 1].strip():
            yield item
            continue
        lines, line = [], item.span.line - 1
        while line in docs and source.line_text(line).lstrip().startswith("##"):
            lines.append(docs[line])
            line -= 1
        yield ast.Decl(item.kind, item.name, item.body, item.span, "\n".join(reversed(lines)) or None)


class _ToAst:
    """The callbacks lark calls as it reduces each rule, named after the rules (and aliases) of
    grammar/flow.lark. `source` is the file being parsed."""

    source: SourceFile

    def _span(self, token: Token) -> Span:
        return self.source.span(token.start_pos, token.end_pos)

    def _between(self, first: Token, last: Token) -> Span:
        return self.source.span(first.start_pos, last.end_pos)

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
        unit_start = number_end + (len(text[number_end:]) - len(text[number_end:].lstrip(" \t\f")))
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

    def list(self, children):
        open_bracket, *items, close_bracket = children
        return ast.ListExpr(tuple(items), self._between(open_bracket, close_bracket))

    def call(self, children):
        head, *args, close = children
        func = ast.Name(str(head)[:-1], self.source.span(head.start_pos, head.end_pos - 1))
        return ast.Call(func, tuple(args), self._between(head, close))

    def callarg(self, children):
        if len(children) == 2:
            label, value = children
            label_node = self._name(label)
            return ast.CallArg(label_node, value, label_node.span.to(value.span))
        (value,) = children
        return ast.CallArg(None, value, value.span)

    def paren(self, children):
        open_paren, inner, close_paren = children
        return ast.Paren(inner, self._between(open_paren, close_paren))


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
        return _unexpected_end(source, postlex)
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
        nul = source.text.find("\0", offset, end)
        if nul >= 0:
            return Diagnostic("F0101", "unexpected character `\\x00`", source.span(nul, nul + 1),
                              "a NUL character", "remove it: strings name files, and no file name holds one")
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


def _unexpected_end(source: SourceFile, postlex: _PostLexer) -> Diagnostic:
    if not postlex.braces:
        return Diagnostic("F0103", "unexpected end of file", source.end_span, "the file ends here",
                          "the last statement is incomplete")
    unclosed = postlex.braces[-1]
    return Diagnostic("F0103", "unexpected end of file", source.end_span, "the file ends here",
                      "close every `{` with a `}`",
                      related=(Label(source.span(unclosed.start_pos, unclosed.end_pos), "this `{` is never closed"),))
