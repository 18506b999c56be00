"""The language-model head and its loss as one op: ``torch_matgrad.linear_cross_entropy``
and :class:`LinearCrossEntropy`.

``F.cross_entropy(F.linear(x, W, b), target)`` writes the ``(tokens, vocab)`` logits,
keeps their log-softmax for the backward, and writes two more tensors of that size in
the backward: at 4096 tokens and a 32000-word vocabulary, 0.5 GB each in fp32. This op
never forms them whole (:func:`torch_matgrad.formulas.linear_cross_entropy`): it walks
the tokens in chunks whose size bounds the working memory and turns each chunk's
``G_z = dL/dz`` (MATH.md item 12) into its share of ``grad_x``, ``grad_W`` and
``grad_b`` (items 9-11) in the forward, so the backward only scales them by the
upstream gradient. Under ``reduction="none"`` that gradient differs per row: the
forward then computes the losses alone and the backward recomputes the chunks with it.
``docs/lm_head.md`` has the measurements behind this choice.

Like :func:`torch_matgrad.linear`: explicit backward, double backward through torch ops
(one chunk), autocast by hand, ``torch.func`` and ``torch.compile`` (which gets the torch
ops' chunk loop as one custom op, run in its buffers); the backend chosen at the forward
(:mod:`torch_matgrad.dispatch`) runs the backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as _fw_ad
from torch import Tensor, nn

from . import dispatch, formulas
from .formulas import REDUCTIONS, CrossEntropyOptions
from .function import _autocast, _autocast_enabled, _check, _check_one_dtype, _describe, combined_style, direct_apply
from .modules import _check_linear, _share

_OP = "torch_matgrad.linear_cross_entropy"


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``(loss, grad_x, grad_W, grad_b, lse)`` for 2-D ``x`` and 1-D ``target``; the
    gradients are the forward's gradients of ``loss`` (None unless ``needs`` asks for
    them, and always None under ``"none"``), ``lse`` what the Triton kernels' backward
    needs (:func:`dispatch.cross_entropy_strategy`; else None), all for the backward and
    not differentiable.

    ``apply(x, weight, bias, target, options, needs, backend)``: ``backend`` is
    :func:`dispatch.chosen_backend`'s answer, kept for the backward.
    """

    @staticmethod
    def forward(x, weight, bias, target, options: CrossEntropyOptions, needs, backend: str):
        row_weight = None
        if options.reduction != "none" and any(needs):
            row_weight = formulas.reduction_weight(target, options, torch.promote_types(x.dtype, torch.float32))
        loss, *grads, lse = dispatch.cross_entropy_forward(x, weight, bias, target, options, row_weight, needs, backend)
        return (formulas.reduce_loss(loss, target, options), *grads, lse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, target, options, needs, backend = inputs
        _, *grads, lse = output
        ctx.mark_non_differentiable(*(g for g in (*grads, lse) if g is not None))
        # x, W, b and the targets cost nothing to keep (the caller holds them); the
        # backward recomputes from them under "none", under double backward, and in a
        # second backward (retain_graph). The forward's gradients are handed to the
        # first backward, which scales them in place and returns them: kept as an
        # attribute, not saved, so that nothing else holds them and autograd takes them
        # as the parameters' .grad without a copy.
        # The Triton kernels' forward returns each row's logsumexp instead (lse), for
        # their backward.
        ctx.save_for_backward(x, weight, bias, target, lse)
        ctx.stored = tuple(grads) if options.reduction != "none" and lse is None else None
        ctx.options, ctx.backend, ctx.strategy = options, backend, dispatch.current_cross_entropy_strategy()
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        x, weight, bias, target, lse = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 7
        stored, ctx.stored = ctx.stored, None
        grads = dispatch.cross_entropy_backward(
            grad_loss, stored, lse, x, weight, bias, target, ctx.options, tuple(ctx.needs_input_grad[:3]), ctx.backend,
            ctx.strategy,
        )
        return (*grads, None, None, None, None)


def _check_lce(x, weight, bias, target, options: CrossEntropyOptions) -> None:
    """Every error a user can cause, named by argument, before anything is computed
    (the range of the targets is :func:`_check_targets`'s)."""
    _check(x, weight, bias, None, op=_OP)
    if not isinstance(target, Tensor):
        raise TypeError(f"{_OP}: target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{_OP}: target must hold integer class indices, got {_describe(target)}")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"{_OP}: target must have input's shape without its last dim, {tuple(x.shape[:-1])}, "
            f"got {tuple(target.shape)} (input: {_describe(x)})"
        )
    if target.device != x.device:
        raise RuntimeError(f"{_OP}: expected all tensors on one device, got input on {x.device}, target on "
                           f"{target.device}; move the target with target.to('{x.device}')")
    if options.reduction not in REDUCTIONS:
        raise ValueError(f"{_OP}: unknown reduction {options.reduction!r}; choose one of "
                         + ", ".join(map(repr, REDUCTIONS)))
    if not 0.0 <= options.label_smoothing <= 1.0:
        raise ValueError(f"{_OP}: label_smoothing must be in [0, 1], got {options.label_smoothing}")
    if not options.z_loss >= 0.0:
        raise ValueError(f"{_OP}: z_loss must be >= 0, got {options.z_loss}")
    if options.softcap is not None and not options.softcap > 0:
        raise ValueError(f"{_OP}: softcap must be None or > 0, got {options.softcap}")
    if options.chunk_rows is not None and not (isinstance(options.chunk_rows, int) and options.chunk_rows > 0):
        raise ValueError(f"{_OP}: chunk_size must be None or a positive int, got {options.chunk_rows!r}")


