"""torch.func through the op: grad, vmap (shared and per-sample weights), jacrev and
per-sample gradients ``vmap(grad(...))``, on every backend.

jacrev is compared with ``torch.autograd.functional.jacobian`` of the pure
``torch.nn.functional`` reference; the comparison with the notes' explicit Kronecker
Jacobians (MATH.md items 5-8) lives with ``torch_matgrad.jacobian`` and its tests.
"""

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.func import grad, jacfwd, jacrev, vmap

import torch_matgrad as tm
from _backends import DEVICES, backend  # noqa: F401  (fixture)
from _util import assert_rel_close, reference

ACTS = list(tm.ACTIVATIONS)
DTYPE = torch.float32  # compared with float64 references at REL_TOL[float32]


def _params(device, n_out=5, n_in=33, bias=True, lead=()):
    w = torch.randn(*lead, n_out, n_in, dtype=torch.float64)
    b = torch.randn(*lead, n_out, dtype=torch.float64) if bias else None
    return w.to(device), (None if b is None else b.to(device))


def _f32(*ts):
    return [None if t is None else t.to(DTYPE) for t in ts]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_grad(backend, device, activation, bias):
    w, b = _params(device, bias=bias)
    x = torch.randn(33, 7, dtype=torch.float64, device=device).t()  # transposed view, 7 rows
    cot = torch.randn(7, 5, dtype=torch.float64, device=device)

    def loss(fn, x, w, b):
        return (fn(x, w, b, activation) * cot.to(x.dtype)).sum()

    argnums = (0, 1, 2) if bias else (0, 1)
    got = grad(lambda *a: loss(tm.linear, *a), argnums=argnums)(*_f32(x, w, b))
    want = torch.autograd.grad(
        loss(reference, *(t.requires_grad_() if t is not None else t for t in (x, w, b))),
        [x, w] + ([b] if bias else []),
    )
    for name, g, r in zip("xwb", got, want):
        assert g.dtype == DTYPE
        assert_rel_close(g, r, DTYPE, what=f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTS)
def test_vmap_shared_weights(backend, device, activation):
    w, b = _params(device)
    x = torch.randn(4, 3, 7, 33, dtype=torch.float64, device=device)  # vmapped dim 1, leading dims
    got = vmap(tm.linear, in_dims=(1, None, None, None))(*_f32(x, w, b), activation)
    want = reference(x.movedim(1, 0), w, b, activation)
    assert_rel_close(got, want, DTYPE, what="vmap over x")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_vmap_per_sample_weights(backend, device, activation, bias):
    w, b = _params(device, bias=bias, lead=(3,))
    x = torch.randn(3, 7, 33, dtype=torch.float64, device=device)
    in_dims = (0, 0, 0 if bias else None, None)
    got = vmap(tm.linear, in_dims=in_dims)(*_f32(x, w, b), activation)
    want = torch.stack([reference(x[i], w[i], None if b is None else b[i], activation) for i in range(3)])
    assert_rel_close(got, want, DTYPE, what="vmap over x, W, b")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTS)
def test_jacrev_matches_autograd_jacobian_of_reference(backend, device, activation):
    w, b = _params(device, n_out=4, n_in=6)
    x = torch.randn(3, 6, dtype=torch.float64, device=device)
    got = jacrev(tm.linear, argnums=(0, 1, 2))(*_f32(x, w, b), activation)
    want = jacobian(lambda x, w, b: reference(x, w, b, activation), (x, w, b))
    for name, g, r in zip("xwb", got, want):
        assert_rel_close(g, r, DTYPE, what=f"d out / d {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTS)
def test_per_sample_gradients(backend, device, activation):
    """The usual recipe (torch.func docs): vmap(grad(loss of one sample))."""
    model = tm.Linear(33, 5, activation=activation, device=device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(6, 7, 33, device=device)  # 6 samples of 7 rows each
    y = torch.randn(6, 7, 5, device=device)

    def sample_loss(params, x, y):
        out = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.mse_loss(out, y)

    got = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(6):
        p64 = {k: v.double().requires_grad_() for k, v in params.items()}
        out = reference(x[i].double(), p64["weight"], p64["bias"], activation)
        want = torch.autograd.grad(torch.nn.functional.mse_loss(out, y[i].double()), list(p64.values()))
        for (name, g), r in zip(got.items(), want):
            assert_rel_close(g[i], r, DTYPE, what=f"sample {i} {name}")


def test_second_order_through_grad_of_grad(backend):
    w, b = _params("cpu", n_out=4, n_in=6)
    x = torch.randn(3, 6, dtype=torch.float64)

    def f(fn):
        return lambda x: fn(x, w, b, "silu").square().sum()

    hvp_dir = torch.randn_like(x)
    got = grad(lambda x: (grad(f(tm.linear))(x) * hvp_dir).sum())(x)
    want = torch.autograd.functional.hvp(f(reference), x, hvp_dir)[1]
    assert_rel_close(got, want, torch.float64, what="Hessian-vector product")


def test_forward_mode_gives_a_clear_error():
    # The Function has no jvp (the notes give reverse mode only): jacfwd must refuse
    # loudly rather than return something wrong.
    w = torch.randn(4, 6)
    with pytest.raises(NotImplementedError, match="jvp"):
        jacfwd(lambda x: tm.linear(x, w))(torch.randn(3, 6))


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_dual_tensors_give_the_same_clear_error(grad_mode):
    # torch.autograd.forward_ad outside functorch, with or without grad mode: the
    # inference fast path (no Function) must not run and drop or fake the tangents.
    import torch.autograd.forward_ad as fwAD

    w = torch.randn(4, 6)
    with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
        x = fwAD.make_dual(torch.randn(3, 6), torch.randn(3, 6))
        with pytest.raises(NotImplementedError, match="jvp"):
            tm.linear(x, w)
