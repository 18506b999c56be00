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

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import torch.autograd.forward_ad as _fw_ad
import torch.nn.functional as F
from torch import Tensor

#: The activations the fused op supports, as it spells them: ``None`` is the identity.
ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")
#: The same names as every command and table spells them: ``none`` for the identity.
ACTIVATION_NAMES = tuple("none" if a is None else a for a in ACTIVATIONS)

# Activations whose derivative needs the pre-activation ``z``; ReLU's derivative can be
# read from its output (``out > 0`` exactly where ``z > 0``), so only ``out`` is kept.
NEEDS_PREACTIVATION = frozenset({"gelu", "gelu_tanh", "silu"})


def canonical_activation(activation: Optional[str]) -> Optional[str]:
    """``activation`` as :data:`ACTIVATIONS` spells it: ``None`` and ``"none"`` alike mean
    the identity, and names are case-insensitive (``"GELU"`` is ``"gelu"``), as backend
    names are. Raises ``ValueError`` naming the choices for anything else."""
    if activation in ACTIVATIONS:  # the common case: one tuple lookup
        return activation
    name = activation.lower() if isinstance(activation, str) else activation
    if name in ACTIVATION_NAMES:
        return None if name == "none" else name
    # Other libraries' names for exactly these functions (transformers' ACT2FN among
    # them), said in the error rather than accepted: one spelling everywhere. Not
    # "gelu_fast" (a rounded constant) nor "quick_gelu" (another function).
    same = {"swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
            "gelu_python_tanh": "gelu_tanh", "gelu_python": "gelu", "linear": "none", "identity": "none"}
    fix = same.get(name) or (name.replace("-", "_") if isinstance(name, str) else None)
    hint = f"use {fix!r}, the same function; " if fix in ACTIVATION_NAMES else ""
    raise ValueError(
        f"torch_matgrad: unknown activation {activation!r}; {hint}choose one of "
        f"{', '.join(repr(a) for a in ACTIVATION_NAMES)} (None is 'none'; any case)"
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
    """``h = act(u)`` (plain) or ``h = act(g) * u`` (gated; with grad mode off, in
    ``act(g)``'s memory: one ``(M, H)`` tensor fewer at once)."""
    if g is None:
        return activate(u, activation)
    if activation is None or torch.is_grad_enabled():
        return activate(g, activation) * u
    return activate(g, activation).mul_(u)


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
    grad_h: Tensor, u: Tensor, g: Optional[Tensor], activation: Optional[str]
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(G_u, G_g)`` from ``grad_h = dL/dh`` (items 1 and 3): plain
    ``G_u = grad_h * act'(u)``; gated, the product rule (item 1) on ``act(g) * u``,
    ``G_u = grad_h * act(g)`` and ``G_g = grad_h * u * act'(g)``. Out of place and
    differentiable (double backward)."""
    if g is None:
        return grad_preactivation(grad_h, u, activation), None
    return grad_h * activate(g, activation), grad_preactivation(grad_h * u, g, activation)


def _grad_preactivation_out(grad: Tensor, saved: Tensor, activation: Optional[str], out: Tensor) -> Tensor:
    """:func:`grad_preactivation` written into ``out`` (PyTorch's derivative kernels'
    ``out=`` forms; ``out`` may be ``grad`` or ``saved`` themselves: one read and one
    write per element). The identity returns ``grad`` and writes nothing."""
    if activation is None:
        return grad
    if activation == "relu":
        return torch.ops.aten.threshold_backward.grad_input(grad, saved, 0, grad_input=out)
    if activation in ("gelu", "gelu_tanh"):
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        return torch.ops.aten.gelu_backward.grad_input(grad, saved, approximate=approximate, grad_input=out)
    return torch.ops.aten.silu_backward.grad_input(grad, saved, grad_input=out)


def _activate_(z: Tensor, activation: Optional[str]) -> Tensor:
    """``act(z)`` written over ``z`` (the ``out=`` forms of :func:`activate`'s kernels)."""
    if activation is None:
        return z
    if activation == "relu":
        return z.relu_()
    if activation in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu.out(z, approximate="tanh" if activation == "gelu_tanh" else "none", out=z)
    return torch.ops.aten.silu.out(z, out=z)


def _graph_dies_after_this_backward() -> bool:
    """True inside a backward whose graph is not kept (no ``retain_graph``, no
    ``create_graph``) and under no ``torch.func`` transform: the tensors saved for it die
    when it returns, and it may write over them, as AOTAutograd's compiled backwards
    reuse ("donate") their saved buffers then. Outside any backward, False."""
    return (torch._C._current_graph_task_id() != -1 and not torch._C._autograd._get_current_graph_task_keep_graph()
            and not torch._C._are_functorch_transforms_active())


def _preactivation_grads_(grad_h: Tensor, u: Tensor, g: Optional[Tensor], activation: Optional[str],
                          donate: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`mlp_grad_preactivations` in the buffers at hand: over ``u`` and ``g`` when
    ``donate`` (dead once ``h`` is used), else over ``grad_h``; one new ``(M, H)`` buffer
    at most (gated, not donating)."""
    if g is None:
        return _grad_preactivation_out(grad_h, u, activation, out=u if donate else grad_h), None
    if donate:
        g_g = _grad_preactivation_out(u.mul_(grad_h), g, activation, out=u)
        return _activate_(g, activation).mul_(grad_h), g_g
    g_u = activate(g, activation) * grad_h
    return g_u, _grad_preactivation_out(grad_h.mul_(u), g, activation, out=grad_h)


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

    Under ``create_graph`` the formulas run out of place, differentiably. A first-order
    backward (grad mode off) runs the same formulas for memory, in the order and the
    buffers below.
    """
    if torch.is_grad_enabled():
        return mlp_backward_out_of_place(grad_out, grad_u, grad_g, x, up_w, gate_w, down_w, u, g, activation,
                                         needs)
    need_x, need_up_w, need_up_b, need_gate_w, need_gate_b, need_down_w, need_down_b = needs
    # Peak memory (bench.allocations; bf16 at 4096 x 1024 x 4096: (M, H) tensors 32 MiB,
    # (M, d) and the weights 8): u (and g) stay saved until this returns, where eager
    # PyTorch frees each pre-activation once its node has run. So:
    # - grad_Wd first, with h whole (one GEMM, no row chunks), while nothing else of
    #   width H but u (and g) is alive; h dies before grad_h = G Wd is formed.
    # - When the graph dies with this backward, u and g are dead once h is used: G_u
    #   (plain; gated G_g) is written over u, gated G_u over g, and grad_h dies before the
    #   first layer's products, which then hold no temporary of width H beside the saved
    #   ones. With retain_graph, grad_h and one new buffer hold them instead.
    # - The first layer's products in the order grad_x, then grad_W: the H200's peaks sat
    #   at these products (cuBLAS's own scratch, ~128 MiB there, docs/mlp.md), so they
    #   run where the fewest bytes are live.
    # Step peak (tensors): plain GELU 88 -> 80 MiB, gated SiLU 176 -> 112, against eager's
    # 112 and 208; aten ops per step 24 -> 17 and 29 -> 30, against eager's 22 and 36.
    donate = _graph_dies_after_this_backward()
    grad_down_w = grad_down_b = g_u = g_g = None
    if grad_out is not None:
        if need_down_w:
            grad_down_w = grad_weight(grad_out, mlp_hidden(u, g, activation))  # h dies here
        if need_down_b:
            grad_down_b = grad_bias(grad_out)
        if need_x or need_up_w or need_up_b or need_gate_w or need_gate_b:
            if g is None and activation is None and donate:  # G_u is grad_h: written where u (h, used) was
                g_u = torch.mm(grad_out, down_w, out=u)
            else:
                g_u, g_g = _preactivation_grads_(grad_input(grad_out, down_w), u, g, activation, donate)
    if grad_u is not None:
        g_u = grad_u if g_u is None else g_u.add_(grad_u)
    if grad_g is not None:
        g_g = grad_g if g_g is None else g_g.add_(grad_g)
    grad_x = None
    if need_x:
        for grad_z, weight in ((g_g, gate_w), (g_u, up_w)):
            if grad_z is not None:
                grad_x = grad_input(grad_z, weight) if grad_x is None else grad_x.addmm_(grad_z, weight)
    grad_gate_w = grad_weight(g_g, x) if need_gate_w and g_g is not None else None
    grad_gate_b = grad_bias(g_g) if need_gate_b and g_g is not None else None
    g_g = None  # a temporary (retain_graph) freed before the up projection's product
    grad_up_w = grad_weight(g_u, x) if need_up_w and g_u is not None else None
    grad_up_b = grad_bias(g_u) if need_up_b and g_u is not None else None
    return grad_x, grad_up_w, grad_up_b, grad_gate_w, grad_gate_b, grad_down_w, grad_down_b


def mlp_backward_out_of_place(grad_out, grad_u, grad_g, x, up_w, gate_w, down_w, u, g, activation, needs):
    """:func:`mlp_backward` out of place, in differentiable torch ops: double backward,
    and the backward that ``torch.compile`` traces for the block's custom op (Inductor
    plans the buffers itself, the saved ones included)."""
    need_x, need_up_w, need_up_b, need_gate_w, need_gate_b, need_down_w, need_down_b = needs
    grad_down_w = grad_down_b = g_u = g_g = None
    if grad_out is not None:
        if need_down_w:
            grad_down_w = grad_weight(grad_out, mlp_hidden(u, g, activation))
        if need_down_b:
            grad_down_b = grad_bias(grad_out)
        if need_x or need_up_w or need_up_b or need_gate_w or need_gate_b:
            g_u, g_g = mlp_grad_preactivations(grad_input(grad_out, down_w), u, g, activation)
    if grad_u is not None:
        g_u = grad_u if g_u is None else g_u + grad_u
    if grad_g is not None:
        g_g = grad_g if g_g is None else g_g + grad_g
    grad_x = None
    for grad_z, weight in ((g_u, up_w), (g_g, gate_w)):
        if need_x and grad_z is not None:
            term = grad_input(grad_z, weight)
            grad_x = term if grad_x is None else grad_x + term
    return (
        grad_x,
        grad_weight(g_u, x) if need_up_w and g_u is not None else None,
        grad_bias(g_u) if need_up_b and g_u is not None else None,
        grad_weight(g_g, x) if need_gate_w and g_g is not None else None,
        grad_bias(g_g) if need_gate_b and g_g is not None else None,
        grad_down_w,
        grad_down_b,
    )


# ------------------------------------------------------- softmax cross-entropy (LM head)
#
# The language-model head and its loss as one op: ``z = x W^T + b``, the logits the
# softmax sees ``s = c tanh(z / c)`` (Gemma 2's soft cap; ``s = z`` without one), and
# per row ``i`` with target class ``y_i``, ``lse_i = log sum_j exp(s_ij)``,
#
#     loss_i = lse_i - (1 - eps) s_{i,y_i} - (eps / V) sum_j s_ij + zl lse_i^2
#
# (label smoothing ``eps``, z-loss ``zl``; rows whose target is ``ignore_index`` give 0).
# Its gradient (MATH.md item 12) is, with ``p_i = softmax(s_i)``, one-hot ``Y`` and
# ``w_i`` the row's weight in the reduced loss (0 for an ignored row),
#
#     G_z = w_i ((1 + 2 zl lse_i) p_i - (1 - eps) Y_i - eps / V) * (1 - (s_i / c)^2),
#
# after which the weight, input and bias gradients are items 9-11 as for one layer.
# The logits are never formed whole: :func:`linear_cross_entropy` walks the rows in
# chunks and turns each chunk's ``G_z`` into its share of the three gradients.

#: The reductions of ``linear_cross_entropy``, as ``F.cross_entropy`` names them.
REDUCTIONS = ("mean", "sum", "none")

#: Bytes of one chunk's logits that set the default rows per chunk, per device type
#: (others: "cuda"'s), counted in the dtype the chunk's loss step works in: fp32 for torch
#: ops (they upcast; the working set is one to three buffers of this size), the input
#: dtype for the Triton backend's fused kernel (the logits are its one chunk-sized
#: tensor). On a CPU 32 MiB stays warm in cache from pass to pass over a chunk. On a GPU
#: the chunk is the K of ``grad_W += G_z^T x``, which reads and writes all of ``grad_W``
#: (1 GiB in bf16 at 128256 x 4096) once per chunk: 256 MiB of bf16 logits are 1024 rows
#: there (:func:`chunk_rows`), 8 chunks and 15 GiB of ``grad_W`` traffic (the first chunk
#: writes it, the others read and write it: ~3.7 ms at 4.3 TB/s, under the product's
#: 12.7 ms at 680 TFLOP/s), where the 261 rows of 128 MiB of fp32 made 32 chunks and 63 GiB
#: (docs/lm_head.md).
CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}


class CrossEntropyOptions(NamedTuple):
    """What ``linear_cross_entropy`` computes besides its tensors."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    chunk_rows: Optional[int] = None


def chunk_rows(rows: int, vocab: int, requested: Optional[int] = None, device_type: str = "cpu",
               itemsize: int = 4) -> int:
    """Rows per chunk: ``requested``, else as many as keep one chunk's logits, at
    ``itemsize`` bytes each, within :data:`CHUNK_BYTES` (at least one, at most every row),
    on a GPU in whole 128-row tiles of the products: 1046 rows would be 9 x 16 tiles of
    128 x 256 in ``grad_x = G_z W`` (2 waves on an H200's 132 SMs, the second 12 tiles),
    1024 are 8 x 16 (one wave), and ``grad_W``'s K is 16 whole steps of 64."""
    budget = CHUNK_BYTES.get(device_type, CHUNK_BYTES["cuda"])
    fit = budget // (itemsize * max(vocab, 1))
    if device_type != "cpu" and fit >= 128:
        fit -= fit % 128
    return max(1, min(rows, requested or fit))


def softcapped(z: Tensor, softcap: Optional[float], out: Optional[Tensor] = None) -> Tensor:
    """``s = c tanh(z / c)``, or ``z`` without a soft cap; written into ``out`` if given."""
    if softcap is None:
        return z
    return torch.mul(torch.tanh(torch.div(z, softcap, out=out), out=out), softcap, out=out)


# The chunk's functions below take ``out=None`` (new tensors, differentiable: double
# backward and torch.func transforms) or a buffer that every chunk reuses, so that the
# working memory is the same from run to run: chunk-sized temporaries, each freed before
# the next, landed in whatever blocks glibc had free, and the CPU's peak varied 4x.


def cross_entropy_rows(
    s: Tensor, target: Tensor, label_smoothing: float, z_loss: float, out: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, lse, e, total)`` per row of the logits ``s`` (rows, V) against class
    indices ``target`` (rows,), all in range: ``loss_i = lse_i - (1 - eps) s_{i,y_i} -
    (eps / V) sum_j s_ij + zl lse_i^2``, which is ``F.cross_entropy``'s
    ``-(1 - eps) log p_{i,y_i} - (eps / V) sum_j log p_ij`` (``log p = s - lse``) plus
    the z-loss; ``e = exp(s - m)``, ``m`` each row's max, and ``total`` its row sums
    (rows, 1): ``softmax(s) = e / total`` and ``lse = m + log(total)``.

    ``e`` is written into ``out`` if given, which may be ``s`` itself (the loss reads
    ``s`` first)."""
    loss = -(1 - label_smoothing) * s.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        loss = loss - (label_smoothing / s.shape[-1]) * s.sum(-1)
    # torch.logsumexp's shift, detached: any constant gives the same lse and derivative.
    m = s.detach().amax(-1, keepdim=True)
    e = torch.exp(torch.sub(s, m, out=out), out=out)
    total = e.sum(-1, keepdim=True)
    lse = (m + total.log()).squeeze(-1)
    loss = loss + lse
    if z_loss:
        loss = loss + z_loss * lse.square()
    return loss, lse, e, total


def cross_entropy_grad_logits(
    s: Tensor, e: Tensor, total: Tensor, lse: Tensor, target: Tensor, weight: Tensor, label_smoothing: float,
    z_loss: float, softcap: Optional[float], overwrite: bool = False,
) -> Tensor:
    """``G_z = dL/dz`` for ``L = sum_i w_i loss_i`` (MATH.md item 12):
    ``w_i ((1 + 2 zl lse_i) p_i - (1 - eps) Y_i - eps / V)`` with ``p_i = e_i / total_i``
    (:func:`cross_entropy_rows`) and ``Y`` one-hot (item 2 on ``lse``'s derivative ``p``;
    the rest is linear in ``s``), times the soft cap's derivative ``1 - (s / c)^2``
    (items 1, 3: elementwise, ``tanh' = 1 - tanh^2``). ``weight`` (rows,) is ``w``: 0 on
    ignored rows.

    Out of place, or with ``overwrite`` written over ``e`` (and, under a soft cap, over
    ``s``, a tensor other than ``e`` then)."""
    out, s_out = (e, s) if overwrite else (None, None)
    coef = weight if not z_loss else weight * (1 + 2 * z_loss * lse)
    g = torch.mul(e, coef.unsqueeze(-1) / total, out=out)
    picked = (-(1 - label_smoothing) * weight).unsqueeze(-1).to(g.dtype)
    g = torch.scatter_add(g, -1, target.unsqueeze(-1), picked, out=out)
    if label_smoothing:
        g = torch.sub(g, (label_smoothing / s.shape[-1]) * weight.unsqueeze(-1), out=out)
    if softcap is not None:
        ratio_sq = torch.square(torch.div(s, softcap, out=s_out), out=s_out)
        g = torch.addcmul(g, g, ratio_sq, value=-1, out=out)  # g (1 - (s / c)^2)
    return g


def cross_entropy_chunk(
    z: Tensor, target: Tensor, row_weight: Optional[Tensor], options: CrossEntropyOptions,
    buffers: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(loss, G_z)`` of one chunk's logits ``z`` (rows, V) in torch ops: each row's
    loss (:func:`cross_entropy_rows` on the soft-capped logits; 0 on ignored rows) in
    float32 (float64 for float64 logits) and, with ``row_weight`` (``w`` of item 12 before
    ignored rows are zeroed: 0-dim or (rows,)), ``G_z`` (:func:`cross_entropy_grad_logits`)
    in ``z``'s dtype, else None.

    Out of place (differentiable), or with ``buffers`` (:func:`chunk_buffers`) in place:
    ``s`` and ``e`` in them or over ``z``, ``G_z`` in ``z``'s dtype over one of them, and
    nothing chunk-sized allocated. The Triton backend's ``lce_chunk`` has this interface
    (without ``buffers``) and writes ``G_z`` over ``z``."""
    compute = torch.promote_types(z.dtype, torch.float32)
    s_buf, e_buf = (None, None) if buffers is None else (b if b is None else b[: z.shape[0]] for b in buffers)
    s = z.to(compute) if s_buf is None else s_buf.copy_(z)  # z itself in its compute dtype
    s = softcapped(s, options.softcap, out=None if buffers is None else s)
    kept = kept_rows(target, options)
    t_safe = torch.where(kept, target, 0)
    e_out = None if buffers is None else (s if e_buf is None else e_buf)
    loss, lse, e, total = cross_entropy_rows(s, t_safe, options.label_smoothing, options.z_loss, e_out)
    loss = torch.where(kept, loss, 0)
    if row_weight is None:
        return loss, None
    w = torch.where(kept, row_weight.to(compute), 0)
    g = cross_entropy_grad_logits(s, e, total, lse, t_safe, w, options.label_smoothing, options.z_loss,
                                  options.softcap, overwrite=buffers is not None)
    if buffers is None or g.dtype == z.dtype:
        return loss, g.to(z.dtype)
    return loss, z.copy_(g)


def chunk_buffers(z: Tensor, options: CrossEntropyOptions) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The buffers of :func:`cross_entropy_chunk` for logits like ``z``, the full
    chunk's: ``s`` over ``z`` where ``z`` has the compute dtype, else in a buffer of it;
    ``e`` over ``s`` without a soft cap, else (``G_z`` needs ``s`` then) in a buffer of
    its own."""
    compute = torch.promote_types(z.dtype, torch.float32)
    s_buf = None if z.dtype == compute else torch.empty_like(z, dtype=compute)
    e_buf = None if options.softcap is None else torch.empty_like(z, dtype=compute)
    return s_buf, e_buf


def chunks_undifferentiated() -> bool:
    """Whether nothing differentiates or batches the chunks' ops (grad mode off, no
    ``torch.func`` transform, no forward AD): they may then write into buffers."""
    return not (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active() or _fw_ad._current_level >= 0)


def kept_rows(target: Tensor, options: CrossEntropyOptions) -> Tensor:
    """The rows whose target is a class: every row but those equal to ``ignore_index``."""
    return target != options.ignore_index


def reduction_weight(target: Tensor, options: CrossEntropyOptions, dtype: torch.dtype) -> Tensor:
    """``w`` of item 12 for a reduced loss, before ignored rows are zeroed: ``1 / n_kept``
    for ``"mean"`` (``F.cross_entropy``'s mean over the rows that count), ``1`` for
    ``"sum"``; a 0-dim tensor."""
    if options.reduction == "sum":
        return torch.ones((), dtype=dtype, device=target.device)
    return 1 / kept_rows(target, options).sum().to(dtype)


def reduce_loss(loss: Tensor, target: Tensor, options: CrossEntropyOptions) -> Tensor:
    """The per-row losses reduced as ``F.cross_entropy`` does: ``"none"`` as they are,
    ``"sum"``, or ``"mean"`` over the rows that count (NaN when none does)."""
    if options.reduction == "none":
        return loss
    if options.reduction == "sum":
        return loss.sum()
    return loss.sum() / kept_rows(target, options).sum()


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    options: CrossEntropyOptions,
    row_weight: Optional[Tensor],
    needs: Tuple[bool, bool, bool],
    linear=None,
    elementwise=None,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(loss, grad_x, grad_W, grad_b)`` chunk by chunk of rows, never forming the
    whole ``(rows, V)`` logits.

    ``loss`` is per row (0 on ignored rows), in float32 (float64 for float64 inputs).
    With ``row_weight`` (a 0-dim or ``(rows,)`` tensor: ``w`` of item 12 before
    ignored rows are zeroed) the gradients of ``sum_i w_i loss_i`` flagged in ``needs``
    come too: each chunk's ``G_z`` (:func:`cross_entropy_grad_logits`) gives its rows of
    ``grad_x = G_z W`` (item 11) and its share of ``grad_W = G_z^T x`` (items 9, 10) and
    ``grad_b = G_z^T 1`` (item 10).

    ``linear`` computes the chunk's products: None for torch ops (``grad_W`` and
    ``grad_b`` accumulated in place: on a GPU cuBLAS accumulates in fp32 and rounds
    once per chunk), or a backend with this module's linear-layer interface,
    :func:`forward` and :func:`backward` (the Triton backend's fused GEMMs).
    ``elementwise`` computes the chunk's losses and ``G_z`` from its logits: None for
    :func:`cross_entropy_chunk` (torch ops), or a function with its interface that may
    write ``G_z`` over the logits (the Triton backend's fused kernel: not differentiable,
    so never under grad mode). With torch ops a single chunk runs only out-of-place ops:
    differentiable, as double backward needs.

    Where nothing differentiates, batches (:func:`chunks_undifferentiated`) or traces
    (``torch.compile``) the chunks, torch products write each chunk's logits into one buffer and ``grad_x``'s rows into ``grad_x`` itself,
    and torch ops work in :func:`chunk_buffers`: the working memory is the same whatever
    the allocator does with freed blocks.
    """
    rows, vocab = x.shape[0], weight.shape[0]
    # The rows per chunk count the chunk's largest tensor: torch ops' fp32 upcast (fp64
    # inputs too: the CPU's measured chunks), or the fused kernel's logits as they are.
    itemsize = 4 if elementwise is None else x.element_size()
    step = chunk_rows(rows, vocab, options.chunk_rows, x.device.type, itemsize)
    need_x, need_w, need_b = needs if row_weight is not None else (False, False, False)
    logits = grad_x = None
    if linear is None and chunks_undifferentiated() and not torch.compiler.is_compiling():
        logits = x.new_empty(step, vocab)
        grad_x = x.new_empty(x.shape) if need_x else None
        if elementwise is None:
            elementwise = functools.partial(cross_entropy_chunk, buffers=chunk_buffers(logits, options))
    elementwise = elementwise or cross_entropy_chunk
    losses, grads_x = [], []
    grad_w = grad_b = None
    for start in range(0, max(rows, 1), step):
        x_c, t_c = x[start : start + step], target[start : start + step]
        if linear is None:  # F.linear's kernels
            z_out = None if logits is None else logits[: x_c.shape[0]]
            wt = weight.t()
            z = torch.mm(x_c, wt, out=z_out) if bias is None else torch.addmm(bias, x_c, wt, out=z_out)
        else:
            z = linear.forward(x_c, weight, bias, None)[0]
        w_c = None
        if need_x or need_w or need_b:
            w_c = row_weight if row_weight.dim() == 0 else row_weight[start : start + step]
        loss, g = elementwise(z, t_c, w_c, options)
        del z  # torch ops' G_z is a new tensor; the fused kernel's is z itself
        losses.append(loss)
        if g is None:
            continue
        if linear is None:
            if need_x:
                grads_x.append(torch.mm(g, weight, out=None if grad_x is None else grad_x[start : start + step]))
            if need_w:
                grad_w = grad_weight(g, x_c) if grad_w is None else grad_w.addmm_(g.t(), x_c)
            if need_b:
                grad_b = grad_bias(g) if grad_b is None else grad_b.add_(grad_bias(g))
        else:
            gx, gw, gb = linear.backward(g, None, x_c, weight, None, None, (need_x, need_w, need_b))
            grads_x.append(gx)
            grad_w = gw if grad_w is None else grad_w.add_(gw)
            grad_b = gb if grad_b is None else grad_b.add_(gb)
            del gx, gw, gb
        del g  # before the next chunk's logits: one chunk-sized tensor at a time
    loss = losses[0] if len(losses) == 1 else torch.cat(losses)
    if need_x and grad_x is None:
        grad_x = grads_x[0] if len(grads_x) == 1 else torch.cat(grads_x)
    return loss, grad_x, grad_w, grad_b


def backward_row_weight(grad_loss: Tensor, target: Tensor, options: CrossEntropyOptions, dtype: torch.dtype) -> Tensor:
    """``w`` of item 12 in the backward: the upstream gradient of each row's loss,
    ``grad_loss_i`` under ``"none"``, else ``grad_loss * reduction_weight``."""
    if options.reduction == "none":
        return grad_loss
    return grad_loss * reduction_weight(target, options, dtype)


def linear_cross_entropy_backward(
    grad_loss: Tensor,
    stored: Optional[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]],
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    options: CrossEntropyOptions,
    needs: Tuple[bool, bool, bool],
    chunks=None,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(grad_x, grad_W, grad_b)`` of the reduced loss, ``grad_loss`` being its upstream
    gradient (0-dim for ``"mean"`` and ``"sum"``, ``(rows,)`` for ``"none"``).

    ``stored``: the gradients the forward computed for the reduced loss, handed over:
    the loss's gradient is linear in its upstream gradient, so they are scaled by
    ``grad_loss`` in place and returned (no copy of ``grad_W``). Without them
    (``"none"``, whose upstream gradient differs per row), or when the backward must
    itself be differentiable (grad mode on: double backward), the chunks are recomputed
    with the row weights ``w_i = grad_loss_i`` (``"none"``) or ``grad_loss *
    reduction_weight`` (item 12), in one chunk under grad mode, by ``chunks``:
    :func:`linear_cross_entropy` or a function with its arguments (the dispatcher's)."""
    if stored is not None and not torch.is_grad_enabled():
        return tuple(None if g is None else g.mul_(grad_loss) for g in stored)
    row_weight = backward_row_weight(grad_loss, target, options, torch.promote_types(x.dtype, torch.float32))
    if torch.is_grad_enabled():
        options = options._replace(chunk_rows=max(x.shape[0], 1))
    return (chunks or linear_cross_entropy)(x, weight, bias, target, options, row_weight, needs)[1:]


# --------------------------------------------------------------- low-rank update (LoRA)
#
# LoRA (PEFT's ``result = base(x) + lora_B(lora_A(dropout(x))) * scaling``) adds a rank-r
# update to a linear map, usually a frozen one:
#
#     z = x W^T + b + s t B^T,   t = drop(x) A^T,   drop(x) = c (M * x),   out = act(z),
#
# ``M`` the dropout's 0/1 mask (none without dropout) and ``c = 1 / (1 - p)`` its scale
# (0 at p = 1: everything dropped). Each product is item 6 in rows, so the backward is
# items 9-11 on each of them, chained (item 3); the dropout is elementwise,
# ``diag(c M)``, its own transpose (items 1, 3): the backward masks as the forward does.
# ``c`` is applied to the r columns of ``t`` and of its gradient, never to ``(rows, d)``.


def masked(v: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``M * v`` for the dropout's boolean mask ``M``; ``v`` itself without one."""
    return v if mask is None else v * mask


def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    mask: Optional[Tensor],
    scaling: float,
    dropout_scale: float,
    activation: Optional[str],
    linear_forward=forward,
) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """``(out, z, t)`` of the LoRA map for 2-D ``x`` (rows): ``t = c (M * x) A^T`` and
    ``z = x W^T + b + s t B^T`` (item 6 for each product), ``out = act(z)``; ``z`` only
    for the activations whose derivative needs it (:data:`NEEDS_PREACTIVATION`).

    ``linear_forward`` computes ``x W^T + b`` with :func:`forward`'s interface (the
    dispatcher passes the op's backend); the rank-r products are torch ops everywhere."""
    t = preactivation(masked(x, mask), lora_A, None)
    if dropout_scale != 1:
        t = t * dropout_scale
    z = torch.addmm(linear_forward(x, weight, bias, None)[0], t, lora_B.t(), alpha=scaling)
    out = activate(z, activation)
    return out, (z if activation in NEEDS_PREACTIVATION else None), t


def lora_backward(
    grad_out: Optional[Tensor],
    grad_z: Optional[Tensor],
    grad_t: Optional[Tensor],
    x: Optional[Tensor],
    weight: Optional[Tensor],
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    t: Optional[Tensor],
    mask: Optional[Tensor],
    saved: Optional[Tensor],
    scaling: float,
    dropout_scale: float,
    activation: Optional[str],
    needs: Tuple[bool, bool, bool, bool, bool],
    linear_backward=backward,
) -> Tuple[Optional[Tensor], ...]:
    """``(grad_x, grad_W, grad_b, grad_A, grad_B)`` of :func:`lora_forward`, those flagged
    in ``needs``; ``grad_z`` and ``grad_t`` flow straight into ``z`` and ``t`` (outputs of
    the op, for double backward), and any gradient may be None. With
    ``G_z = G_out * act'(z)`` (items 1, 3; ``saved`` as for :func:`backward`):

    * ``grad_W = G_z^T x``, ``grad_b = G_z^T 1``, ``G_z W`` (items 9-11), by
      ``linear_backward`` (:func:`backward`'s interface: the op's backend);
    * ``grad_B = s G_z^T t`` (items 9, 10: ``t`` is the input of the map ``s B``);
    * ``G_t = s G_z B`` (item 11), and through ``t = c (M * x) A^T``, with
      ``G_u = c G_t``: ``grad_A = G_u^T (M * x)`` (items 9, 10) and
      ``grad_x = G_z W + M * (G_u A)`` (item 11, then the mask: items 1, 3).

    Out of place and differentiable under grad mode (double backward); a first-order
    backward adds the low-rank term into ``grad_x`` in place (a fresh product)."""
    need_x, need_w, need_b, need_a, need_lb = needs
    g = None if grad_out is None else grad_preactivation(grad_out, saved, activation)
    if grad_z is not None:
        g = grad_z if g is None else g + grad_z
    grad_x = grad_w = grad_b = grad_a = grad_lb = g_t = None
    if g is not None:
        grad_x, grad_w, grad_b = linear_backward(g, None, x, weight, None, None, (need_x, need_w, need_b))
        if need_lb:
            grad_lb = grad_weight(g, t) * scaling
        if need_x or need_a:
            g_t = grad_input(g, lora_B) * scaling
    if grad_t is not None and (need_x or need_a):
        g_t = grad_t if g_t is None else g_t + grad_t
    if g_t is None:
        return grad_x, grad_w, grad_b, grad_a, grad_lb
    g_u = g_t * dropout_scale if dropout_scale != 1 else g_t
    if need_a:
        grad_a = grad_weight(g_u, masked(x, mask))
    if need_x:
        in_place = not torch.is_grad_enabled()
        if grad_x is None:
            grad_x = masked(grad_input(g_u, lora_A), mask)
        elif mask is None:
            grad_x = grad_x.addmm_(g_u, lora_A) if in_place else torch.addmm(grad_x, g_u, lora_A)
        else:
            g_xa = grad_input(g_u, lora_A)
            grad_x = grad_x.addcmul_(g_xa, mask) if in_place else torch.addcmul(grad_x, g_xa, mask)
    return grad_x, grad_w, grad_b, grad_a, grad_lb


# ------------------------------------------------ the MLP block with LoRA adapters
#
# PEFT's LoRA on a block's projections: each adapted projection is the LoRA map above
# with activation None (the update lands before the block's activation), ``u`` and
# ``g`` from ``x``, the output from ``h``. The block saves what the plain block saves
# (``x``, ``u``, ``g``) plus, per adapter, ``t`` (r values a row) and its mask (one byte
# an element: ``x``'s for up and gate, ``h``'s for down); ``h`` is rebuilt in the
# backward, where the down adapter's ``grad_A = G_u^T (M * h)`` needs it, as ``grad_Wd``.


class LowRank(NamedTuple):
    """One projection's adapter as the formulas take it: ``A`` ``(r, in)``, ``B``
    ``(out, r)``, the dropout's ``mask`` (None: no dropout), ``scaling`` ``s`` and
    ``dropout_scale`` ``c = 1 / (1 - p)``."""

    A: Tensor
    B: Tensor
    mask: Optional[Tensor]
    scaling: float
    dropout_scale: float


def lora_mlp_forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation, adapters, linear_forward=forward):
    """``(out, u, g, t_up, t_gate, t_down)`` of the block whose projections carry the
    adapters ``(up, gate, down)`` (each a :class:`LowRank` or None; ``t`` None where
    there is none): :func:`lora_forward` per projection with activation None, ``h`` by
    :func:`mlp_hidden` between them."""

    def project(v, weight, bias, adapter):
        if adapter is None:
            return linear_forward(v, weight, bias, None)[0], None
        z, _, t = lora_forward(v, weight, bias, adapter.A, adapter.B, adapter.mask, adapter.scaling,
                               adapter.dropout_scale, None, linear_forward)
        return z, t

    up, gate, down = adapters
    u, t_up = project(x, up_w, up_b, up)
    g, t_gate = (None, None) if gate_w is None else project(x, gate_w, gate_b, gate)
    out, t_down = project(mlp_hidden(u, g, activation), down_w, down_b, down)
    return out, u, g, t_up, t_gate, t_down


def lora_mlp_backward(grads, x, up_w, gate_w, down_w, u, g, ts, activation, adapters, needs,
                      linear_backward=backward):
    """The gradients of ``(x, up_w, up_b, gate_w, gate_b, down_w, down_b, A_up, B_up,
    A_gate, B_gate, A_down, B_down)`` flagged in ``needs`` from ``grads = (G_out, G_u,
    G_g, G_t_up, G_t_gate, G_t_down)`` (any None), the saved ``x``, ``u``, ``g`` and
    ``ts``: :func:`lora_backward` for the down projection on the recomputed ``h``
    (dying before ``grad_h`` is used), the activation's chain rule
    (:func:`mlp_grad_preactivations`; items 1, 3), then :func:`lora_backward` for up and
    gate from ``x``, ``grad_x`` summing both. Out of place under grad mode (double
    backward); a first-order backward sums in place."""
    grad_out, grad_u, grad_g, *grad_ts = grads
    up, gate, down = adapters
    need_x, need_up_w, need_up_b, need_gate_w, need_gate_b, need_down_w, need_down_b = needs[:7]
    low_rank = needs[7:]
    first = need_x or need_up_w or need_up_b or need_gate_w or need_gate_b or any(low_rank[:4])

    def through(adapter, grad, grad_t, v, weight, t, want):
        """``(grad_v, grad_W, grad_b, grad_A, grad_B)`` of one projection."""
        if adapter is None:
            if grad is None:
                return (None,) * 5
            return (*linear_backward(grad, None, v, weight, None, None, want[:3]), None, None)
        return lora_backward(grad, None, grad_t, v, weight, adapter.A, adapter.B, t, adapter.mask, None,
                             adapter.scaling, adapter.dropout_scale, None, want, linear_backward)

    h = mlp_hidden(u, g, activation) if need_down_w or low_rank[4] else None
    grad_h, grad_down_w, grad_down_b, grad_down_a, grad_down_lb = through(
        down, grad_out, grad_ts[2], h, down_w, ts[2], (first, need_down_w, need_down_b, *low_rank[4:]))
    h = None  # before the first layer's products
    g_u = g_g = None
    if grad_h is not None and torch.is_grad_enabled():
        g_u, g_g = mlp_grad_preactivations(grad_h, u, g, activation)
    elif grad_h is not None:  # the plain block's buffers (mlp_backward); u and g die here when the graph does
        g_u, g_g = _preactivation_grads_(grad_h, u, g, activation, _graph_dies_after_this_backward())
    grad_h = None
    if grad_u is not None:
        g_u = grad_u if g_u is None else g_u + grad_u
    if grad_g is not None:
        g_g = grad_g if g_g is None else g_g + grad_g
    grad_x, grad_up_w, grad_up_b, grad_up_a, grad_up_lb = through(
        up, g_u, grad_ts[0], x, up_w, ts[0], (need_x, need_up_w, need_up_b, *low_rank[:2]))
    gate_grads = (None,) * 5 if g is None else through(  # gate_w is saved only for grad_x
        gate, g_g, grad_ts[1], x, gate_w, ts[1], (need_x, need_gate_w, need_gate_b, *low_rank[2:4]))
    if gate_grads[0] is not None:
        grad_x = gate_grads[0] if grad_x is None else (
            grad_x + gate_grads[0] if torch.is_grad_enabled() else grad_x.add_(gate_grads[0]))
    return (grad_x, grad_up_w, grad_up_b, *gate_grads[1:3], grad_down_w, grad_down_b, grad_up_a, grad_up_lb,
            *gate_grads[3:], grad_down_a, grad_down_lb)
