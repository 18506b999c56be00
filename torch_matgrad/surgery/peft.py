"""PEFT's LoRA layers in the surgery (importing this module imports ``peft``; the
families import it only once PEFT's LoRA is loaded: :func:`.common.peft_loaded`).

:func:`torch_matgrad.fuse_mlps` fuses an MLP block whose projections are PEFT
``lora.Linear`` layers into a :class:`LoRAFusedMLP`. It keeps those layers, and so every
PEFT module and Parameter, under their names, and reads each at every call as the
layer's own forward would compute it (:func:`read`): the base layer's weight and bias and
the one active adapter as a :class:`torch_matgrad.LoRA`. Where the op cannot compute what
a layer would now, the block calls its layers instead. :func:`torch_matgrad.replace_linear`
passes over the adapters' own small layers (:func:`adapter_modules`).
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from ..function import _autocast_enabled
from ..lora import LoRA
from ..mlp import FusedMLP, _weight
from ..modules import Linear
from .common import class_name, hooked, projection

Read = Tuple[Tensor, Optional[Tensor], Optional[LoRA]]


def tuner_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer (LoRA's or another method's), the kind :func:`lora_refusal` judges."""
    return isinstance(module, BaseTunerLayer)


def adapter_modules(model: nn.Module) -> frozenset:
    """The ids of the modules inside PEFT tuner layers' adapter containers (``lora_A``,
    ``lora_B``, ...): the adapters' own layers, not projections of the model."""
    inside = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                container = getattr(module, name, None)
                if isinstance(container, nn.Module):
                    inside.update(id(m) for m in container.modules())
    return frozenset(inside)


def read(layer: nn.Module) -> Union[Read, str]:
    """``(weight (out, in), bias, adapter)`` of the PEFT layer ``layer`` as its forward
    computes now (adapter None where none adds anything: adapters disabled or merged, none
    of the active ones on this layer), or why the op cannot compute it, as a clause about
    the layer (``fuse_mlps`` writes "its gate_proj " before it)."""
    if type(layer) is not LoraLinear or not projection(layer.base_layer):
        return _unreadable(layer)
    base = layer.base_layer
    if hooked(layer) or hooked(base):
        return ("has module hooks (PEFT adds some for a mixed batch's adapter_names), which the fused op "
                "would skip")
    weight, bias = _weight(base), base.bias
    if layer.disable_adapters and layer.merged:
        return "has its adapters disabled while merged, which its own forward undoes by unmerging them"
    if layer.disable_adapters or layer.merged:  # merged: the base weights hold the update
        return weight, bias, None
    names = [name for name in layer.active_adapters if name in layer.lora_A]
    if not names:
        return weight, bias, None
    if len(names) > 1:
        return f"has the adapters {names} active at once, whose sum the op does not compute"
    adapter = _adapter(layer, names[0])
    return adapter if isinstance(adapter, str) else (weight, bias, adapter)


def _unreadable(layer: nn.Module) -> str:
    base = layer.get_base_layer()
    if type(base).__module__.split(".")[0] == "bitsandbytes":
        bits = "4-bit" if "4bit" in type(base).__name__ else "8-bit"
        return (f"is PEFT's LoRA on bitsandbytes' {type(base).__name__} ({bits} quantized weights), which the op "
                "cannot read as a matrix")
    if type(layer) is not LoraLinear:
        return f"is PEFT's {class_name(type(layer))}, a layer the op does not read"
    return f"is PEFT's LoRA on a {class_name(type(layer.base_layer))}, not a projection the op reads"


def _adapter(layer: nn.Module, name: str) -> Union[LoRA, str]:
    """The adapter ``name`` of ``layer`` as the op takes it, or why it cannot."""
    if layer.use_dora.get(name):
        return f"uses DoRA for adapter {name!r} (use_dora=True), which the op does not compute"
    if name in layer.lora_variant:
        variant = type(layer.lora_variant[name]).__name__
        return f"uses the LoRA variant {variant} for adapter {name!r}, which the op does not compute"
    a, b, dropout, scaling = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name], layer.scaling[name]
    if b.bias is not None:
        return f"has a bias in adapter {name!r}'s lora_B (lora_bias=True), whose gradient the op does not compute"
    if not all(type(m) in (nn.Linear, Linear) for m in (a, b)) or type(dropout) not in (nn.Dropout, nn.Identity):
        kinds = ", ".join(type(m).__qualname__ for m in (a, b, dropout))
        return f"holds adapter {name!r} in layers the op does not read ({kinds})"
    if hooked(a) or hooked(b) or hooked(dropout):
        return f"has module hooks on adapter {name!r}'s layers, which the fused op would skip"
    if not isinstance(scaling, numbers.Real):
        return f"scales adapter {name!r} by a {type(scaling).__name__}, not a number"
    return LoRA(a.weight, b.weight, scaling, dropout.p if type(dropout) is nn.Dropout and dropout.training else 0.0)


def lora_refusal(layer: nn.Module) -> Optional[str]:
    """Why :func:`torch_matgrad.fuse_mlps` leaves a block with the PEFT layer ``layer``
    alone (see :func:`read`; also adapters merged into the weights), or None."""
    found = read(layer)
    if isinstance(found, str):
        return found
    if layer.merged:
        return (f"has the adapters {layer.merged_adapters} merged into its base weights (merge_adapter); "
                "unmerge_adapter() first")
    return None


def _one_dtype(weight: Tensor, adapter: LoRA) -> bool:
    """Whether the op takes ``weight`` and ``adapter`` together: one dtype, or autocast
    casting both (PEFT keeps adapters in float32 beside half weights; outside autocast it
    adds their update in float32, which one op in one dtype does not)."""
    dtypes = {weight.dtype, adapter.A.dtype, adapter.B.dtype}
    return len(dtypes) == 1 or (torch.float64 not in dtypes and _autocast_enabled(weight.device.type))


class LoRAFusedMLP(FusedMLP):
    """A :class:`torch_matgrad.FusedMLP` whose projections may be PEFT ``lora.Linear``
    layers, each read at every call as its forward would compute it (:func:`read`), or
    the block calls its layers where the op cannot (several active adapters, DoRA, ...,
    adapters in float32 beside half weights outside autocast).

    The PEFT layers stay registered under their names, so PEFT's own methods find and
    change them: ``disable_adapter()``, ``set_adapter``, ``merge_adapter`` and
    ``unmerge_adapter`` change what this block reads; ``merge_and_unload()`` and
    ``unload()`` put each layer's base layer in its place (``setattr`` on this block),
    which it then reads as a plain :class:`FusedMLP` does.
    """

    def project(self, role: str) -> Optional[Read]:
        layer = self._layer(role)
        if not isinstance(layer, BaseTunerLayer):
            return super().project(role)
        found = read(layer)
        if isinstance(found, str) or (found[2] is not None and not _one_dtype(found[0], found[2])):
            return None
        return found
