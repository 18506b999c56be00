"""What every surgery family shares: selecting modules by name patterns, telling
whether a module is safe to replace or one an op can read, the warning for one left
alone, and the map between activation modules and the op's activation names. It imports
no other surgery module but :mod:`.conv1d`, which imports none."""

from __future__ import annotations

import fnmatch
import sys
import warnings
from typing import Iterable, Iterator, Optional, Tuple, Union

from torch import nn

from ..modules import Linear

Patterns = Optional[Union[str, Iterable[str]]]

# Per-instance hook tables of nn.Module (getattr: not every torch version has all).
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def as_list(patterns: Patterns) -> list:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def matches(name: str, patterns: list) -> bool:
    """True if a glob pattern matches ``name`` or one of its parents' names: ``"encoder"``
    covers ``"encoder.layers.0.fc1"``; ``"*.fc1"`` matches any module called ``fc1``."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def patched(module: nn.Module) -> bool:
    """A ``forward`` set on the instance (accelerate's hooks: ``_hf_hook``)."""
    return "_hf_hook" in module.__dict__ or "forward" in module.__dict__


def hooked(module: nn.Module) -> bool:
    return any(getattr(module, table, None) for table in _HOOK_TABLES) or patched(module)


def conv1d_pair():
    """``(transformers' Conv1D, torch_matgrad's Conv1D)``, or None while transformers is
    not loaded (no model can hold a Conv1D then: the class lives there)."""
    if "transformers.pytorch_utils" not in sys.modules:
        return None
    from .conv1d import Conv1D, HFConv1D

    return HFConv1D, Conv1D


def projection(module: nn.Module) -> bool:
    """A layer whose product ``x W^T + b`` an op may compute from its ``weight`` and
    ``bias`` alone: nn.Linear and the layers :func:`replace_linear` puts in its place,
    transformers' ``Conv1D`` and its swap."""
    exact = (nn.Linear, Linear)
    pair = conv1d_pair()
    return type(module) in (exact + pair if pair else exact)


def peft_loaded() -> bool:
    """Whether PEFT's LoRA is imported; before it is, no model can hold its layers (the
    families then import :mod:`.peft`, which imports PEFT)."""
    return "peft.tuners.lora" in sys.modules


def slots(model: nn.Module, types: tuple) -> Iterator[Tuple[nn.Module, str, str, nn.Module]]:
    """``(parent, attribute, qualified name, module)`` for every registration of a
    module of ``types`` (a module registered under two names appears twice)."""
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():  # named_children() drops repeats
            if isinstance(child, types):
                yield parent, attr, f"{parent_name}.{attr}" if parent_name else attr, child


def why_not(parent: nn.Module, module: nn.Module, exact: tuple = (nn.Linear,)) -> Optional[str]:
    """Why swapping ``module`` (an instance of one of the classes ``exact``) could change
    the model's result; None if it is safe."""
    if isinstance(parent, nn.MultiheadAttention):
        return (
            "nn.MultiheadAttention uses this layer's weight directly without calling its forward, "
            "so a torch_matgrad.Linear there would never run"
        )
    if type(module) not in exact:
        base = next(t for t in exact if isinstance(module, t))
        return f"it is a {type(module).__qualname__}, a subclass of {class_name(base)} whose behaviour a swap would drop"
    if patched(module):
        return (
            "its forward is patched on the instance (accelerate's _hf_hook: device map or offload), "
            "which cannot move to a new module"
        )
    if hooked(module):
        return "it has module hooks (e.g. weight_norm, pruning), which cannot move to a new module"
    return None


def class_name(cls: type) -> str:
    module = cls.__module__
    short = {"torch.nn.modules.linear": "nn", "torch_matgrad.modules": "torch_matgrad"}.get(module, module)
    return f"{short}.{cls.__qualname__}"


def warn_left(function: str, name: str, attr: str, reason: str, stacklevel: int = 3) -> None:
    """The warning for a layer left alone; ``stacklevel`` 3 names the line that called
    the public function which calls this."""
    warnings.warn(
        f"torch_matgrad.{function}: left {name!r} as it is: {reason}. To skip it without "
        f"this warning, pass exclude=[{name!r}] (or a pattern such as '*.{attr}')",
        stacklevel=stacklevel,
    )


def candidates(model: nn.Module, types: tuple, function: str, include: list, exclude: list, skip: tuple = (),
               leave: frozenset = frozenset()):
    """``(parent, attribute, qualified name, module)`` for every registration of a module
    of ``types`` that the patterns select, that is not of ``skip`` and whose id is not in
    ``leave``, once it is known safe to swap (:func:`why_not`, one warning per module
    otherwise). A module already accepted under another name is accepted again, so that
    it stays shared."""
    accepted, refused = set(), set()
    for parent, attr, name, module in list(slots(model, types)):
        if (isinstance(module, skip) or id(module) in leave or (include and not matches(name, include))
                or matches(name, exclude)):
            continue
        if id(module) not in accepted:
            reason = why_not(parent, module, types)
            if reason is not None:
                if id(module) not in refused:
                    warn_left(function, name, attr, reason, stacklevel=4)  # past this generator
                    refused.add(id(module))
                continue
            accepted.add(id(module))
        yield parent, attr, name, module


def activation_of(module: nn.Module) -> Optional[str]:
    """The fused-activation name equivalent to ``module``, or None."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.GELU:
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    return None


def activation_module(activation: str) -> nn.Module:
    """The ``torch.nn`` module computing the fused activation ``activation``
    (the inverse of :func:`activation_of`)."""
    if activation == "relu":
        return nn.ReLU()
    if activation == "silu":
        return nn.SiLU()
    return nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")

