"""torch.func through the op: grad, vmap (shared and per-sample weights), jacrev and
per-sample gradients ``vmap(grad(...))``, and forward mode (jvp, jacfwd, hessian,
``torch.autograd.forward_ad``), on every backend.

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
@pytest.mark.parametrize("transform", [jacrev, jacfwd], ids=["jacrev", "jacfwd"])
def test_jacrev_and_jacfwd_match_autograd_jacobian_of_reference(backend, device, activation, transform):
    """jacrev runs the backward (vmap over vjp), jacfwd the forward-mode rule (vmap over jvp)."""
    w, b = _params(device, n_out=4, n_in=6)
    x = torch.randn(3, 6, dtype=torch.float64, device=device)
    got = transform(tm.linear, argnums=(0, 1, 2))(*_f32(x, w, b), activation)
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


# ------------------------------------------------------------------- forward mode
# The jvp of MATH.md's forward-mode line, dz = dx W^T + x dW^T + db and
# d out = act'(z) * dz (items 1, 3), against torch.func of the float64 reference.

# (x shape, out_features): ragged rows, leading dims, a single sample, an empty batch.
JVP_SHAPES = [((7, 33), 5), ((2, 3, 9), 4), ((9,), 3), ((0, 6), 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("x_shape,n", JVP_SHAPES, ids=str)
@pytest.mark.parametrize("moving", ["xwb", "x", "w", "b", "wb"])
def test_jvp_matches_f_linear(backend, device, activation, x_shape, n, moving):
    x = torch.randn(x_shape, dtype=torch.float64, device=device)
    w, b = _params(device, n_out=n, n_in=x_shape[-1])
    tangents = [torch.randn_like(t) for t in (x, w, b)]

    def jvp(fn, dtype):
        # Only the inputs named in ``moving`` get a tangent; the others are constants.
        primals = dict(zip("xwb", (t.to(dtype) for t in (x, w, b))))

        def f(*moved):
            args = dict(primals, **dict(zip(moving, moved)))
            return fn(args["x"], args["w"], args["b"], activation)

        picked = [i for i, k in enumerate("xwb") if k in moving]
        return torch.func.jvp(f, tuple(primals["xwb"[i]] for i in picked), tuple(tangents[i].to(dtype) for i in picked))

    # float64 on both sides (every backend runs it): a float32 output of GELU/SiLU in
    # their flat negative tail is too ill-conditioned for REL_TOL[float32] on 3 values.
    got_out, got_t = jvp(tm.linear, torch.float64)
    want_out, want_t = jvp(reference, torch.float64)
    assert_rel_close(got_out, want_out, torch.float64, what="primal output")
    assert_rel_close(got_t, want_t, torch.float64, what=f"tangent along d{moving}")


def test_jvp_runs_the_rule_in_formulas(monkeypatch):
    calls = []
    real = tm.formulas.jvp
    monkeypatch.setattr(tm.formulas, "jvp", lambda *a: calls.append(a[3]) or real(*a))
    w, b = _params("cpu")
    torch.func.jvp(lambda x: tm.linear(x, w, b, "silu"), (torch.randn(3, 33, dtype=torch.float64),),
                   (torch.randn(3, 33, dtype=torch.float64),))
    assert calls == ["silu"]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("wrt", [0, 1, 2], ids=["x", "w", "b"])
def test_hessian_matches_reference(backend, activation, wrt):
    """hessian = jacfwd(jacrev(f)): forward mode over the explicit backward."""
    w, b = _params("cpu", n_out=4, n_in=5)
    x = torch.randn(3, 5, dtype=torch.float64)

    def loss(fn):
        return lambda *a: fn(*a, activation).sin().sum()  # a curved loss: nonzero second derivatives

    got = torch.func.hessian(loss(tm.linear), argnums=wrt)(x, w, b)
    want = torch.func.hessian(loss(reference), argnums=wrt)(x, w, b)
    assert_rel_close(got, want, torch.float64, what="Hessian")


@pytest.mark.parametrize("activation", ACTS)
def test_jacfwd_with_per_sample_weights(activation):
    w, b = _params("cpu", lead=(3,))
    x = torch.randn(3, 4, 33, dtype=torch.float64)
    per_sample = vmap(jacfwd(lambda x, w, b: tm.linear(x, w, b, activation), argnums=1))
    want = [jacobian(lambda w: reference(x[i], w, b[i], activation), w[i]) for i in range(3)]
    got = per_sample(*_f32(x, w, b))
    for i in range(3):
        assert_rel_close(got[i], want[i], DTYPE, what=f"sample {i}")


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("activation", ACTS)
def test_dual_tensors_match_f_linear(grad_mode, activation):
    # torch.autograd.forward_ad outside functorch, with or without grad mode: the
    # inference fast path (no Function) must not run and drop the tangents.
    import torch.autograd.forward_ad as fwAD

    w, b = _params("cpu", n_out=4, n_in=6)
    x, dx = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    dw = torch.randn_like(w)
    results = []
    for fn in (tm.linear, reference):
        with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
            out = fn(fwAD.make_dual(x, dx), fwAD.make_dual(w, dw), b, activation)
            results.append(fwAD.unpack_dual(out))
    (got, got_t), (want, want_t) = results
    assert got_t is not None, "the tangent was dropped"
    assert_rel_close(got, want, torch.float64, what="primal")
    assert_rel_close(got_t, want_t, torch.float64, what="tangent")


def test_forward_mode_keeps_nothing_alive_without_it(monkeypatch):
    """The jvp's tensors (x, W, act'(z)'s input) are saved only under forward-mode AD:
    a backward-only graph with a frozen weight still does not keep x."""
    import torch.autograd.forward_ad as fwAD

    saved = []
    real = torch.autograd.function.FunctionCtx.save_for_forward
    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_forward",
                        lambda ctx, *ts: saved.append(len(ts)) or real(ctx, *ts))
    x, w = torch.randn(3, 6), torch.randn(4, 6, requires_grad=True)
    tm.linear(x, w, None, "gelu").sum().backward()
    assert saved == []
    with fwAD.dual_level():
        out = tm.linear(fwAD.make_dual(x, torch.randn_like(x)), w, None, "gelu")
        assert fwAD.unpack_dual(out).tangent is not None
    assert saved == [3]
