"""transformers' ``Conv1D`` on the op (importing this module imports ``transformers``;
:mod:`torch_matgrad.surgery` does so only when transformers is loaded).

GPT-2 and its relatives (GPT, DistilGPT-2, ImageGPT, DecisionTransformer, ...) build
their projections from ``transformers.pytorch_utils.Conv1D``: a linear layer whose
weight is stored transposed, ``(in, out) = (nx, nf)``, computing ``y = x W + b``.
:class:`Conv1D` computes the same with :func:`torch_matgrad.linear`, reading the weight
through a transpose: ``x W + b = x (W^T)^T + b``, where ``W^T`` is a view (no copy) of
the layout ``nn.Linear`` uses. The Triton kernels read the view through its strides;
the gradient reaches the stored ``(nx, nf)`` Parameter through the view's backward.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.pytorch_utils import Conv1D as HFConv1D

from ..function import linear


class Conv1D(HFConv1D):
    r"""``transformers``' ``Conv1D`` (``y = x W + b``, ``W`` of shape ``(nx, nf)``)
    computed by :func:`torch_matgrad.linear` on ``W^T``, a view.

    A subclass of ``transformers.pytorch_utils.Conv1D`` with the same Parameters
    (``weight`` ``(nx, nf)``, ``bias`` ``(nf,)``) and ``state_dict``, so the tools that
    know ``Conv1D`` (PEFT's LoRA with ``fan_in_fan_out``, ``transformers``' own weight
    initialisation and head pruning) handle it as they handle the original.

    Shape:
        - Input: ``(*, nx)``.
        - Output: ``(*, nf)``.
    """

    @classmethod
    def from_conv1d(cls, module: HFConv1D) -> "Conv1D":
        """A ``Conv1D`` sharing ``module``'s Parameter objects (no copy); ``training``
        is kept."""
        if not isinstance(module, HFConv1D):
            raise TypeError(f"torch_matgrad.surgery.conv1d.Conv1D.from_conv1d expects a transformers Conv1D, got {type(module).__name__}")
        with torch.device("meta"):  # allocates nothing; the parameters are replaced just below
            new = cls(module.nf, module.nx)
        new.weight, new.bias = module.weight, module.bias
        return new.train(module.training)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight.t(), self.bias)

    def __repr__(self) -> str:
        return f"torch_matgrad.surgery.conv1d.Conv1D(nf={self.nf}, nx={self.nx})"
