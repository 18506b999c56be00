"""The LoRA map as one op (``torch_matgrad.lora_linear``): the explicit backward (float64
gradcheck and gradgradcheck, dropout included), PEFT's own ``lora.Linear`` reproduced,
what is saved (no copy of drop(x), a one-byte mask, nothing for a frozen W), autocast,
torch.compile, torch.func, both backends, and the errors."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jacfwd, jacrev, vmap

import torch_matgrad as mg
from torch_matgrad import lora
from torch_matgrad.mlp import saved_bytes

from _backends import DEVICES, backend  # noqa: F401  (fixture)
from _util import REL_TOL, activate_ref, assert_rel_close, float32_matmul_precision, rel_err
from test_surgery import _MatmulShapes

ACTS = list(mg.ACTIVATIONS)
SEED = 1234  # reseeded before each evaluation that must draw the same dropout mask


def reference(x, weight, bias, lora_A, lora_B, scaling, dropout=0.0, activation=None):
    """PEFT's ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` in ``torch.nn.functional``,
    then the activation."""
    delta = F.linear(F.linear(F.dropout(x, dropout), lora_A), lora_B) * scaling
    return activate_ref(F.linear(x, weight, bias) + delta, activation)


def _params(d_in, d_out, rank, bias=True, dtype=torch.float64, frozen=()):
    """``{weight, bias, lora_A, lora_B}``, those not in ``frozen`` requiring grad."""
    shapes = dict(weight=(d_out, d_in), bias=(d_out,), lora_A=(rank, d_in), lora_B=(d_out, rank))
    return {name: (torch.randn(*s, dtype=dtype) / s[-1] ** 0.5).requires_grad_(name not in frozen)
            for name, s in shapes.items() if bias or name != "bias"}


def _call(fn, x, p, scaling, dropout=0.0, activation=None, seed=SEED):
    if seed is not None:
        torch.manual_seed(seed)  # the same mask for the op and the reference
    return fn(x, p["weight"], p.get("bias"), p["lora_A"], p["lora_B"], scaling, dropout=dropout,
              activation=activation)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTS)
def test_gradcheck_and_gradgradcheck(activation, bias, dropout):
    # Every evaluation reseeds, so the finite differences see one mask: the one the
    # analytic backward uses. That it is F.dropout's mask: test_matches_peft.
    p = _params(5, 4, 3, bias)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)  # leading dims
    names = list(p)

    def fn(x, *ts):
        return _call(mg.lora_linear, x, dict(zip(names, ts)), 0.7, dropout, activation)

    assert torch.autograd.gradcheck(fn, (x, *p.values()))
    assert torch.autograd.gradgradcheck(fn, (x, *p.values()))


def _peft_layer(d_in, d_out, rank, dropout, dtype):
    """PEFT's ``lora.Linear`` on an ``nn.Linear`` (frozen by PEFT), random ``A`` and ``B``."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=rank, lora_alpha=3, lora_dropout=dropout, target_modules=["0"],
                             init_lora_weights=False)
    layer = peft.get_peft_model(nn.Sequential(nn.Linear(d_in, d_out)), config).base_model.model[0]
    assert isinstance(layer, peft.tuners.lora.Linear) and not layer.base_layer.weight.requires_grad
    return layer.to(dtype).train()


def _peft_params(layer):
    return dict(weight=layer.base_layer.weight, bias=layer.base_layer.bias,
                lora_A=layer.lora_A["default"].weight, lora_B=layer.lora_B["default"].weight)