def _check_dtypes(x, weight, bias) -> None:
    _check_one_dtype((("input", x), ("weight", weight), ("bias", bias)), op=_OP)


def _check_targets(target: Tensor, vocab: int, options: CrossEntropyOptions) -> None:
    """Targets in ``[0, vocab)`` or equal to ``ignore_index``. On a CPU an error naming
    the first bad one; elsewhere a device-side assert (``torch._assert_async``, as
    PyTorch's own loss kernels assert): no host synchronisation on the hot path, and a
    bad target stops the next synchronising call with this message."""
    bad = (target != options.ignore_index) & ((target < 0) | (target >= vocab))
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        if bad.any():
            where = tuple(i.item() for i in bad.nonzero()[0]) if target.dim() else ()
            raise ValueError(
                f"{_OP}: target {target[where].item()} at {where} is not a class index in [0, {vocab}) "
                f"(weight has {vocab} rows) nor ignore_index={options.ignore_index}"
            )
    elif target.device.type != "meta":
        torch._assert_async(~bad.any(), f"{_OP}: a target is outside [0, {vocab}) and not ignore_index")


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    r"""``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` without forming
    the logits: the language-model head and its loss as one op.

    Args:
        input: ``(*, hidden)``: the last hidden states.
        weight: ``(vocab, hidden)``: the head's weight (``lm_head.weight``).
        target: ``(*)``: class indices in ``[0, vocab)``, or ``ignore_index``.
        bias: ``(vocab,)`` or None.
        ignore_index: targets equal to it count for nothing (not in the mean either).
        reduction: ``"mean"`` (over the rows that count; NaN when none does), ``"sum"``
            or ``"none"`` (per row, shaped like ``target``; 0 on ignored rows).
        label_smoothing: ``eps`` in ``[0, 1]``, as ``F.cross_entropy``'s.
        z_loss: adds ``z_loss * lse^2`` per row (``lse`` the logsumexp of the logits
            the softmax sees), reduced like the loss (PaLM's auxiliary loss).
        softcap: ``c``: the softmax sees ``c * tanh(z / c)`` (Gemma 2), ``z`` the logits.
        chunk_size: tokens per chunk (default: as many as keep one chunk's logits within
            ``formulas.CHUNK_BYTES`` for the device: counted in fp32 for torch ops, in the
            input dtype for the Triton backend's fused kernel); smaller uses less memory,
            larger fewer and bigger products.

    Returns:
        The loss: 0-dim, or shaped like ``target`` under ``"none"``; in ``input``'s
        dtype (float32 under autocast, as ``F.cross_entropy`` there).

    Inside ``torch.autocast`` the products run in the autocast dtype and the loss in
    float32, as the eager head and loss do. A target outside ``[0, vocab)`` other than
    ``ignore_index`` is a ``ValueError`` on a CPU and a device-side assert elsewhere.
    """
    options = CrossEntropyOptions(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size)
    _check_lce(input, weight, bias, target, options)
    out_dtype = input.dtype
    device_type = input.device.type
    if torch._C._is_any_autocast_enabled() and _autocast_enabled(device_type):
        # As torch_matgrad.linear: cast here, run with autocast off (pytorch#132388).
        # Autocast runs cross_entropy in float32: so does the loss here.
        dtype = torch.get_autocast_dtype(device_type)
        input, weight, bias = (_autocast(t, dtype) for t in (input, weight, bias))
        out_dtype = torch.float32 if input.dtype != torch.float64 else input.dtype
        _check_dtypes(input, weight, bias)
        with torch.autocast(device_type, enabled=False):
            return _apply(input, weight, bias, target, options).to(out_dtype)
    _check_dtypes(input, weight, bias)
    return _apply(input, weight, bias, target, options).to(out_dtype)


