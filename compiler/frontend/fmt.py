"""The canonical formatter: `flowc fmt`. No options.

Two-space indents, one statement per line, single spaces between arguments, `a, b` in lists,
at most one blank line kept between statements, and every comment kept: a comment on its own
line stays above what followed it, a comment after code stays at the end of that line.
Numbers, strings and units are printed as written. The output is a fixed point.
"""

from __future__ import annotations

from flowc.compiler.frontend import ast
from flowc.compiler.frontend.parser import parse
from flowc.compiler.source import SourceFile

INDENT = "  "
INLINE_WIDTH = 60


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
    """Prints a module; `out` holds (code, trailing comment or None) per output line."""

    def __init__(self, source: SourceFile, module: ast.Module):
        self.source = source
        self.out: list[tuple[str, str | None]] = []
        self.comments = list(module.comments)  # in source order
        self.next_comment = 0
        self.last_line = 0  # last source line already printed

    def _blank_between(self, first: int, last: int) -> bool:
        return any(not self.source.line_text(n).strip() for n in range(first + 1, last))

    def _gap(self, start_line: int) -> None:
        """A blank line where the source had one, except right after an opening brace."""
        if self.out and self.last_line and self._blank_between(self.last_line, start_line):
            code = self.out[-1][0]
            if not code.endswith("{") and code:
                self.out.append(("", None))

    def flush_comments(self, before_line: int, depth: int) -> None:
        """Print own-line comments that sit above `before_line`."""
        while self.next_comment < len(self.comments):
            comment = self.comments[self.next_comment]
            if comment.span.line >= before_line:
                return
            self._gap(comment.span.line)
            self.out.append((INDENT * depth + comment.text, None))
            self.last_line = comment.span.line
            self.next_comment += 1

    def line(self, code: str, first_line: int, last_line: int, next_line: int, depth: int) -> None:
        """Print a line of code with the comments that end source lines first..last. A source
        line shared with the next element (`a 1; b 2  # c`) leaves its comment to that element.
        With several comments (a list over many lines), all but the last go on lines above."""
        if next_line == last_line:
            last_line -= 1
        found = []
        while self.next_comment < len(self.comments):
            comment = self.comments[self.next_comment]
            if not first_line <= comment.span.line <= last_line:
                break
            found.append(comment)
            self.next_comment += 1
        self.out.extend((INDENT * depth + extra.text, None) for extra in found[:-1])
        self.out.append((code, found[-1].text if found else None))

    def emit(self, text: str, first_line: int, last_line: int, next_line: int, depth: int) -> None:
        self.flush_comments(first_line, depth)
        self._gap(first_line)
        self.line(INDENT * depth + text, first_line, last_line, next_line, depth)
        self.last_line = last_line

    def block(self, head: str, head_line: int, body: ast.Body, next_line: int, depth: int) -> None:
        inline = self._inline(body)
        if inline is not None:
            self.emit(f"{head} {inline}", head_line, body.close.line, next_line, depth)
            return
        starts = [stmt.span.line for stmt in body.statements] + [body.close.line]
        self.emit(head + " {", head_line, body.open.line, starts[0], depth)
        for stmt, following in zip(body.statements, starts[1:]):
            self.statement(stmt, following, depth + 1)
        self.flush_comments(body.close.line, depth + 1)
        self.line(INDENT * depth + "}", body.close.line, body.close.line, next_line, depth)
        self.last_line = body.close.line

    def _inline(self, body: ast.Body) -> str | None:
        """A body written on one line stays on one line when it is simple and, as printed, short:
        the printed width decides, so that the output is a fixed point."""
        if body.open.line != body.close.line or any(s.body for s in body.statements):
            return None
        if any(body.open.start < c.span.start < body.close.start for c in self.comments):
            return None
        inner = "; ".join(" ".join([s.key.text, *(format_expr(a) for a in s.args)]) for s in body.statements)
        printed = f"{{ {inner} }}" if inner else "{}"
        return printed if len(printed) <= INLINE_WIDTH else None

    def statement(self, stmt: ast.Statement, next_line: int, depth: int) -> None:
        head = " ".join([stmt.key.text, *(format_expr(a) for a in stmt.args)])
        if stmt.body is None:
            self.emit(head, stmt.span.line, stmt.span.end_line, next_line, depth)
        else:
            self.block(head, stmt.span.line, stmt.body, next_line, depth)

    def module(self, module: ast.Module) -> str:
        starts = [item.span.line for item in module.items[1:]] + [0]
        for item, next_line in zip(module.items, starts):
            if isinstance(item, ast.Use):
                self.emit(f"use {format_expr(item.target)}", item.span.line, item.span.end_line, next_line, 0)
            else:
                self.block(f"{item.kind.text} {item.name.text}", item.span.line, item.body, next_line, 0)
        self.flush_comments(len(self.source.text) + 1, 0)
        while self.out and self.out[-1] == ("", None):
            self.out.pop()
        return "".join(line.rstrip() + "\n" for line in _align_comments(self.out))


def _align_comments(lines: list[tuple[str, str | None]]) -> list[str]:
    """Trailing comments on consecutive lines start in one column, two spaces after the
    longest code of the run."""
    out: list[str] = []
    run: list[tuple[str, str]] = []

    def flush() -> None:
        column = max((len(code.rstrip()) for code, _ in run), default=0) + 2
        out.extend(code.rstrip().ljust(column) + comment for code, comment in run)
        run.clear()

    for code, comment in lines:
        if comment is not None:
            run.append((code, comment))
            continue
        flush()
        out.append(code)
    flush()
    return out


def format_source(source: SourceFile) -> str:
    """Format one file's text. Raises FlowError on syntax errors."""
    return format_module(source, parse(source))


def format_module(source: SourceFile, module: ast.Module) -> str:
    """Format a module already parsed from `source`."""
    return _Printer(source, module).module(module)
