"""Model surgery: put :class:`torch_matgrad.Linear` into an existing model, and take it out.

:func:`replace_linear` swaps ``nn.Linear`` layers for ``torch_matgrad.Linear`` (and
``transformers``' ``Conv1D``, GPT-2's projections, for :class:`torch_matgrad.hf.Conv1D`);
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

import fnmatch
import sys
import warnings
from typing import Dict, Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import nn

from .modules import Linear, LinearAct

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


def _patched(module: nn.Module) -> bool:
    """A ``forward`` set on the instance (accelerate's hooks: ``_hf_hook``)."""
    return "_hf_hook" in module.__dict__ or "forward" in module.__dict__


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, table, None) for table in _HOOK_TABLES) or _patched(module)


def _conv1d_pair():
    """``(transformers' Conv1D, torch_matgrad.hf.Conv1D)``, or None while transformers is
    not loaded (no model can hold a Conv1D then: the class lives there)."""
    if "transformers.pytorch_utils" not in sys.modules:
        return None
    from . import hf

    return hf.HFConv1D, hf.Conv1D


def _slots(model: nn.Module, types: tuple) -> Iterator[Tuple[nn.Module, str, str, nn.Module]]:
    """``(parent, attribute, qualified name, module)`` for every registration of a
    module of ``types`` (a module registered under two names appears twice)."""
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():  # named_children() drops repeats
            if isinstance(child, types):
                yield parent, attr, f"{parent_name}.{attr}" if parent_name else attr, child


def _why_not(parent: nn.Module, module: nn.Module, exact: tuple = (nn.Linear,)) -> Optional[str]:
    """Why swapping ``module`` (an instance of one of the classes ``exact``) could change
    the model's result; None if it is safe."""
    if isinstance(parent, nn.MultiheadAttention):
        return (
            "nn.MultiheadAttention uses this layer's weight directly without calling its forward, "
            "so a torch_matgrad.Linear there would never run"
        )
    if type(module) not in exact:
        base = next(t for t in exact if isinstance(module, t))
        return f"it is a {type(module).__qualname__}, a subclass of {_class_name(base)} whose behaviour a swap would drop"
    if _patched(module):
        return (
            "its forward is patched on the instance (accelerate's _hf_hook: device map or offload), "
            "which cannot move to a new module"
        )
    if _hooked(module):
        return "it has module hooks (e.g. weight_norm, pruning), which cannot move to a new module"
    return None


def _class_name(cls: type) -> str:
    module = cls.__module__
    short = {"torch.nn.modules.linear": "nn", "torch_matgrad.modules": "torch_matgrad"}.get(module, module)
    return f"{short}.{cls.__qualname__}"


def _warn_left(function: str, name: str, attr: str, reason: str, stacklevel: int = 3) -> None:
    """The warning for a layer left alone; ``stacklevel`` 3 names the line that called
    the public function which calls this."""
    warnings.warn(
        f"torch_matgrad.{function}: left {name!r} as it is: {reason}. To skip it without "
        f"this warning, pass exclude=[{name!r}] (or a pattern such as '*.{attr}')",
        stacklevel=stacklevel,
    )


def _candidates(model: nn.Module, types: tuple, function: str, include: list, exclude: list, skip: tuple = ()):
    """``(parent, attribute, qualified name, module)`` for every registration of a module
    of ``types`` that the patterns select and that is not of ``skip``, once it is known
    safe to swap (:func:`_why_not`, one warning per module otherwise). A module already
    accepted under another name is accepted again, so that it stays shared."""
    accepted, refused = set(), set()
    for parent, attr, name, module in list(_slots(model, types)):
        if isinstance(module, skip) or (include and not _matches(name, include)) or _matches(name, exclude):
            continue
        if id(module) not in accepted:
            reason = _why_not(parent, module, types)
            if reason is not None:
                if id(module) not in refused:
                    _warn_left(function, name, attr, reason, stacklevel=4)  # past this generator
                    refused.add(id(module))
                continue
            accepted.add(id(module))
        yield parent, attr, name, module


def replace_linear(model: nn.Module, *, include: Patterns = None, exclude: Patterns = None) -> int:
    """Swap every ``nn.Linear`` in ``model`` for :class:`torch_matgrad.Linear`, in place
    (and every ``transformers`` ``Conv1D`` for :class:`torch_matgrad.hf.Conv1D`, which
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
        skipped silently. :func:`restore_linear` undoes the swap.
    """
    include, exclude = _as_list(include), _as_list(exclude)
    conv1d = _conv1d_pair()
    stock, ours = ((nn.Linear,), (Linear,)) if conv1d is None else ((nn.Linear, conv1d[0]), (Linear, conv1d[1]))
    swapped: Dict[int, nn.Module] = {}
    for parent, attr, _, module in _candidates(model, stock, "replace_linear", include, exclude, skip=ours):
        if id(module) not in swapped:
            swapped[id(module)] = Linear.from_linear(module) if type(module) is nn.Linear else conv1d[1].from_conv1d(module)
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
    - :class:`torch_matgrad.hf.Conv1D` becomes ``transformers``' ``Conv1D``;
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
    include, exclude = _as_list(include), _as_list(exclude)
    conv1d = _conv1d_pair()
    ours = (Linear, LinearAct) if conv1d is None else (Linear, LinearAct, conv1d[1])
    registrations: Dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        registrations[id(module)] = registrations.get(id(module), 0) + 1
    restored: Dict[int, nn.Module] = {}
    for parent, attr, _, module in _candidates(model, ours, "restore_linear", include, exclude):
        if id(module) not in restored:
            if type(module) is not LinearAct:
                restored[id(module)] = _stock(module, conv1d)
            else:
                linear, activation = _stock(module, conv1d), _activation_module(module.activation)
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