def _apply(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, options: CrossEntropyOptions) -> Tensor:
    transformed = torch._C._are_functorch_transforms_active() or _fw_ad._current_level >= 0
    if not transformed:  # under vmap the targets may be batched: gather checks its indices
        _check_targets(target, weight.shape[0], options)
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    t2 = target.reshape(-1).long()
    backend = dispatch.cross_entropy_backend(x2, weight, bias)
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (x, weight, bias))
    if transformed or not any(needs):
        # torch.func transforms differentiate the chunked torch ops themselves (as they
        # do F.cross_entropy: each chunk's logits are then kept); without a gradient
        # to compute, the chunks give the losses alone.
        loss = formulas.reduce_loss(dispatch.cross_entropy_forward(
            x2, weight, bias, t2, options, None, (False,) * 3, backend)[0], t2, options)
    else:
        apply = LinearCrossEntropyFunction.apply if torch.compiler.is_compiling() else _eager_apply
        loss = apply(x2, weight, bias, t2, options, needs, backend)[0]
    return loss.view(target.shape) if options.reduction == "none" else loss


# Outside torch.compile (and transforms, which take the torch ops above): no per-call
# signature binding (function.combined_style).
_eager_apply = direct_apply(combined_style(LinearCrossEntropyFunction))


class LinearCrossEntropy(nn.Module):
    r"""A language-model head that returns its loss: ``forward(input, target)`` is
    :func:`torch_matgrad.linear_cross_entropy` on the head's ``weight`` and ``bias``,
    never forming the ``(tokens, vocab)`` logits.

    The parameters, their initialisation and the ``state_dict`` keys (``weight``,
    ``bias``) are ``nn.Linear``'s, so checkpoints move between the ``nn.Linear`` head and
    this module in both directions; the constructor is ``nn.Linear``'s plus the loss's
    options. Not a subclass of ``nn.Linear``: its ``forward`` takes the targets and
    returns a loss, which no tool that handles linear layers expects. :meth:`logits`
    gives the head's output for generation.

    Args:
        in_features: the hidden size.
        out_features: the vocabulary size.
        bias: if ``False``, the head learns no bias. Default: ``True`` (``nn.Linear``'s;
            language-model heads usually pass ``False``).
        ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size: as
            :func:`torch_matgrad.linear_cross_entropy`.

    Shape:
        - Input: ``(*, in_features)``; target: ``(*)``; output: ``()``, or ``(*)``
          under ``reduction="none"``.

    Examples::

        >>> head = torch_matgrad.LinearCrossEntropy(64, 1000, bias=False)
        >>> head(torch.randn(2, 8, 64), torch.randint(0, 1000, (2, 8))).shape
        torch.Size([])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        chunk_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.options = CrossEntropyOptions(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size)
        # nn.Linear's own Parameters and initialisation: the same numbers from one seed.
        _share(self, nn.Linear(in_features, out_features, bias, device, dtype))

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation, by ``nn.Linear``'s own code."""
        nn.Linear.reset_parameters(self)  # type: ignore[arg-type]

    @classmethod
    def from_linear(cls, linear_module: nn.Linear, **options) -> "LinearCrossEntropy":
        """The loss on ``linear_module``'s Parameter objects (no copy: tied embeddings,
        optimizer state and hooks stay valid); ``options`` as the constructor's."""
        _check_linear(linear_module, "torch_matgrad.LinearCrossEntropy.from_linear")
        new = cls(linear_module.in_features, linear_module.out_features, bias=linear_module.bias is not None,
                  device="meta", **options)
        return _share(new, linear_module)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        o = self.options
        return linear_cross_entropy(
            input, self.weight, target, self.bias, ignore_index=o.ignore_index, reduction=o.reduction,
            label_smoothing=o.label_smoothing, z_loss=o.z_loss, softcap=o.softcap, chunk_size=o.chunk_rows,
        )

    def logits(self, input: Tensor) -> Tensor:
        """The head's output ``input W^T + b`` (for generation), soft-capped if set."""
        return formulas.softcapped(formulas.preactivation(input, self.weight, self.bias), self.options.softcap)

    def extra_repr(self) -> str:
        changed = {k: v for k, v in self.options._asdict().items() if v != CrossEntropyOptions._field_defaults[k]}
        text = ", ".join(f"{'chunk_size' if k == 'chunk_rows' else k}={v!r}" for k, v in changed.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                + (f", {text}" if text else ""))
