"""torch_matgrad: a fused linear layer ``act(x W^T + b)`` for PyTorch.

The backward is written out from matrix-calculus identities (``docs/MATH.md``) in
:mod:`torch_matgrad.formulas`; :mod:`torch_matgrad.dispatch` picks the implementation.
"""

import torch as _torch

from . import dispatch, formulas, jacobian
from .cross_entropy import LinearCrossEntropy, LinearCrossEntropyFunction, linear_cross_entropy
from .dispatch import use_backend
from .formulas import ACTIVATIONS
from .function import LinearFunction, linear
from .lora import LoRA, lora_linear
from .mlp import FusedMLP, MLPFunction, mlp
from .modules import Linear, LinearAct
from .surgery import (
    fuse_activations,
    fuse_lm_head_loss,
    fuse_mlps,
    replace_linear,
    restore_linear,
    restore_lm_head_loss,
)

# torch.fx.symbolic_trace records ``torch_matgrad.linear(...)`` as one node (see
# torch_matgrad.function); free outside symbolic tracing.
_torch.fx.wrap("linear")

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "FusedMLP",
    "Linear",
    "LinearAct",
    "LinearCrossEntropy",
    "LinearCrossEntropyFunction",
    "LinearFunction",
    "LoRA",
    "MLPFunction",
    "dispatch",
    "formulas",
    "fuse_activations",
    "fuse_lm_head_loss",
    "fuse_mlps",
    "jacobian",
    "linear",
    "linear_cross_entropy",
    "lora_linear",
    "mlp",
    "replace_linear",
    "restore_linear",
    "restore_lm_head_loss",
    "use_backend",
]