X_SHAPES = {"1": (1, 33), "7": (7, 33), "33": (33, 33), "2x3": (2, 3, 33), "empty": (0, 33), "transposed": None}


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("x_kind", list(X_SHAPES))
def test_matches_peft(x_kind, dtype, dropout):
    """Forward and gradients of PEFT's layer, within the distance of PEFT in ``dtype``
    from PEFT in float64 (the same mask: on the CPU both draw F.dropout's)."""
    ref = _peft_layer(33, 17, 4, dropout, torch.float64)
    layer = copy.deepcopy(ref).to(dtype)
    x64 = torch.randn(33, 7, dtype=torch.float64).t() if x_kind == "transposed" else torch.randn(
        X_SHAPES[x_kind], dtype=torch.float64)
    g64 = torch.randn(*x64.shape[:-1], 17, dtype=torch.float64)
    results = {}
    for name, fn, module in (("ours", mg.lora_linear, layer), ("peft", None, layer), ("peft64", None, ref)):
        x = (x64 if module is ref else x64.to(dtype)).detach().requires_grad_()
        p = _peft_params(module)
        torch.manual_seed(SEED)
        out = module(x) if fn is None else fn(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"],
                                              module.scaling["default"], dropout=dropout)
        inputs = [x, p["lora_A"], p["lora_B"]]
        results[name] = [out, *torch.autograd.grad(out, inputs, g64.to(out.dtype))]
        assert p["weight"].grad is None
    for what, ours, peft, peft64 in zip(["out", "x", "lora_A", "lora_B"], *results.values()):
        assert ours.dtype == dtype and ours.shape == peft64.shape
        tol = max(REL_TOL[dtype], 2 * rel_err(peft, peft64))
        assert rel_err(ours, peft64) <= tol, f"{what}: {rel_err(ours, peft64):.2e} > {tol:.2e}"


def test_dropout_is_f_dropouts_and_off_draws_nothing():
    p = _params(8, 6, 2)
    x = torch.randn(5, 8, dtype=torch.float64)
    for dropout in (0.5, 1.0):
        want = _call(reference, x, p, 1.5, dropout)
        assert torch.allclose(_call(mg.lora_linear, x, p, 1.5, dropout), want, rtol=1e-12, atol=1e-12)
    # All dropped (p = 1): the base map alone. Off (p = 0, or training=False): no draw.
    assert torch.allclose(mg.lora_linear(x, *p.values(), 1.5, dropout=1.0), F.linear(x, p["weight"], p["bias"]))
    plain = mg.lora_linear(x, *p.values(), 1.5)
    state = torch.get_rng_state()
    assert torch.equal(mg.lora_linear(x, *p.values(), 1.5, dropout=0.5, training=False), plain)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(mg.lora_linear(x, *p.values(), 1.5, dropout=0.5), plain)


