"""``torch_matgrad.Linear``: a drop-in ``nn.Linear`` with a fused activation."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .formulas import check_activation
from .function import linear


class Linear(nn.Linear):
    r"""Applies ``y = act(x W^T + b)`` with one fused op.

    A subclass of :class:`torch.nn.Linear`: same constructor arguments and defaults,
    same parameters (``weight``, ``bias``), same initialisation and the same
    ``state_dict``, so checkpoints move between the two in both directions.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer learns no additive bias. Default: ``True``.
        activation: ``None`` (default, exactly ``nn.Linear``), ``"relu"``, ``"gelu"``,
            ``"gelu_tanh"`` or ``"silu"``, applied inside the op.

    Shape:
        - Input: ``(*, H_in)`` where ``H_in = in_features``.
        - Output: ``(*, H_out)`` where ``H_out = out_features``.

    Examples::

        >>> m = torch_matgrad.Linear(20, 30, activation="gelu_tanh")
        >>> m(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    __constants__ = nn.Linear.__constants__ + ["activation"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        activation: Optional[str] = None,
    ) -> None:
        check_activation(activation)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = activation

    @classmethod
    def from_linear(cls, linear_module: nn.Linear, activation: Optional[str] = None) -> "Linear":
        """A ``Linear`` that shares ``linear_module``'s Parameter objects (no copy):
        optimizer state, hooks on the parameters and weight tying stay valid."""
        if not isinstance(linear_module, nn.Linear):
            raise TypeError(f"torch_matgrad.Linear.from_linear expects an nn.Linear, got {type(linear_module).__name__}")
        new = cls(
            linear_module.in_features,
            linear_module.out_features,
            bias=linear_module.bias is not None,
            device="meta",  # allocates nothing; the parameters are replaced just below
            activation=activation,
        )
        new.weight = linear_module.weight
        new.bias = linear_module.bias
        new.train(linear_module.training)
        return new

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
