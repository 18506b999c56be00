"""The one place that chooses which implementation computes the op.

Backends:

``"torch"``
    :mod:`torch_matgrad.formulas`, plain torch ops. Runs anywhere, is differentiable
    (double backward), and is the reference for every other backend.
``"triton"``
    :mod:`torch_matgrad.triton_backend`, fused Triton GEMM kernels. CUDA tensors; CPU
    tensors too when Triton's interpreter is on (``TRITON_INTERPRET=1`` set before
    torch_matgrad's kernels are imported: that is how CI runs them without a GPU).
    Anything else is an error when forced.
``"auto"`` (default)
    ``"triton"`` for CUDA tensors when Triton imports and supports the case (float64
    and inputs of at most ``AUTO_TORCH_MAX_ROWS`` rows excepted, see
    :func:`_triton_fallback`), ``"torch"`` for everything else.

Force a backend for a block of code with :func:`use_backend`, or for a whole process
with the environment variable ``TORCH_MATGRAD_BACKEND``; the context manager wins.

Even when forced, ``"triton"`` hands these cases to ``"torch"`` (the list is
:func:`_triton_fallback`): a backward under ``create_graph`` (it must itself be
differentiable), a gradient flowing straight into ``z`` (double backward), tensor
subclasses and functorch-wrapped tensors (DTensor, the batched tensors of
``vmap(grad(f))``), meta tensors, mixed dtypes, and code that ``torch.compile`` is
tracing. Set the logger ``torch_matgrad`` to DEBUG to see each fallback and why.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from . import formulas

ENV_VAR = "TORCH_MATGRAD_BACKEND"

#: Under "auto", inputs of at most this many rows (decoding) run on cuBLAS: on an H100
#: the Triton kernels matched cuBLAS there within -12%..+10% in CUDA-graph replays, but
#: each eager call spent ~185 us on the host against ~55 us for the torch path
#: (``benchmarks/host_overhead.py``), and a decoding step is bound by that host time.
AUTO_TORCH_MAX_ROWS = 64
BACKENDS = ("auto", "torch", "triton")

log = logging.getLogger("torch_matgrad")

_forced: Optional[str] = None


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"torch_matgrad: unknown backend {name!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the backend inside a ``with`` block (tests and benchmarks use this).

    >>> with torch_matgrad.use_backend("torch"):
    ...     y = torch_matgrad.linear(x, w)
    """
    global _forced
    previous, _forced = _forced, _check_backend(name)
    try:
        yield
    finally:
        _forced = previous


def requested_backend() -> str:
    """The backend asked for: ``use_backend`` first, then ``$TORCH_MATGRAD_BACKEND``."""
    if _forced is not None:
        return _forced
    return _check_backend(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")


_triton_module = None
_triton_import_error: Optional[str] = None


def _triton():
    """:mod:`torch_matgrad.triton_backend`, or None when Triton does not import."""
    global _triton_module, _triton_import_error
    if _triton_module is None and _triton_import_error is None:
        try:
            from . import triton_backend
        except (ImportError, RuntimeError) as e:  # no triton wheel, or a broken install
            _triton_import_error = f"{type(e).__name__}: {e}"
        else:
            _triton_module = triton_backend
    return _triton_module


def _is_functorch_wrapped(t: Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return check is not None and check(t)


def _triton_fallback(tensors, differentiable: bool, direct_z: bool, forced: bool) -> Optional[str]:
    """Why these tensors go to torch ops instead of the Triton kernels (None: they don't).
    ``tensors[0]`` has the op's rows (the input, or the output gradient)."""
    if differentiable:
        return "backward under create_graph must be differentiable"
    if direct_z:
        return "a gradient flows directly into z (double backward)"
    for t in tensors:
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            return f"tensor subclass {type(t).__name__}"
        if _is_functorch_wrapped(t):
            return "functorch-wrapped tensor (vmap/grad transform)"
        if t.device.type == "meta":
            return "meta tensor"
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or not dtypes <= set(_triton().SUPPORTED_DTYPES):
        return f"unsupported dtype combination {sorted(map(str, dtypes))}"
    if not forced and torch.float64 in dtypes:
        # The kernels compile in float64 for sm_80 and sm_90 (fp64 tensor-core mma,
        # m8n8k4) and pass under the interpreter, but have not yet been run on a GPU
        # (tests/test_triton_gpu.py checks them there) nor timed against cuBLAS's
        # DGEMM, and ptxas reports register spills for every float64 tile of the GELU
        # backward (1.5-5.6 KB stack frames): "auto" keeps float64 on cuBLAS.
        return "float64 runs on Triton only when the triton backend is forced"
    if not forced and tensors[0].dim() == 2 and tensors[0].shape[0] <= AUTO_TORCH_MAX_ROWS:
        return f"{tensors[0].shape[0]} rows (<= AUTO_TORCH_MAX_ROWS = {AUTO_TORCH_MAX_ROWS}): cuBLAS"
    return None


def _choose(tensors: Tuple[Optional[Tensor], ...], differentiable: bool, direct_z: bool = False):
    """The implementation module for these tensors (``formulas`` or a kernel backend)."""
    requested = requested_backend()
    present = [t for t in tensors if t is not None]
    if not present:  # a backward with nothing flowing in: torch ops return the Nones
        return formulas
    device = present[0].device.type
    if requested == "torch" or (requested == "auto" and device != "cuda"):
        return formulas
    if torch.compiler.is_compiling():
        # Inductor fuses the GEMM epilogue itself, and tracing an autotuned user kernel
        # (or importing it mid-trace) is not supported on every torch >= 2.4. No log
        # here: logging while tracing breaks the graph.
        return formulas
    forced = requested == "triton"
    backend = _triton()
    if backend is None:
        if forced:
            raise RuntimeError(
                f"torch_matgrad: backend 'triton' needs Triton, which failed to import ({_triton_import_error})"
            )
        return _fallback("Triton does not import: " + _triton_import_error)
    reason = _triton_fallback(present, differentiable, direct_z, forced)
    if reason is not None:
        return _fallback(reason)
    if device != "cuda" and not backend.INTERPRET:
        raise RuntimeError(
            f"torch_matgrad: backend 'triton' runs {device} tensors only under Triton's interpreter: "
            "set TRITON_INTERPRET=1 before importing torch_matgrad (or use CUDA tensors)"
        )
    return backend


def chosen_backend(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> str:
    """The backend (``"torch"`` or ``"triton"``) that the forward would run for these
    tensors right now, after the request and every fallback (benchmarks record it)."""
    return "triton" if _choose((x, weight, bias), differentiable=False) is not formulas else "torch"


def _fallback(reason: str):
    log.debug("torch_matgrad: using torch ops instead of Triton: %s", reason)
    return formulas


def forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(out, z)`` of ``out = act(x W^T + b)`` for 2-D ``x``; ``z`` only if needed."""
    return _choose((x, weight, bias), differentiable=False).forward(x, weight, bias, activation)


def backward(
    grad_out: Optional[Tensor],
    grad_z: Optional[Tensor],
    x: Optional[Tensor],
    weight: Optional[Tensor],
    saved: Optional[Tensor],
    activation: Optional[str],
    needs: Tuple[bool, bool, bool],
):
    """``(grad_x, grad_W, grad_b)``; see :func:`torch_matgrad.formulas.backward`."""
    # Under create_graph the backward itself is recorded, so it must be torch ops.
    differentiable = torch.is_grad_enabled()
    impl = _choose((grad_out, grad_z, x, weight, saved), differentiable, direct_z=grad_z is not None)
    return impl.backward(grad_out, grad_z, x, weight, saved, activation, needs)
