"""The MLP block as one op: ``torch_matgrad.mlp`` and :class:`FusedMLP`.

A transformer's MLP is two linear maps around an activation, plain
``down(act(up(x)))`` (GPT-2, Phi, ViT) or gated ``down(act(gate(x)) * up(x))`` (Llama,
Mistral, Qwen, Gemma), and it holds most of a training step's activation memory.
Per token, eager PyTorch saves ``x``, ``z = up(x)`` (for ``act'``) and ``h = act(z)``
(for ``down``'s weight gradient): ``d + 2H`` values (``H`` the hidden width); gated,
``x``, ``g``, ``act(g)``, ``u`` and ``h``: ``d + 4H``. This op saves ``x`` and the
pre-activations (``d + H``; gated ``d + 2H``) and rebuilds ``h`` in the backward where
it is consumed (:func:`torch_matgrad.formulas.mlp_backward`: one elementwise pass).

Like :func:`torch_matgrad.linear`: explicit backward (MATH.md items 1, 3, 9-11),
double backward through torch ops (the pre-activations are outputs of the Function,
so a gradient reaching them flows back), autocast by hand, ``torch.func`` and
``torch.compile``; the backend recorded at the forward runs the backward. Under
``torch.compile`` (with gradients) the block is the custom op ``torch_matgrad::mlp``
and its backward ``torch_matgrad::mlp_backward``, which the compiler does not look
inside: it saves what the eager op saves, where tracing the block's torch ops let the
partitioner keep ``h``.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import List, Optional, Tuple

import torch
import torch.autograd.forward_ad as _fw_ad
from torch import Tensor, nn

from . import dispatch, formulas
from .function import (
    _FLOAT_DTYPES,
    _autocast,
    _autocast_enabled,
    _check,
    _check_one_dtype,
    _describe,
    combined_style,
    direct_apply,
)
from .lora import LoRA, check_adapter, dropout_mask, dropout_scale
from .modules import Linear, LinearAct

_OP = "torch_matgrad.mlp"
_ROLES = ("up", "gate", "down")
# The block's inputs, in the Function's and the op's order: the projections, then each
# role's adapter (A, B and the dropout's mask; all None where it has none).
_NAMES = ("input", "up_weight", "up_bias", "gate_weight", "gate_bias", "down_weight", "down_bias",
          *(f"{role}_lora.{part}" for role in _ROLES for part in ("A", "B", "mask")))
_LOW_RANK = (7, 8, 10, 11, 13, 14)  # where A and B are among the inputs (their gradients)


def _adapters(low_rank: tuple, config) -> tuple:
    """``(up, gate, down)`` as :class:`formulas.LowRank` (None without an adapter) from
    the nine adapter inputs and ``config``, each role's ``(scaling, dropout_scale)``."""
    if config is None:
        return None, None, None
    return tuple(None if low_rank[3 * i] is None else formulas.LowRank(*low_rank[3 * i: 3 * i + 3], *config[i])
                 for i in range(3))


def _forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, low_rank, config, activation, backend):
    """``(out, u, g, t_up, t_gate, t_down)``: the plain block on its backend's fused
    forward, the adapted one per projection (the base products on the backend)."""
    if config is None:
        return (*dispatch.mlp_forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation, backend), None, None,
                None)
    return formulas.lora_mlp_forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation,
                                     _adapters(low_rank, config), functools.partial(dispatch.forward, backend=backend))


def _save(ctx, inputs, output) -> None:
    """What the block's backward needs, for the Function and the compiled op alike:
    ``x`` (first-layer weight gradients, the adapters' ``grad_A``), the pre-activations
    (``h`` and ``act'``), each adapter's ``t`` (r values a row) and mask (a byte an
    element), and the weights only where a product needs them. Never ``h``."""
    x, up_w, _, gate_w, _, down_w, _, *low_rank = inputs[:16]
    _, u, g, *ts = output
    needs = tuple(ctx.needs_input_grad[:7]) + tuple(ctx.needs_input_grad[i] for i in _LOW_RANK)
    need_x, need_up_w, need_up_b, need_gate_w, need_gate_b = needs[:5]
    first = need_x or need_up_w or need_up_b or need_gate_w or need_gate_b or any(needs[7:11])
    ctx.save_for_backward(
        x if need_up_w or need_gate_w or needs[7] or needs[9] else None,
        up_w if need_x else None,
        gate_w if need_x else None,
        down_w if first else None,
        u,
        g,
        *ts,
        *low_rank,
    )
    ctx.config, ctx.activation, ctx.backend, ctx.needs = (*inputs[16:], needs)
    ctx.set_materialize_grads(False)


