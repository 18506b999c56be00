"""The Triton backend: :func:`forward` and :func:`backward` with the interface of
:func:`torch_matgrad.formulas.forward` / :func:`torch_matgrad.formulas.backward`,
each product one launch of the fused GEMM kernel (``torch_matgrad.triton_kernels``).

=========================  ================================  ===========================
product (MATH.md item)     ``fused_matmul`` operands          fused into it
=========================  ================================  ===========================
``z = x W^T + b`` (6)      ``A = x``, ``B = W^T``             bias, ``act``, store of ``z``
``grad_x = G_z W`` (11)    ``A = G``, ``B = W``               ``G_z = G * act'`` (1, 3)
``grad_W = G_z^T x`` (10)  ``A = G^T``, ``B = x``             ``act'``; ``grad_b`` (10)
=========================  ================================  ===========================

Transposes are stride swaps (no copies). ``grad_b`` is the row sum of ``G_z^T``
reduced inside the weight-gradient launch; without ``grad_W`` it is a launch that
only sums. Not differentiable: :mod:`torch_matgrad.dispatch` sends double backward
and direct gradients of ``z`` to :mod:`torch_matgrad.formulas`.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .formulas import NEEDS_PREACTIVATION
from .triton_kernels.fused_gemm import INTERPRET
from .triton_kernels.ops import SUPPORTED_DTYPES, fused_matmul

__all__ = ["INTERPRET", "SUPPORTED_DTYPES", "backward", "forward"]


def forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(out, z)``, ``z`` only when the activation's derivative needs it."""
    out, z, _ = fused_matmul(
        x, weight.t(), bias=bias, activation=activation, store_z=activation in NEEDS_PREACTIVATION
    )
    return out, z


def backward(
    grad_out: Optional[Tensor],
    grad_z: Optional[Tensor],
    x: Optional[Tensor],
    weight: Optional[Tensor],
    saved: Optional[Tensor],
    activation: Optional[str],
    needs: Tuple[bool, bool, bool],
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(grad_x, grad_W, grad_b)`` for the gradients flagged in ``needs``.

    ``grad_z`` must be None (the dispatcher routes direct ``z`` gradients to torch ops).
    """
    if grad_z is not None:
        raise ValueError("triton_backend.backward: a direct gradient of z goes through torch ops")
    if grad_out is None:
        return None, None, None
    need_x, need_w, need_b = needs
    prologue = dict(grad_activation=activation, saved=saved) if activation is not None else {}
    grad_x = fused_matmul(grad_out, weight, **prologue)[0] if need_x else None
    grad_w = grad_b = None
    if need_w or need_b:
        prologue_t = dict(prologue, saved=saved.t()) if activation is not None else {}
        grad_w, _, grad_b = fused_matmul(grad_out.t(), x if need_w else None, rowsum=need_b, **prologue_t)
    return grad_x, grad_w, grad_b