@pytest.mark.parametrize(
    "frozen, dropout, activation, expected",
    [
        # PEFT's case: W and b frozen; the mask and t are LoRA's, z is gelu's.
        ({"weight", "bias"}, 0.25, "gelu", {"input", "weight", "lora_A", "lora_B", "t", "mask", "z"}),
        ({"weight", "bias", "input"}, 0.25, None, {"input", "lora_B", "t", "mask"}),  # no grad_x: no W, no A
        ({"weight", "bias", "input"}, 0.0, "relu", {"input", "lora_B", "t", "out"}),  # no dropout: no mask
        ({"input", "lora_A", "lora_B"}, 0.25, "silu", {"input", "z"}),  # only W: x for grad_W = G_z^T x
        ({"input", "weight", "bias", "lora_A"}, 0.25, None, {"t"}),  # only B: t for grad_B = s G_z^T t
    ],
)
def test_saves_only_what_backward_needs(frozen, dropout, activation, expected):
    p = _params(16, 12, 4, frozen=frozen)
    x = torch.randn(10, 16, dtype=torch.float64, requires_grad="input" not in frozen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _call(mg.lora_linear, x, p, 0.5, dropout, activation)
    names = {id(t): n for n, t in (("input", x), *p.items())}
    z = _call(reference, x.detach(), {k: v.detach() for k, v in p.items()}, 0.5, dropout)

    def name(t):
        if id(t) in names:
            return names[id(t)]
        if t.dtype == torch.bool and t.shape == x.shape:
            return "mask"
        if t.shape == (10, 4):
            return "t"
        if activation == "relu" and torch.equal(t, out.detach()):
            return "out"
        if t.shape == z.shape and torch.allclose(t, z, rtol=1e-12, atol=1e-12):
            return "z"
        return f"unexpected {t.dtype} {tuple(t.shape)}"

    assert sorted(name(t) for t in saved) == sorted(expected)
    # A frozen W gets no gradient and no grad_W product (the only (12, 16) results are W's).
    with _MatmulShapes() as ran:
        out.backward(torch.randn_like(out))
    assert ((12, 16) in ran.shapes) == ("weight" not in frozen)
    assert (p["weight"].grad is None) == ("weight" in frozen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saved_bytes_per_row_and_less_than_peft(dtype):
    # PEFT's case (W frozen, p > 0, x requiring grad): x, the one-byte mask and t; PEFT
    # saves the dropped copy of x (and its own mask) instead.
    layer = _peft_layer(64, 48, 8, 0.1, dtype)
    p = _peft_params(layer)
    x = torch.randn(4, 32, 64, dtype=dtype, requires_grad=True)
    params = list(p.values())
    _, ours = saved_bytes(lambda: mg.lora_linear(x, *params, layer.scaling["default"], dropout=0.1), params=params)
    _, peft = saved_bytes(layer, x, params=params)
    assert ours == 4 * 32 * (64 * dtype.itemsize + 64 + 8 * dtype.itemsize), ours
    assert ours < peft, (ours, peft)


def test_inputs_not_modified_and_non_contiguous_views():
    p = _params(16, 8, 4, dtype=torch.float32)
    x = torch.randn(16, 10).t().requires_grad_()  # transposed view
    tensors = (x, *p.values())
    copies, versions = [t.detach().clone() for t in tensors], [t._version for t in tensors]
    out = _call(mg.lora_linear, x, p, 2.0, 0.2, "silu")
    assert_rel_close(out, _call(reference, x, p, 2.0, 0.2, "silu"), torch.float32)
    out.sum().backward()
    assert [t._version for t in tensors] == versions
    assert all(torch.equal(t.detach(), c) for t, c in zip(tensors, copies))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_recomputes_the_same_mask(reentrant):
    # PEFT training often checkpoints: the recomputed forward must draw the first one's
    # mask (checkpoint restores the RNG state) and save what the first one saved.
    p = _params(8, 6, 3, frozen={"weight", "bias"})
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    inputs = [x, p["lora_A"], p["lora_B"]]
    results = []
    for run in (lambda x: torch.utils.checkpoint.checkpoint(lambda x: _call(mg.lora_linear, x, p, 0.5, 0.4, "gelu", None),
                                                            x, use_reentrant=reentrant),
                lambda x: _call(mg.lora_linear, x, p, 0.5, 0.4, "gelu", None)):
        torch.manual_seed(SEED)
        out = run(x)
        out.backward(torch.ones_like(out))
        results.append([out.detach()] + [t.grad.clone() for t in inputs])
        for t in inputs:
            t.grad = None
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_autocast_behaves_like_peft():
    layer = _peft_layer(16, 8, 4, 0.0, torch.float32)
    p = _peft_params(layer)
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mg.lora_linear(x, *p.values(), layer.scaling["default"], activation="gelu")
        want = F.gelu(layer(x))
    assert out.dtype == want.dtype == torch.bfloat16
    assert_rel_close(out, want, torch.bfloat16)
    out.float().sum().backward()
    assert x.grad.dtype == p["lora_A"].grad.dtype == p["lora_B"].grad.dtype == torch.float32


def test_compile_fullgraph_matches_eager_and_saves_no_more():
    # One small compile (CI has 2 cores). Inductor's fallback_random draws the mask
    # with eager's RNG, so the compiled op and the eager one see the same mask.
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    p = _params(32, 24, 4, dtype=torch.float32, frozen={"weight", "bias"})
    x = torch.randn(3, 5, 32, requires_grad=True)
    params = list(p.values())

    def fn(x):
        return _call(mg.lora_linear, x, p, 2.0, 0.25, "gelu", seed=None)  # Dynamo traces no manual_seed

    torch.manual_seed(SEED)
    with inductor_config.patch(fallback_random=True):
        got, got_bytes = saved_bytes(torch.compile(fn, fullgraph=True), x, params=params)
    torch.manual_seed(SEED)
    want, want_bytes = saved_bytes(fn, x, params=params)
    assert_rel_close(got, want, torch.float32)
    assert got_bytes <= want_bytes, (got_bytes, want_bytes)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, [x, *params[2:]], g), torch.autograd.grad(want, [x, *params[2:]], g)):
        assert_rel_close(a, b, torch.float32)
    torch._dynamo.reset()


