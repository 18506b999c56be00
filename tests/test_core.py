"""The core op on the CPU path: gradients, equivalence with nn.Linear, saved tensors,
skipped products, the notes' formulas evaluated independently, and edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import torch_matgrad as mg
from _util import activate_ref, assert_rel_close, reference

ACTS = list(mg.ACTIVATIONS)


def _views(shape, kind, dtype=torch.float64):
    """A random tensor of ``shape`` laid out as ``kind``: contiguous, transposed (a .t()
    view of a tensor stored the other way round) or sliced (every other column)."""
    if kind == "contiguous":
        return torch.randn(shape, dtype=dtype)
    if kind == "transposed":
        return torch.randn(shape[::-1], dtype=dtype).t()
    assert kind == "sliced"
    return torch.randn(shape[0], 2 * shape[1], dtype=dtype)[:, ::2]


# --------------------------------------------------------------------------- gradcheck


# (x shape, out_features): ragged 2-D, 3-D and 1-D inputs, an empty batch.
GRADCHECK_SHAPES = [((1, 1), 1), ((7, 5), 3), ((33, 7), 1), ((2, 3, 5), 7), ((5,), 4), ((0, 5), 3), ((2, 0, 5), 3)]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_shape,n", GRADCHECK_SHAPES, ids=lambda v: str(v))
def test_gradcheck_and_gradgradcheck(activation, bias, x_shape, n):
    k = x_shape[-1]
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)

    def fn(*ts):
        return mg.linear(*ts, activation=activation)

    # check_forward_ad: the jvp (MATH.md's forward-mode line) against finite differences
    # too; batched: the same under vmap, as jacfwd runs it.
    assert gradcheck(fn, inputs, check_forward_ad=True, check_batched_forward_grad=True)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("activation", ["gelu", "relu", None])
@pytest.mark.parametrize("x_kind", ["transposed", "sliced"])
@pytest.mark.parametrize("w_kind", ["transposed", "sliced"])
def test_gradcheck_non_contiguous(activation, x_kind, w_kind):
    x = _views((9, 6), x_kind).requires_grad_()
    w = _views((4, 6), w_kind).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert not x.is_contiguous() and not w.is_contiguous()
    fn = lambda *ts: mg.linear(*ts, activation=activation)  # noqa: E731
    assert gradcheck(fn, (x, w, b), check_forward_ad=True)
    assert gradgradcheck(fn, (x, w, b))


# --------------------------------------------------------------- against nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_shape", [(127, 33), (4, 7, 33), (33,)], ids=str)
def test_matches_nn_linear(dtype, activation, bias, x_shape):
    k, n = x_shape[-1], 65
    ref_layer = torch.nn.Linear(k, n, bias=bias, dtype=dtype)
    layer = mg.Linear.from_linear(torch.nn.Linear(k, n, bias=bias, dtype=dtype), activation=activation)
    layer.load_state_dict(ref_layer.state_dict())
    x = torch.randn(x_shape, dtype=dtype)
    x_ref, x_mg = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(*x_shape[:-1], n, dtype=dtype)

    out_ref = activate_ref(ref_layer(x_ref), activation)
    out = layer(x_mg)
    out.backward(grad)
    out_ref.backward(grad)

    # Both against float64 (per-dtype tolerance), and against each other.
    x64, w64 = x.double().requires_grad_(), ref_layer.weight.detach().double().requires_grad_()
    b64 = ref_layer.bias.detach().double().requires_grad_() if bias else None
    out64 = reference(x64, w64, b64, activation)
    out64.backward(grad.double())
    pairs = [("out", out, out_ref, out64), ("grad_x", x_mg.grad, x_ref.grad, x64.grad),
             ("grad_W", layer.weight.grad, ref_layer.weight.grad, w64.grad)]
    if bias:
        pairs.append(("grad_b", layer.bias.grad, ref_layer.bias.grad, b64.grad))
    for name, got, ref, exact in pairs:
        assert got.dtype == ref.dtype == dtype, name
        assert_rel_close(got, exact, dtype, f"{name} vs float64")
        assert_rel_close(got, ref, dtype, f"{name} vs nn.Linear")


def test_forward_bit_identical_to_nn_linear_fp32():
    # The CPU path calls nn.Linear's own kernel, so even the bits agree.
    lin = torch.nn.Linear(33, 17)
    x = torch.randn(7, 33)
    assert torch.equal(mg.Linear.from_linear(lin)(x), lin(x))


# ------------------------------------------------- the notes' formulas, independently


def _act_derivative(z, activation):
    """act'(z) written out in closed form (not via torch_matgrad or aten)."""
    if activation is None:
        return torch.ones_like(z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        return cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if activation == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        u = c * (z + 0.044715 * z**3)
        t = torch.tanh(u)
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


@pytest.mark.parametrize("activation", ACTS)
def test_backward_equals_notes_formulas(activation):
    """MATH.md rows: G_z = G * act'(z) (items 1, 3); grad_W = G_z^T x (9, 10);
    grad_x = G_z W (11); grad_b = G_z^T 1 (10). Evaluated elementwise with einsum."""
    B, n, m = 13, 6, 5
    x = torch.randn(B, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(m, n, dtype=torch.float64, requires_grad=True)
    b = torch.randn(m, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, m, dtype=torch.float64)
    gx, gw, gb = torch.autograd.grad(mg.linear(x, w, b, activation), (x, w, b), g)

    with torch.no_grad():
        z = torch.einsum("bj,ij->bi", x, w) + b
        gz = g * _act_derivative(z, activation)
        assert torch.allclose(gw, torch.einsum("bi,bj->ij", gz, x), rtol=1e-12, atol=1e-12)  # dz/dw_ij = sum_b G_bi x_bj
        assert torch.allclose(gx, torch.einsum("bi,ij->bj", gz, w), rtol=1e-12, atol=1e-12)
        assert torch.allclose(gb, gz.sum(0), rtol=1e-12, atol=1e-12)


# ------------------------------------------- what is saved, and what is computed


class _CountMatmuls(TorchDispatchMode):
    """Counts the matrix products the dispatcher sees."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.matmul.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("frozen", ["weight", "input", "none"])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_needs_input_grad_skips_products(frozen, activation):
    x = torch.randn(16, 8, requires_grad=frozen != "input")
    w = torch.randn(4, 8, requires_grad=frozen != "weight")
    b = torch.randn(4, requires_grad=True)
    out = mg.linear(x, w, b, activation)
    with _CountMatmuls() as counter:
        out.backward(torch.randn_like(out))
    assert counter.count == (2 if frozen == "none" else 1)
    assert (w.grad is None) == (frozen == "weight")
    assert (x.grad is None) == (frozen == "input")


@pytest.mark.parametrize(
    "frozen,activation,expected",
    [
        ("weight", None, {"weight"}),  # grad_x = G W needs W only
        ("input", None, {"input"}),  # grad_W = G^T x needs x only
        ("weight", "gelu", {"weight", "z"}),  # plus z for gelu'
        ("none", "relu", {"input", "weight", "out"}),  # relu' is read off the output
        ("none", "silu", {"input", "weight", "z"}),
    ],
)
def test_saves_only_what_backward_needs(frozen, activation, expected):
    x = torch.randn(6, 5, requires_grad=frozen != "input")
    w = torch.randn(3, 5, requires_grad=frozen != "weight")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = mg.linear(x, w, None, activation)
    z = F.linear(x, w).detach()

    def name(t):
        if t is x:
            return "input"
        if t is w:
            return "weight"
        if t.shape == out.shape and torch.equal(t, out.detach()) and activation == "relu":
            return "out"
        if t.shape == z.shape and torch.equal(t, z):
            return "z"
        return f"unexpected {tuple(t.shape)}"

    assert {name(t) for t in saved} == expected


# --------------------------------------------------------------------- edge cases


def test_empty_batch_and_zero_in_features():
    w = torch.randn(3, 5, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    x = torch.randn(0, 5, requires_grad=True)
    out = mg.linear(x, w, b, "gelu")
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))

    # in_features == 0: the product is empty, so the output is act(bias) broadcast.
    x0, w0 = torch.randn(4, 0), torch.randn(3, 0)
    assert torch.equal(mg.linear(x0, w0, b, "silu"), F.silu(b.detach()).expand(4, 3))
    assert torch.equal(mg.linear(x0, w0), torch.zeros(4, 3))


def test_nan_and_inf_propagate_like_f_linear():
    x = torch.randn(6, 4)
    x[1, 2], x[3, 0] = float("nan"), float("inf")
    w, b = torch.randn(5, 4), torch.randn(5)
    for activation in ACTS:
        got, want = mg.linear(x, w, b, activation), reference(x, w, b, activation)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), activation
        finite = want.isfinite()
        assert torch.allclose(got[finite], want[finite])


def test_inputs_not_modified():
    x = torch.randn(7, 5, requires_grad=True)
    w, b = torch.randn(3, 5, requires_grad=True), torch.randn(3, requires_grad=True)
    copies, versions = [t.detach().clone() for t in (x, w, b)], [t._version for t in (x, w, b)]
    mg.linear(x, w, b, "relu").sum().backward()
    assert [t._version for t in (x, w, b)] == versions
    assert all(torch.equal(t.detach(), c) for t, c in zip((x, w, b), copies))


def test_autocast_behaves_like_f_linear():
    x = torch.randn(8, 16, requires_grad=True)
    layer = mg.Linear(16, 4, activation="gelu")
    ref = torch.nn.Linear(16, 4)
    ref.load_state_dict(layer.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_ref = layer(x), F.gelu(ref(x))
    assert out.dtype == out_ref.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight.grad.dtype == layer.bias.grad.dtype == x.grad.dtype == torch.float32
    assert_rel_close(out, out_ref, torch.bfloat16, "autocast output")


# -------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: (torch.randn(2, 5), torch.randn(3, 4), None), ValueError, r"input has 5 features.*\(2, 5\).*\(3, 4\)"),
        (lambda: (torch.randn(2, 4), torch.randn(4), None), ValueError, r"weight must be 2-D.*\(4,\)"),
        (lambda: (torch.randn(2, 4), torch.randn(2, 3, 4), None), ValueError, r"weight must be 2-D.*\(2, 3, 4\)"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)), ValueError, r"bias must have shape \(3,\).*got \(4,\)"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.randn(1, 3)), ValueError, r"bias must have shape \(3,\).*got \(1, 3\)"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64), None), TypeError, r"one dtype.*input torch.float32, weight torch.float64"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, dtype=torch.bfloat16)), TypeError, r"bias torch.bfloat16"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4, device="meta"), None), RuntimeError,
         r"one device.*input on cpu, weight on meta; meta tensors hold no data: materialise them \(a module with "
         r"\.to_empty\(device='cpu'\)"),
        (lambda: (torch.ones(2, 4, dtype=torch.int64), torch.randn(3, 4), None), TypeError, r"input has dtype torch.int64"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4, dtype=torch.complex64), None), TypeError, r"weight has dtype torch.complex64"),
        (lambda: ([[1.0, 2.0]], torch.randn(3, 2), None), TypeError, r"input must be a torch.Tensor, got list"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4).numpy(), None), TypeError, r"weight must be a torch.Tensor, got ndarray"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), 1.0), TypeError, r"bias must be a torch.Tensor, got float"),
        (lambda: (torch.tensor(1.0), torch.randn(3, 1), None), ValueError, r"at least 1 dimension"),
    ],
)
def test_bad_input_errors(make, error, match):
    x, w, b = make()
    with pytest.raises(error, match=match):
        mg.linear(x, w, b)


@pytest.mark.cuda
def test_device_errors_name_the_fix():
    layer, x = mg.LinearAct(4, 3, activation="gelu").cuda(), torch.randn(2, 4)
    fix = r"move them to one device with \.to\(device\): the module with \.to\('cpu'\), or the input with \.to\('cuda:0'\)"
    with pytest.raises(RuntimeError, match=r"one device, got input on cpu, weight on cuda:0, bias on cuda:0; " + fix):
        layer(x)
    with pytest.raises(RuntimeError, match=r"down_weight on cuda:0; move them to one device with \.to\(device\), "
                                           r"e\.g\. the module with \.to\('cpu'\)"):
        mg.mlp(x, torch.randn(5, 4), torch.randn(3, 5, device="cuda"))


def test_device_error_wording_without_a_gpu():
    # The words test_device_errors_name_the_fix checks on a GPU, for a machine without one.
    fix = mg.function._device_fix(torch.device("cpu"), torch.device("cuda:1"))
    assert fix == "move them to one device with .to(device): the module with .to('cpu'), or the input with .to('cuda:1')"
    with pytest.raises(RuntimeError, match=r"down_weight on meta; move them to one device .* \.to\('cpu'\)"):
        mg.mlp(torch.randn(2, 4), torch.randn(5, 4), torch.randn(3, 5, device="meta"))


@pytest.mark.parametrize("activation", ["tanh", "gelu-tanh", "", 1])
def test_unknown_activation(activation):
    with pytest.raises(ValueError, match=r"unknown activation.*'none', 'relu', 'gelu', 'gelu_tanh', 'silu'"):
        mg.linear(torch.randn(2, 3), torch.randn(4, 3), activation=activation)
    with pytest.raises(ValueError, match="unknown activation"):
        mg.Linear(3, 4, activation=activation)


# Other libraries' names (transformers' ACT2FN) for exactly the op's functions: the error
# names the op's spelling. gelu_fast rounds sqrt(2/pi); quick_gelu is x * sigmoid(1.702 x).
SAME_FUNCTION = {"swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                 "gelu_python_tanh": "gelu_tanh", "gelu_python": "gelu", "linear": "none"}


@pytest.mark.parametrize("name", [*SAME_FUNCTION, "gelu_fast", "quick_gelu", "gelu-tanh"])
def test_unknown_activation_names_the_same_function(name):
    fix = SAME_FUNCTION.get(name) or {"gelu-tanh": "gelu_tanh"}.get(name)
    with pytest.raises(ValueError) as raised:
        mg.Linear(3, 4, activation=name.upper())
    message = str(raised.value)
    assert (f"use {fix!r}, the same function" in message) if fix else ("use '" not in message), message
    if name in SAME_FUNCTION:  # it is the same function
        act2fn = pytest.importorskip("transformers.activations").ACT2FN
        z = torch.linspace(-6, 6, 1001, dtype=torch.float64)
        torch.testing.assert_close(act2fn[name](z), activate_ref(z, mg.formulas.canonical_activation(fix)), rtol=1e-12, atol=1e-12)


def test_unknown_backend(backend_env):
    with pytest.raises(ValueError, match=r"use_backend\('cuda-magic'\) names no backend"):
        with mg.use_backend("cuda-magic"):
            pass
    backend_env("nope")
    with pytest.raises(ValueError, match=r"\$TORCH_MATGRAD_BACKEND='nope' names no backend"):
        mg.linear(torch.randn(2, 3), torch.randn(4, 3))
    with mg.use_backend("torch"):  # the context manager wins over the environment
        assert mg.linear(torch.randn(2, 3), torch.randn(4, 3)).shape == (2, 4)


# ------------------------------------------------------------------- the module


def test_linear_is_a_drop_in_nn_linear():
    torch.manual_seed(1)
    ref = torch.nn.Linear(7, 3)
    torch.manual_seed(1)
    layer = mg.Linear(7, 3)
    assert isinstance(layer, torch.nn.Linear)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)  # same init
    assert list(layer.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    assert repr(layer) == "Linear(in_features=7, out_features=3, bias=True, activation=None)"
    nobias = mg.Linear(4, 2, bias=False, dtype=torch.float64)
    assert nobias.bias is None and nobias.weight.dtype == torch.float64


@pytest.mark.parametrize("activation", [a for a in ACTS if a is not None])
def test_a_fused_activation_makes_a_linear_act_which_is_no_nn_linear(activation):
    """Tools that find nn.Linear layers (LoRA, quantization, tensor parallel) treat them
    as the linear map x W^T + b: a layer that applies an activation must not be one."""
    torch.manual_seed(1)
    ref = torch.nn.Linear(7, 3)
    for make in (lambda: mg.LinearAct(7, 3, activation=activation), lambda: mg.Linear(7, 3, activation=activation),
                 lambda: mg.Linear(7, 3, True, None, None, activation)):  # the old spellings too
        torch.manual_seed(1)
        layer = make()
        assert type(layer) is mg.LinearAct and isinstance(layer, torch.nn.Module)
        assert not isinstance(layer, torch.nn.Linear) and not isinstance(layer, mg.Linear)
        assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)  # same init
        assert list(layer.state_dict()) == ["weight", "bias"] and layer.activation == activation
    assert repr(layer) == f"LinearAct(in_features=7, out_features=3, bias=True, activation={activation!r})"
    x = torch.randn(2, 5, 7)
    assert torch.equal(layer(x), activate_ref(ref(x), activation))
    nobias = mg.LinearAct(4, 2, bias=False, dtype=torch.float64, activation=activation)
    assert nobias.bias is None and nobias.weight.dtype == torch.float64 and list(nobias.state_dict()) == ["weight"]
    assert type(mg.Linear(7, 3, activation=None)) is mg.Linear


@pytest.mark.parametrize("spelling, name", [
    (None, None), ("none", None), ("NONE", None), ("GELU", "gelu"), ("Gelu_Tanh", "gelu_tanh"), ("SiLU", "silu"),
])
def test_one_spelling_of_activations_everywhere(spelling, name):
    # None and "none" alike, names in any case: the op, both layers, the MLP block.
    x, w, b = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
    want = activate_ref(F.linear(x, w, b), name)
    assert torch.equal(mg.linear(x, w, b, activation=spelling), want)
    layer = mg.Linear(3, 4, activation=spelling)
    assert type(layer) is (mg.Linear if name is None else mg.LinearAct) and layer.activation == name
    if name is not None:
        assert mg.LinearAct(3, 4, activation=spelling).activation == name
    up, down = torch.randn(6, 3), torch.randn(2, 6)
    hidden = activate_ref(F.linear(x, up), name)
    assert torch.allclose(mg.mlp(x, up, down, activation=spelling), F.linear(hidden, down), atol=1e-6)
    assert mg.FusedMLP(3, 6, activation=spelling).activation == name


def test_linear_act_needs_an_activation_and_linear_subclasses_take_none():
    with pytest.raises(ValueError, match=r"LinearAct needs an activation.*use torch_matgrad.Linear"):
        mg.LinearAct(3, 4)
    with pytest.raises(ValueError, match="unknown activation"):
        mg.LinearAct(3, 4, activation="tanh")

    class MyLinear(mg.Linear):
        pass

    assert type(MyLinear(3, 4)) is MyLinear
    with pytest.raises(TypeError, match=r"MyLinear: .* is an nn.Linear and fuses no activation; subclass .*LinearAct"):
        MyLinear(3, 4, activation="relu")


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_layers_survive_deepcopy_and_pickle(activation):
    import copy
    import io

    layer = mg.Linear(5, 3, activation=activation)
    x = torch.randn(4, 5)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for other in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):
        assert type(other) is type(layer) and other.activation == activation
        assert torch.equal(other(x), layer(x))


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip_both_ways(bias):
    src = torch.nn.Linear(6, 5, bias=bias)
    layer = mg.Linear(6, 5, bias=bias, activation="relu")
    layer.load_state_dict(src.state_dict(), strict=True)
    back = torch.nn.Linear(6, 5, bias=bias)
    back.load_state_dict(layer.state_dict(), strict=True)
    for key, value in src.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), F.relu(src(x)))


@pytest.mark.parametrize("from_linear", [mg.Linear.from_linear, mg.LinearAct.from_linear])
def test_from_linear_shares_parameters(from_linear):
    src = torch.nn.Linear(6, 5, dtype=torch.float64).eval()
    layer = from_linear(src, activation="gelu_tanh")
    assert type(layer) is mg.LinearAct
    assert layer.weight is src.weight and layer.bias is src.bias
    assert not layer.training and layer.weight.dtype == torch.float64
    assert layer.activation == "gelu_tanh"
    nobias = from_linear(torch.nn.Linear(2, 3, bias=False), activation="relu")
    assert nobias.bias is None and list(nobias.state_dict()) == ["weight"]
    with pytest.raises(TypeError, match="expects an nn.Linear, got Conv1d"):
        from_linear(torch.nn.Conv1d(2, 3, 1), activation="relu")
    plain = mg.Linear.from_linear(src)
    assert type(plain) is mg.Linear and plain.weight is src.weight and not plain.training

