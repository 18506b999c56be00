"""The low-rank (LoRA) linear map as one op: ``torch_matgrad.lora_linear``.

``act(x W^T + b + s (drop(x) A^T) B^T)``, PEFT's ``base(x) + lora_B(lora_A(dropout(x)))
* scaling`` (then an activation), with the explicit backward of
:func:`torch_matgrad.formulas.lora_backward` (MATH.md items 1, 3, 9-11 on each factor):
no ``grad_W`` product and nothing saved for it when ``W`` is frozen, and the dropout
kept as a one-byte-per-element mask beside ``x``, never as a copy of ``drop(x)``.

Like :func:`torch_matgrad.linear`: double backward (``z`` and ``t = drop(x) A^T`` are
outputs of the Function, so a gradient reaching them flows back), autocast by hand,
``torch.func`` (grad, vmap, jacrev) and ``torch.compile``; ``x W^T + b`` runs on the
backend :func:`dispatch.chosen_backend` picks (the Triton GEMM, or torch ops), the rank-r
products are torch ops on both.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as _fw_ad
from torch import Tensor

from . import dispatch, formulas
from .function import (_FLOAT_DTYPES, _autocast, _autocast_enabled, _check, _check_one_dtype, _describe,
                       _is_exporting, combined_style, direct_apply)

_OP = "torch_matgrad.lora_linear"
_NAMES = ("input", "weight", "bias", "lora_A", "lora_B")


class LoRAFunction(torch.autograd.Function):
    """``(out, z, t)`` of the LoRA map for 2-D ``x`` (``z`` None unless ``act'`` needs it).

    ``apply(x, weight, bias, lora_A, lora_B, mask, scaling, dropout_scale, activation,
    backend)``: ``mask`` the dropout's boolean mask (None: no dropout), ``dropout_scale``
    ``1 / (1 - p)``; ``backend`` is :func:`dispatch.chosen_backend`'s answer, kept for the
    backward. ``z`` and ``t`` are returned, not hidden in ``ctx``, for double backward
    (as :class:`torch_matgrad.LinearFunction` returns ``z``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, mask, scaling, dropout_scale, activation, backend):
        return formulas.lora_forward(x, weight, bias, lora_A, lora_B, mask, scaling, dropout_scale, activation,
                                     functools.partial(dispatch.forward, backend=backend))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, lora_A, lora_B, mask, scaling, dropout_scale, activation, backend = inputs
        out, z, t = output
        needs = ctx.needs_input_grad[:5]
        need_x, need_w, _, need_a, need_lb = needs
        low_rank = need_x or need_a  # the products through t = drop(x) A^T
        # Saved: x for grad_W and grad_A (never drop(x): M * x is rebuilt where grad_A
        # uses it), the mask for x and A, t (r values a row) for grad_B, z or out for
        # act', and the weights only where a product needs them.
        ctx.save_for_backward(
            x if need_w or need_a else None,
            weight if need_x else None,
            lora_A if need_x else None,
            lora_B if low_rank else None,
            t if need_lb else None,
            mask if low_rank else None,
            z if activation in formulas.NEEDS_PREACTIVATION else (out if activation == "relu" else None),
        )
        ctx.scaling, ctx.dropout_scale, ctx.activation, ctx.backend, ctx.needs = (
            scaling, dropout_scale, activation, backend, needs)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, grad_z, grad_t):
        x, weight, lora_A, lora_B, t, mask, saved = ctx.saved_tensors
        grads = formulas.lora_backward(
            grad_out, grad_z, grad_t, x, weight, lora_A, lora_B, t, mask, saved, ctx.scaling, ctx.dropout_scale,
            ctx.activation, ctx.needs, functools.partial(dispatch.backward, backend=ctx.backend),
        )
        return (*grads, None, None, None, None, None)


class LoRA(NamedTuple):
    """A LoRA adapter on one projection, as :func:`torch_matgrad.mlp` takes it (PEFT's
    ``lora_A[name].weight``, ``lora_B[name].weight``, ``scaling[name]``): ``A``
    ``(r, in_features)``, ``B`` ``(out_features, r)``, ``scaling`` ``s`` (``lora_alpha /
    r``), and ``dropout``, the probability applied to the projection's input on its way
    into the update (pass 0 outside training)."""

    A: Tensor
    B: Tensor
    scaling: float
    dropout: float = 0.0


def check_adapter(lora_A, lora_B, scaling, dropout, in_features: int, weight: Tensor, device, op: str,
                  names=("lora_A", "lora_B")) -> None:
    """The errors an adapter can cause beside a ``weight`` ``(out, in_features)`` on
    ``device``, named as ``names`` (dtypes: the op's one-dtype check)."""
    for name, t in zip(names, (lora_A, lora_B)):
        if not isinstance(t, Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a floating torch.Tensor, got "
                            + (_describe(t) if isinstance(t, Tensor) else type(t).__name__))
        if t.device != device:
            raise RuntimeError(f"{op}: expected all tensors on one device, got input on {device}, {name} on "
                               f"{t.device}; move them to one device with .to(device)")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"{op}: {names[0]} must be 2-D (r, {in_features}) to read the projection's "
                         f"{in_features} input features, got {_describe(lora_A)}")
    want = (weight.shape[0], lora_A.shape[0])
    if tuple(lora_B.shape) != want:
        raise ValueError(
            f"{op}: {names[1]} must have shape (out_features, r) = {want}, out_features from weight of shape "
            f"{tuple(weight.shape)} and the rank r from {names[0]} of shape {tuple(lora_A.shape)}; got "
            f"{_describe(lora_B)}"
        )
    if not isinstance(scaling, numbers.Real):
        raise TypeError(f"{op}: scaling must be a Python number (PEFT's lora_alpha / r), got {type(scaling).__name__}")
    if not isinstance(dropout, numbers.Real) or not 0 <= dropout <= 1:
        raise ValueError(f"{op}: dropout is a probability, between 0 and 1; got {dropout!r}")


