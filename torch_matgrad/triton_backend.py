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

Each of the three products may run on cuBLAS instead (torch's products), where
:func:`torch_matgrad.dispatch.cublas_products` says cuBLAS measured faster for the card
and shape class: the forward as :func:`formulas.forward`; ``grad_x`` and ``grad_W`` from
``G_z`` formed by the pass below, which then also sums ``grad_b`` from the tiles it
writes (``triton_kernels/gz_pass.py``), so cuBLAS's ``grad_W`` costs no extra read.

``G_z`` is formed one of two ways (:func:`gz_strategy`): in the prologue of both
backward GEMMs, as above, which never writes ``G_z`` but recomputes ``act'`` in every
program that loads a tile of ``G``; or in one elementwise pass (PyTorch's own
derivative kernel: reads ``G`` and ``z``, writes ``G_z``) followed by the two GEMMs
without a prologue. ``"auto"`` takes the pass: on an H100 (bf16, the four quick
shapes, ``benchmarks/NOTES.md``) the pass made the GELU-tanh and SiLU backward 1.3-2.8x
faster than the prologue at every shape measured; the prologue recomputes ``act'`` in
each of the ~``in_features / BLOCK_N`` programs that load a ``G`` tile and keeps the
tensor cores waiting on it.

The MLP block (:func:`mlp_forward`, :func:`mlp_backward`; ``H`` the hidden width) never
writes the hidden activation ``h = act(u)`` (gated ``act(g) * u``): the kernels build it
where they load it, and the backward's ``act'`` is applied once per element, in the
epilogue of the launch that computes ``grad_h``:

=============================  ===================================  =========================
launch (MATH.md item)          reads                                writes
=============================  ===================================  =========================
pre-activations (6)            ``x``, ``Wu`` (gated: and ``Wg``)    ``u`` (gated ``[g | u]``)
``out = h Wd^T + bd`` (6)      ``u`` (and ``g``): ``h`` at load     ``out``
``grad_Wd^T = h^T G`` (9, 10)  ``u^T`` (and ``g^T``), ``G``         ``grad_Wd``, ``grad_bd``
``grad_h = G Wd`` (11; 1, 3)   ``G``, ``Wd``; ``u`` (and ``g``)     ``G_u`` (``[G_g | G_u]``)
first layer (9-11)             ``G_u`` (and ``G_g``), ``x``, ``W``  as :func:`backward`
=============================  ===================================  =========================

Every launch passes ``check=False``: the op (:mod:`torch_matgrad.function`,
:mod:`torch_matgrad.mlp`) checked dtypes, devices and shapes once, and the launches
of its forward and backward add no checks of their own.

Not differentiable: :mod:`torch_matgrad.dispatch` sends double backward
and direct gradients of ``z`` (and of ``u``, ``g``) to :mod:`torch_matgrad.formulas`.
"""

from __future__ import annotations

import contextlib
from typing import FrozenSet, Iterator, Optional, Tuple

from torch import Tensor

from . import formulas
from .formulas import NEEDS_PREACTIVATION, grad_preactivation
from .triton_kernels.cross_entropy import (
    CE_DTYPES, cross_entropy_logits, linear_cross_entropy_backward, linear_cross_entropy_forward,
)
from .triton_kernels.fused_gemm import INTERPRET
from .triton_kernels.gz_pass import grad_preactivation_and_bias
from .triton_kernels.ops import SUPPORTED_DTYPES, fused_matmul

__all__ = [
    "CE_DTYPES", "GZ_STRATEGIES", "INTERPRET", "SUPPORTED_DTYPES", "backward", "forward", "gz_strategy", "lce_backward",
    "lce_chunk", "lce_forward", "mlp_backward", "mlp_forward",
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
    x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str], on_cublas: FrozenSet[str] = frozenset()
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(out, z)``, ``z`` only when the activation's derivative needs it; with
    ``"forward"`` in ``on_cublas``, torch's (:func:`formulas.forward`)."""
    if "forward" in on_cublas:
        return formulas.forward(x, weight, bias, activation)
    out, z, _ = fused_matmul(
        x, weight.t(), bias=bias, activation=activation, store_z=activation in NEEDS_PREACTIVATION, check=False
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
    on_cublas: FrozenSet[str] = frozenset(),
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(grad_x, grad_W, grad_b)`` for the gradients flagged in ``needs``; ``grad_x``
    (``"grad_x"`` in ``on_cublas``) and ``grad_W`` with ``grad_b`` (``"grad_w"``) as
    torch's products, ``G_z`` then from the pass, with ``grad_b`` summed in it.

    ``grad_z`` must be None (the dispatcher routes direct ``z`` gradients to torch ops).
    """
    if grad_z is not None:
        raise ValueError("triton_backend.backward: a direct gradient of z goes through torch ops")
    if grad_out is None:
        return None, None, None
    need_x, need_w, need_b = needs
    cublas_x = need_x and "grad_x" in on_cublas
    cublas_w = (need_w or need_b) and "grad_w" in on_cublas
    grad_b = None
    if activation is not None and (cublas_x or cublas_w or not _gz_in_prologue()):
        if cublas_w and need_b:
            grad_out, grad_b = grad_preactivation_and_bias(grad_out, saved, activation)
        else:
            grad_out = grad_preactivation(grad_out, saved, activation)
        activation = None
    prologue = dict(grad_activation=activation, saved=saved) if activation is not None else {}
    grad_x = grad_w = None
    if cublas_x:
        grad_x = formulas.grad_input(grad_out, weight)
    elif need_x:
        grad_x = fused_matmul(grad_out, weight, **prologue, check=False)[0]
    if cublas_w:
        grad_w = formulas.grad_weight(grad_out, x) if need_w else None
        if need_b and grad_b is None:
            grad_b = formulas.grad_bias(grad_out)
    elif need_w or need_b:
        prologue_t = dict(prologue, saved=saved.t()) if activation is not None else {}
        grad_w, _, grad_b = fused_matmul(
            grad_out.t(), x if need_w else None, rowsum=need_b, **prologue_t, check=False
        )
    return grad_x, grad_w, grad_b


def mlp_forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation):
    """``(out, u, g)`` of an MLP block (:func:`torch_matgrad.formulas.mlp_forward`) for
    2-D ``x``, in two launches that never write ``h``:

    * the pre-activations (item 6): plain ``u = x Wu^T + bu``; gated one launch over
      ``[Wg; Wu]`` (read from the two weights, not concatenated) storing ``[g | u]``, one
      ``(M, 2H)`` tensor whose halves are returned as views;
    * ``out = h Wd^T + bd`` with ``h = act(u)`` or ``act(g) * u`` built where the kernel
      loads its ``A`` tile (for a plain block without activation, ``h = u``).
    """
    if gate_w is None:
        u, g = fused_matmul(x, up_w.t(), bias=up_b, check=False)[0], None
    else:
        gu = fused_matmul(x, gate_w.t(), bias=gate_b, b2=up_w.t(), bias2=up_b, check=False)[0]
        hidden_width = up_w.shape[0]
        g, u = gu[:, :hidden_width], gu[:, hidden_width:]
    out = fused_matmul(u, down_w.t(), bias=down_b, hidden=True, gate=g, mlp_activation=activation, check=False)[0]
    return out, u, g


def mlp_backward(grad_out, grad_u, grad_g, x, up_w, gate_w, down_w, u, g, activation, needs):
    """The MLP block's gradients (:func:`torch_matgrad.formulas.mlp_backward`), ``h``
    never written:

    * ``grad_Wd = G^T h`` (items 9, 10) as ``(h^T G)^T``: ``h^T`` built where its tiles
      load from ``u^T`` (and ``g^T``), stored through transposed strides, with
      ``grad_bd = G^T 1`` (item 10) summed from the ``G`` tiles in the same launch;
    * ``grad_h = G Wd`` (item 11) with the epilogue forming ``G_u = grad_h * act'(u)``,
      or gated ``[G_g | G_u]`` (``grad_h * u * act'(g)``, ``grad_h * act(g)``: items 1, 3),
      one ``(M, 2H)`` tensor;
    * the first layer's products from ``G_u`` (and ``G_g``) as the linear layer's
      backward without activation (items 9-11), ``grad_x`` summing both.
    """
    if grad_u is not None or grad_g is not None:
        raise ValueError("triton_backend.mlp_backward: direct gradients of u and g go through torch ops")
    need_x, need_up_w, need_up_b, need_gate_w, need_gate_b, need_down_w, need_down_b = needs
    if grad_out is None:
        return (None,) * 7
    hidden = dict(hidden=True, mlp_activation=activation)
    grad_down_w = grad_down_b = None
    if need_down_w:
        gate_t = None if g is None else g.t()
        grad_down_w, _, grad_down_b = fused_matmul(u.t(), grad_out, gate=gate_t, colsum=need_down_b,
                                                   transpose_c=True, **hidden, check=False)
    elif need_down_b:
        grad_down_b = fused_matmul(grad_out.t(), None, rowsum=True, check=False)[2]
    grad_x = grad_up_w = grad_up_b = grad_gate_w = grad_gate_b = None
    if need_x or need_up_w or need_up_b or need_gate_w or need_gate_b:
        grads = fused_matmul(grad_out, down_w, grad_hidden=(u, g), mlp_activation=activation, check=False)[0]
        hidden_width = u.shape[1]
        g_g, g_u = (None, grads) if g is None else (grads[:, :hidden_width], grads[:, hidden_width:])
        grad_x, grad_up_w, grad_up_b = backward(g_u, None, x, up_w, None, None, (need_x, need_up_w, need_up_b))
        if g_g is not None:
            gate_needs = (need_x, need_gate_w, need_gate_b)
            gx, grad_gate_w, grad_gate_b = backward(g_g, None, x, gate_w, None, None, gate_needs)
            grad_x = gx if grad_x is None else grad_x.add_(gx)
    return grad_x, grad_up_w, grad_up_b, grad_gate_w, grad_gate_b, grad_down_w, grad_down_b


# ------------------------------------------------------- linear cross-entropy (LM head)


def lce_forward(x, weight, bias, target, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """``(loss, lse)`` per row (fp32, ``(N,)``) of ``cross_entropy(x W^T + b, target)``
    with :mod:`torch_matgrad.formulas`'s softmax cross-entropy conventions (label
    smoothing, z-loss, soft cap), the ``(N, V)`` logits never written
    (``triton_kernels/cross_entropy.py``). ``loss`` is 0 on ignored rows and NaN on a row
    whose target is out of range; ``lse`` (0 on ignored rows) is what
    :func:`lce_backward` needs. fp16, bf16 and fp32 operands (``CE_DTYPES``)."""
    return linear_cross_entropy_forward(
        x, weight, bias, target,
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
    )


def lce_backward(grad_rows, x, weight, bias, target, lse, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                 softcap=None, needs=(True, True, True), filter_eps=0.0):
    """``(grad_x, grad_W, grad_b)`` (those flagged in ``needs``, else None; ``grad_b`` None
    without a bias) of ``sum_i w_i loss_i`` with ``w = grad_rows`` (a ``(N,)`` or 0-dim
    float tensor: the rows' weights of MATH.md item 12, which the kernel zeroes on ignored
    rows itself) and :func:`lce_forward`'s ``lse``; ``G_z`` never written. Sums in fp32
    atomics: not bitwise reproducible from run to run. ``filter_eps > 0`` (off by default)
    skips the tiles whose gradient is below it everywhere (an approximation: CCE's
    filtering; ignored with label smoothing)."""
    if grad_rows.dim() == 0:
        grad_rows = grad_rows.expand(x.shape[0])
    return linear_cross_entropy_backward(
        grad_rows, x, weight, bias, target, lse,
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, needs=needs,
        filter_eps=filter_eps,
    )


def lce_chunk(z, target, row_weight, options):
    """``(loss, G_z)`` of one chunk's logits ``z`` with the interface of
    :func:`torch_matgrad.formulas.cross_entropy_chunk` (MATH.md item 12), in one fused
    kernel (``triton_kernels/cross_entropy.py``'s ``ce_logits_kernel``): ``G_z`` is
    written over ``z`` (the chunk loop's own buffer) and returned, None without
    ``row_weight``; ``loss`` fp32, 0 on ignored rows. fp16, bf16, fp32 (``CE_DTYPES``)."""
    loss, _ = cross_entropy_logits(
        z, target, row_weight, ignore_index=options.ignore_index, label_smoothing=options.label_smoothing,
        z_loss=options.z_loss, softcap=options.softcap,
    )
    return loss, (None if row_weight is None else z)
