"""The layer swaps: put :class:`torch_matgrad.Linear` into an existing model, and take it out.

:func:`replace_linear` swaps ``nn.Linear`` layers for ``torch_matgrad.Linear`` (and
``transformers``' ``Conv1D``, GPT-2's projections, for :class:`torch_matgrad.surgery.conv1d.Conv1D`);
:func:`fuse_activations` folds ``Linear -> ReLU/GELU/SiLU`` pairs inside ``nn.Sequential``
into one :class:`torch_matgrad.LinearAct`; :func:`restore_linear` undoes both, for tools
that need stock modules. All share the original Parameter objects (no copies): optimizer
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
  ``parallelize_module`` add such hooks (FSDP2 also a subclass): swap before wrapping;
- a layer whose ``forward`` was patched on the instance, as ``accelerate``'s hooks
  (``_hf_hook``: device maps, CPU/disk offload) do: the patch, which moves the weights
  in place for each call, belongs to the old object.

``nn.TransformerEncoderLayer``'s ``linear1``/``linear2`` are swapped (training calls
their ``forward``), but its inference fast path (eval mode without grad, see its
docstring) reads their weights directly: the numbers are the same, the op just does not
run there.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..modules import Linear, LinearAct
from .common import Patterns, activation_module, activation_of, as_list, candidates, conv1d_pair, hooked, peft_loaded


def replace_linear(model: nn.Module, *, include: Patterns = None, exclude: Patterns = None) -> int:
    """Swap every ``nn.Linear`` in ``model`` for :class:`torch_matgrad.Linear`, in place
    (and every ``transformers`` ``Conv1D`` for :class:`torch_matgrad.surgery.conv1d.Conv1D`, which
    reads the same ``(in, out)`` weight through a transpose).

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
        skipped silently, and so are the adapters' own layers inside PEFT's tuner layers
        (``lora_A``, ``lora_B``), which the adapted layer calls on its own: its base
        layer is swapped, as on a model without adapters (PEFT chose the LoRA layer's
        class from the base layer's when it injected the adapter, and only calls the
        base layer since). :func:`restore_linear` undoes the swap.
    """
    include, exclude = as_list(include), as_list(exclude)
    conv1d = conv1d_pair()
    stock, ours = ((nn.Linear,), (Linear,)) if conv1d is None else ((nn.Linear, conv1d[0]), (Linear, conv1d[1]))
    leave = frozenset()
    if peft_loaded():
        from .peft import adapter_modules

        leave = adapter_modules(model)
    swapped: Dict[int, nn.Module] = {}
    for parent, attr, _, module in candidates(model, stock, "replace_linear", include, exclude, skip=ours, leave=leave):
        if id(module) not in swapped:
            swapped[id(module)] = Linear.from_linear(module) if type(module) is nn.Linear else conv1d[1].from_conv1d(module)
        setattr(parent, attr, swapped[id(module)])
    return len(swapped)


def fuse_activations(model: nn.Module) -> int:
    """Fold ``Linear`` followed by ``nn.ReLU`` / ``nn.GELU`` (``approximate="none"`` or
    ``"tanh"``) / ``nn.SiLU`` inside any ``nn.Sequential`` of ``model`` into one
    :class:`torch_matgrad.LinearAct` (not an ``nn.Linear``: see its docstring), in place.

    The Linear may be a plain ``nn.Linear`` or a ``torch_matgrad.Linear`` without an
    activation. The fused layer shares the Linear's Parameters and computes the same
    numbers (the same ``torch.nn.functional`` activation, applied inside the op). The
    activation module's slot is filled with ``nn.Identity``, so indices into the
    Sequential and ``state_dict`` keys stay the same. ``inplace=True`` activations fuse
    too (the fused op never writes to its input).

    A pair is left alone, silently, if the Linear is registered elsewhere in the model
    too (another caller expects its output without the activation), if it has module
    hooks or a patched forward (a forward hook there sees the pre-activation), if
    either module is a subclass (its own behaviour would be lost), or if the activation
    has hooks. :func:`restore_linear` undoes the fusion.

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
            activation = activation_of(act)
            if (
                activation is None
                or type(lin) not in (nn.Linear, Linear)
                or getattr(lin, "activation", None) is not None
                or registrations[id(lin)] > 1
                or hooked(lin)
                or hooked(act)
            ):
                continue
            seq._modules[first] = LinearAct.from_linear(lin, activation)
            seq._modules[second] = nn.Identity().train(act.training)
            fused += 1
    return fused