def test_torch_func_grad_vmap_jacrev_jacfwd():
    p = {k: v.detach() for k, v in _params(6, 5, 3).items()}
    x = torch.randn(4, 6, dtype=torch.float64)

    def fn(op):
        return lambda lora_A, lora_B, x: op(x, p["weight"], p["bias"], lora_A, lora_B, 0.5, activation="silu")

    def loss(op):
        return lambda *ts: fn(op)(*ts).square().sum()

    ours, ref = mg.lora_linear, reference
    args = (p["lora_A"], p["lora_B"], x)
    for a, b in zip(grad(loss(ours), argnums=(0, 1))(*args), grad(loss(ref), argnums=(0, 1))(*args)):
        assert_rel_close(a, b, torch.float64, what="grad")
    # Per-sample gradients: vmap over the rows of x, the adapters shared.
    per_sample = vmap(grad(loss(ours), argnums=(0, 1)), in_dims=(None, None, 0))(*args[:2], x[:, None])
    for i in range(4):
        for a, b in zip(per_sample, grad(loss(ref), argnums=(0, 1))(*args[:2], x[i : i + 1])):
            assert_rel_close(a[i], b, torch.float64, what="per-sample grad")
    # Per-sample adapters: vmap over A and B.
    many = (torch.randn(3, 3, 6, dtype=torch.float64), torch.randn(3, 5, 3, dtype=torch.float64))
    assert_rel_close(vmap(fn(ours), in_dims=(0, 0, None))(*many, x),
                     torch.stack([fn(ref)(many[0][i], many[1][i], x) for i in range(3)]), torch.float64)
    for transform in (jacrev, jacfwd):
        for a, b in zip(transform(fn(ours), argnums=(0, 1, 2))(*args), transform(fn(ref), argnums=(0, 1, 2))(*args)):
            assert_rel_close(a, b, torch.float64, what=transform.__name__)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_shape, activation, dropout", [((33, 40), "gelu", 0.25), ((0, 40), "silu", 0.0)],
                         ids=["33rows", "empty"])
def test_backends_match_float64(backend, device, x_shape, activation, dropout):  # noqa: F811
    # Widths span two interpreter tiles (32); the backend of the forward runs the backward.
    # The reference drops with the op's mask, drawn again from the same seed (on the CPU
    # F.dropout's, test_matches_peft; CUDA's F.dropout draws another way).
    p64 = {k: v.to(device) for k, v in _params(40, 36, 4).items()}
    x64 = torch.randn(x_shape, dtype=torch.float64, device=device)
    g64 = torch.randn(x_shape[0], 36, dtype=torch.float64, device=device)
    p = {k: v.detach().float().requires_grad_() for k, v in p64.items()}
    x = x64.float().requires_grad_()
    with mg.dispatch.recording() as ran, float32_matmul_precision("highest"):
        got = _call(mg.lora_linear, x, p, 0.75, dropout, activation)
        got_grads = torch.autograd.grad(got, [x, *p.values()], g64.float())
    assert ran == {("forward", backend): 1, ("backward", backend): 1}
    with mg.dispatch.recording() as ran, float32_matmul_precision("highest"), torch.no_grad():
        assert torch.equal(_call(mg.lora_linear, x, p, 0.75, dropout, activation), got.detach())  # no Function
    assert ran == {("forward", backend): 1}
    inputs = [x64.requires_grad_(), *p64.values()]
    torch.manual_seed(SEED)
    dropped = x64 * torch.empty_like(x64, dtype=torch.bool).bernoulli_(1 - dropout) / (1 - dropout)
    want = activate_ref(F.linear(x64, p64["weight"], p64["bias"])
                        + 0.75 * F.linear(F.linear(dropped, p64["lora_A"]), p64["lora_B"]), activation)
    for what, a, b in zip(["out", "x", *p], [got, *got_grads], [want, *torch.autograd.grad(want, inputs, g64)]):
        assert_rel_close(a, b, torch.float32, what=f"{what} ({backend}, {device})")


