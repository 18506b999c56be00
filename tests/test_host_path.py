"""The host path: without a gradient to compute the op skips the autograd Function,
the training path skips per-call signature binding, and the quick validity test plus
F.linear's own refusals give every bad input the full checks' error."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
import torch.nn.functional as F

import torch_matgrad as mg
from torch_matgrad import function

from _util import activate_ref


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
@pytest.mark.parametrize("activation", mg.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 64), (7, 33), (2, 3, 33), (0, 33), (33,)])
def test_no_gradient_skips_the_function_and_matches_bit_for_bit(mode, activation, shape, monkeypatch):
    layer = mg.Linear(33 if shape[-1] == 33 else 64, 17, activation=activation)
    x = torch.randn(*shape)
    if mode == "nothing_requires_grad":
        layer.requires_grad_(False)
    with torch.no_grad():
        want = activate_ref(F.linear(x, layer.weight, layer.bias), activation)
    with_grad = layer(x)  # the Function path when the parameters require grad
    for cls in (function.EagerLinearFunction, function.LinearFunction):
        monkeypatch.setattr(cls, "apply", None)  # any use now raises TypeError
    monkeypatch.setattr(function, "_eager_linear", None)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    with context():
        got = layer(x)
    assert got.grad_fn is None and not got.requires_grad
    assert torch.equal(got, want) and torch.equal(got, with_grad.detach())


@pytest.mark.parametrize("op", ["linear", "mlp", "linear_cross_entropy"])
def test_training_path_binds_no_signature(monkeypatch, op):
    calls = []
    real = inspect.signature
    layer = {
        "linear": lambda: mg.Linear(8, 4, activation="silu"),
        "mlp": lambda: mg.FusedMLP(8, 16, activation="silu", gated=True),
        "linear_cross_entropy": lambda: mg.LinearCrossEntropy(8, 5),
    }[op]()
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(a) or real(*a, **k))
    x = torch.randn(3, 8, requires_grad=True)
    out = layer(x, torch.tensor([0, 4, 2])) if op == "linear_cross_entropy" else layer(x)
    out.sum().backward()
    assert calls == [] and x.grad is not None and all(p.grad is not None for p in layer.parameters())


def _tensors():
    """Inputs, weights and biases: good ones and every kind of bad one."""
    xs = [torch.randn(3, 4), torch.randn(2, 3, 4), torch.randn(4), torch.randn(3, 5), torch.tensor(1.0),
          torch.randn(3, 4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.int64), torch.randn(3, 4, device="meta"),
          [[1.0] * 4], torch.randn(3, 4, dtype=torch.complex64)]
    ws = [torch.randn(6, 4), torch.nn.Parameter(torch.randn(6, 4)), torch.randn(6, 4, dtype=torch.float64),
          torch.ones(6, 4, dtype=torch.bool), torch.randn(6, 4)[:, ::2], torch.randn(4, 6).t(),
          torch.randn(4), torch.randn(2, 6, 4), torch.randn(6, 4).numpy(), torch.randn(6, 4, device="meta")]
    bs = [None, torch.randn(6), torch.randn(1), torch.randn(1, 6), torch.randn(6, dtype=torch.bfloat16), 1.0,
          torch.randn(6, device="meta"), torch.ones(6, dtype=torch.int64), torch.randn(7)]
    acts = [None, "gelu", "GELU", 1]
    return list(itertools.product(xs, ws, bs, acts))


def _full_check_error(x, w, b, act):
    try:
        function._check(x, w, b, act)
        function._check_dtypes(x, w, b)
    except (TypeError, ValueError, RuntimeError) as e:
        return e
    return None


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_every_bad_input_gets_the_full_checks_error(grad):
    # The quick test leaves shapes, devices and mixed dtypes to F.linear; the op must
    # still raise exactly the full checks' error for each, and run every good input.
    for x, w, b, act in _tensors():
        if grad and isinstance(w, torch.Tensor) and w.is_floating_point():
            w = w.detach().requires_grad_()
        want = _full_check_error(x, w, b, act)
        if want is None:
            out = mg.linear(x, w, b, act)
            assert out.shape[-1] == w.shape[0]
            continue
        with pytest.raises(type(want)) as got:
            mg.linear(x, w, b, act)
        assert str(got.value) == str(want), (x, w, b, act)
