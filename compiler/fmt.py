"""The canonical formatter: `flowc fmt`. No options.

Two-space indents, one statement per line, single spaces between arguments, `a, b` in lists,
at most one blank line kept between statements, and every comment kept: a comment on its own
line stays above what followed it, a comment after code stays at the end of that line.
Numbers, strings and units are printed as written. The output is a fixed point.
"""

from __future__ import annotations

from . import ast
from .parser import parse
from .source import SourceFile

INDENT = "  "
INLINE_WIDTH = 60
TRAILING = "\0"  # marks where a trailing comment starts, until alignment


def format_expr(expr: ast.Expr) -> str:
    if isinstance(expr, ast.Name):
        return expr.text
    if isinstance(expr, ast.Number):
        return expr.text
    if isinstance(expr, ast.Quantity):
        return f"{expr.number.text} {expr.unit}"
    if isinstance(expr, ast.String):
        return expr.raw
    if isinstance(expr, ast.Operator):
        return expr.op
    if isinstance(expr, ast.ListExpr):
        return "[" + ", ".join(format_expr(i) for i in expr.items) + "]"
    if isinstance(expr, ast.TupleExpr):
        return ", ".join(format_expr(i) for i in expr.items)
    if isinstance(expr, ast.Call):
        args = ", ".join((f"{a.label.text} " if a.label else "") + format_expr(a.value) for a in expr.args)
        return f"{expr.func.text}({args})"
    if isinstance(expr, ast.BinOp):
        return f"{format_expr(expr.left)} {expr.op} {format_expr(expr.right)}"
    if isinstance(expr, ast.Paren):
        return f"({format_expr(expr.expr)})"
    raise TypeError(f"not an expression: {expr!r}")


class _Printer:
    def __init__(self, source: SourceFile, module: ast.Module):
        self.source = source
        self.lines: list[str] = []
        self.comments = list(module.comments)  # in source order
        self.next_comment = 0
        self.last_line = 0  # last source line already printed

    def _own_line(self, comment: ast.Comment) -> bool:
        before = self.source.line_text(comment.span.line)[: comment.span.col - 1]
        return not before.strip()

    def _blank_between(self, first: int, last: int) -> bool:
        return any(not self.source.line_text(n).strip() for n in range(first + 1, last))

    def _gap(self, start_line: int, depth: int) -> None:
        """A blank line where the source had one, except right after an opening brace."""
        if self.lines and self.last_line and self._blank_between(self.last_line, start_line):
            if not self.lines[-1].endswith("{") and self.lines[-1] != "":
                self.lines.append("")

    def flush_comments(self, before_line: int, depth: int) -> None:
        """Print own-line comments that sit above `before_line`."""
        while self.next_comment < len(self.comments):
            comment = self.comments[self.next_comment]
            if comment.span.line >= before_line:
                return
            self._gap(comment.span.line, depth)
            self.lines.append(INDENT * depth + comment.text)
            self.last_line = comment.span.line
            self.next_comment += 1

    def trailing(self, first_line: int, last_line: int, depth: int) -> str:
        """Comments that end lines first_line..last_line: the first goes after the code, any
        others (from inside a multi-line list) are printed on their own lines above."""
        found = []
        while self.next_comment < len(self.comments):
            comment = self.comments[self.next_comment]
            if not first_line <= comment.span.line <= last_line:
                break
            found.append(comment)
            self.next_comment += 1
        for extra in found[:-1]:
            self.lines.insert(len(self.lines) - 1, INDENT * depth + extra.text)
        return f"{TRAILING}{found[-1].text}" if found else ""

    def emit(self, text: str, first_line: int, last_line: int, depth: int) -> None:
        self.flush_comments(first_line, depth)
        self._gap(first_line, depth)
        self.lines.append(INDENT * depth + text)
        self.lines[-1] += self.trailing(first_line, last_line, depth)
        self.last_line = last_line

    def block(self, head: str, head_line: int, body: ast.Body, depth: int) -> None:
        if self._stays_inline(body):
            inner = "; ".join(" ".join([s.key.text, *(format_expr(a) for a in s.args)]) for s in body.statements)
            self.emit(f"{head} {{ {inner} }}" if inner else f"{head} {{}}", head_line, body.close.line, depth)
            return
        self.emit(head + " {", head_line, body.open.line, depth)
        for stmt in body.statements:
            self.statement(stmt, depth + 1)
        self.flush_comments(body.close.line, depth + 1)
        self.lines.append(INDENT * depth + "}")
        self.lines[-1] += self.trailing(body.close.line, body.close.line, depth)
        self.last_line = body.close.line

    def _stays_inline(self, body: ast.Body) -> bool:
        """A body written on one line stays on one line when it is short and simple."""
        if body.open.line != body.close.line or any(s.body for s in body.statements):
            return False
        width = body.close.end - body.open.start
        return width <= INLINE_WIDTH and not any(c.span.start < body.close.start and c.span.start > body.open.start
                                                 for c in self.comments)

    def statement(self, stmt: ast.Statement, depth: int) -> None:
        head = " ".join([stmt.key.text, *(format_expr(a) for a in stmt.args)])
        if stmt.body is None:
            self.emit(head, stmt.span.line, stmt.span.end_line, depth)
        else:
            self.block(head, stmt.span.line, stmt.body, depth)

    def module(self, module: ast.Module) -> str:
        for item in module.items:
            if isinstance(item, ast.Use):
                self.emit(f"use {format_expr(item.target)}", item.span.line, item.span.end_line, 0)
            else:
                self.block(f"{item.kind.text} {item.name.text}", item.span.line, item.body, 0)
        self.flush_comments(len(self.source.text) + 1, 0)
        while self.lines and self.lines[-1] == "":
            self.lines.pop()
        return "".join(line.rstrip() + "\n" for line in _align_comments(self.lines))


def _align_comments(lines: list[str]) -> list[str]:
    """Trailing comments on consecutive lines start in one column, two spaces after the
    longest code of the run."""
    out, run = [], []

    def flush() -> None:
        column = max(len(line.split(TRAILING)[0].rstrip()) for line in run) + 2 if run else 0
        for line in run:
            code, comment = line.split(TRAILING, 1)
            out.append(code.rstrip().ljust(column) + comment)
        run.clear()

    for line in lines:
        if TRAILING in line:
            run.append(line)
            continue
        flush()
        out.append(line)
    flush()
    return out


def format_source(source: SourceFile) -> str:
    """Format one file's text. Raises FlowError on syntax errors."""
    module = parse(source)
    return _Printer(source, module).module(module)
