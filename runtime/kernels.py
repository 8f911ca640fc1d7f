"""The kernel interface: every hot op of the model has two implementations with one signature,
the torch reference (`kernels_torch.py`) and Triton (`kernels_triton.py`).

`get_ops("torch" | "triton" | "auto")` returns a namespace with `rms_norm`, `rotary`,
`store_kv`, `paged_attention`, `silu_and_mul` and `moe_topk` (signatures and layouts are
documented in `kernels_torch.py`). "auto" picks Triton on a CUDA device and the torch
reference elsewhere: on CPU, Triton only runs under TRITON_INTERPRET=1, which is for tests.
"""

from __future__ import annotations

from types import SimpleNamespace

OP_NAMES = ("rms_norm", "rotary", "store_kv", "paged_attention", "silu_and_mul", "moe_topk")
BACKENDS = ("auto", "torch", "triton")


def get_ops(backend: str = "auto", device: str = "cpu") -> SimpleNamespace:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if str(device).startswith("cuda") else "torch"
    if backend == "torch":
        from . import kernels_torch as impl
    else:
        from . import kernels_triton as impl
    return SimpleNamespace(backend=backend, **{name: getattr(impl, name) for name in OP_NAMES})
