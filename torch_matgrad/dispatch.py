"""The one place that chooses which implementation computes the op.

Backends:

``"torch"``
    :mod:`torch_matgrad.formulas`, plain torch ops. Runs anywhere, is differentiable
    (double backward), and is the reference for every other backend.
``"auto"`` (default)
    The best backend for the tensors at hand. Today that is ``"torch"`` for every
    device; the Triton kernels plug in here.

Force a backend for a block of code with :func:`use_backend`, or for a whole process
with the environment variable ``TORCH_MATGRAD_BACKEND``; the context manager wins.
Set the logger ``torch_matgrad`` to DEBUG to see each fallback and why it happened.
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
BACKENDS = ("auto", "torch")

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


def _choose(tensors: Tuple[Optional[Tensor], ...], differentiable: bool):
    """The implementation module for these tensors (``formulas`` or a kernel backend)."""
    requested_backend()  # validates the request even while only one backend exists
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
    impl = _choose((grad_out, grad_z, x, weight, saved), differentiable)
    return impl.backward(grad_out, grad_z, x, weight, saved, activation, needs)
