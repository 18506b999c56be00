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
only sums.

``G_z`` is formed one of two ways (:func:`gz_strategy`): in the prologue of both
backward GEMMs, as above, which never writes ``G_z`` but recomputes ``act'`` in every
program that loads a tile of ``G``; or in one elementwise pass (PyTorch's own
derivative kernel: reads ``G`` and ``z``, writes ``G_z``) followed by the two GEMMs
without a prologue. ``"auto"`` takes the pass: on an H100 (bf16, the four quick
shapes, ``benchmarks/NOTES.md``) the pass made the GELU-tanh and SiLU backward 1.3-2.8x
faster than the prologue at every shape measured; the prologue recomputes ``act'`` in
each of the ~``in_features / BLOCK_N`` programs that load a ``G`` tile and keeps the
tensor cores waiting on it.

Not differentiable: :mod:`torch_matgrad.dispatch` sends double backward
and direct gradients of ``z`` to :mod:`torch_matgrad.formulas`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

from torch import Tensor

from .formulas import NEEDS_PREACTIVATION, grad_preactivation, mlp_grad_preactivations, mlp_hidden
from .triton_kernels.fused_gemm import INTERPRET
from .triton_kernels.ops import SUPPORTED_DTYPES, fused_matmul

__all__ = [
    "GZ_STRATEGIES", "INTERPRET", "SUPPORTED_DTYPES", "backward", "forward", "gz_strategy", "mlp_backward", "mlp_forward",
]

#: Ways to form ``G_z = G * act'(z)`` in the backward; see the module docstring.
GZ_STRATEGIES = ("auto", "prologue", "pass")
_gz = "auto"


@contextlib.contextmanager
def gz_strategy(name: str) -> Iterator[None]:
    """Form ``G_z`` by ``name`` (one of ``GZ_STRATEGIES``) inside the block: benchmarks
    time the two against each other."""
    global _gz
    if name not in GZ_STRATEGIES:
        raise ValueError(f"gz_strategy: unknown strategy {name!r}; choose one of {', '.join(GZ_STRATEGIES)}")
    previous, _gz = _gz, name
    try:
        yield
    finally:
        _gz = previous


def _gz_in_prologue() -> bool:
    """Whether the backward fuses ``act'`` into its GEMMs' prologue (see above)."""
    return _gz == "prologue"


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
    if activation is not None and not _gz_in_prologue():
        grad_out, activation = grad_preactivation(grad_out, saved, activation), None
    prologue = dict(grad_activation=activation, saved=saved) if activation is not None else {}
    grad_x = fused_matmul(grad_out, weight, **prologue)[0] if need_x else None
    grad_w = grad_b = None
    if need_w or need_b:
        prologue_t = dict(prologue, saved=saved.t()) if activation is not None else {}
        grad_w, _, grad_b = fused_matmul(grad_out.t(), x if need_w else None, rowsum=need_b, **prologue_t)
    return grad_x, grad_w, grad_b


def mlp_forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation):
    """``(out, u, g)`` of an MLP block (:func:`torch_matgrad.formulas.mlp_forward`) for
    2-D ``x``: the plain block's first launch applies the activation in its epilogue and
    stores ``u`` beside ``h``; ``h`` lives only until the second launch has read it."""
    if gate_w is None:
        h, u, _ = fused_matmul(x, up_w.t(), bias=up_b, activation=activation, store_z=activation is not None)
        u = h if u is None else u
        g = None
    else:
        u = fused_matmul(x, up_w.t(), bias=up_b)[0]
        g = fused_matmul(x, gate_w.t(), bias=gate_b)[0]
        h = mlp_hidden(u, g, activation)
    return fused_matmul(h, down_w.t(), bias=down_b)[0], u, g


def mlp_backward(grad_out, grad_u, grad_g, x, up_w, gate_w, down_w, u, g, activation, needs):
    """The MLP block's gradients (:func:`torch_matgrad.formulas.mlp_backward`) as
    launches of the linear layer's products; ``h`` is rebuilt from ``u`` (and ``g``)."""
    if grad_u is not None or grad_g is not None:
        raise ValueError("triton_backend.mlp_backward: direct gradients of u and g go through torch ops")
    need_x, need_up_w, need_up_b, need_gate_w, need_gate_b, need_down_w, need_down_b = needs
    if grad_out is None:
        return (None,) * 7
    grad_down_w = grad_down_b = None
    if need_down_w or need_down_b:
        h = mlp_hidden(u, g, activation) if need_down_w else None
        grad_down_w, _, grad_down_b = fused_matmul(grad_out.t(), h, rowsum=need_down_b)
    grad_x = grad_up_w = grad_up_b = grad_gate_w = grad_gate_b = None
    if need_x or need_up_w or need_up_b or need_gate_w or need_gate_b:
        g_u, g_g = mlp_grad_preactivations(fused_matmul(grad_out, down_w)[0], u, g, activation)
        grad_x, grad_up_w, grad_up_b = backward(g_u, None, x, up_w, None, None, (need_x, need_up_w, need_up_b))
        if g_g is not None:
            gx, grad_gate_w, grad_gate_b = backward(g_g, None, x, gate_w, None, None, (need_x, need_gate_w, need_gate_b))
            grad_x = gx if grad_x is None else grad_x + gx
    return grad_x, grad_up_w, grad_up_b, grad_gate_w, grad_gate_b, grad_down_w, grad_down_b