@pytest.mark.kernels
def test_gradcheck_on_the_triton_backend():
    pytest.importorskip("triton")
    p = _params(5, 4, 2)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    names = list(p)

    def fn(x, *ts):
        with mg.use_backend("triton"):
            return _call(mg.lora_linear, x, dict(zip(names, ts)), 0.7, 0.3, "gelu_tanh")

    assert torch.autograd.gradcheck(fn, (x, *p.values()))
    assert torch.autograd.gradgradcheck(fn, (x, *p.values()))


def test_host_path(monkeypatch):
    # Training: no per-call signature binding (function.combined_style). No gradient to
    # compute: no Function at all.
    calls = []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(a) or real(*a, **k))
    p = _params(8, 4, 2, dtype=torch.float32, frozen={"weight", "bias"})
    x = torch.randn(3, 8, requires_grad=True)
    _call(mg.lora_linear, x, p, 1.0, 0.1, "gelu").sum().backward()
    assert calls == [] and x.grad is not None and p["lora_A"].grad is not None
    monkeypatch.setattr(lora, "_eager_lora", None)
    with torch.no_grad():
        out = _call(mg.lora_linear, x, p, 1.0, 0.1, "gelu")
    assert out.grad_fn is None
    assert_rel_close(out, _call(reference, x, p, 1.0, 0.1, "gelu"), torch.float32)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(lora_B=torch.randn(4, 3)), ValueError,
         r"lora_B must have shape \(out_features, r\) = \(4, 2\), .* lora_A of shape \(2, 5\); got shape \(4, 3\)"),
        (dict(lora_A=torch.randn(2, 6)), ValueError,
         r"torch_matgrad.lora_linear: input has 5 features .* lora_A of shape \(2, 6\) expects in_features=6"),
        (dict(lora_B=torch.randn(3, 2)), ValueError, r"lora_B must have shape \(out_features, r\) = \(4, 2\)"),
        (dict(lora_A=torch.randn(2, 5, 1)), ValueError, r"lora_A must be 2-D"),
        (dict(weight=torch.randn(4, 6)), ValueError, r"input has 5 features .* weight of shape \(4, 6\)"),
        (dict(lora_B=torch.randn(4, 2, dtype=torch.float64)), TypeError, r"one dtype .* lora_B torch.float64"),
        (dict(lora_B=torch.ones(4, 2, dtype=torch.int64)), TypeError, r"lora_B must be a floating torch.Tensor"),
        (dict(lora_A=torch.randn(2, 5, device="meta")), RuntimeError, r"one device.* lora_A on meta"),
        (dict(lora_B=torch.randn(4, 2, device="meta")), RuntimeError, r"one device.* lora_B on meta"),
        (dict(dropout=1.5), ValueError, r"dropout is a probability, between 0 and 1; got 1.5"),
        (dict(scaling=torch.tensor(2.0)), TypeError, r"scaling must be a Python number"),
        (dict(activation="tanh"), ValueError, r"unknown activation 'tanh'"),
    ],
)
def test_bad_input_errors(change, error, match):
    args = dict(weight=torch.randn(4, 5), bias=None, lora_A=torch.randn(2, 5), lora_B=torch.randn(4, 2), scaling=2.0,
                dropout=0.0, activation=None)
    args.update(change)
    kw = {k: args.pop(k) for k in ("dropout", "activation")}
    with pytest.raises(error, match=match):
        mg.lora_linear(torch.randn(3, 5), *args.values(), **kw)
