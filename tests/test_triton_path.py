"""The public ``linear`` and ``Linear`` through the forced Triton backend, against the
torch-ops path, and the dispatcher's choices and fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch

from _util import assert_rel_close, float32_matmul_precision

pytestmark = pytest.mark.kernels
triton = pytest.importorskip("triton")

import torch_matgrad  # noqa: E402
from torch_matgrad import dispatch, formulas, triton_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _ieee_fp32():
    with float32_matmul_precision("highest"):
        yield


def _run(backend, fn, inputs, grad):
    inputs = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    with torch_matgrad.use_backend(backend):
        out = fn(*inputs)
        grads = torch.autograd.grad(out, [t for t in inputs if t is not None], grad)
    return [out, *grads]


@pytest.mark.parametrize("activation", torch_matgrad.ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    "x_shape", [(2, 3, 17), (33, 17), (17,), (0, 17), (4, 0, 17)], ids=lambda s: "x" + "x".join(map(str, s))
)
def test_linear_matches_torch_path(x_shape, bias, activation):
    x = torch.randn(*x_shape, device=DEVICE)
    w = torch.randn(9, 17, device=DEVICE)
    b = torch.randn(9, device=DEVICE) if bias else None
    grad = torch.randn(*x_shape[:-1], 9, device=DEVICE)

    def fn(*ts):
        return torch_matgrad.linear(*ts, activation=activation)

    got = _run("triton", fn, (x, w, b), grad)
    want = _run("torch", fn, (x, w, b), grad)
    for g, r in zip(got, want):
        assert_rel_close(g, r, torch.float32)


def test_transposed_input_reaches_kernel_without_copy(monkeypatch):
    # A transposed 2-D x flows to the kernel as a view (its strides, not a copy).
    seen = []
    forward = triton_backend.forward
    monkeypatch.setattr(triton_backend, "forward", lambda x, *a: seen.append(x.stride()) or forward(x, *a))
    x = torch.randn(17, 33, device=DEVICE).t()
    w = torch.randn(9, 17, device=DEVICE)
    with torch_matgrad.use_backend("triton"):
        out = torch_matgrad.linear(x, w)
    assert seen == [(1, 33)]
    assert_rel_close(out, x.double() @ w.double().t(), torch.float32)


@pytest.mark.parametrize("activation", torch_matgrad.ACTIVATIONS)
def test_module_matches_torch_path(activation):
    layer = torch_matgrad.Linear(17, 9, activation=activation, device=DEVICE)
    x = torch.randn(5, 17, device=DEVICE, requires_grad=True)
    results = {}
    for backend in ("triton", "torch"):
        layer.zero_grad()
        x.grad = None
        with torch_matgrad.use_backend(backend):
            out = layer(x)
        out.backward(torch.ones_like(out))
        results[backend] = [out.detach(), x.grad, layer.weight.grad, layer.bias.grad]
    for g, r in zip(results["triton"], results["torch"]):
        assert_rel_close(g, r, torch.float32)


@pytest.mark.parametrize("activation", torch_matgrad.ACTIVATIONS)
def test_gradcheck_and_gradgradcheck(activation):
    x, w, b = (torch.randn(*s, dtype=torch.float64, device=DEVICE, requires_grad=True) for s in ((5, 4), (3, 4), (3,)))

    def fn(*ts):
        with torch_matgrad.use_backend("triton"):
            return torch_matgrad.linear(*ts, activation=activation)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("activation", torch_matgrad.ACTIVATIONS)
def test_nan_and_inf_propagate_like_torch(activation):
    x, w, b = (torch.randn(*s, device=DEVICE) for s in ((70, 40), (50, 40), (50,)))
    x[7, 3] = float("nan")
    x[11, 5] = float("inf")
    w[13, 2] = float("-inf")
    grad = torch.randn(70, 50, device=DEVICE)

    def fn(*ts):
        return torch_matgrad.linear(*ts, activation=activation)

    for got, want in zip(_run("triton", fn, (x, w, b), grad), _run("torch", fn, (x, w, b), grad)):
        # Exactly the same elements are finite; which non-finite value an activation
        # gives at +-inf differs between torch's own CPU and CUDA kernels (F.gelu(inf)
        # is nan on CPU), so only the identity and ReLU must match NaN for NaN.
        assert torch.equal(got.isfinite(), want.isfinite())
        if activation in (None, "relu"):
            assert torch.equal(got.isnan(), want.isnan())
        finite = want.isfinite()
        assert_rel_close(got[finite], want[finite], torch.float32)


def test_auto_sends_cpu_to_torch_and_forced_sends_it_to_triton():
    x = torch.randn(3, 4)
    with torch_matgrad.use_backend("auto"):
        assert dispatch.chosen_backend(x, x) == "torch"
    if not triton_backend.INTERPRET:
        pytest.skip("Triton's interpreter is off")
    with torch_matgrad.use_backend("triton"):
        assert dispatch.chosen_backend(x, x) == "triton"


def test_forced_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setattr(triton_backend, "INTERPRET", False)
    with torch_matgrad.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.chosen_backend(torch.randn(2, 2), torch.randn(2, 2))


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize(
    "case, reason",
    [
        ("subclass", "tensor subclass _Subclass"),
        ("meta", "meta tensor"),
        ("mixed", "unsupported dtype combination"),
    ],
)
def test_forward_fallbacks_are_logged(caplog, case, reason):
    t = torch.randn(3, 4, device=DEVICE)
    x, w = {
        "subclass": (t.as_subclass(_Subclass), t),
        "meta": (torch.empty(3, 4, device="meta"), torch.empty(3, 4, device="meta")),
        "mixed": (t, t.double()),
    }[case]
    with torch_matgrad.use_backend("triton"), caplog.at_level(logging.DEBUG, logger="torch_matgrad"):
        assert dispatch.chosen_backend(x, w) == "torch"
    assert reason in caplog.text


def _launches(monkeypatch):
    """Counts of Triton kernel launches made by the backend's forward and backward."""
    counts = {"forward": 0, "backward": 0}
    half = []
    launch = triton_backend.fused_matmul

    def counted(*args, **kwargs):
        counts[half[-1] if half else "forward"] += 1
        return launch(*args, **kwargs)

    def backward(*args):
        half.append("backward")
        try:
            return real_backward(*args)
        finally:
            half.pop()

    real_backward = triton_backend.backward
    monkeypatch.setattr(triton_backend, "fused_matmul", counted)
    monkeypatch.setattr(triton_backend, "backward", backward)
    return counts


