"""The MLP fusion: :func:`fuse_mlps` puts :class:`torch_matgrad.FusedMLP` in place of
the MLP blocks it recognises, sharing their projection layers."""

from __future__ import annotations

import sys
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..mlp import FusedMLP
from ..modules import Linear, LinearAct
from .common import (Patterns, activation_module, activation_of, as_list, hooked, matches, peft_loaded, projection,
                     warn_left)

# transformers' MLP classes whose forward this module reproduces exactly, each checked
# by tests/test_mlp.py against the original: (module path, class, names of the
# projections by role, name of the activation module, name of a trailing dropout).
_GATED = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_HF_MLPS = (
    *((f"transformers.models.{m}.modeling_{m}", f"{c}MLP", _GATED, "act_fn", None)
      for m, c in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("gemma", "Gemma"))),
    ("transformers.models.phi.modeling_phi", "PhiMLP", {"up": "fc1", "down": "fc2"}, "activation_fn", None),
    ("transformers.models.gpt2.modeling_gpt2", "GPT2MLP", {"up": "c_fc", "down": "c_proj"}, "act", "dropout"),
)


def _hf_mlp_spec(module: nn.Module):
    """The ``_HF_MLPS`` entry of ``module``'s exact class (subclasses may compute
    something else), or None. Only classes already imported can be present."""
    cls = type(module)
    for path, name, roles, act, dropout in _HF_MLPS:
        if cls.__name__ == name and cls.__module__ == path and path in sys.modules:
            return roles, act, dropout
    return None


def _mlp_activation(module: nn.Module) -> Tuple[bool, Optional[str]]:
    """``(known, activation)`` for an activation module: torch's own (see
    :func:`activation_of`) or transformers' ``ACT2FN`` classes whose function is
    exactly one of the op's (``gelu_new`` is the tanh GELU, in other rounding)."""
    act = activation_of(module)
    if act is not None:
        return True, act
    if type(module) is nn.Identity:
        return True, None
    cls = type(module)
    if cls.__module__ != "transformers.activations":
        return False, None
    inner = getattr(module, "act", None)
    if cls.__name__ == "SiLUActivation":
        return True, "silu"
    if cls.__name__ == "NewGELUActivation":
        return True, "gelu_tanh"
    if cls.__name__ == "GELUActivation" and inner is torch.nn.functional.gelu:
        return True, "gelu"
    if cls.__name__ == "GELUTanh" and getattr(inner, "keywords", None) == {"approximate": "tanh"}:
        return True, "gelu_tanh"
    return False, None


def _mlp_plan(module: nn.Module):
    """How to fuse ``module``: ``(class, keyword arguments of its from_layers)``, a
    reason (str) why a recognised block cannot be fused exactly, or None when it is not
    a block this function knows. Blocks with PEFT layers get :mod:`.peft`'s class."""
    peft = None
    if peft_loaded():
        from . import peft
    spec = _hf_mlp_spec(module)
    if spec is not None:
        roles, act_name, dropout_name = spec
        layers = {role: module._modules[attr] for role, attr in roles.items()}
        act_module = module._modules[act_name]
        dropout = module._modules.get(dropout_name) if dropout_name else None
        keep = {act_name: act_module}
    elif type(module) is nn.Sequential:
        items = list(module._modules.items())
        core = [(n, m) for n, m in items if type(m) is not nn.Dropout]
        if len(core) != 3 or not all(type(m) in (nn.Linear, Linear, LinearAct) or (peft and peft.tuner_layer(m))
                                     for _, m in (core[0], core[2])):
            return None
        (up_name, up), (act_name, act_module), (down_name, down) = core
        if type(down) is LinearAct:
            return None
        if type(up) is LinearAct:  # fuse_activations ran first: the activation is inside
            if type(act_module) is not nn.Identity:
                return None
            act_module = activation_module(up.activation)
        elif type(act_module).__module__ not in ("torch.nn.modules.activation", "transformers.activations"):
            return None  # Linear, <not an activation>, Linear: not an MLP block
        if any(type(m) is nn.Dropout and m.p > 0 for _, m in items):
            return "it has dropout with p > 0, which the fused op does not apply between its layers"
        layers = {"up": up, "down": down}
        roles = {"up": up_name, "down": down_name}
        keep = {n: m for n, m in items if n not in (up_name, down_name)}
        dropout = None
    elif type(module) is FusedMLP and peft and any(peft.tuner_layer(m) for m in module._modules.values()):
        # Fused before PEFT wrapped its projections (get_peft_model, PeftModel.from_pretrained):
        # a FusedMLP reads their base weights alone. The same block, with PEFT's reader.
        order = list(module._modules)
        roles = dict(sorted(module._roles.items(), key=lambda item: order.index(item[1])))  # its state_dict order
        layers = {role: module._modules[attr] for role, attr in roles.items()}
        act_module = nn.Identity() if module.activation is None else activation_module(module.activation)
        dropout, dropout_name = module.dropout, "dropout"
        keep = {n: m for n, m in module._modules.items() if n not in roles.values() and m is not dropout}
    else:
        return None
    known, activation = _mlp_activation(act_module)
    if not known:
        return f"its activation {type(act_module).__qualname__} has no exact equivalent among the op's"
    tuned = False
    for role, layer in layers.items():
        if type(layer) is LinearAct:
            continue
        if peft and peft.tuner_layer(layer):
            reason, tuned = peft.lora_refusal(layer), True
            if reason is not None:
                return f"its {roles[role]} {reason}"
        elif not projection(layer):
            return f"its {roles[role]} is a {type(layer).__qualname__}, not a projection the op reads"
        if hooked(layer):
            return f"its {roles[role]} has module hooks or a patched forward, which the fused op would skip"
    if hooked(module) or hooked(act_module):
        return "it has module hooks or a patched forward, which the fused op would skip"
    if dropout is not None and not (type(dropout) is nn.Dropout):
        return f"its {dropout_name} is a {type(dropout).__qualname__}"
    return (peft.LoRAFusedMLP if tuned else FusedMLP), dict(
        up=layers["up"], down=layers["down"], gate=layers.get("gate"), activation=activation, names=roles, keep=keep,
        dropout=dropout)