def restore_linear(model: nn.Module, *, include: Patterns = None, exclude: Patterns = None) -> int:
    """Undo :func:`replace_linear` and :func:`fuse_activations`, in place: every
    torch_matgrad layer of ``model`` becomes the stock module again, sharing its
    Parameter objects (no copies).

    The step before ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear})``,
    PEFT on fused layers, tensor-parallel styles, or any tool that looks for
    ``nn.Linear``: a :class:`torch_matgrad.LinearAct` is not one, so such tools leave
    it alone or refuse it.

    - :class:`torch_matgrad.Linear` becomes ``nn.Linear``;
    - :class:`torch_matgrad.surgery.conv1d.Conv1D` becomes ``transformers``' ``Conv1D``;
    - :class:`torch_matgrad.LinearAct` becomes ``nn.Linear`` followed by the
      activation module (``nn.ReLU``, ``nn.GELU`` with ``approximate="none"`` or
      ``"tanh"``, ``nn.SiLU``). Where :func:`fuse_activations` left an ``nn.Identity``
      right after it in an ``nn.Sequential``, the activation goes into that slot: the
      model and its ``state_dict`` keys are what they were before fusing. Anywhere else
      the layer becomes ``nn.Sequential(nn.Linear, activation)``, whose keys gain a
      ``.0`` (``fc.weight`` becomes ``fc.0.weight``; the values are the same tensors).

    ``include``/``exclude`` select layers as in :func:`replace_linear`. A layer with
    module hooks or a patched forward, or of a subclass of these classes, is left
    alone with a warning naming it, as in :func:`replace_linear`; ``training`` is kept.

    Returns:
        The number of distinct layers restored.
    """
    include, exclude = as_list(include), as_list(exclude)
    conv1d = conv1d_pair()
    ours = (Linear, LinearAct) if conv1d is None else (Linear, LinearAct, conv1d[1])
    registrations: Dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        registrations[id(module)] = registrations.get(id(module), 0) + 1
    restored: Dict[int, nn.Module] = {}
    for parent, attr, _, module in candidates(model, ours, "restore_linear", include, exclude):
        if id(module) not in restored:
            if type(module) is not LinearAct:
                restored[id(module)] = _stock(module, conv1d)
            else:
                linear, activation = _stock(module, conv1d), activation_module(module.activation)
                slot = _identity_after(parent, attr)
                if slot is not None and registrations[id(module)] == 1:
                    parent._modules[slot] = activation.train(parent._modules[slot].training)
                    restored[id(module)] = linear
                else:
                    restored[id(module)] = nn.Sequential(linear, activation.train(module.training))
        setattr(parent, attr, restored[id(module)])
    return len(restored)


def _stock(module: nn.Module, conv1d) -> nn.Module:
    """``nn.Linear`` (for a ``Linear`` or the linear part of a ``LinearAct``) or
    ``transformers``' ``Conv1D``, holding ``module``'s Parameters, in its mode."""
    if isinstance(module, (Linear, LinearAct)):
        new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    else:
        with torch.device("meta"):  # the stock initialisation runs on nothing
            new = conv1d[0](module.nf, module.nx)
    new.weight, new.bias = module.weight, module.bias
    return new.train(module.training)


def _identity_after(parent: nn.Module, attr: str) -> Optional[str]:
    """The key of the plain, unhooked ``nn.Identity`` right after ``attr`` in the
    ``nn.Sequential`` ``parent`` (the slot :func:`fuse_activations` leaves), or None."""
    if not isinstance(parent, nn.Sequential):
        return None
    names = list(parent._modules)
    i = names.index(attr)
    if i + 1 == len(names):
        return None
    after = parent._modules[names[i + 1]]
    return names[i + 1] if type(after) is nn.Identity and not hooked(after) else None

