"""The matrix-calculus notes as code: the forward and the explicit backward of
``out = act(x W^T + b)``, written with differentiable torch ops.

This module is the one statement of the formulas in ``docs/MATH.md`` (item numbers
cited in each docstring). It is also the CPU implementation: the dispatcher
(:mod:`torch_matgrad.dispatch`) calls :func:`forward` and :func:`backward` here for
CPU tensors, for double backward, and wherever the Triton kernels do not apply.

The notes put samples in columns (``Y = W X``); PyTorch puts them in rows, so with
``x = X^T`` (``B x n``), ``W`` (``m x n``) and ``G_z = dL/dz`` (``B x m``):

======================  ===================  ======================  ========
gradient                notes (columns)      PyTorch (rows)          item
======================  ===================  ======================  ========
pre-activation          ``G * act'(z)``      same                    1, 3
weight                  ``G X^T``            ``G_z^T x``             9, 10
input                   ``W^T G``            ``G_z W``               11
bias                    ``G 1``              ``G_z.sum(0)``          10
======================  ===================  ======================  ========

Forward mode (:func:`jvp`) is the product rule (item 1) on ``z = x W^T + b`` with each
factor's derivative pushed through a linear map (item 3), then the chain rule through
the elementwise activation:

    dz = dx W^T + x dW^T + db,        d out = act'(z) * dz.

Every function is built from differentiable torch ops, so double backward through
them is the same products again (the backward is bilinear, MATH.md "From the notes
to nn.Linear").
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: The activations the fused op supports, ``None`` meaning the identity.
ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")

# Activations whose derivative needs the pre-activation ``z``; ReLU's derivative can be
# read from its output (``out > 0`` exactly where ``z > 0``), so only ``out`` is kept.
NEEDS_PREACTIVATION = frozenset({"gelu", "gelu_tanh", "silu"})


def check_activation(activation: Optional[str]) -> None:
    """Raise ``ValueError`` naming the choices unless ``activation`` is supported."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"torch_matgrad: unknown activation {activation!r}; "
            f"choose one of {', '.join(repr(a) for a in ACTIVATIONS)}"
        )