def fuse_mlps(model: nn.Module, *, include: Patterns = None, exclude: Patterns = None) -> int:
    """Replace every MLP block of ``model`` that this function recognises with one
    :class:`torch_matgrad.FusedMLP`, in place; return how many it replaced.

    Recognised, by their exact classes (whose forward the fused op reproduces, tested):

    - ``nn.Sequential(Linear, activation, Linear)``, optionally with ``nn.Dropout(p=0)``
      between, where the activation is ``nn.ReLU``, ``nn.GELU``, ``nn.SiLU`` or
      transformers' equivalents, and the first pair may already be a fused
      :class:`torch_matgrad.LinearAct` (``fuse_activations`` ran first);
    - transformers' ``LlamaMLP``, ``MistralMLP``, ``Qwen2MLP``, ``GemmaMLP`` (gated),
      ``PhiMLP`` and ``GPT2MLP`` (``Conv1D`` weights read through a transpose), with the
      configured activation mapped exactly (``silu``, ``gelu``, ``gelu_pytorch_tanh``,
      ``gelu_new``);
    - any of these whose projections are PEFT's LoRA layers (``lora.Linear``, unmerged,
      one active adapter, no DoRA or ``lora_bias``; :mod:`torch_matgrad.surgery.peft`):
      the block reads each at every call as its forward would compute it, so PEFT's own
      features keep working (docs/lora.md); also a ``FusedMLP`` whose projections PEFT
      adapted after fusing (``PeftModel.from_pretrained`` on a fused model).

    It works whether or not :func:`replace_linear` ran first. The new block keeps the
    old one's projection layers under their names, so the Parameter objects and the
    ``state_dict`` keys do not change; ``include`` and ``exclude`` are the patterns of
    :func:`replace_linear`, matched against the block's name. A recognised block that
    the op cannot reproduce exactly (another activation, hooks, a subclass, dropout
    with p > 0 between the layers, a PEFT layer the op cannot read) is left alone with a
    warning naming it and the reason. The root module itself is not replaced.
    """
    include, exclude = as_list(include), as_list(exclude)
    fused: Dict[int, nn.Module] = {}
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(parent._modules.items()):
            if child is None or (isinstance(child, FusedMLP) and type(child) is not FusedMLP):
                continue
            name = f"{parent_name}.{attr}" if parent_name else attr
            if (include and not matches(name, include)) or matches(name, exclude):
                continue
            if id(child) not in fused:
                plan = _mlp_plan(child)
                if plan is None:
                    continue
                if isinstance(plan, str):
                    warn_left("fuse_mlps", name, attr, plan)
                    continue
                cls, layers = plan
                fused[id(child)] = cls.from_layers(**layers)
            setattr(parent, attr, fused[id(child)])
    return len(fused)

