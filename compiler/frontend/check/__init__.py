"""Resolution and type checking: from the AST of every loaded module to the spec IR.

The checker reads each declaration's statements against the block's vocabulary, evaluates
quantities with their units, resolves references by kind, and then checks the constraints
that tie objects together (TP must divide heads, the weights must fit somewhere, ...).

Phases (`Checker.run`):
1. collect every module's declarations by kind and name (unknown kinds, duplicates);
2. build each declaration into its IR: links, gpus, models, clusters, workloads, slos, then
   deployments; a reference builds what it names first, so each object is built once;
3. check each deployment against its model, cluster and workload (knobs, context);
4. check that the weights fit each cluster, alone and together, and each allowed instance;
5. warn of definitions that no deployment uses.

Diagnostics are collected, not raised one at a time: a phase reports all of its errors, and
the first phase with any stops the check with one FlowError, its errors in source order. The
attributes a block lacks are gathered into one F0310 per block.

Modules: `vocabulary` (kinds, each block's attributes, the words they take), `core` (the
driver, diagnostics, names, blocks, values), one builder module per kind of block (`hardware`,
`models`, `workloads`, `slos`, `deployments`) and `constraints` (the checks across objects).
"""

from __future__ import annotations

from flowc.compiler.diagnostics import Diagnostic
from flowc.compiler.frontend.check.core import Checker
from flowc.compiler.frontend.check.vocabulary import SCHEMAS, TOKEN_KNOBS
from flowc.compiler.frontend.imports import Program
from flowc.compiler.spec import Spec

__all__ = ["SCHEMAS", "TOKEN_KNOBS", "Checker", "check"]


def check(program: Program) -> tuple[Spec, list[Diagnostic]]:
    """Check a loaded program. Returns the spec and its warnings; raises FlowError on errors."""
    checker = Checker(program)
    return checker.run(), checker.warnings
