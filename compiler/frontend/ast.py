"""The syntax tree of a .flow file: frozen dataclasses, each carrying its source span.

The tree keeps what the user wrote (number text, string text, parentheses, comments) so the
formatter can print it back without losing anything; meaning is given by the checker.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Union

from flowc.compiler.source import Span


@dataclass(frozen=True, slots=True)
class Name:
    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class Number:
    text: str  # as written, e.g. "1_000" or "3.35"
    span: Span

    @property
    def value(self) -> Fraction:
        return Fraction(self.text.replace("_", ""))


@dataclass(frozen=True, slots=True)
class Quantity:
    number: Number
    unit: str
    unit_span: Span
    span: Span


@dataclass(frozen=True, slots=True)
class String:
    raw: str  # with quotes and escapes, as written
    span: Span

    @property
    def value(self) -> str:
        body = self.raw[1:-1]
        out, i = [], 0
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body):
                out.append({"n": "\n", "t": "\t"}.get(body[i + 1], body[i + 1]))
                i += 2
            else:
                out.append(body[i])
                i += 1
        return "".join(out)


@dataclass(frozen=True, slots=True)
class Operator:
    op: str  # one of <= >= == < >
    span: Span


@dataclass(frozen=True, slots=True)
class ListExpr:
    items: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class TupleExpr:
    """Comma-separated values of one argument: `allow disaggregation, offload`."""

    items: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class CallArg:
    label: Name | None
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Call:
    func: Name
    args: tuple[CallArg, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class BinOp:
    op: str  # + - * /
    left: Expr
    right: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Paren:
    expr: Expr
    span: Span


Expr = Union[Name, Number, Quantity, String, Operator, ListExpr, TupleExpr, Call, BinOp, Paren]


@dataclass(frozen=True, slots=True)
class Body:
    statements: tuple[Statement, ...]
    open: Span
    close: Span


@dataclass(frozen=True, slots=True)
class Statement:
    key: Name
    args: tuple[Expr, ...]
    body: Body | None
    span: Span


@dataclass(frozen=True, slots=True)
class Decl:
    kind: Name
    name: Name
    body: Body
    span: Span
    doc: str | None = None


@dataclass(frozen=True, slots=True)
class Use:
    target: Name | String
    span: Span


@dataclass(frozen=True, slots=True)
class Comment:
    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class Module:
    file: str
    items: tuple[Use | Decl, ...]
    comments: tuple[Comment, ...]

    @property
    def uses(self) -> tuple[Use, ...]:
        return tuple(i for i in self.items if isinstance(i, Use))

    @property
    def decls(self) -> tuple[Decl, ...]:
        return tuple(i for i in self.items if isinstance(i, Decl))