@pytest.mark.parametrize("activation", ["gelu", None])
def test_backward_runs_the_backend_its_forward_ran(monkeypatch, activation):
    # The backend is read when the forward runs; the backward, called after the block,
    # runs the same kernels (and a torch forward's backward stays on torch ops).
    launches = _launches(monkeypatch)
    x, w, b = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((33, 17), (9, 17), (9,)))
    with torch_matgrad.use_backend("triton"):
        y = torch_matgrad.linear(x, w, b, activation=activation)
    with torch_matgrad.use_backend("torch"), dispatch.recording() as ran:
        y.backward(torch.randn_like(y))
    assert ran == {("backward", "triton"): 1}
    assert launches == {"forward": 1, "backward": 2}  # grad_x; grad_W with grad_b
    with torch_matgrad.use_backend("torch"):
        y = torch_matgrad.linear(x, w, b, activation=activation)
    with torch_matgrad.use_backend("triton"), dispatch.recording() as ran:
        y.backward(torch.randn_like(y))
    assert ran == {("backward", "torch"): 1}
    assert launches == {"forward": 1, "backward": 2}


def test_backward_fallbacks_are_logged(caplog):
    x, w = (torch.randn(*s, dtype=torch.float64, device=DEVICE, requires_grad=True) for s in ((5, 4), (3, 4)))
    with torch_matgrad.use_backend("triton"):
        out = torch_matgrad.linear(x, w, activation="gelu")
    with caplog.at_level(logging.DEBUG, logger="torch_matgrad"), dispatch.recording() as ran:
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    assert "create_graph" in caplog.text and ran == {("backward", "torch"): 1}
    # gradgradcheck-style: the double backward sends a gradient straight into z.
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="torch_matgrad"):
        torch.autograd.grad(gx.sum(), w)
    assert "directly into z" in caplog.text
    # vmap over the backward: the output gradients are batched tensors.
    caplog.clear()
    with torch_matgrad.use_backend("triton"):
        out = torch_matgrad.linear(x, w, activation="gelu")
    grads = torch.randn(2, *out.shape, dtype=out.dtype, device=DEVICE)
    with caplog.at_level(logging.DEBUG, logger="torch_matgrad"):
        (got,) = torch.autograd.grad(out, x, grads, retain_graph=True, is_grads_batched=True)
    assert "output gradient: functorch-wrapped tensor" in caplog.text
    want = torch.stack([torch.autograd.grad(out, x, g, retain_graph=True)[0] for g in grads])
    assert_rel_close(got, want, torch.float64)


