"""``torch_matgrad.linear``: input checks, autocast, and the autograd Function.

``linear`` (public) validates and casts, flattens leading dims to 2-D rows, asks
:mod:`torch_matgrad.dispatch` which implementation runs the op, and calls
``LinearFunction`` with that answer: the Function keeps it for its backward.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.autograd.forward_ad as _fw_ad
from torch import Tensor

from . import dispatch, formulas

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LinearFunction(torch.autograd.Function):
    """``(out, z) = (act(x W^T + b), x W^T + b)`` for 2-D ``x``, explicit backward.

    ``apply(x, weight, bias, activation, backend)``: ``backend`` is the implementation
    (``"torch"`` or ``"triton"``) of the forward, as :func:`dispatch.chosen_backend`
    answers; the backward runs the same one (:func:`dispatch.backward`).

    ``z`` is returned (a second, differentiable output) only for activations whose
    derivative needs it; otherwise the second output is None. Returning it, rather than
    hiding it in ``ctx``, is what makes double backward right: the backward uses ``z``,
    and a gradient reaching ``z`` flows back through this Function to ``x``, ``W``, ``b``.

    Forward mode is :class:`ForwardModeLinearFunction`, this Function plus a ``jvp``:
    Dynamo refuses to trace a Function that defines one (torch 2.13: "Unsupported custom
    jvp"), which would break every ``torch.compile`` of a model using the layer.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str], backend: str):
        return dispatch.forward(x, weight, bias, activation, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, activation, backend = inputs
        out, z = output
        need_x, need_w, _ = ctx.needs_input_grad[:3]
        # Save only what the requested gradients use: grad_x = G_z W needs W,
        # grad_W = G_z^T x needs x, and act' needs z (GELU, SiLU) or the output (ReLU).
        saved = z if activation in formulas.NEEDS_PREACTIVATION else (out if activation == "relu" else None)
        ctx.save_for_backward(x if need_w else None, weight if need_x else None, saved)
        ctx.activation, ctx.backend = activation, backend
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, grad_z):
        x, weight, saved = ctx.saved_tensors
        grads = dispatch.backward(
            grad_out, grad_z, x, weight, saved, ctx.activation, ctx.needs_input_grad[:3], ctx.backend
        )
        return (*grads, None, None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, activation, backend):
        return _vmap_rule(LinearFunction, info, in_dims, x, weight, bias, activation, backend)


class ForwardModeLinearFunction(LinearFunction):
    """:class:`LinearFunction` with forward-mode AD (``torch.func.jvp``, ``jacfwd``,
    ``hessian``, ``torch.autograd.forward_ad``): :func:`linear` applies it while a dual
    level is open (``torch.func.jvp`` opens one too). Its ``jvp`` is
    :func:`formulas.jvp` in torch ops, whichever backend ran the forward; the tensors it
    needs are saved only here, so a backward-only graph keeps nothing more alive."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        LinearFunction.setup_context(ctx, inputs, output)
        x, weight, _, activation, _ = inputs
        out, z = output
        # dz = dx W^T + x dW^T + db needs x and W; act'(z) needs z or, for ReLU, out.
        ctx.save_for_forward(x, weight, z if activation in formulas.NEEDS_PREACTIVATION else
                             (out if activation == "relu" else None))

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, _activation_t, _backend_t):
        x, weight, saved = ctx.saved_tensors  # in jvp: what save_for_forward kept
        return formulas.jvp(x, weight, saved, ctx.activation, x_t, weight_t, bias_t)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, activation, backend):
        # jacfwd is vmap over jvp: the batched call must keep the jvp.
        return _vmap_rule(ForwardModeLinearFunction, info, in_dims, x, weight, bias, activation, backend)


def combined_style(function: type) -> type:
    """The new-style Function ``function`` (``forward`` without ``ctx``, then
    ``setup_context``) in the combined style (``forward(ctx, ...)``): the same forward,
    saved tensors and backward, for the ops to apply outside functorch transforms and
    ``torch.compile`` (:func:`direct_apply`). ``apply`` of a Function that defines
    ``setup_context`` binds its arguments through ``inspect.signature`` on every call (in
    Python up to torch 2.13, in C++ from 2.14): ~100 us on a 2-core CPU, six times
    ``F.linear`` on small inputs. A combined ``forward`` is never bound."""

    def forward(ctx, *args):
        output = function.forward(*args)
        function.setup_context(ctx, args, output)
        return output

    return type(f"Eager{function.__name__}", (torch.autograd.Function,), {
        "__doc__": f":class:`{function.__name__}` in the combined style (:func:`combined_style`).",
        "__module__": function.__module__,
        "forward": staticmethod(forward),
        "backward": staticmethod(function.backward),
    })


#: :class:`LinearFunction` as :func:`linear` applies it outside transforms and compiling.
EagerLinearFunction = combined_style(LinearFunction)


def _vmap_rule(function, info, in_dims, x, weight, bias, activation, backend):
    """The ``vmap`` rule of both Functions; ``function`` applies the batched op."""
    x_dim, w_dim, b_dim, _, _ = in_dims
    if w_dim is None and b_dim is None:
        # Shared parameters (e.g. per-sample gradients): fold the vmapped dimension
        # into the rows, so the whole batch is one GEMM on the same backend.
        xb = x.movedim(x_dim, 0)
        out, z = function.apply(xb.reshape(-1, xb.shape[-1]), weight, bias, activation, backend)
        rows = xb.shape[:2]
        return (out.view(*rows, -1), None if z is None else z.view(*rows, -1)), (0, None if z is None else 0)

    # Per-sample parameters: a batched matmul of the same formulas, in torch ops.
    def batched(t, dim):
        if t is None:
            return None
        return t.movedim(dim, 0) if dim is not None else t.expand(info.batch_size, *t.shape)

    out, z = formulas.forward(batched(x, x_dim), batched(weight, w_dim), batched(bias, b_dim), activation)
    return (out, z), (0, None if z is None else 0)


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def untraced(check):
    """``check``, a function of input checks that computes nothing, run with
    ``torch.jit.trace``'s tracer paused. A trace records sizes as traced values, and
    comparing them warns (TracerWarning) that the outcome is kept as a constant; warning
    filters cannot silence that for good (pytest resets them for each test). Paused, the
    sizes are plain ints. Dynamo reads no tracing state (it folds it to None)."""

    @functools.wraps(check)
    def checked(*args, **kwargs):
        tracing = torch._C._get_tracing_state()
        if tracing is None:
            return check(*args, **kwargs)
        torch._C._set_tracing_state(None)
        try:
            return check(*args, **kwargs)
        finally:
            torch._C._set_tracing_state(tracing)

    return checked


@untraced
def _check(x, weight, bias, activation, op: str = "torch_matgrad.linear", names=("input", "weight", "bias")):
    """Every error a user can cause, raised before anything is computed; returns the
    activation as the op spells it (:func:`formulas.canonical_activation`). ``op`` and
    ``names`` word the errors of ops built from several linear maps (the MLP block)."""
    x_name, w_name, b_name = names
    for name, t in ((x_name, x), (w_name, weight), (b_name, bias)):
        if t is None and name == b_name:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype}; supported dtypes are "
                f"float16, bfloat16, float32 and float64 ({name}: {_describe(t)})"
            )
    activation = formulas.canonical_activation(activation)
    if weight.dim() != 2:
        raise ValueError(f"{op}: {w_name} must be 2-D (out_features, in_features), got {_describe(weight)}")
    if x.dim() == 0:
        raise ValueError(f"{op}: {x_name} must have at least 1 dimension, got {_describe(x)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: {x_name} has {x.shape[-1]} features (last dim of shape {tuple(x.shape)}) "
            f"but {w_name} of shape {tuple(weight.shape)} expects in_features={weight.shape[1]}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"{op}: {b_name} must have shape ({weight.shape[0]},) to match {w_name} of shape "
            f"{tuple(weight.shape)}, got {tuple(bias.shape)}"
        )
    tensors = [(x_name, x), (w_name, weight)] + ([(b_name, bias)] if bias is not None else [])
    if len({t.device for _, t in tensors}) > 1:
        raise RuntimeError(
            f"{op}: expected all tensors on one device, got " + ", ".join(f"{n} on {t.device}" for n, t in tensors)
            + "; " + _device_fix(x.device, next(t.device for _, t in tensors if t.device != x.device))
        )
    return activation


def _device_fix(input_device: torch.device, other: torch.device) -> str:
    """The fix for an input on ``input_device`` and a parameter on ``other``."""
    if "meta" in (input_device.type, other.type):
        real = other if input_device.type == "meta" else input_device
        return (f"meta tensors hold no data: materialise them (a module with .to_empty(device='{real}'), "
                "then initialise or load its weights)")
    return (f"move them to one device with .to(device): the module with .to('{input_device}'), "
            f"or the input with .to('{other}')")


def _check_one_dtype(named, op: str = "torch_matgrad.linear") -> None:
    """A ``TypeError`` naming each dtype unless the ``(name, tensor)`` pairs given (None
    tensors left out) share one: the ops, like ``F.linear``, do not promote."""
    present = [(n, t) for n, t in named if t is not None]
    if len({t.dtype for _, t in present}) > 1:
        raise TypeError(
            f"{op}: expected one dtype for all tensors, got " + ", ".join(f"{n} {t.dtype}" for n, t in present)
            + " (cast them, or run under torch.autocast)"
        )


def _check_dtypes(x, weight, bias) -> None:
    _check_one_dtype((("input", x), ("weight", weight), ("bias", bias)))


def _autocast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # Autocast's own rule for "lower precision" ops such as linear: cast floating tensors
    # other than float64; leave the rest alone (a mismatch then errors as in F.linear).
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _autocast_enabled(device_type: str) -> bool:
    # torch.is_autocast_enabled raises for devices without autocast, such as "meta"
    # (models built on the meta device for deferred init); those never autocast.
    # CPU and CUDA always have it, and torch.compile cannot trace the availability
    # check (torch 2.11: a graph break on torch._C._is_autocast_available).
    if device_type not in ("cpu", "cuda"):
        available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
        if available is not None and not available(device_type):
            return False
    return torch.is_autocast_enabled(device_type)


def _valid(x, weight, bias, activation) -> bool:
    """The properties of a valid call that ``F.linear`` would not refuse by itself (an
    integer dtype, a 1-D weight, a bias that broadcasts, an activation not spelled as
    :data:`formulas.ACTIVATIONS` spells it, meta tensors mixed with real ones), in a
    fraction of the full checks' time. Everything else that is wrong (shapes, devices,
    mixed dtypes) ``F.linear`` refuses before computing anything, and :func:`linear`
    then words the error with the full checks; a non-tensor has no ``dtype`` or a
    foreign one."""
    try:
        return (
            x.dtype in _FLOAT_DTYPES
            and activation in formulas.ACTIVATIONS
            and weight.dim() == 2
            and x.dim() > 0
            and x.is_meta == weight.is_meta
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0] and bias.is_meta == x.is_meta))
        )
    except (AttributeError, TypeError):
        return False


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    r"""``act(x W^T + b)``: ``torch.nn.functional.linear`` plus a fused activation.

    Args:
        x: ``(*, in_features)``, any number of leading dims (including none and zero-size).
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        activation: one of ``None`` (or ``"none"``), ``"relu"``, ``"gelu"`` (exact erf),
            ``"gelu_tanh"``, ``"silu"``; names in any case.

    Returns:
        ``(*, out_features)``.

    Inside ``torch.autocast`` the op behaves as ``F.linear``: floating inputs are cast
    to the autocast dtype, the output has that dtype, and parameter gradients come
    back in the parameters' own dtype.
    """
    if torch._C._is_any_autocast_enabled() or torch._C._get_tracing_state():  # Dynamo: None
        return _linear_checked(x, weight, bias, activation)
    if not _valid(x, weight, bias, activation):
        activation = _check(x, weight, bias, activation)
        _check_dtypes(x, weight, bias)
    try:
        return _apply(x, weight, bias, activation)
    except RuntimeError:
        # F.linear refused the inputs (or something else failed): say what is wrong
        # with them, in this module's words, or else let the original error through.
        _check(x, weight, bias, activation)
        _check_dtypes(x, weight, bias)
        raise


def _linear_checked(x, weight, bias, activation) -> Tensor:
    """:func:`linear` with the full checks first: under autocast (the casts come after
    them) and under ``torch.jit.trace`` (whose traced sizes :func:`_valid` cannot compare
    without a TracerWarning: :func:`untraced`)."""
    activation = _check(x, weight, bias, activation)
    device_type = x.device.type
    if not _autocast_enabled(device_type):  # autocast is on for another device
        _check_dtypes(x, weight, bias)
        return _apply(x, weight, bias, activation)
    # torch.amp.custom_fwd would break the new-style Function (pytorch#132388): cast
    # here, then run the Function with autocast off.
    dtype = torch.get_autocast_dtype(device_type)
    x, weight, bias = (_autocast(t, dtype) for t in (x, weight, bias))
    _check_dtypes(x, weight, bias)
    with torch.autocast(device_type, enabled=False):
        return _apply(x, weight, bias, activation)


def _apply(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> Tensor:
    backend = dispatch.chosen_backend(x, weight, bias)
    if backend != "torch" and not (
        x.shape[-1] == weight.shape[1] and x.device == weight.device and (bias is None or bias.device == x.device)
    ):
        # No kernel launches on inputs that F.linear would refuse: the full checks raise,
        # naming the mismatch. The callers checked the rest (linear's _valid, or the full
        # checks), and a Triton backend means one dtype (dispatch): what is left costs
        # ~0.5 us, the full checks ~2.6 (2-core CPU).
        _check(x, weight, bias, activation)
    # vmap/grad need the Function's rules, and so do forward-mode AD's tangents.
    transformed = torch._C._are_functorch_transforms_active() or _fw_ad._current_level >= 0
    if not transformed and not (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))):
        # Nothing to differentiate (inference, frozen layers on detached inputs): no
        # autograd node to build, no tensors to save, leading dims left to the backend.
        return dispatch.forward(x, weight, bias, activation, backend)[0]
    compiling = transformed or torch.compiler.is_compiling()
    if _is_exporting() if compiling else torch._C._is_tracing():
        # torch.export and torch.jit.trace (the legacy ONNX export too) record torch ops
        # (dispatch answers "torch" there): a trace cannot save or export a Python
        # Function, and strict export would run it without grad, so that its outputs
        # would not require grad where nn.Linear's do. Autograd differentiates them.
        return dispatch.forward(x, weight, bias, activation, backend)[0]
    # The Function works on rows: (..., n) -> (B, n). reshape is a view whenever the
    # strides allow it, so transposed 2-D views reach the backend without a copy.
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if compiling:  # torch.compile traces the Function
        function = ForwardModeLinearFunction if _fw_ad._current_level >= 0 else LinearFunction
        out, _ = function.apply(x2, weight, bias, activation, backend)
    else:
        out, _ = _eager_linear(x2, weight, bias, activation, backend)
    return out.view(*x.shape[:-1], weight.shape[0]) if x.dim() != 2 else out


# torch.fx.symbolic_trace records calls of this module's ``linear`` as one node
# (instead of tracing into its checks, which need real tensors); __init__ and modules
# register their own names for it. Costs nothing outside symbolic tracing.
torch.fx.wrap("linear")

_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5

# Outside functorch transforms and torch.compile, ``Function.apply`` (Python up to torch
# 2.13) only unwraps dead functorch wrappers and calls the C++ ``apply``: the ops do both
# themselves, ~10 us less per training step at 1 x 64 -> 64 on a 2-core CPU.
try:
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers

    def direct_apply(function: type):
        """``function.apply`` (a combined-style Function: :func:`combined_style`) as a
        call of its C++ ``apply`` with dead functorch wrappers unwrapped."""
        apply = super(torch.autograd.Function, function).apply
        return lambda *args: apply(*_unwrap_dead_wrappers(args))

except ImportError:  # pragma: no cover - a torch without these internals

    def direct_apply(function: type):
        return function.apply


_eager_linear = direct_apply(EagerLinearFunction)