def dropout_mask(v: Tensor, p: float) -> Optional[Tensor]:
    """The dropout's mask for ``v``, kept one byte per element, drawn as ``F.dropout``
    draws its own (``empty_like`` keeps ``v``'s strides: a view draws in memory order, as
    F.dropout does); None at p = 0 and p = 1, which draw nothing. Regenerating it from
    a saved RNG state would save that byte but draw again in the backward, between
    ``get_rng_state`` and ``set_rng_state``, which torch.compile does not trace (torch
    2.13: "marked as skipped", no fullgraph)."""
    return torch.empty_like(v, dtype=torch.bool).bernoulli_(1 - p) if 0 < p < 1 else None


def dropout_scale(p: float) -> float:
    """``c = 1 / (1 - p)``, inverted dropout's scale of what it keeps; 0 at p = 1."""
    return 1 / (1 - p) if p < 1 else 0.0


def _check_lora(x, weight, bias, lora_A, lora_B, scaling, dropout, activation) -> Optional[str]:
    """Every error a user can cause, named by argument, before anything is computed;
    returns the activation as the op spells it."""
    activation = _check(x, weight, bias, activation, op=_OP)
    _check(x, lora_A, None, None, op=_OP, names=("input", "lora_A", "bias"))  # (r, in_features)
    check_adapter(lora_A, lora_B, scaling, dropout, x.shape[-1], weight, x.device, _OP)
    return activation


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    dropout: float = 0.0,
    activation: Optional[str] = None,
    training: bool = True,
) -> Tensor:
    r"""``act(x W^T + b + s (drop(x) A^T) B^T)``: a linear map plus a LoRA update, as PEFT's
    ``lora.Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``, with an
    optional fused activation.

    Args:
        x: ``(*, in_features)``.
        weight: ``(out_features, in_features)``; ``bias``: ``(out_features,)`` or None.
        lora_A: ``(r, in_features)``; ``lora_B``: ``(out_features, r)``.
        scaling: ``s``, a Python number (PEFT's ``lora_alpha / r``).
        dropout: the probability ``p`` that an element of ``x`` is zeroed on its way into
            the update (inverted dropout: the rest are scaled by ``1 / (1 - p)``).
        activation: ``None`` (or ``"none"``), ``"relu"``, ``"gelu"``, ``"gelu_tanh"``,
            ``"silu"``; names in any case.
        training: apply the dropout (as ``F.dropout``'s ``training``): pass the module's
            ``self.training``; False, or ``dropout=0``, draws nothing.

    Returns:
        ``(*, out_features)``.

    On the CPU the dropout draws the mask ``F.dropout`` draws from the same RNG state;
    under ``torch.func.vmap``, as any random op, it needs ``randomness="different"`` or
    ``"same"``. Inside ``torch.autocast`` the op behaves as PEFT's layer: floating
    inputs cast to the autocast dtype, gradients in the parameters' own dtype.
    """
    activation = _check_lora(x, weight, bias, lora_A, lora_B, scaling, dropout, activation)
    p = dropout if training else 0.0
    tensors = (x, weight, bias, lora_A, lora_B)
    device_type = x.device.type
    if torch._C._is_any_autocast_enabled() and _autocast_enabled(device_type):
        # As linear and mlp: cast here, run with autocast off (pytorch#132388).
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _apply(*(_autocast(t, dtype) for t in tensors), scaling, p, activation)
    return _apply(*tensors, scaling, p, activation)


def _apply(x, weight, bias, lora_A, lora_B, scaling, p, activation) -> Tensor:
    _check_one_dtype(zip(_NAMES, (x, weight, bias, lora_A, lora_B)), op=_OP)
    mask, scale = dropout_mask(x, p), dropout_scale(p)
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if mask is not None and x.dim() != 2:
        mask = mask.reshape(x2.shape)
    params = (weight, bias, lora_A, lora_B)
    compiling = torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling()
    plain = _fw_ad._current_level >= 0 or (_is_exporting() if compiling else torch._C._is_tracing())
    if plain or not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))):
        # Nothing to differentiate: no autograd node, nothing saved. Forward-mode AD (no
        # jvp here), torch.export and torch.jit.trace record the torch ops instead, and
        # autograd differentiates them: a trace cannot hold a Python Function, and the
        # Triton kernels would drop the tangents.
        backend = "torch" if plain else dispatch.chosen_backend(x2, *params)
        out = formulas.lora_forward(x2, *params, mask, scaling, scale, activation,
                                    functools.partial(dispatch.forward, backend=backend))[0]
    else:
        function = LoRAFunction.apply if compiling else _eager_lora
        out = function(x2, *params, mask, scaling, scale, activation, dispatch.chosen_backend(x2, *params))[0]
    return out.view(*x.shape[:-1], weight.shape[0]) if x.dim() != 2 else out


# Outside transforms and compiling: no per-call signature binding (function.combined_style).
_eager_lora = direct_apply(combined_style(LoRAFunction))
