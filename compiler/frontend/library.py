"""The whole standard library, checked once per process: what names like `h100-sxm` or
`llama-3.1-70b` mean outside a spec (`flowc.estimate`, `flowc stdlib`)."""

from __future__ import annotations

import functools

from flowc.compiler.frontend.check import check
from flowc.compiler.frontend.imports import load_program, std_modules
from flowc.compiler.source import SourceFile
from flowc.compiler.spec import Spec


@functools.cache
def stdlib_spec() -> Spec:
    text = "\n".join(f"use std.{module}" for module in std_modules()) + "\n"
    spec, _ = check(load_program(text=SourceFile("<stdlib>", text)))
    return spec