def test_auto_runs_what_measured_fastest(monkeypatch):
    # "auto" is dispatch.AUTO for every case, whatever the device, dtype or rows (torch
    # today: the kernels measured slower than cuBLAS); the Triton backend's own fallbacks
    # still apply when AUTO names it.
    big = torch.randn(4097, 8, dtype=torch.bfloat16)
    with torch_matgrad.use_backend("auto"):
        assert dispatch.AUTO == "torch"
        for t in (big, big.double(), big[:1]):
            assert dispatch.chosen_backend(t, t) == "torch"
        if triton_backend.INTERPRET:
            monkeypatch.setattr(dispatch, "AUTO", "triton")
            assert dispatch.chosen_backend(big, big) == "triton"
            assert dispatch.chosen_backend(big, big.double()) == "torch"  # mixed dtypes


def test_an_ops_own_auto_rule_is_its_alone():
    # An op with its own meaning of "auto" (the LM head's on CUDA) passes it in, rather
    # than forcing a backend for every op for a moment; a request or a fallback still wins.
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    with torch_matgrad.use_backend("auto"):
        if triton_backend.INTERPRET:
            assert dispatch.chosen_backend(x, x, auto="triton") == "triton"
            assert dispatch.chosen_backend(x, x.double(), auto="triton") == "torch"  # mixed dtypes
        assert dispatch.chosen_backend(x, x) == dispatch.AUTO == "torch"
        assert dispatch.cross_entropy_backend(x, x, None) == "torch"  # a CPU tensor: the shared rule
    with torch_matgrad.use_backend("torch"):
        assert dispatch.chosen_backend(x, x, auto="triton") == "torch"


def test_vmap_of_grad_falls_back_in_backward():
    # The backward of vmap(grad(f)) sees batched tensors; they must reach torch ops.
    w = torch.randn(3, 4, device=DEVICE, dtype=torch.float64)
    xs = torch.randn(5, 2, 4, device=DEVICE, dtype=torch.float64)

    def loss(w, x):
        return torch_matgrad.linear(x, w, activation="gelu").square().sum()

    with torch_matgrad.use_backend("triton"):
        got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, xs)
    reference = torch.func.grad(lambda w, x: formulas.activate(x @ w.t(), "gelu").square().sum())
    want = torch.stack([reference(w, x) for x in xs])
    assert_rel_close(got, want, torch.float64)


def test_check_lists_the_interpreter_only_when_it_is_on(monkeypatch):
    from torch_matgrad.cli import available_backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ("triton", "cpu") in available_backends()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert ("triton", "cpu") not in available_backends()


def test_torch_compile_traces_the_torch_ops():
    # Forced or not, what torch.compile traces is the formulas module, without a graph break.
    x, w = torch.randn(5, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE)

    def f(x, w):
        with torch_matgrad.use_backend("triton"):
            return torch_matgrad.linear(x, w, activation="silu")

    torch._dynamo.reset()
    got = torch.compile(f, backend="eager", fullgraph=True)(x, w)
    assert_rel_close(got, formulas.activate(x.double() @ w.double().t(), "silu"), torch.float32)