def _backward(ctx, grads, saved) -> tuple:
    """The gradients of the 16 tensor inputs (None for the masks)."""
    x, up_w, gate_w, down_w, u, g, t_up, t_gate, t_down, *low_rank = saved
    needs, backend = ctx.needs, ctx.backend
    if ctx.config is None:
        out = dispatch.mlp_backward(*grads[:3], x, up_w, gate_w, down_w, u, g, ctx.activation, needs[:7], backend)
        return (*out, *(None,) * 9)
    out = formulas.lora_mlp_backward(grads, x, up_w, gate_w, down_w, u, g, (t_up, t_gate, t_down), ctx.activation,
                                     _adapters(tuple(low_rank), ctx.config), needs,
                                     functools.partial(dispatch.backward, backend=backend))
    up_a, up_b, gate_a, gate_b, down_a, down_b = out[7:]
    return (*out[:7], up_a, up_b, None, gate_a, gate_b, None, down_a, down_b, None)


class MLPFunction(torch.autograd.Function):
    """``(out, u, g, t_up, t_gate, t_down)`` of the MLP block for 2-D ``x`` (``g`` None
    when plain, each ``t = c (M * v) A^T`` None without its adapter).

    ``apply(x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_A, up_B, up_mask, gate_A,
    gate_B, gate_mask, down_A, down_B, down_mask, config, activation, backend)``:
    ``config`` each role's ``(scaling, dropout_scale)``, or None without adapters;
    ``backend`` is :func:`dispatch.chosen_backend`'s answer, kept for the backward.
    ``u``, ``g`` and the ``t`` are returned, not hidden in ``ctx``, for double backward
    (as :class:`torch_matgrad.LinearFunction` returns ``z``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_a, up_lb, up_m, gate_a, gate_lb, gate_m, down_a,
                down_lb, down_m, config, activation, backend):
        low_rank = (up_a, up_lb, up_m, gate_a, gate_lb, gate_m, down_a, down_lb, down_m)
        return _forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, low_rank, config, activation, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs, output)

    @staticmethod
    def backward(ctx, *grads):
        return (*_backward(ctx, grads, ctx.saved_tensors), None, None, None)


# Under torch.compile (with gradients) the block is these two ops: the compiler sees
# their inputs and outputs, not their inside, so it saves what _save saves, and the
# backward runs in the eager block's order and buffers (grad_Wd while h is the only
# temporary; G_u over the dead u), which Inductor's scheduling of the traced formulas
# did not keep (it formed h beside grad_h: one (M, H) tensor more at the peak). Both
# run on the backend dispatch chose. Outputs are tensors, never None: a plain block's
# g, a missing adapter's t and a gradient not asked for are empty tensors.
def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _config(config: List[float]):
    """The op's flat ``config`` (6 numbers, or none) as the Function's."""
    return None if not config else tuple(zip(config[0::2], config[1::2]))


@torch.library.custom_op("torch_matgrad::mlp", mutates_args=())
def _mlp_op(
    x: Tensor, up_w: Tensor, up_b: Optional[Tensor], gate_w: Optional[Tensor], gate_b: Optional[Tensor],
    down_w: Tensor, down_b: Optional[Tensor], up_a: Optional[Tensor], up_lb: Optional[Tensor],
    up_m: Optional[Tensor], gate_a: Optional[Tensor], gate_lb: Optional[Tensor], gate_m: Optional[Tensor],
    down_a: Optional[Tensor], down_lb: Optional[Tensor], down_m: Optional[Tensor], config: List[float],
    activation: Optional[str], backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    low_rank = (up_a, up_lb, up_m, gate_a, gate_lb, gate_m, down_a, down_lb, down_m)
    out = _forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, low_rank, _config(config), activation, backend)
    return tuple(_empty(x) if t is None else t for t in out)


@_mlp_op.register_fake
def _(x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_a, up_lb, up_m, gate_a, gate_lb, gate_m, down_a, down_lb,
      down_m, config, activation, backend):
    rows, hidden = x.shape[0], up_w.shape[0]
    u = x.new_empty(rows, hidden)
    ts = (x.new_empty(rows, a.shape[0]) if a is not None else _empty(x) for a in (up_a, gate_a, down_a))
    return x.new_empty(rows, down_w.shape[0]), u, _empty(x) if gate_w is None else torch.empty_like(u), *ts


@torch.library.custom_op("torch_matgrad::mlp_backward", mutates_args=())
def _mlp_backward_op(
    grad_out: Tensor, grad_u: Optional[Tensor], grad_g: Optional[Tensor], grad_t_up: Optional[Tensor],
    grad_t_gate: Optional[Tensor], grad_t_down: Optional[Tensor], saved: List[Optional[Tensor]], config: List[float],
    activation: Optional[str], needs: List[bool], backend: str,
) -> List[Tensor]:
    # Writes over u and g when the autograd graph dies with this backward, as the eager
    # block does (formulas.mlp_backward): they are the forward op's own outputs, saved
    # for this call alone, so nothing reads them after it; with retain_graph it does not.
    ctx = SimpleNamespace(config=_config(config), activation=activation, backend=backend, needs=tuple(needs))
    grads = _backward(ctx, (grad_out, grad_u, grad_g, grad_t_up, grad_t_gate, grad_t_down), saved)
    u = saved[4]
    return [_empty(u) if t is None else t for i, t in enumerate(grads) if i not in _MASKS]


_MASKS = (9, 12, 15)  # the masks among the 16 inputs: no gradient


@_mlp_backward_op.register_fake
def _(grad_out, grad_u, grad_g, grad_t_up, grad_t_gate, grad_t_down, saved, config, activation, needs, backend):
    x, up_w, _, _, u, _, _, _, _, up_a, _, _, gate_a, _, _, down_a, _, _ = saved
    rows, hidden, d_out = u.shape[0], u.shape[1], grad_out.shape[1]
    d = next((t.shape[1] for t in (x, up_w, up_a, gate_a) if t is not None), 0)
    r = [0 if a is None else a.shape[0] for a in (up_a, gate_a, down_a)]
    shapes = ((rows, d), (hidden, d), (hidden,), (hidden, d), (hidden,), (d_out, hidden), (d_out,),
              (r[0], d), (hidden, r[0]), (r[1], d), (hidden, r[1]), (r[2], hidden), (d_out, r[2]))
    return [u.new_empty(shape) if need else _empty(u) for shape, need in zip(shapes, needs)]


def _op_setup_context(ctx, inputs, output):
    *tensors, config, activation, backend = inputs
    gated, adapted = tensors[3] is not None, (tensors[7], tensors[10], tensors[13])
    out, u, g, *ts = output
    output = (out, u, g if gated else None, *(t if a is not None else None for t, a in zip(ts, adapted)))
    _save(ctx, (*tensors, _config(config), activation, backend), output)
    ctx.out_features, ctx.op_config = out.shape[1], config


def _op_backward(ctx, grad_out, *grads):
    saved = ctx.saved_tensors
    if grad_out is None:  # only u, g or a t took part in the loss: the op called directly
        grad_out = saved[4].new_zeros(saved[4].shape[0], ctx.out_features)
    # The gradients of the outputs that stand for None (a plain block's g, a missing
    # adapter's t: empty) are dropped; the others flow back (the op called directly).
    grad_u, *rest = grads
    rest = (None if saved[5 + i] is None else grad for i, grad in enumerate(rest))
    grads = torch.ops.torch_matgrad.mlp_backward(grad_out, grad_u, *rest, list(saved), ctx.op_config, ctx.activation,
                                                 list(ctx.needs), ctx.backend)
    grads = iter(t if need else None for t, need in zip(grads, ctx.needs))
    return (*(None if i in _MASKS else next(grads) for i in range(16)), None, None, None)


_mlp_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _check_mlp(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation, adapters) -> Optional[str]:
    """Every error a user can cause, named by argument, before anything is computed;
    returns the activation as the op spells it."""
    activation = _check(x, up_w, up_b, activation, op=_OP, names=("input", "up_weight", "up_bias"))
    if gate_w is not None:
        _check(x, gate_w, gate_b, activation, op=_OP, names=("input", "gate_weight", "gate_bias"))
        if gate_w.shape != up_w.shape:
            raise ValueError(
                f"{_OP}: gate_weight must have up_weight's shape {tuple(up_w.shape)}, got {tuple(gate_w.shape)}"
            )
    elif gate_b is not None:
        raise ValueError(f"{_OP}: gate_bias given without gate_weight")
    hidden = up_w.shape[0]
    for name, t in (("down_weight", down_w), ("down_bias", down_b)):
        if t is None and name == "down_bias":
            continue
        if not isinstance(t, Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{_OP}: {name} must be a floating torch.Tensor, got "
                            + (_describe(t) if isinstance(t, Tensor) else type(t).__name__))
        if t.device != x.device:
            raise RuntimeError(f"{_OP}: expected all tensors on one device, got input on {x.device}, {name} on {t.device}"
                               f"; move them to one device with .to(device), e.g. the module with .to('{x.device}')")
    if down_w.dim() != 2 or down_w.shape[1] != hidden:
        raise ValueError(
            f"{_OP}: down_weight must be 2-D (out_features, {hidden}) to follow up_weight of shape "
            f"{tuple(up_w.shape)}, got {_describe(down_w)}"
        )
    if down_b is not None and tuple(down_b.shape) != (down_w.shape[0],):
        raise ValueError(f"{_OP}: down_bias must have shape ({down_w.shape[0]},), got {tuple(down_b.shape)}")
    weights = {"up": (up_w, x.shape[-1]), "gate": (gate_w, x.shape[-1]), "down": (down_w, hidden)}
    for role, adapter in zip(_ROLES, adapters):
        if adapter is None:
            continue
        if not isinstance(adapter, LoRA):
            raise TypeError(f"{_OP}: {role}_lora must be a torch_matgrad.LoRA(A, B, scaling, dropout), got "
                            f"{type(adapter).__name__}")
        weight, features = weights[role]
        if weight is None:
            raise ValueError(f"{_OP}: gate_lora given without gate_weight")
        check_adapter(adapter.A, adapter.B, adapter.scaling, adapter.dropout, features, weight, x.device, _OP,
                      names=(f"{role}_lora.A", f"{role}_lora.B"))
    return activation


def mlp(
    x: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    up_bias: Optional[Tensor] = None,
    down_bias: Optional[Tensor] = None,
    activation: Optional[str] = "gelu",
    gate_weight: Optional[Tensor] = None,
    gate_bias: Optional[Tensor] = None,
    *,
    up_lora: Optional[LoRA] = None,
    gate_lora: Optional[LoRA] = None,
    down_lora: Optional[LoRA] = None,
) -> Tensor:
    r"""The MLP block ``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))`` when
    ``gate_weight`` is given, saving only ``x`` and the pre-activations for backward.

    Args:
        x: ``(*, d)``.
        up_weight: ``(H, d)``; ``up_bias``: ``(H,)`` or None.
        down_weight: ``(d_out, H)``; ``down_bias``: ``(d_out,)`` or None.
        activation: one of ``None`` (or ``"none"``), ``"relu"``, ``"gelu"``, ``"gelu_tanh"``,
            ``"silu"``; names in any case.
        gate_weight: ``(H, d)`` for the gated block (``act`` applies to the gate);
            ``gate_bias``: ``(H,)`` or None.
        up_lora, gate_lora, down_lora: a :class:`torch_matgrad.LoRA` adapter on that
            projection, or None: the projection ``v W^T + b`` becomes PEFT's
            ``v W^T + b + s (drop(v) A^T) B^T``. The block then also saves each adapter's
            ``t = drop(v) A^T`` (r values a row) and dropout mask (a byte an element),
            and still never ``h``: the down adapter's gradients use the recomputed one.

    Returns:
        ``(*, d_out)``, equal to the eager block (with PEFT's LoRA layers) within the
        dtype's rounding. The dropout draws its masks in PEFT's order (gate, up, down),
        on the CPU the same as PEFT's.
    """
    adapters = (up_lora, gate_lora, down_lora)
    activation = _check_mlp(x, up_weight, up_bias, gate_weight, gate_bias, down_weight, down_bias, activation,
                            adapters)
    tensors = (x, up_weight, up_bias, gate_weight, gate_bias, down_weight, down_bias)
    low_rank = tuple(t for a in adapters for t in ((None, None) if a is None else (a.A, a.B)))
    device_type = x.device.type
    if torch._C._is_any_autocast_enabled() and _autocast_enabled(device_type):
        # As torch_matgrad.linear: cast here, run with autocast off (pytorch#132388).
        dtype = torch.get_autocast_dtype(device_type)
        tensors, low_rank = (tuple(_autocast(t, dtype) for t in ts) for ts in (tensors, low_rank))
        with torch.autocast(device_type, enabled=False):
            return _apply(tensors, low_rank, adapters, activation)
    return _apply(tensors, low_rank, adapters, activation)


def _apply(tensors, low_rank, adapters, activation) -> Tensor:
    x, up_w, up_b, gate_w, gate_b, down_w, down_b = tensors
    _check_one_dtype(zip(_NAMES, (*tensors, *low_rank[0:2], None, *low_rank[2:4], None, *low_rank[4:6])), op=_OP)
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    params = (up_w, up_b, gate_w, gate_b, down_w, down_b)
    config = None
    adapted = (None,) * 9
    if any(a is not None for a in adapters):
        # The dropout's masks, drawn in PEFT's order: gate's and up's on x (the call of
        # each projection), then down's on h.
        ps = [0.0 if a is None else a.dropout for a in adapters]
        gate_m = dropout_mask(x, ps[1]) if adapters[1] is not None else None
        up_m = dropout_mask(x, ps[0]) if adapters[0] is not None else None
        down_m = None if adapters[2] is None else dropout_mask(x2.new_empty(x2.shape[0], up_w.shape[0]), ps[2])
        up_m, gate_m = (m if m is None or x.dim() == 2 else m.reshape(x2.shape) for m in (up_m, gate_m))
        masks = (up_m, gate_m, down_m)
        adapted = tuple(t for i in range(3) for t in (*low_rank[2 * i: 2 * i + 2], masks[i]))
        config = tuple((0.0, 1.0) if a is None else (float(a.scaling), dropout_scale(p)) for a, p in zip(adapters, ps))
    backend = dispatch.chosen_backend(x2, *params)
    transformed = torch._C._are_functorch_transforms_active() or _fw_ad._current_level >= 0
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params, *low_rank))
    if not transformed and not grads:
        # No gradient to compute: nothing to save, and a compiler fuses the torch ops.
        out = _forward(x2, *params, adapted, config, activation, backend)[0]
    elif torch.compiler.is_compiling() and not transformed:
        # One op the compiler does not look inside, so that its partitioner cannot choose
        # to save h (it did: compiled, the traced block saved as much as the stock one).
        flat = [] if config is None else [v for pair in config for v in pair]
        out = torch.ops.torch_matgrad.mlp(x2, *params, *adapted, flat, activation, backend)[0]
    else:
        out = (MLPFunction.apply if transformed else _eager_mlp)(x2, *params, *adapted, config, activation, backend)[0]
    return out.view(*x.shape[:-1], down_w.shape[0]) if x.dim() != 2 else out


# Outside transforms: no per-call signature binding (function.combined_style), ~50 us a
# training step of a small block on a 2-core CPU.
_eager_mlp = direct_apply(combined_style(MLPFunction))


def _plain_projection(layer: nn.Module) -> bool:
    """A layer whose forward is ``v W^T + b`` from its ``weight`` and ``bias`` alone:
    ``nn.Linear``, this package's ``Linear`` (and ``LinearAct``, whose activation the
    block applies), transformers' ``Conv1D`` and its swap. Not a subclass (a quantized
    layer), nor a wrapper such as PEFT's LoRA layers."""
    cls = type(layer)
    return cls in (nn.Linear, Linear, LinearAct) or (
        cls.__name__ == "Conv1D" and cls.__module__ in ("transformers.pytorch_utils", "torch_matgrad.surgery.conv1d"))


