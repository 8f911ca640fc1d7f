"""Suite-wide setup. Without an NVIDIA GPU, Triton kernels run under the Triton interpreter:
triton reads TRITON_INTERPRET when `@triton.jit` decorates, so it is set before any test
module imports the kernels (torch is not imported here, to keep collection light)."""

import os
import shutil

import pytest

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """`saved(variant)`: the directory of a tiny random-weight transformers model of `variant`
    (runtime_models.VARIANTS), saved once for the whole run."""
    from runtime_models import save_tiny_model  # torch only when a runtime test asks

    cache = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = save_tiny_model(variant, tmp_path_factory.mktemp(variant))
        return cache[variant]
    return get
