"""The layers: :class:`Linear`, a drop-in ``nn.Linear``, and :class:`LinearAct`, a linear
layer with a fused activation, which is deliberately *not* an ``nn.Linear``.

Tools that find layers by ``isinstance(m, nn.Linear)`` (PEFT's LoRA, ``torch.ao``
quantization, bitsandbytes-style replacement, tensor-parallel styles) treat what they
find as the linear map ``x W^T + b`` and change it as one: LoRA adds its update ``BAx``
to the layer's output. On a layer that also applies an activation that update would land
*after* it, ``act(Wx + b) + BAx`` instead of ``act(Wx + b + BAx)``. So the two kinds are
kept apart, as flash-attention keeps ``FusedDense`` (an ``nn.Linear``) apart from its
fused MLP: such tools leave a :class:`LinearAct` alone or refuse it, and
:func:`torch_matgrad.restore_linear` turns it back into ``nn.Linear`` + the activation
module for them.

Both run :func:`torch_matgrad.linear`. Compiled by ``torch.jit.script``, they run
``F.linear`` and the ``torch.nn.functional`` activation (TorchScript cannot compile the
autograd Function); ``torch.jit.trace`` and ``torch.fx.symbolic_trace`` record the op as
explained in :mod:`torch_matgrad.function`.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from . import formulas
from .formulas import canonical_activation
from .function import linear

# torch.fx.symbolic_trace: the layers' calls of ``linear`` become one graph node (see
# torch_matgrad.function). Costs nothing outside symbolic tracing.
torch.fx.wrap("linear")


class Linear(nn.Linear):
    r"""Applies ``y = x W^T + b`` with the op of :func:`torch_matgrad.linear`.

    A subclass of :class:`torch.nn.Linear`: same constructor arguments and defaults,
    same parameters (``weight``, ``bias``), same initialisation and the same
    ``state_dict``, so checkpoints move between the two in both directions, and every
    tool that handles ``nn.Linear`` handles this layer.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer learns no additive bias. Default: ``True``.
        activation: ``None`` (default). Any of ``"relu"``, ``"gelu"``, ``"gelu_tanh"``,
            ``"silu"`` makes the constructor return a :class:`LinearAct` instead, the
            layer with that activation fused (not an ``nn.Linear``, so not an instance
            of this class either: see the module docstring for why).

    Shape:
        - Input: ``(*, H_in)`` where ``H_in = in_features``.
        - Output: ``(*, H_out)`` where ``H_out = out_features``.

    Examples::

        >>> m = torch_matgrad.Linear(20, 30)
        >>> m(torch.randn(128, 20)).shape
        torch.Size([128, 30])
        >>> type(torch_matgrad.Linear(20, 30, activation="gelu_tanh")).__name__
        'LinearAct'
    """

    __constants__ = nn.Linear.__constants__ + ["activation"]
    #: Always None: a layer with an activation is a :class:`LinearAct`.
    activation: Optional[str] = None

    def __new__(cls, *args, **kwargs):
        # Linear(..., activation=name) builds the fused layer, so that code written when
        # the activation lived on this class keeps computing the same thing.
        activation = canonical_activation(kwargs.get("activation", args[5] if len(args) > 5 else None))
        if activation is not None and cls is Linear:
            return LinearAct(*args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        activation: Optional[str] = None,
    ) -> None:
        if canonical_activation(activation) is not None:  # only a subclass gets here (Linear returns a LinearAct)
            raise TypeError(
                f"{type(self).__name__}: a torch_matgrad.Linear is an nn.Linear and fuses no activation; "
                "subclass torch_matgrad.LinearAct for a layer with one"
            )
        super().__init__(in_features, out_features, bias, device, dtype)

    @classmethod
    def from_linear(cls, linear_module: nn.Linear, activation: Optional[str] = None):
        """A layer that shares ``linear_module``'s Parameter objects (no copy): optimizer
        state, hooks on the parameters and weight tying stay valid. With an activation
        this is :meth:`LinearAct.from_linear`."""
        if canonical_activation(activation) is not None:
            return LinearAct.from_linear(linear_module, activation)
        _check_linear(linear_module, "torch_matgrad.Linear.from_linear")
        new = cls(linear_module.in_features, linear_module.out_features, bias=linear_module.bias is not None,
                  device="meta")  # allocates nothing; the parameters are replaced just below
        return _share(new, linear_module)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return formulas.preactivation(input, self.weight, self.bias)
        return linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation=None"


class LinearAct(nn.Module):
    r"""Applies ``y = act(x W^T + b)`` as one fused op (:func:`torch_matgrad.linear`).

    ``W`` is ``(out_features, in_features)``, ``b`` is ``(out_features,)``, and
    ``act`` is applied elementwise to the pre-activation ``z = x W^T + b``. The
    parameters, their initialisation and the ``state_dict`` keys (``weight``, ``bias``)
    are ``nn.Linear``'s, so checkpoints move between ``nn.Linear`` + activation and this
    layer in both directions; the constructor is ``nn.Linear``'s plus ``activation``.

    Not a subclass of ``nn.Linear``, on purpose: a tool that rewrites linear maps must
    not mistake ``act(x W^T + b)`` for one (the module docstring says why; PEFT LoRA
    refuses this layer, ``quantize_dynamic`` leaves it in float, tensor-parallel styles
    refuse it). :func:`torch_matgrad.restore_linear` turns it into ``nn.Linear`` and
    the activation module, sharing the Parameters, for such tools.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer learns no additive bias. Default: ``True``.
        activation: ``"relu"``, ``"gelu"`` (exact erf), ``"gelu_tanh"`` or ``"silu"``,
            as ``torch.nn.functional`` computes them. Required (without one, use
            :class:`Linear`).

    Shape:
        - Input: ``(*, H_in)`` where ``H_in = in_features``.
        - Output: ``(*, H_out)`` where ``H_out = out_features``.

    Examples::

        >>> m = torch_matgrad.LinearAct(20, 30, activation="gelu_tanh")
        >>> m(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    __constants__ = ["in_features", "out_features", "activation"]
    # Evaluated class annotations (no ``from __future__ import annotations`` in this
    # module): torch.jit.script reads them as the attributes' types.
    in_features: int
    out_features: int
    activation: str
    weight: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        activation: Optional[str] = None,
    ) -> None:
        activation = canonical_activation(activation)
        if activation is None:
            raise ValueError(
                "torch_matgrad.LinearAct needs an activation ("
                + ", ".join(repr(a) for a in formulas.ACTIVATION_NAMES if a != "none")
                + "); without one, use torch_matgrad.Linear (an nn.Linear)"
            )
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation, by ``nn.Linear``'s own code (it reads only
        ``weight`` and ``bias``), so that both draw the same numbers from one seed."""
        nn.Linear.reset_parameters(self)  # type: ignore[arg-type]

    @classmethod
    def from_linear(cls, linear_module: nn.Linear, activation: str) -> "LinearAct":
        """``activation`` fused onto ``linear_module`` (an ``nn.Linear``), sharing its
        Parameter objects (no copy); ``training`` is kept."""
        _check_linear(linear_module, "torch_matgrad.LinearAct.from_linear")
        new = cls(linear_module.in_features, linear_module.out_features, bias=linear_module.bias is not None,
                  device="meta", activation=activation)
        return _share(new, linear_module)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return formulas.activate(formulas.preactivation(input, self.weight, self.bias), self.activation)
        return linear(input, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation={self.activation!r}"
        )


def _check_linear(module, where: str) -> None:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{where} expects an nn.Linear, got {type(module).__name__}")


def _share(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` with ``old``'s Parameter objects and training mode."""
    new.weight = old.weight
    new.bias = old.bias
    return new.train(old.training)
