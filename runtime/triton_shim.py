"""The one place that imports Triton, so that `flowc.runtime` imports without it (Triton is an
optional, Linux-only dependency). `kernels_triton.py` calls `require_triton()` first."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

__all__ = ["triton", "tl", "HAVE_TRITON", "require_triton"]


def require_triton() -> None:
    if not HAVE_TRITON:
        raise ImportError("the Triton kernel backend needs triton: pip install triton "
                          "(or use get_ops('torch'), the reference kernels)")
