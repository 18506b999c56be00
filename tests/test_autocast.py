"""Under torch.autocast the op matches F.linear: output dtype, gradient dtypes, values."""

import pytest
import torch
import torch.nn.functional as F

import torch_matgrad as tm
from _backends import DEVICES, backend  # noqa: F401  (fixture)
from _util import assert_rel_close, reference

LOW = [torch.bfloat16, torch.float16]


def _leaves(device, bias, x_dtype=torch.float32):
    x = torch.randn(33, 7, device=device).t().to(x_dtype)  # 7 rows, transposed view
    w = torch.randn(5, 33, device=device)
    b = torch.randn(5, device=device) if bias else None
    return [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("activation", tm.ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
def test_autocast_matches_f_linear(backend, device, dtype, activation, bias, x_dtype):
    ours = _leaves(device, bias, x_dtype)
    theirs = [t.detach().clone().requires_grad_() if t is not None else None for t in ours]
    with torch.autocast(device, dtype=dtype):
        out = tm.linear(*ours, activation=activation)
        ref = reference(*theirs, activation)
    assert out.dtype == ref.dtype == dtype
    cot = torch.randn(ref.shape, device=device, dtype=dtype)
    out.backward(cot)
    ref.backward(cot)
    for name, a, r in zip(("x", "weight", "bias"), ours, theirs):
        if a is None:
            continue
        # Gradients come back in each leaf's own dtype, as through autocast's casts.
        assert a.grad.dtype == r.grad.dtype == a.dtype, name
        assert_rel_close(a.grad, r.grad, dtype, what=f"grad {name}")
    assert_rel_close(out, ref, dtype, what="output")


@pytest.mark.parametrize("device", DEVICES)
def test_module_under_autocast_keeps_fp32_parameters_and_grads(backend, device):
    model = torch.nn.Sequential(tm.Linear(33, 17, activation="gelu", device=device), tm.Linear(17, 5, device=device))
    ref = torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.GELU(), torch.nn.Linear(17, 5)).to(device)
    ref[0].load_state_dict(model[0].state_dict())
    ref[2].load_state_dict(model[1].state_dict())
    x = torch.randn(3, 7, 33, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, want = model(x), ref(x)
    assert out.dtype == want.dtype == torch.bfloat16
    out.float().square().mean().backward()
    want.float().square().mean().backward()
    for p, q in zip(model.parameters(), [ref[0].weight, ref[0].bias, ref[2].weight, ref[2].bias]):
        assert p.dtype == p.grad.dtype == torch.float32
        assert_rel_close(p.grad, q.grad, torch.bfloat16, what="parameter gradient")


def test_autocast_disabled_inside_is_full_precision(backend):
    x, w, b = _leaves("cpu", True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            out = tm.linear(x, w, b, "relu")
    assert out.dtype == torch.float32
    assert_rel_close(out, F.relu(F.linear(x.double(), w.double(), b.double())), torch.float32)


def test_float64_input_under_autocast_is_a_clear_error():
    # Autocast leaves float64 alone and casts the float32 weight, as for F.linear, which
    # then fails on the mismatch; ours says which tensor has which dtype.
    x, w, b = _leaves("cpu", True, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="input torch.float64, weight torch.bfloat16"):
            tm.linear(x, w, b)