def _weight(layer: nn.Module) -> Tensor:
    """A projection's weight as ``(out, in)``: transformers' ``Conv1D`` (GPT-2) stores
    ``(in, out)`` and is read through a transpose (a view, no copy)."""
    return layer.weight if isinstance(layer, nn.Linear) or not hasattr(layer, "nf") else layer.weight.t()


class FusedMLP(nn.Module):
    r"""Applies the MLP block ``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))``,
    as one op (:func:`torch_matgrad.mlp`) that saves ``x`` and the pre-activations for
    backward and never the hidden activation.

    The projections are ordinary layers (``nn.Linear``, :class:`torch_matgrad.Linear`,
    or transformers' ``Conv1D``) registered under the names the block had, so the
    Parameter objects and ``state_dict`` keys are those of the block it replaces
    (:func:`torch_matgrad.fuse_mlps`); only their ``weight`` and ``bias`` are read.

    Args:
        in_features: ``d``, the size of each input sample.
        hidden_features: ``H``, the width of the hidden activation.
        out_features: ``d_out`` (default ``in_features``).
        bias: whether the projections learn biases. Default: ``True``.
        activation: ``None``, ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        gated: add a gate projection: ``down(act(gate(x)) * up(x))``.

    Shape:
        - Input: ``(*, d)``; output: ``(*, d_out)``.

    Examples::

        >>> m = torch_matgrad.FusedMLP(64, 256, activation="silu", gated=True)
        >>> m(torch.randn(8, 64)).shape
        torch.Size([8, 64])
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: Optional[int] = None,
        bias: bool = True,
        activation: Optional[str] = "gelu",
        gated: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        activation = formulas.canonical_activation(activation)
        super().__init__()
        kw = dict(bias=bias, device=device, dtype=dtype)
        layers = {"up": nn.Linear(in_features, hidden_features, **kw)}
        if gated:
            layers["gate"] = nn.Linear(in_features, hidden_features, **kw)
        layers["down"] = nn.Linear(hidden_features, out_features or in_features, **kw)
        self._adopt(layers, {role: role for role in layers}, activation, None)

    @classmethod
    def from_layers(
        cls,
        up: nn.Module,
        down: nn.Module,
        activation: Optional[str],
        gate: Optional[nn.Module] = None,
        names: Optional[dict] = None,
        keep: Optional[dict] = None,
        dropout: Optional[nn.Module] = None,
    ) -> "FusedMLP":
        """A block over existing layers, sharing their Parameters (no copy).

        ``names`` maps ``"up"``, ``"gate"``, ``"down"`` to the attribute names to
        register them under (default the roles themselves); ``keep`` adds parameter-free
        modules of the replaced block (its activation module, say) under their names, for
        the printed structure; ``dropout`` runs on the output (GPT-2's MLP ends in one)."""
        activation = formulas.canonical_activation(activation)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        layers = {"up": up, "down": down} if gate is None else {"up": up, "gate": gate, "down": down}
        new._adopt(layers, names or {role: role for role in layers}, activation, dropout)
        for name, module in (keep or {}).items():
            new.add_module(name, module)
        new.train(up.training)
        return new

    def _adopt(self, layers: dict, names: dict, activation: Optional[str], dropout: Optional[nn.Module]) -> None:
        for role in sorted(layers, key=list(names).index):  # the replaced block's order: same state_dict
            self.add_module(names[role], layers[role])
        self._roles = {role: names[role] for role in layers}
        self.activation = activation
        self.gated = "gate" in layers
        self.dropout = dropout

    def _layer(self, role: str) -> nn.Module:
        return self._modules[self._roles[role]]

    def project(self, role: str) -> Optional[Tuple[Tensor, Optional[Tensor], Optional[LoRA]]]:
        """``(weight (out, in), bias, adapter)`` of the projection ``role`` as the op
        reads it now, or None where the op cannot compute it (then the block calls its
        layers). Here a plain layer's, never an adapter; PEFT's LoRA layers have their
        own reader (:mod:`torch_matgrad.surgery.peft`)."""
        layer = self._layer(role)
        if not _plain_projection(layer):  # e.g. PEFT wrapped it after fusing: its own forward knows
            return None
        return _weight(layer), layer.bias, None

    def forward(self, x: Tensor) -> Tensor:
        parts = {role: self.project(role) for role in self._roles}
        if any(part is None for part in parts.values()):
            out = self.eager(x)
        else:
            (up_w, up_b, up_lora), (down_w, down_b, down_lora) = parts["up"], parts["down"]
            gate_w, gate_b, gate_lora = parts.get("gate", (None, None, None))
            out = mlp(x, up_w, down_w, up_b, down_b, self.activation, gate_w, gate_b, up_lora=up_lora,
                      gate_lora=gate_lora, down_lora=down_lora)
        return out if self.dropout is None else self.dropout(out)

    def eager(self, x: Tensor) -> Tensor:
        """The block as its layers compute it, one call each, ``h`` stored as autograd
        stores it: for what :meth:`project` cannot hand to the op."""
        gate = formulas.activate(self._layer("gate")(x), self.activation) if self.gated else None  # PEFT's order
        u = self._layer("up")(x)
        return self._layer("down")(formulas.activate(u, self.activation) if gate is None else gate * u)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, gated={self.gated}"


def saved_bytes(fn, *args, params=()) -> Tuple[object, int]:
    """``(fn(*args), bytes)``: the bytes of the distinct tensors that autograd saves for
    backward while ``fn`` runs (``saved_tensors_hooks``; a storage counted once however
    many views of it are saved), Parameters left out: those in ``params`` too, which a
    compiled graph saves as plain tensors sharing their storage."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            storage = t.untyped_storage()
            if storage.data_ptr() not in skip:
                storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn(*args)
    return result, sum(storages.values())
