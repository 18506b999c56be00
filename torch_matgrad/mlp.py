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

_OP = "torch_matgrad.mlp"


def _save(ctx, inputs, output) -> None:
    """What the block's backward needs, for the Function and the compiled op alike:
    ``x`` (first-layer weight gradients), the pre-activations (``h`` and ``act'``), and
    the weights only where a product needs them. Never ``h``."""
    x, up_w, _, gate_w, _, down_w, _, activation, backend = inputs
    _, u, g = output
    needs = ctx.needs_input_grad[:7]
    need_x, need_up_w, need_up_b, need_gate_w, need_gate_b = needs[:5]
    first = need_x or need_up_w or need_up_b or need_gate_w or need_gate_b
    ctx.save_for_backward(
        x if need_up_w or need_gate_w else None,
        up_w if need_x else None,
        gate_w if need_x else None,
        down_w if first else None,
        u,
        g,
    )
    ctx.activation, ctx.backend, ctx.needs = activation, backend, needs
    ctx.set_materialize_grads(False)


class MLPFunction(torch.autograd.Function):
    """``(out, u, g)`` of the MLP block for 2-D ``x`` (``g`` None when plain).

    ``apply(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation, backend)``;
    ``backend`` is :func:`dispatch.chosen_backend`'s answer, kept for the backward.
    ``u`` and ``g`` are returned, not hidden in ``ctx``, for double backward (as
    :class:`torch_matgrad.LinearFunction` returns ``z``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation, backend):
        return dispatch.mlp_forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_out, grad_u, grad_g):
        x, up_w, gate_w, down_w, u, g = ctx.saved_tensors
        grads = dispatch.mlp_backward(
            grad_out, grad_u, grad_g, x, up_w, gate_w, down_w, u, g, ctx.activation, ctx.needs, ctx.backend
        )
        return (*grads, None, None)


# Under torch.compile (with gradients) the block is these two ops: the compiler sees
# their inputs and outputs, not their inside, so it saves what _save saves, and the
# backward runs in the eager block's order and buffers (grad_Wd while h is the only
# temporary; G_u over the dead u), which Inductor's scheduling of the traced formulas
# did not keep (it formed h beside grad_h: one (M, H) tensor more at the peak). Both
# run on the backend dispatch chose. Outputs are tensors, never None: a plain block's
# g and a gradient not asked for are empty tensors.
def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


@torch.library.custom_op("torch_matgrad::mlp", mutates_args=())
def _mlp_op(
    x: Tensor, up_w: Tensor, up_b: Optional[Tensor], gate_w: Optional[Tensor], gate_b: Optional[Tensor],
    down_w: Tensor, down_b: Optional[Tensor], activation: Optional[str], backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    out, u, g = dispatch.mlp_forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation, backend)
    return out, u, _empty(u) if g is None else g


@_mlp_op.register_fake
def _(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation, backend):
    u = x.new_empty(x.shape[0], up_w.shape[0])
    return x.new_empty(x.shape[0], down_w.shape[0]), u, _empty(u) if gate_w is None else torch.empty_like(u)


@torch.library.custom_op("torch_matgrad::mlp_backward", mutates_args=())
def _mlp_backward_op(
    grad_out: Tensor, grad_u: Optional[Tensor], grad_g: Optional[Tensor], x: Optional[Tensor],
    up_w: Optional[Tensor], gate_w: Optional[Tensor], down_w: Optional[Tensor], u: Tensor, g: Optional[Tensor],
    activation: Optional[str], needs: List[bool], backend: str,
) -> List[Tensor]:
    # Writes over u and g when the autograd graph dies with this backward, as the eager
    # block does (formulas.mlp_backward): they are the forward op's own outputs, saved
    # for this call alone, so nothing reads them after it; with retain_graph it does not.
    grads = dispatch.mlp_backward(grad_out, grad_u, grad_g, x, up_w, gate_w, down_w, u, g, activation, tuple(needs),
                                  backend)
    return [_empty(u) if t is None else t for t in grads]


@_mlp_backward_op.register_fake
def _(grad_out, grad_u, grad_g, x, up_w, gate_w, down_w, u, g, activation, needs, backend):
    # (rows, d), (H, d), (H,) twice, then (d_out, H), (d_out,): x is saved where a first
    # weight gradient is asked for, up_w where grad_x is (_save).
    rows, hidden, d_out = u.shape[0], u.shape[1], grad_out.shape[1]
    d = x.shape[1] if x is not None else up_w.shape[1] if up_w is not None else 0
    shapes = ((rows, d), (hidden, d), (hidden,), (hidden, d), (hidden,), (d_out, hidden), (d_out,))
    return [u.new_empty(shape) if need else _empty(u) for shape, need in zip(shapes, needs)]


def _op_setup_context(ctx, inputs, output):
    out, u, g = output
    _save(ctx, inputs, (out, u, g if inputs[3] is not None else None))
    ctx.out_features = out.shape[1]


def _op_backward(ctx, grad_out, grad_u, grad_g):
    x, up_w, gate_w, down_w, u, g = ctx.saved_tensors
    if grad_out is None:  # only u or g took part in the loss: the op called directly
        grad_out = u.new_zeros(u.shape[0], ctx.out_features)
    grads = torch.ops.torch_matgrad.mlp_backward(
        grad_out, grad_u, None if g is None else grad_g, x, up_w, gate_w, down_w, u, g, ctx.activation,
        list(ctx.needs), ctx.backend,
    )
    return (*(t if need else None for t, need in zip(grads, ctx.needs)), None, None)


_mlp_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _check_mlp(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation) -> Optional[str]:
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

    Returns:
        ``(*, d_out)``, equal to the eager block within the dtype's rounding.
    """
    tensors = (x, up_weight, up_bias, gate_weight, gate_bias, down_weight, down_bias)
    activation = _check_mlp(x, up_weight, up_bias, gate_weight, gate_bias, down_weight, down_bias, activation)
    device_type = x.device.type
    if torch._C._is_any_autocast_enabled() and _autocast_enabled(device_type):
        # As torch_matgrad.linear: cast here, run with autocast off (pytorch#132388).
        dtype = torch.get_autocast_dtype(device_type)
        tensors = tuple(_autocast(t, dtype) for t in tensors)
        _check_dtypes(tensors)
        with torch.autocast(device_type, enabled=False):
            return _apply(*tensors, activation)
    _check_dtypes(tensors)
    return _apply(*tensors, activation)


