"""The kernel interface: every hot op of the model has two implementations with one signature,
the torch reference (`kernels_torch.py`) and Triton (`kernels_triton.py`).

`get_ops("torch" | "triton" | "auto")` returns a namespace with `rms_norm`, `rotary`,
`store_kv`, `paged_attention`, `silu_and_mul`, `moe_topk` and `moe_grouped_mm` (signatures and
layouts are documented in `kernels_torch.py`). "auto" picks Triton on a CUDA device and the torch
reference elsewhere: on CPU, Triton only runs under TRITON_INTERPRET=1, which is for tests.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional

from .triton_shim import HAVE_TRITON

OP_NAMES = ("rms_norm", "rotary", "store_kv", "paged_attention", "silu_and_mul", "moe_topk", "moe_grouped_mm")
BACKENDS = ("auto", "torch", "triton")


def backend_problem(backend: str, device: str) -> Optional[tuple[str, str]]:
    """(message, help) when the kernel `backend` cannot run on `device`: Triton compiles its
    kernels for a CUDA GPU, and runs on the CPU only in its interpreter (TRITON_INTERPRET=1)."""
    if backend not in BACKENDS:
        return f"unknown kernel backend {backend!r}", f"choose one of {', '.join(BACKENDS)}"
    if backend != "triton":
        return None
    if not HAVE_TRITON:
        return ("the triton kernel backend needs the triton package, which is not installed",
                "install it with `pip install triton`, or use the torch backend (the reference kernels)")
    if str(device).startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the triton kernel backend needs a CUDA GPU, and this runs on {device}",
            "use the torch backend (the reference kernels), or set TRITON_INTERPRET=1 to run the Triton kernels "
            "in Triton's CPU interpreter (slow: for tests)")


def resolve_backend(backend: str, device: str) -> str:
    """The backend "auto" stands for on `device`: Triton on a CUDA device, the torch reference elsewhere."""
    if backend != "auto":
        return backend
    return "triton" if str(device).startswith("cuda") else "torch"


def tile_problem(name: str, value: int) -> Optional[str]:
    """Why `value` cannot be a dimension of the Triton attention's tiles (head_dim, block_size):
    tl.dot on the GPU needs a power of two of at least 16."""
    if value < 16 or value & (value - 1):
        return f"{name} {value} is not a legal tl.dot tile dimension (a power of two >= 16 is required)"
    return None


def get_ops(backend: str = "auto", device: str = "cpu") -> SimpleNamespace:
    problem = backend_problem(backend, device)
    if problem is not None:
        raise ValueError(f"{problem[0]}: {problem[1]}")
    backend = resolve_backend(backend, device)
    if backend == "torch":
        from . import kernels_torch as impl
    else:
        from . import kernels_triton as impl
    return SimpleNamespace(backend=backend, **{name: getattr(impl, name) for name in OP_NAMES})
