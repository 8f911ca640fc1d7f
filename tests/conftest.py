"""Suite-wide setup. Without an NVIDIA GPU, Triton kernels run under the Triton interpreter:
triton reads TRITON_INTERPRET when `@triton.jit` decorates, so it is set before any test
module imports the kernels (torch is not imported here, to keep collection light)."""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
