"""The LM-head fusion: :func:`fuse_lm_head_loss` has transformers' causal language
models compute their loss with :func:`torch_matgrad.linear_cross_entropy`, and
:func:`restore_lm_head_loss` undoes it. The forward it sets lives in
:mod:`torch_matgrad.surgery.causal_lm`, imported only when a model has one."""

from __future__ import annotations

import sys
import warnings
from typing import Iterator, Optional, Tuple

from torch import nn

from .common import patched


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


def _lm_refusal(module: nn.Module, causal_lm) -> Optional[str]:
    """Why :func:`fuse_lm_head_loss` cannot compute ``module``'s loss exactly, or None."""
    cls = type(module)
    if (cls.__module__, cls.__name__) not in causal_lm.CAUSAL_LMS:
        return f"{cls.__name__} is not a class whose forward fuse_lm_head_loss knows"
    forward = module.__dict__.get("forward")  # accelerate's remove_hook_from_module leaves the class's bound
    rebound = getattr(forward, "__func__", None) is cls.forward and getattr(forward, "__self__", None) is module
    if patched(module) and not rebound:
        return (
            "its forward is patched on the instance (accelerate's _hf_hook: device map or offload), "
            "which the fused loss would have to replace"
        )
    if module._forward_hooks:
        return "it has forward hooks, which would see an output without logits"
    return causal_lm.lm_head_refusal(module)


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
    attribute (:class:`torch_matgrad.surgery.causal_lm.LMHeadLossForward`) that calls the class's own,
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
    from . import causal_lm

    fused = 0
    for name, module in models:
        if isinstance(module.__dict__.get("forward"), causal_lm.LMHeadLossForward):
            continue
        reason = _lm_refusal(module, causal_lm)
        if reason is not None:
            _warn_left_model("fuse_lm_head_loss", name, module, reason)
            continue
        module.forward = causal_lm.LMHeadLossForward(module)
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
    from .causal_lm import LMHeadLossForward

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