def _activation_module(activation: str) -> nn.Module:
    """The ``torch.nn`` module computing the fused activation ``activation``
    (the inverse of :func:`_activation_of`)."""
    if activation == "relu":
        return nn.ReLU()
    if activation == "silu":
        return nn.SiLU()
    return nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")


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
    return names[i + 1] if type(after) is nn.Identity and not _hooked(after) else None


# --------------------------------------------------------------------------- MLP blocks

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
    :func:`_activation_of`) or transformers' ``ACT2FN`` classes whose function is
    exactly one of the op's (``gelu_new`` is the tanh GELU, in other rounding)."""
    act = _activation_of(module)
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


def _projection(module: nn.Module) -> bool:
    """A layer the block may read ``weight``/``bias`` from: nn.Linear and the layers
    :func:`replace_linear` puts in its place, transformers' ``Conv1D`` and its swap."""
    exact = (nn.Linear, Linear)
    pair = _conv1d_pair()
    return type(module) in (exact + pair if pair else exact)


def _mlp_plan(module: nn.Module):
    """How to fuse ``module``: the keyword arguments of ``FusedMLP.from_layers``, a
    reason (str) why a recognised block cannot be fused exactly, or None when it is not
    a block this function knows."""
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
        if len(core) != 3 or not all(type(m) in (nn.Linear, Linear, LinearAct) for _, m in (core[0], core[2])):
            return None
        (up_name, up), (act_name, act_module), (down_name, down) = core
        if type(down) is LinearAct:
            return None
        if type(up) is LinearAct:  # fuse_activations ran first: the activation is inside
            if type(act_module) is not nn.Identity:
                return None
            act_module = _activation_module(up.activation)
        elif type(act_module).__module__ not in ("torch.nn.modules.activation", "transformers.activations"):
            return None  # Linear, <not an activation>, Linear: not an MLP block
        if any(type(m) is nn.Dropout and m.p > 0 for _, m in items):
            return "it has dropout with p > 0, which the fused op does not apply between its layers"
        layers = {"up": up, "down": down}
        roles = {"up": up_name, "down": down_name}
        keep = {n: m for n, m in items if n not in (up_name, down_name)}
        dropout = None
    else:
        return None
    known, activation = _mlp_activation(act_module)
    if not known:
        return f"its activation {type(act_module).__qualname__} has no exact equivalent among the op's"
    for role, layer in layers.items():
        if type(layer) is LinearAct:
            continue
        if not _projection(layer):
            return f"its {roles[role]} is a {type(layer).__qualname__}, not a projection the op reads"
        if _hooked(layer):
            return f"its {roles[role]} has module hooks or a patched forward, which the fused op would skip"
    if _hooked(module) or _hooked(act_module):
        return "it has module hooks or a patched forward, which the fused op would skip"
    if dropout is not None and not (type(dropout) is nn.Dropout):
        return f"its {dropout_name} is a {type(dropout).__qualname__}"
    return dict(up=layers["up"], down=layers["down"], gate=layers.get("gate"), activation=activation,
                names=roles, keep=keep, dropout=dropout)


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
      ``gelu_new``).

    It works whether or not :func:`replace_linear` ran first. The new block keeps the
    old one's projection layers under their names, so the Parameter objects and the
    ``state_dict`` keys do not change; ``include`` and ``exclude`` are the patterns of
    :func:`replace_linear`, matched against the block's name. A recognised block that
    the op cannot reproduce exactly (another activation, hooks, a subclass, dropout
    with p > 0 between the layers) is left alone with a warning naming it. The root
    module itself is not replaced.
    """
    from .mlp import FusedMLP

    include, exclude = _as_list(include), _as_list(exclude)
    fused: Dict[int, nn.Module] = {}
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(parent._modules.items()):
            if child is None or isinstance(child, FusedMLP):
                continue
            name = f"{parent_name}.{attr}" if parent_name else attr
            if (include and not _matches(name, include)) or _matches(name, exclude):
                continue
            if id(child) not in fused:
                plan = _mlp_plan(child)
                if plan is None:
                    continue
                if isinstance(plan, str):
                    _warn_left("fuse_mlps", name, attr, plan)
                    continue
                fused[id(child)] = FusedMLP.from_layers(**plan)
            setattr(parent, attr, fused[id(child)])
    return len(fused)


# ------------------------------------------------------------------ language-model heads


def _generative(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, module)`` for every transformers model with ``generate`` in ``model``, the
    root included (none while transformers' models are not loaded)."""
    if "transformers.modeling_utils" not in sys.modules:
        return
    from transformers import GenerationMixin

    for name, module in model.named_modules():
        if isinstance(module, GenerationMixin):
            yield name, module


