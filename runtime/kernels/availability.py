"""Whether Triton is importable, whether it runs in interpreter mode, and the custom-op registration.

Triton is an optional extra (``pip install 'diffusion-runtime[triton]'``). Every kernel module
imports ``triton`` through this file, so ``import runtime.kernels`` works without it and each entry point
raises ``TritonUnavailableError`` instead.

Interpreter mode (``TRITON_INTERPRET=1``) is decided once, when this module is imported: that is
when the ``@triton.jit`` functions of the kernel modules are created, and Triton fixes the mode at
decoration time. Setting the variable later has no effect on kernels already imported.
"""
from __future__ import annotations

from typing import Callable

import torch

try:  # Triton is optional: keep `import runtime.kernels` working without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

if triton is not None:
    from triton import knobs as _knobs

    INTERPRET: bool = bool(_knobs.runtime.interpret)
else:
    INTERPRET = False

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonUnavailableError(RuntimeError):
    """Raised by a kernel entry point when Triton is not installed."""


def triton_available() -> bool:
    """True when Triton imported (the kernels can run on CUDA, or on CPU in interpreter mode)."""
    return triton is not None


def interpreter_mode() -> bool:
    """True when the kernels were built with ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    return INTERPRET


def require_triton(op: str) -> None:
    """Raise a clear error naming ``op`` when Triton is missing."""
    if triton is None:
        raise TritonUnavailableError(
            f"runtime.kernels.{op} needs Triton, which is not installed: "
            "pip install 'diffusion-runtime[triton]' (CUDA), or use the PyTorch reference "
            f"runtime.kernels.{op}_ref."
        )


def device_reason(*tensors: torch.Tensor) -> str | None:
    """None when the tensors sit on one device the kernels can run on, else why not."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"tensors are on different devices: {sorted(str(d) for d in devices)}"
    device = tensors[0].device
    if device.type == "cuda":
        return None
    if INTERPRET and device.type == "cpu":
        return None
    return (
        f"device {device} is not supported: the Triton kernels run on CUDA "
        "(or on CPU with TRITON_INTERPRET=1 set before kernels is imported)"
    )


def register_op(name: str, fn: Callable, fake: Callable):
    """Register ``fn`` (which launches Triton kernels) as the custom op ``diffusion_runtime::<name>``.

    Compiled Triton: ``torch.library.triton_op``, so torch.compile sees the kernel launches and
    inductor can schedule them itself; ``fn`` is its own shape function there (its launches go
    through ``wrap_triton``, which traces), so ``fake`` must allocate exactly what ``fn`` does.
    Interpreter: the kernels are Python functions that touch real memory, which fake tensors do
    not have, so the op is an opaque ``torch.library.custom_op`` with ``fake`` as its shape
    function. torch.compile still traces it as one node, without a graph break.
    """
    qualname = f"diffusion_runtime::{name}"
    if not INTERPRET and not torch.cuda.is_available():
        # Compiled Triton runs on CUDA only, and there is none: ``fn`` can only say so (device_reason).
        # No op to register, and registering one imports torch._dynamo and inductor (a second of a
        # CPU process's cold start: bench/RESULTS.md, 'Cold start on a quiet machine').
        return fn
    if not INTERPRET:
        return torch.library.triton_op(qualname, fn, mutates_args=())
    op = torch.library.custom_op(qualname, fn, mutates_args=())
    op.register_fake(fake)
    return op


def launcher(kernel):
    """The kernel wrapped for tracing (``wrap_triton``); under the interpreter, the kernel itself."""
    if INTERPRET:
        return kernel
    return torch.library.wrap_triton(kernel)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


if triton is not None:

    @triton.jit
    def round_bf16_rtne(x):
        """fp32 -> fp32 holding x rounded to the nearest-even bf16 value.

        GPUs round fp32 -> bf16 casts to nearest even; Triton's interpreter truncates them. The
        kernels apply this before a bf16 cast under the interpreter only (flag EMULATE_BF16), so
        the emulated rounding is the GPU's and the tests' error budget means the same thing.
        """
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
else:
    round_bf16_rtne = None
