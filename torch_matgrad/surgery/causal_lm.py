"""The forward that :func:`torch_matgrad.fuse_lm_head_loss` sets on transformers' causal
language models (importing this module imports ``transformers``;
:mod:`torch_matgrad.surgery.lm_head` does so only when a model holds one)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.loss.loss_utils import ForCausalLMLoss

from ..cross_entropy import linear_cross_entropy
from ..modules import Linear
from .common import hooked

# transformers' causal language models whose loss :class:`LMHeadLossForward` computes
# with the fused op, each checked by tests/test_lm_head_surgery.py against the original:
# every forward ends ``logits = self.lm_head(slice_logits_to_keep(hidden, logits_to_keep))``,
# then, where an attribute of the config is named here, the soft cap
# ``c * tanh(logits / c)`` with ``c`` its value (None: no cap), then
# ``self.loss_function(logits, labels, vocab_size, **kwargs)``.
CAUSAL_LMS = {
    **{(f"transformers.models.{m}.modeling_{m}", f"{c}ForCausalLM"): None
       for m, c in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"),
                    ("gemma", "Gemma"), ("phi", "Phi"), ("phi3", "Phi3"))},
    **{(f"transformers.models.{m}.modeling_{m}", f"{c}ForCausalLM"): "final_logit_softcapping"
       for m, c in (("gemma2", "Gemma2"), ("gemma3", "Gemma3"))},
    ("transformers.models.gpt2.modeling_gpt2", "GPT2LMHeadModel"): None,
}


def lm_head_refusal(model: nn.Module) -> Optional[str]:
    """Why the fused loss would not be what the causal LM ``model`` (of a class of
    :data:`CAUSAL_LMS`) computes now, or None: its head must be a plain linear layer
    and its loss transformers' ``ForCausalLMLoss``."""
    head = model._modules.get("lm_head")
    if type(head) not in (nn.Linear, Linear):
        return f"its lm_head is a {type(head).__qualname__}, not a linear layer the fused op reads"
    if hooked(head):
        return "its lm_head has module hooks or a patched forward, which the fused op would skip"
    loss = model.loss_function
    if loss is not ForCausalLMLoss:
        return f"its loss_function is {getattr(loss, '__qualname__', loss)}, not ForCausalLMLoss"
    return None


def _labels_at(forward, args: tuple) -> Optional[int]:
    """Where ``labels`` is in ``args``, the positional arguments of a call of the bound
    ``forward`` of a model, or None (``input_ids`` alone need no signature)."""
    if len(args) < 2:
        return None
    at = list(inspect.signature(forward).parameters).index("labels")
    return at if at < len(args) else None


class LMHeadLossForward:
    """The ``forward`` that :func:`torch_matgrad.fuse_lm_head_loss` sets on a causal LM
    (an instance attribute; deleting it gives the model its class's forward back).

    Called with ``labels`` while gradients are on, it runs the model's own forward with
    ``labels=None`` and the head fed no rows (a forward pre-hook on ``lm_head``, for this
    call only, keeps the hidden states and passes on an empty slice of them), then
    computes ``ForCausalLMLoss`` with :func:`torch_matgrad.linear_cross_entropy` from the
    kept hidden states: the logits are never formed and the output's ``logits`` is None
    (with ``return_dict=False``, the tuple keeps None in their place); ``torch.compile``
    traces all of it as one graph. Any other call (no labels, gradients off as in
    ``generate``, or a head or loss function changed since fusing, with a warning) is the
    model's own forward. ``inspect.signature`` sees the model's own signature
    (``generate`` and ``Trainer`` read it).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(type(self.model).forward.__get__(self.model))

    def __call__(self, *args, **kwargs):
        model = self.model
        # The class's forward bound as the compiler traces it (torch 2.11's Dynamo skips
        # function.__get__, and no version traces types.MethodType).
        stock = functools.partial(type(model).forward, model)
        if not torch.is_grad_enabled():
            return stock(*args, **kwargs)
        at = _labels_at(stock, args)
        labels = kwargs.get("labels") if at is None else args[at]
        if labels is None:
            return stock(*args, **kwargs)
        reason = lm_head_refusal(model)
        if reason is not None:
            warnings.warn(f"torch_matgrad.fuse_lm_head_loss: {type(model).__name__} computes its own loss: {reason}",
                          stacklevel=4)
            return stock(*args, **kwargs)
        if at is not None:
            args = (*args[:at], None, *args[at + 1 :])
        else:
            del kwargs["labels"]
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        kept = []

        def keep_hidden(module, inputs):
            kept.append(inputs[0])
            return (inputs[0].narrow(-2, 0, 0),)

        # The head's hook table (empty: lm_head_refusal) is swapped for one holding
        # keep_hidden, for this call only. torch.compile traces a new table, where it
        # neither sees a hook added to the old one nor traces register_forward_pre_hook's
        # handle (a graph break that left the rest of the forward to eager).
        head = model.lm_head
        hooks, head._forward_pre_hooks = head._forward_pre_hooks, OrderedDict(keep=keep_hidden)
        try:
            out = stock(*args, return_dict=True, **kwargs)
        finally:
            head._forward_pre_hooks = hooks
        if len(kept) != 1:
            raise RuntimeError(f"torch_matgrad.fuse_lm_head_loss: {type(model).__name__}'s forward called its "
                               f"lm_head {len(kept)} times, not once; restore_lm_head_loss(model) gives its own back")
        loss = self.loss(kept[0], labels, **kwargs)
        rest = {k: v for k, v in out.items() if k != "logits"}
        return type(out)(loss=loss, **rest) if return_dict else (loss, None, *rest.values())

    def loss(self, hidden: Tensor, labels: Tensor, num_items_in_batch=None, ignore_index: int = -100,
             shift_labels: Optional[Tensor] = None, **_) -> Tensor:
        """transformers' ``ForCausalLMLoss`` of the logits ``lm_head(hidden)`` (soft-capped
        where the model caps them): the labels shifted by one (or ``shift_labels``),
        ``ignore_index`` left out, the mean, or the sum over ``num_items_in_batch``."""
        model = self.model
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        cap = CAUSAL_LMS[type(model).__module__, type(model).__name__]
        device = hidden.device.type
        # ForCausalLMLoss upcasts the half-precision logits: the op's loss is float32
        # inside autocast, whose dtype here (the hidden states') changes nothing else.
        upcast = hidden.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(device)
        with torch.autocast(device, dtype=hidden.dtype) if upcast else contextlib.nullcontext():
            loss = linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]),
                model.lm_head.weight,
                shift_labels.reshape(-1).to(hidden.device),
                model.lm_head.bias,
                ignore_index=ignore_index,
                reduction="mean" if num_items_in_batch is None else "sum",
                softcap=None if cap is None else getattr(model.config, cap),
            )
        if num_items_in_batch is None:
            return loss
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
