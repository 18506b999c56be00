"""Model surgery: put :class:`torch_matgrad.Linear` into an existing model.

:func:`replace_linear` swaps ``nn.Linear`` layers for ``torch_matgrad.Linear``;
:func:`fuse_activations` folds ``Linear -> ReLU/GELU/SiLU`` pairs inside ``nn.Sequential``
into one fused layer. Both share the original Parameter objects (no copies): optimizer
state, parameter hooks, weight tying, device, dtype and ``requires_grad`` stay as they
were, and the ``state_dict`` keys do not change.

A layer is left alone, with a :class:`UserWarning` naming it, wherever swapping it
could change what the model computes:

- a Linear owned by ``nn.MultiheadAttention`` (its ``out_proj``): the attention calls
  ``F.multi_head_attention_forward`` with the weight directly and never calls the
  layer's ``forward``, so a swap would silently do nothing;
- a subclass of ``nn.Linear`` (its own ``forward`` or attributes would be lost), which
  includes layers with ``torch.nn.utils.parametrize`` parametrizations;
- a layer with module hooks (forward, pre-forward, backward or state-dict hooks, which
  is how ``weight_norm`` and ``torch.nn.utils.prune`` work): module hooks belong to the
  module object and cannot move to a new one. ``fully_shard`` and
  ``parallelize_module`` add such hooks (FSDP2 also a subclass): swap before wrapping.

``nn.TransformerEncoderLayer``'s ``linear1``/``linear2`` are swapped (training calls
their ``forward``), but its inference fast path (eval mode without grad, see its
docstring) reads their weights directly: the numbers are the same, the op just does not
run there.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Dict, Iterable, Iterator, Optional, Tuple, Union

from torch import nn

from .modules import Linear

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


def _as_list(patterns: Patterns) -> list:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def _matches(name: str, patterns: list) -> bool:
    """True if a glob pattern matches ``name`` or one of its parents' names: ``"encoder"``
    covers ``"encoder.layers.0.fc1"``; ``"*.fc1"`` matches any module called ``fc1``."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, table, None) for table in _HOOK_TABLES)


def _linear_slots(model: nn.Module) -> Iterator[Tuple[nn.Module, str, str, nn.Module]]:
    """``(parent, attribute, qualified name, module)`` for every registration of an
    ``nn.Linear`` (a module registered under two names appears twice)."""
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():  # named_children() drops repeats
            if isinstance(child, nn.Linear):
                yield parent, attr, f"{parent_name}.{attr}" if parent_name else attr, child


def _why_not(parent: nn.Module, module: nn.Module) -> Optional[str]:
    """Why swapping ``module`` could change the model's result; None if it is safe."""
    if isinstance(parent, nn.MultiheadAttention):
        return (
            "nn.MultiheadAttention uses this layer's weight directly without calling its forward, "
            "so a torch_matgrad.Linear there would never run"
        )
    if type(module) is not nn.Linear:
        return f"it is a {type(module).__qualname__}, a subclass of nn.Linear whose behaviour a swap would drop"
    if _hooked(module):
        return "it has module hooks (e.g. weight_norm, pruning), which cannot move to a new module"
    return None


def replace_linear(model: nn.Module, *, include: Patterns = None, exclude: Patterns = None) -> int:
    """Swap every ``nn.Linear`` in ``model`` for :class:`torch_matgrad.Linear`, in place.

    Args:
        model: modified in place (the root itself is not replaced; wrap a bare
            ``nn.Linear`` with ``torch_matgrad.Linear.from_linear`` instead).
        include: glob patterns (:mod:`fnmatch`, case-sensitive) matched against each
            module's qualified name as in ``model.named_modules()``, or against one of
            its parents' names: ``"encoder"`` selects everything under ``encoder``,
            ``"*.mlp.*"`` every layer inside any ``mlp``. None selects every layer.
        exclude: the same kind of patterns; a layer matching ``exclude`` is never
            swapped, even if it matches ``include`` (like ``modules_to_not_convert``).

    Returns:
        The number of distinct layers swapped. The new layers share the old Parameter
        objects and keep ``training``; the old module objects are no longer part of
        ``model``. A layer registered under several names is swapped once and stays
        shared. Layers that cannot be swapped safely are left alone with a warning (see
        the module docstring). Layers that are already ``torch_matgrad.Linear`` are
        skipped silently.
    """
    include, exclude = _as_list(include), _as_list(exclude)
    swapped: Dict[int, Linear] = {}
    refused = set()
    for parent, attr, name, module in list(_linear_slots(model)):
        if isinstance(module, Linear):
            continue
        if (include and not _matches(name, include)) or _matches(name, exclude):
            continue
        if id(module) not in swapped:
            reason = _why_not(parent, module)
            if reason is not None:
                if id(module) not in refused:
                    warnings.warn(
                        f"torch_matgrad.replace_linear: left {name!r} as it is: {reason}. To skip it without "
                        f"this warning, pass exclude=[{name!r}] (or a pattern such as '*.{attr}')",
                        stacklevel=2,
                    )
                    refused.add(id(module))
                continue
            swapped[id(module)] = Linear.from_linear(module)
        setattr(parent, attr, swapped[id(module)])
    return len(swapped)


def _activation_of(module: nn.Module) -> Optional[str]:
    """The fused-activation name equivalent to ``module``, or None."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.GELU:
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    return None


def fuse_activations(model: nn.Module) -> int:
    """Fold ``Linear`` followed by ``nn.ReLU`` / ``nn.GELU`` (``approximate="none"`` or
    ``"tanh"``) / ``nn.SiLU`` inside any ``nn.Sequential`` of ``model`` into one
    ``torch_matgrad.Linear(activation=...)``, in place.

    The Linear may be a plain ``nn.Linear`` or a ``torch_matgrad.Linear`` without an
    activation. The fused layer shares the Linear's Parameters and computes the same
    numbers (the same ``torch.nn.functional`` activation, applied inside the op). The
    activation module's slot is filled with ``nn.Identity``, so indices into the
    Sequential and ``state_dict`` keys stay the same. ``inplace=True`` activations fuse
    too (the fused op never writes to its input).

    A pair is left alone, silently, if the Linear is registered elsewhere in the model
    too (another caller expects its output without the activation), if it has module
    hooks (a forward hook there sees the pre-activation), if either module is a
    subclass (its own behaviour would be lost), or if the activation has hooks.

    Returns:
        The number of pairs fused.
    """
    registrations: Dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        registrations[id(module)] = registrations.get(id(module), 0) + 1
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            lin, act = seq._modules[first], seq._modules[second]
            activation = _activation_of(act)
            if (
                activation is None
                or type(lin) not in (nn.Linear, Linear)
                or getattr(lin, "activation", None) is not None
                or registrations[id(lin)] > 1
                or _hooked(lin)
                or _hooked(act)
            ):
                continue
            seq._modules[first] = Linear.from_linear(lin, activation=activation)
            seq._modules[second] = nn.Identity().train(act.training)
            fused += 1
    return fused
