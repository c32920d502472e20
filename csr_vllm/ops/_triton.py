"""How the kernels are compiled: Triton's JIT on a CUDA machine, its interpreter on CPU.

Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is decorated, and its own
standard library (``tl.cdiv``, ``tl.argmax``...) is decorated when triton is first imported. So
the interpreter needs ``TRITON_INTERPRET=1`` in the environment before anything imports triton
(tests start the kernel tests in such a subprocess: ``tests/test_ops_interpreter.py``).
The launchers refuse tensors the current mode cannot run instead of failing deep in Triton.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

jit = triton.jit


def check_device(*tensors: torch.Tensor) -> torch.device:
    """All tensors on one device that this process can run the kernels on."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"kernel inputs are on several devices: {sorted(map(str, devices))}")
    (device,) = devices
    if device.type == "cpu" and not INTERPRET:
        raise ValueError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before "
                         "triton is imported")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}")
    if device.type == "cuda" and INTERPRET:
        raise ValueError("TRITON_INTERPRET=1 is set: the kernels run on CPU tensors only")
    return device


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
