"""SLO blocks: `slo` with its latency limits (`ttft p90 <= 500 ms`), percentiles and attainment."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from flowc.compiler import units
from flowc.compiler.frontend import ast
from flowc.compiler.frontend.check.vocabulary import SCHEMAS, SLO_METRICS
from flowc.compiler.spec import SLO, SLOTarget

if TYPE_CHECKING:  # core imports this module to dispatch to it: the checker is only an annotation here
    from flowc.compiler.frontend.check.core import Checker


def build_slo(c: Checker, decl: ast.Decl) -> SLO | None:
    b = c.block(decl.body, "slo", decl.name)
    targets = []
    for metric in SLO_METRICS:
        stmt = b.one(metric)
        if stmt is not None:
            targets.append(_slo_target(c, stmt))
    attainment = None
    stmt = b.one("attainment")
    if stmt is not None:
        attainment = _attainment(c, stmt)
        if attainment is None:
            return None
    if any(t is None for t in targets):
        return None
    if not targets:
        c.error("F0310", f"slo `{decl.name.text}` sets no limit", decl.name.span, "empty SLO",
                "add a limit such as `ttft p90 <= 500 ms`")
        return None
    bare = [t for t in targets if t.percentile is None]
    if bare and attainment is None:
        c.error("F0405", f"`{bare[0].metric}` has no percentile and the SLO has no attainment",
                b.one(bare[0].metric).span, "share of requests unknown",
                f"write `{bare[0].metric} p90 <= ...` or add `attainment >= 90 %`")
        return None
    return SLO(name=decl.name.text, targets=targets, attainment=attainment, doc=decl.doc,
               location=c.location(decl))


def _slo_target(c: Checker, stmt: ast.Statement) -> SLOTarget | None:
    usage = SCHEMAS["slo"][stmt.key.text]
    args = list(stmt.args)
    percentile = None
    if args and isinstance(args[0], ast.Name):
        percentile = _percentile(c, args.pop(0))
        if percentile is None:
            return None
    if len(args) != 2 or not isinstance(args[0], ast.Operator):
        c.error("F0305", f"malformed `{stmt.key.text}` limit", stmt.span, "expected `METRIC [pNN] <= LIMIT`",
                f"write `{usage}`")
        return None
    if args[0].op not in ("<=", "<"):
        c.error("F0305", f"a latency limit is an upper bound, not `{args[0].op}`", args[0].span, "wrong comparison",
                f"write `{usage}`")
        return None
    limit = c.positive(args[1], units.TIME, "a latency limit")
    if limit is None:
        return None
    return SLOTarget(metric=stmt.key.text, percentile=percentile, limit=limit)


def _percentile(c: Checker, name: ast.Name) -> float | None:
    match = re.fullmatch(r"p(\d+(?:\.\d+)?)", name.text)
    if not match:
        c.error("F0305", f"expected a percentile such as `p90`, found `{name.text}`", name.span,
                "not a percentile", "percentiles are written `p50`, `p90`, `p99`, `p99.9`")
        return None
    value = float(match.group(1))
    if not 0 < value <= 100:
        c.error("F0308", f"percentile {match.group(1)} is outside (0, 100]", name.span, "out of range",
                "use a percentile above 0 and at most 100, such as `p99`")
        return None
    return value


def _attainment(c: Checker, stmt: ast.Statement) -> float | None:
    if len(stmt.args) != 2 or not isinstance(stmt.args[0], ast.Operator):
        c.error("F0305", "malformed `attainment`", stmt.span, "expected `attainment >= PERCENT`",
                "write `attainment >= 90 %`")
        return None
    op, expr = stmt.args
    if op.op not in (">=", ">"):
        c.error("F0305", f"attainment is a lower bound, not `{op.op}`", op.span, "wrong comparison",
                "write `attainment >= 90 %`")
        return None
    if not (isinstance(expr, ast.Quantity) and expr.unit == "%"):
        c.error("F0302", "attainment is a percentage", expr.span, "expected a percentage",
                "write it with `%`, such as `attainment >= 90 %`")
        return None
    share = c.quantity(expr, units.NUMBER)
    if share is None:
        return None
    if not 0 < share <= 1:
        c.error("F0307", f"attainment {expr.number.text} % is outside (0, 100] %", expr.span, "out of range")
        return None
    return float(share)