def _warn_left_model(function: str, name: str, module: nn.Module, reason: str) -> None:
    """The warning for a model left alone, named by its place in the model and its class;
    the stack level names the line that called the public function."""
    what = f"{name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
    warnings.warn(f"torch_matgrad.{function}: left {what} as it is: {reason}", stacklevel=3)


def _lm_refusal(module: nn.Module, hf) -> Optional[str]:
    """Why :func:`fuse_lm_head_loss` cannot compute ``module``'s loss exactly, or None."""
    cls = type(module)
    if (cls.__module__, cls.__name__) not in hf.CAUSAL_LMS:
        return f"{cls.__name__} is not a class whose forward fuse_lm_head_loss knows"
    forward = module.__dict__.get("forward")  # accelerate's remove_hook_from_module leaves the class's bound
    rebound = getattr(forward, "__func__", None) is cls.forward and getattr(forward, "__self__", None) is module
    if _patched(module) and not rebound:
        return (
            "its forward is patched on the instance (accelerate's _hf_hook: device map or offload), "
            "which the fused loss would have to replace"
        )
    if module._forward_hooks:
        return "it has forward hooks, which would see an output without logits"
    return hf.lm_head_refusal(module)


def fuse_lm_head_loss(model: nn.Module) -> int:
    """Compute the loss of every transformers causal language model in ``model`` (the
    root included) with :func:`torch_matgrad.linear_cross_entropy`, which never forms the
    logits; return how many models it changed.

    Called with ``labels`` while gradients are on, such a model returns the loss its own
    ``ForCausalLMLoss`` computes (labels shifted by one or ``shift_labels``,
    ``ignore_index=-100``, the mean or the sum over ``num_items_in_batch``; Gemma 2's
    and 3's final soft cap inside the op) and ``logits=None``. Without labels, or under
    ``torch.no_grad()`` (``generate``, evaluation), it runs its own forward: the same
    logits as before. Nothing else changes: the model's ``forward`` becomes an instance
    attribute (:class:`torch_matgrad.hf.LMHeadLossForward`) that calls the class's own,
    with ``lm_head``, its Parameters (tied to the input embeddings or not), the
    ``state_dict`` keys and ``generate`` untouched; :func:`replace_linear`,
    :func:`fuse_mlps` and PEFT adapters inside the model compose with it, before or
    after. :func:`restore_lm_head_loss` undoes it.

    Recognised, by their exact classes: ``LlamaForCausalLM``, ``MistralForCausalLM``,
    ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``GemmaForCausalLM``,
    ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``, ``PhiForCausalLM``, ``Phi3ForCausalLM``
    and ``GPT2LMHeadModel``. Any other model with ``generate`` is left alone with a
    warning naming it, as is a recognised one whose loss the op cannot reproduce exactly:
    a forward patched on the instance (accelerate's device maps and offload: fuse before
    dispatching), forward hooks on the model, an ``lm_head`` that is not a plain linear
    layer (``nn.Linear`` or :class:`torch_matgrad.Linear`) or has hooks, or a
    ``loss_function`` other than transformers' ``ForCausalLMLoss``. A model whose head or
    loss function changes so after fusing computes its own loss, with a warning. Models
    already fused are skipped silently; ``docs/lm_head.md`` has the design.
    """
    models = list(_generative(model))
    if not models:
        warnings.warn(
            f"torch_matgrad.fuse_lm_head_loss: {type(model).__name__} holds no transformers causal language model",
            stacklevel=2,
        )
        return 0
    from . import hf

    fused = 0
    for name, module in models:
        if isinstance(module.__dict__.get("forward"), hf.LMHeadLossForward):
            continue
        reason = _lm_refusal(module, hf)
        if reason is not None:
            _warn_left_model("fuse_lm_head_loss", name, module, reason)
            continue
        module.forward = hf.LMHeadLossForward(module)
        fused += 1
    return fused


def restore_lm_head_loss(model: nn.Module) -> int:
    """Undo :func:`fuse_lm_head_loss`, in place: every model in ``model`` that it changed
    runs its class's own ``forward`` again (the instance attribute is deleted). A model
    whose forward was patched again after fusing (accelerate's hooks, which keep the
    fused forward as ``_old_forward``) is left alone with a warning naming it: remove
    those hooks first. Returns the number of models restored."""
    models = list(_generative(model))
    if not models:
        return 0
    from .hf import LMHeadLossForward

    restored = 0
    for name, module in models:
        if isinstance(module.__dict__.get("forward"), LMHeadLossForward):
            del module.forward
            restored += 1
        elif isinstance(module.__dict__.get("_old_forward"), LMHeadLossForward):
            reason = (
                "its forward was patched again after fuse_lm_head_loss (accelerate's _hf_hook); "
                "remove those hooks first"
            )
            _warn_left_model("restore_lm_head_loss", name, module, reason)
    return restored