_NAMES = ("input", "up_weight", "up_bias", "gate_weight", "gate_bias", "down_weight", "down_bias")


def _check_dtypes(tensors) -> None:
    _check_one_dtype(zip(_NAMES, tensors), op=_OP)


def _apply(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    params = (up_w, up_b, gate_w, gate_b, down_w, down_b)
    backend = dispatch.chosen_backend(x2, *params)
    transformed = torch._C._are_functorch_transforms_active() or _fw_ad._current_level >= 0
    if not transformed and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))):
        # No gradient to compute: nothing to save, and a compiler fuses the torch ops.
        out = dispatch.mlp_forward(x2, *params, activation, backend)[0]
    elif torch.compiler.is_compiling() and not transformed:
        # One op the compiler does not look inside, so that its partitioner cannot choose
        # to save h (it did: compiled, the traced block saved as much as the stock one).
        out = torch.ops.torch_matgrad.mlp(x2, *params, activation, backend)[0]
    else:
        out = (MLPFunction.apply if transformed else _eager_mlp)(x2, *params, activation, backend)[0]
    return out.view(*x.shape[:-1], down_w.shape[0]) if x.dim() != 2 else out


# Outside transforms: no per-call signature binding (function.combined_style), ~50 us a
# training step of a small block on a 2-core CPU.
_eager_mlp = direct_apply(combined_style(MLPFunction))


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

    def forward(self, x: Tensor) -> Tensor:
        up, down = self._layer("up"), self._layer("down")
        gate = self._layer("gate") if self.gated else None
        out = mlp(
            x, _weight(up), _weight(down), up.bias, down.bias, self.activation,
            None if gate is None else _weight(gate), None if gate is None else gate.bias,
        )
        return out if self.dropout is None else self.dropout(out)

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