def preactivation(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``z = x W^T + b``: the notes' ``Y = W X`` (item 6) in PyTorch's row convention.

    ``x`` is ``(..., n)``; ``weight`` is ``(m, n)`` or, for per-sample weights under
    ``torch.func.vmap``, ``(batch, m, n)`` with ``x`` ``(batch, rows, n)``.
    """
    if weight.dim() == 2:
        # F.linear is nn.Linear's own kernel (addmm with the bias as beta term): the
        # CPU path is bit-identical to nn.Linear.
        return F.linear(x, weight, bias)
    z = torch.matmul(x, weight.transpose(-1, -2))
    return z if bias is None else z + bias.unsqueeze(-2)


def activate(z: Tensor, activation: Optional[str]) -> Tensor:
    """``act(z)``, exactly as ``torch.nn.functional`` computes it."""
    if activation is None:
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.silu(z)


def grad_preactivation(grad_out: Tensor, saved: Optional[Tensor], activation: Optional[str]) -> Tensor:
    """``G_z = G_out * act'(z)`` (items 1 and 3: the Jacobian of an elementwise map is
    ``diag(act'(z))``, so the chain rule is an elementwise product).

    ``saved`` is ``z`` for GELU/SiLU and the output for ReLU (see ``NEEDS_PREACTIVATION``).
    PyTorch's own derivative kernels are used; they are differentiable themselves, which
    double backward needs.
    """
    if activation is None:
        return grad_out
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad_out, saved, 0)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad_out, saved)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad_out, saved, approximate="tanh")
    if torch.is_grad_enabled() and (grad_out.requires_grad or saved.requires_grad):
        # aten.silu_backward has no derivative; PyTorch switches to this composite
        # under grad mode too (derivatives.yaml, infinitely_differentiable_silu_backward).
        s = torch.sigmoid(saved)
        return grad_out * s * (1 + saved * (1 - s))
    return torch.ops.aten.silu_backward(grad_out, saved)


def grad_input(grad_z: Tensor, weight: Tensor) -> Tensor:
    """``dL/dx = G_z W`` (item 11: ``dz/dX = W^T G``, transposed into rows)."""
    return grad_z.matmul(weight)


def grad_weight(grad_z: Tensor, x: Tensor) -> Tensor:
    """``dL/dW = G_z^T x`` (items 9 and 10: ``dz/dW = G X^T``, the ``as_mat`` of
    ``dz/dW~ = (dz/dY)(I_m (x) X^T)``). Summed over every row of the batch."""
    return grad_z.transpose(-1, -2).matmul(x)


def grad_bias(grad_z: Tensor) -> Tensor:
    """``dL/db = G_z^T 1`` (item 10 with ``x = 1``: the bias is a weight column whose
    input is constantly one)."""
    return grad_z.sum(-2)


def jvp(
    x: Tensor,
    weight: Tensor,
    saved: Optional[Tensor],
    activation: Optional[str],
    x_t: Optional[Tensor],
    weight_t: Optional[Tensor],
    bias_t: Optional[Tensor],
) -> Tuple[Tensor, Optional[Tensor]]:
    """Forward mode: the tangents ``(d out, dz)`` of ``(out, z)`` along the input
    tangents ``(dx, dW, db)`` (any may be None: no tangent).

    ``z = x W^T + b`` is a sum of products, so by the product rule (item 1), each
    factor's derivative entering through a linear map (item 3: ``d(A u) = A du``),

        ``dz = dx W^T + x dW^T + db``;

    and ``out = act(z)`` is elementwise, its Jacobian ``diag(act'(z))`` (items 1, 3), so

        ``d out = act'(z) * dz``,

    the same elementwise product as :func:`grad_preactivation` (a diagonal Jacobian is
    its own transpose), computed by it. ``saved`` is what the backward keeps: ``z`` for
    GELU/SiLU, the output for ReLU. ``dz`` is returned only for the activations whose
    op returns ``z`` (``NEEDS_PREACTIVATION``).
    """
    dz = None
    if x_t is not None:
        dz, bias_t = preactivation(x_t, weight, bias_t), None  # dx W^T + db
    if weight_t is not None:
        term = preactivation(x, weight_t, bias_t)  # x dW^T (+ db)
        dz = term if dz is None else dz + term
    elif dz is None:  # only the bias moves: db on every row
        dz = bias_t.expand(*x.shape[:-1], bias_t.shape[-1]).contiguous()
    out_t = grad_preactivation(dz, saved, activation)
    return out_t, (dz if activation in NEEDS_PREACTIVATION else None)


def forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(out, z)`` with ``z`` returned only when the activation's derivative needs it."""
    z = preactivation(x, weight, bias)
    out = activate(z, activation)
    return out, (z if activation in NEEDS_PREACTIVATION else None)


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

    ``grad_out`` flows into ``out`` and ``grad_z`` straight into ``z`` (the op exposes
    ``z`` as a second output so that double backward reaches it); either may be None.
    """
    g = None if grad_out is None else grad_preactivation(grad_out, saved, activation)
    if grad_z is not None:
        g = grad_z if g is None else g + grad_z
    if g is None:
        return None, None, None
    need_x, need_w, need_b = needs
    return (
        grad_input(g, weight) if need_x else None,
        grad_weight(g, x) if need_w else None,
        grad_bias(g) if need_b else None,
    )


# --------------------------------------------------------------------------- MLP blocks
#
# A transformer MLP is two linear maps around an activation: plain
# ``out = act(x Wu^T + bu) Wd^T + bd`` (GPT-2, Phi, ViT) or gated
# ``out = (act(x Wg^T + bg) * (x Wu^T + bu)) Wd^T + bd`` (Llama, Mistral, Qwen, Gemma).
# Everything its backward needs can be rebuilt from ``x`` and the pre-activations
# ``u = x Wu^T + bu`` (and ``g = x Wg^T + bg``): the hidden activation ``h`` is
# recomputed where it is consumed instead of being saved.


def mlp_hidden(u: Tensor, g: Optional[Tensor], activation: Optional[str]) -> Tensor:
    """``h = act(u)`` (plain) or ``h = act(g) * u`` (gated)."""
    return activate(u, activation) if g is None else activate(g, activation) * u


def mlp_forward(
    x: Tensor,
    up_w: Tensor,
    up_b: Optional[Tensor],
    gate_w: Optional[Tensor],
    gate_b: Optional[Tensor],
    down_w: Tensor,
    down_b: Optional[Tensor],
    activation: Optional[str],
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(out, u, g)``: the block's output and its pre-activations (``g`` None when
    plain), each linear map item 6 in rows (:func:`preactivation`)."""
    u = preactivation(x, up_w, up_b)
    g = None if gate_w is None else preactivation(x, gate_w, gate_b)
    return preactivation(mlp_hidden(u, g, activation), down_w, down_b), u, g


def mlp_grad_preactivations(
    grad_h: Tensor, u: Tensor, g: Optional[Tensor], activation: Optional[str], act_g: Optional[Tensor] = None
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(G_u, G_g)`` from ``grad_h = dL/dh`` (items 1 and 3): plain
    ``G_u = grad_h * act'(u)``; gated, the product rule (item 1) on ``act(g) * u``,
    ``G_u = grad_h * act(g)`` and ``G_g = grad_h * u * act'(g)`` (``act_g``: ``act(g)``
    if the caller has it)."""
    if g is None:
        return grad_preactivation(grad_h, u, activation), None
    act_g = activate(g, activation) if act_g is None else act_g
    return grad_h * act_g, grad_preactivation(grad_h * u, g, activation)


def mlp_backward(
    grad_out: Optional[Tensor],
    grad_u: Optional[Tensor],
    grad_g: Optional[Tensor],
    x: Optional[Tensor],
    up_w: Optional[Tensor],
    gate_w: Optional[Tensor],
    down_w: Optional[Tensor],
    u: Tensor,
    g: Optional[Tensor],
    activation: Optional[str],
    needs: Tuple[bool, ...],
) -> Tuple[Optional[Tensor], ...]:
    """The gradients of ``(x, up_w, up_b, gate_w, gate_b, down_w, down_b)`` flagged in
    ``needs``, from the output gradient and the direct gradients of ``u`` and ``g``
    (the op exposes them so that double backward reaches them; any may be None).

    ``h`` is recomputed from ``u`` (and ``g``). Then, for the second map, items 9-11 as
    for one layer: ``grad_Wd = G^T h``, ``grad_bd = G^T 1``, ``grad_h = G Wd``; the
    activation's chain rule (:func:`mlp_grad_preactivations`); and the first maps are
    items 9-11 again, ``grad_x`` summing what flows through both ``Wu`` and ``Wg``.
    """
    need_x, need_up_w, need_up_b, need_gate_w, need_gate_b, need_down_w, need_down_b = needs
    grad_down_w = grad_down_b = g_u = g_g = None
    if grad_out is not None:
        act_g = None if g is None else activate(g, activation)  # once, for h and G_u
        if need_down_w:
            grad_down_w = grad_weight(grad_out, activate(u, activation) if g is None else act_g * u)
        if need_down_b:
            grad_down_b = grad_bias(grad_out)
        if need_x or need_up_w or need_up_b or need_gate_w or need_gate_b:
            g_u, g_g = mlp_grad_preactivations(grad_input(grad_out, down_w), u, g, activation, act_g)
    if grad_u is not None:
        g_u = grad_u if g_u is None else g_u + grad_u
    if grad_g is not None:
        g_g = grad_g if g_g is None else g_g + grad_g
    grad_x = None
    if need_x:
        for gz, w in ((g_u, up_w), (g_g, gate_w)):
            if gz is not None:
                grad_x = grad_input(gz, w) if grad_x is None else grad_x + grad_input(gz, w)
    return (
        grad_x,
        grad_weight(g_u, x) if need_up_w and g_u is not None else None,
        grad_bias(g_u) if need_up_b and g_u is not None else None,
        grad_weight(g_g, x) if need_gate_w and g_g is not None else None,
        grad_bias(g_g) if need_gate_b and g_g is not None else None,
        grad_down_w,
        grad_down_b,
    )
