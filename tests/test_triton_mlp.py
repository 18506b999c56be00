"""The MLP block's Triton kernels (``fused_gemm.py``'s ``DUAL``, ``HIDDEN``, ``EPI_GRAD`` and
``COLSUM`` launches) against the float64 formulas (MATH.md items 1, 3, 9-11), and the
proof that the hidden activation ``h`` is never written.

Without a GPU they run under Triton's interpreter in 32 x 32 x 16 tiles: the shapes
(44 tokens, 40 inputs, 48 hidden, 34 outputs) span two or three tiles in every dimension
of every product, with ragged edges. Every output is NaN-filled first (``poisoned_outputs``),
and every launch is recorded: its flags and the tensors it writes.
"""

from __future__ import annotations

import pytest
import torch

from _util import assert_rel_close

pytestmark = pytest.mark.kernels
triton = pytest.importorskip("triton")

from test_triton_kernels import DEVICE, _randn, _to, poisoned_outputs  # noqa: E402, F401 (autouse fixture)
from torch_matgrad import formulas, triton_backend  # noqa: E402
from torch_matgrad.triton_kernels import configs, launch, ops  # noqa: E402

M, D, H, D_OUT = 44, 40, 48, 34  # tokens, inputs, hidden, outputs: all different
ALL_NEEDS = (True,) * 7
GRAD_NAMES = ("grad_x", "grad_up_w", "grad_up_b", "grad_gate_w", "grad_gate_b", "grad_down_w", "grad_down_b")


class Launch:
    """One kernel launch: which kernel, its flags, and the tensors it writes."""

    def __init__(self, kernel, args):
        if kernel == "tma":  # (plan, c, bias, z, sums, flags_key): A and B are in the plan
            args = (None, None, *args[1:2], None, *args[2:5], dict(args[5]))
        a, b, c, saved, bias, z, sums, flags = args[:8]
        self.kernel, self.flags = kernel, flags
        mlp = args[9] if len(args) > 9 else ops.MLPOperands()
        self.writes = [t for t in (c, z, sums, mlp.colsum) if t is not None]

    def mlp(self):
        """The MLP flags that are set."""
        return {name: self.flags[name] for name in ops.MLP_FLAGS if self.flags.get(name)}


@pytest.fixture
def launches(monkeypatch):
    """Every launch of either kernel, in order (:class:`Launch`)."""
    seen = []

    def recording(kind):
        run = getattr(launch, f"run_{kind}_kernel")
        return lambda *args: seen.append(Launch(kind, args)) or run(*args)

    for kind in ("tma", "pointer"):
        monkeypatch.setattr(launch, f"run_{kind}_kernel", recording(kind))
    return seen


def _params(dtype, gated, bias, layout="contiguous"):
    """x, up_w, up_b, gate_w, gate_b, down_w, down_b in ``dtype`` (float64 data rounded to
    it), the weights laid out as asked (``"transposed"``: GPT-2's Conv1D, read through a
    transpose)."""
    shapes = ((M, D), (H, D), (H,), (H, D), (H,), (D_OUT, H), (D_OUT,))
    has = (True, True, bias, gated, gated and bias, True, bias)
    out = []
    for i, (shape, present) in enumerate(zip(shapes, has)):
        weight = len(shape) == 2 and i > 0
        out.append(_to(_randn(*shape, layout=layout if weight else "contiguous"), dtype) if present else None)
    return out


def _double(ts):
    return [None if t is None else t.double() for t in ts]


def _check_block(dtype, activation, gated, bias=True, needs=ALL_NEEDS, layout="contiguous", grad=None):
    """The Triton forward and backward of the block against the float64 formulas on the
    same (rounded) inputs; the backward on the forward's own pre-activations."""
    params = _params(dtype, gated, bias, layout)
    out, u, g = triton_backend.mlp_forward(*params, activation)
    ref_out, ref_u, ref_g = formulas.mlp_forward(*_double(params), activation)
    assert out.dtype == dtype and out.is_contiguous()
    for name, got, want in (("out", out, ref_out), ("u", u, ref_u), ("g", g, ref_g)):
        assert (got is None) == (want is None), name
        if want is not None:
            assert_rel_close(got, want, dtype, name)
    if grad is None:
        grad = _to(_randn(M, D_OUT), dtype)
    x, up_w, _, gate_w, _, down_w, _ = params
    grads = triton_backend.mlp_backward(grad, None, None, x, up_w, gate_w, down_w, u, g, activation, needs)
    x64, up64, _, gate64, _, down64, _ = _double(params)
    ref = formulas.mlp_backward(
        grad.double(), None, None, x64, up64, gate64, down64, u.double(), _double([g])[0], activation, needs
    )
    for name, got, want in zip(GRAD_NAMES, grads, ref):
        assert (got is None) == (want is None), name
        if want is not None:
            assert got.dtype == dtype and got.is_contiguous(), name
            assert_rel_close(got, want, dtype, name)
    return params, u, g, grad


def _set(**flags):
    """The flags that are set, as :meth:`Launch.mlp` lists them."""
    return {name: value for name, value in flags.items() if value}


def _hidden_sized(launch):
    """The tensors a launch writes that have ``h``'s number of elements per token."""
    return [t for t in launch.writes if t.shape in ((M, H), (M, 2 * H), (H, M), (2 * H, M))]


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", formulas.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_block_matches_the_formulas_and_never_writes_h(launches, dtype, activation, gated):
    params, u, g, grad = _check_block(dtype, activation, gated)
    mlp = [launch.mlp() for launch in launches]
    # A plain block without activation has h = u: nothing to build.
    kind = (2 if gated else 1) if gated or activation is not None else 0
    act = ops.ACT_CODES[activation]
    # Forward: the pre-activations, then the product that builds h as it loads.
    assert mlp[:2] == [_set(DUAL=gated), _set(HIDDEN=kind, MLP_ACT=act)]
    # Backward: grad_Wd with grad_bd; grad_h with the gradients' epilogue; then the first
    # layer's grad_x and grad_W + grad_b, per projection, without any MLP flag.
    assert mlp[2:4] == [_set(HIDDEN=kind, MLP_ACT=act, COLSUM=True), _set(EPI_GRAD=kind, MLP_ACT=act)]
    assert mlp[4:] == [{}] * (4 if gated else 2)
    assert all(launch.kernel == "pointer" for launch in launches)
    # The only tensors of h's size written: the forward's [g | u] (or u) and the
    # backward's [G_g | G_u] (or G_u).
    sized = [(i, t) for i, launch in enumerate(launches) for t in _hidden_sized(launch)]
    assert [i for i, _ in sized] == [0, 3]
    (_, pre), (_, grads) = sized
    assert pre.data_ptr() == (g if gated else u).data_ptr()
    grad_h = grad.double() @ params[5].double()
    g_u, g_g = formulas.mlp_grad_preactivations(grad_h, u.double(), _double([g])[0], activation)
    assert_rel_close(grads, g_u if g_g is None else torch.cat([g_g, g_u], 1), dtype, "[G_g | G_u]")


def test_float64(launches):
    _check_block(torch.float64, "silu", gated=True)


@pytest.mark.parametrize("gated, layout", [(False, "sliced"), (True, "transposed")], ids=["plain", "gated"])
def test_weight_layouts(launches, gated, layout):
    # Weights read through their strides: a transposed view (GPT-2's Conv1D) or a slice.
    _check_block(torch.float32, "gelu_tanh", gated, layout=layout)
    assert len(launches) == (8 if gated else 6)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_without_biases(launches, gated):
    # The two-half product and the h prologue without biases.
    _check_block(torch.float32, "gelu", gated, bias=False)
    assert not any(launch.flags["HAS_BIAS"] for launch in launches)


def test_gate_and_up_with_different_strides_take_one_launch_each(launches):
    # The two-half launch reads W_up through W_gate's strides: when they differ, each
    # half is its own launch, into the same (M, 2H) tensor.
    x, up_w, up_b, gate_w, gate_b, down_w, down_b = _params(torch.float32, True, True)
    up_t = _to(_randn(*up_w.shape, layout="transposed"), torch.float32)
    out, u, g = triton_backend.mlp_forward(x, up_t, up_b, gate_w, gate_b, down_w, down_b, "silu")
    assert [launch.mlp() for launch in launches[:2]] == [{}, {}]
    assert launches[0].writes[0].data_ptr() == g.data_ptr() and launches[1].writes[0].data_ptr() == u.data_ptr()
    ref = formulas.mlp_forward(*_double([x, up_t, up_b, gate_w, gate_b, down_w, down_b]), "silu")
    for name, got, want in zip(("out", "u", "g"), (out, u, g), ref):
        assert_rel_close(got, want, torch.float32, name)


def test_one_bias_of_two(launches):
    # Only the up projection has a bias: the gate's half adds zeros.
    x, up_w, up_b, gate_w, _, down_w, down_b = _params(torch.float32, True, True)
    out, u, g = triton_backend.mlp_forward(x, up_w, up_b, gate_w, None, down_w, down_b, "relu")
    ref = formulas.mlp_forward(*_double([x, up_w, up_b, gate_w, None, down_w, down_b]), "relu")
    for name, got, want in zip(("out", "u", "g"), (out, u, g), ref):
        assert_rel_close(got, want, torch.float32, name)
    assert launches[0].mlp() == {"DUAL": True} and launches[0].flags["HAS_BIAS"]


_PARTIAL = {
    "down_w only": (False, False, False, False, False, True, False),
    "down_b only": (False, False, False, False, False, False, True),
    "frozen gate": (True, True, True, False, False, True, True),
    "biases only": (False, False, True, False, True, False, True),
}


@pytest.mark.parametrize("needs", list(_PARTIAL.values()), ids=list(_PARTIAL))
def test_partial_needs(launches, needs):
    _check_block(torch.float32, "gelu", gated=True, needs=needs)
    backward = [launch.mlp() for launch in launches[2:]]
    need_x, need_up_w, need_up_b, need_gate_w, need_gate_b, need_down_w, need_down_b = needs
    # grad_bd alone is the launch that only sums G^T's rows.
    first = [{"HIDDEN": 2, "MLP_ACT": 2, **({"COLSUM": True} if need_down_b else {})}] if need_down_w else (
        [{}] if need_down_b else []
    )
    assert backward[: len(first)] == first
    if any(needs[:5]):
        assert backward[len(first)] == {"EPI_GRAD": 2, "MLP_ACT": 2}
    else:
        assert len(backward) == len(first)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("dims", [(0, D, H, D_OUT), (M, 0, H, D_OUT), (M, D, 0, D_OUT), (M, D, H, 0)],
                         ids=["no tokens", "no inputs", "no hidden", "no outputs"])
def test_empty_dims(monkeypatch, dims, gated):
    # A zero in each dimension: K = 0 gives bias-only outputs and zero gradients; the
    # grad_bd column sums still run when h has no columns.
    for name, value in zip(("M", "D", "H", "D_OUT"), dims):
        monkeypatch.setitem(globals(), name, value)
    _check_block(torch.float32, "silu", gated)


def test_nan_and_inf_propagate(launches):
    # An Inf in x reaches out, and the gradients become NaN or Inf as the formulas' do.
    params = _params(torch.float32, True, True)
    params[0][3, 5] = float("inf")
    out, u, g = triton_backend.mlp_forward(*params, "silu")
    ref_out, ref_u, ref_g = formulas.mlp_forward(*_double(params), "silu")
    for got, want in ((out, ref_out), (u, ref_u), (g, ref_g)):
        assert torch.equal(got.isfinite(), want.isfinite())


# -------------------------------------------------------------------------------------
# The launches on their own: fused_matmul's MLP keywords.


def test_column_sums_and_transposed_store():
    a, b = _to(_randn(H, M), torch.float32), _to(_randn(M, D_OUT), torch.float32)
    c, _, sums = ops.fused_matmul(a, b, colsum=True, transpose_c=True)
    assert c.shape == (D_OUT, H) and c.is_contiguous()
    assert_rel_close(c, (a.double() @ b.double()).t(), torch.float32, "C^T")
    assert_rel_close(sums, b.double().sum(0), torch.float32, "column sums")
    # No rows of C (m = 0): the column sums still come (a launch over B^T's rows).
    c, _, sums = ops.fused_matmul(a[:0], b, colsum=True, transpose_c=True)
    assert c.shape == (D_OUT, 0)
    assert_rel_close(sums, b.double().sum(0), torch.float32, "column sums, m = 0")


def test_two_halves_with_an_empty_reduction():
    a = torch.randn(M, 0, device=DEVICE)
    b, b2 = torch.randn(0, H, device=DEVICE), torch.randn(0, H, device=DEVICE)
    bias = torch.randn(H, device=DEVICE)
    c = ops.fused_matmul(a, b, b2=b2, bias2=bias)[0]
    assert torch.equal(c, torch.cat([torch.zeros(M, H, device=DEVICE), bias.expand(M, H)], 1))


def test_mlp_keywords_are_checked():
    a, b = torch.randn(4, 3, device=DEVICE), torch.randn(3, 2, device=DEVICE)
    u = torch.randn(4, 2, device=DEVICE)
    with pytest.raises(ValueError, match="b2 of shape .* must be shaped like b"):
        ops.fused_matmul(a, b, b2=torch.randn(3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="takes only bias and bias2"):
        ops.fused_matmul(a, b, b2=b, activation="gelu")
    with pytest.raises(ValueError, match="bias2 .* needs b2"):
        ops.fused_matmul(a, b, bias2=torch.randn(2, device=DEVICE))
    with pytest.raises(ValueError, match="gate needs hidden=True"):
        ops.fused_matmul(a, b, gate=a)
    with pytest.raises(ValueError, match="two prologues"):
        ops.fused_matmul(a, b, hidden=True, saved=a, grad_activation="gelu")
    with pytest.raises(ValueError, match="grad_hidden needs a product and u"):
        ops.fused_matmul(a, b, grad_hidden=(a, None))
    with pytest.raises(ValueError, match="replaces the epilogue"):
        ops.fused_matmul(a, b, grad_hidden=(u, None), bias=torch.randn(2, device=DEVICE))
    with pytest.raises(ValueError, match="colsum needs a product"):
        ops.fused_matmul(a, b, colsum=True, rowsum=True)
    with pytest.raises(ValueError, match="grad_hidden's g is torch.float64"):
        ops.fused_matmul(a, b, grad_hidden=(u, u.double()))


# -------------------------------------------------------------------------------------
# The choice of kernel (ops.gemm_kernel_for) and the autotuner.


def test_mlp_flags_take_the_pointer_kernel(monkeypatch):
    # The one place that chooses: a launch with any MLP flag is the pointer kernel's,
    # whatever the rest would allow; so is a transposed output (the descriptor kernel
    # stores C as it is).
    monkeypatch.setattr(ops, "_tma_hardware", lambda device: True)
    monkeypatch.setattr(ops, "TMA_AVAILABLE", True)
    monkeypatch.setattr(launch, "TMA", launch.TMA or launch.tma_kernel(ops.TMA_CONFIGS))
    a, b = torch.empty(128, 256, dtype=torch.bfloat16), torch.empty(256, 512, dtype=torch.bfloat16)
    plain = ops.specialisation(torch.bfloat16)
    assert ops.gemm_kernel_for(a, b, flags=plain) == "tma"
    for kwargs in (dict(dual=True), dict(hidden=True, mlp_activation="gelu"), dict(hidden=True, gated=True),
                   dict(grad_hidden=True, mlp_activation="silu"), dict(grad_hidden=True, gated=True),
                   dict(colsum=True)):
        assert ops.gemm_kernel_for(a, b, flags=ops.specialisation(torch.bfloat16, **kwargs)) == "pointer", kwargs
    c = torch.empty(512, 128, dtype=torch.bfloat16)
    assert ops.gemm_kernel_for(a, b, outputs=(c.t(),)) == "pointer"
    assert ops.gemm_kernel_for(a, b, outputs=(c.t().contiguous(),)) == "tma"


@pytest.mark.skipif(not (ops.TMA_AVAILABLE and DEVICE == "cpu"), reason="the interpreter's descriptor kernel")
def test_descriptor_kernel_runs_only_the_first_layers_products(launches):
    # Forced to the descriptor kernel where valid: the MLP launches stay on the pointer
    # kernel, the first layer's plain products (grad_x, grad_W + grad_b) take it.
    with ops.gemm_kernel("tma"):
        _check_block(torch.bfloat16, "silu", gated=True)
    kernels = [(launch.kernel, bool(launch.mlp())) for launch in launches]
    assert kernels == [("pointer", True)] * 4 + [("tma", False)] * 4


def test_autotune_key_and_pruning(monkeypatch):
    # Each MLP flag is in the key (a launch with it never reuses another's tuning); the
    # gated h prologue streams the gate's tile beside A, as the act' prologue does.
    assert set(ops.MLP_FLAGS) <= set(configs._AUTOTUNE_KEY)
    assert not set(ops.MLP_FLAGS) & set(configs._TMA_AUTOTUNE_KEY)
    monkeypatch.setattr(configs, "_shared_memory_limit", lambda device: 163 * 1024)
    a = torch.empty(2, 2, dtype=torch.bfloat16)
    args = {"a_ptr": a, "M_BUCKET": 4096}
    flags = ops.specialisation(torch.bfloat16)
    kept = {
        name: configs._fits(ops.CONFIGS, args, **ops.specialisation(torch.bfloat16, **kwargs))
        for name, kwargs in (("none", {}), ("act'", dict(grad_activation="gelu")),
                             ("plain h", dict(hidden=True, mlp_activation="gelu")),
                             ("gated h", dict(hidden=True, gated=True, mlp_activation="gelu")))
    }
    assert kept["plain h"] == configs._fits(ops.CONFIGS, args, **flags)
    assert kept["gated h"] == kept["act'"] != kept["none"]
    # The gated epilogue keeps the tiles of at most 64 accumulator elements per thread.
    gated_epilogue = configs._fits(ops.CONFIGS, args, **ops.specialisation(torch.bfloat16, grad_hidden=True, gated=True))
    assert [ops.config_name(c) for c in gated_epilogue] == [
        ops.config_name(c) for c in kept["none"] if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps
    ]
    assert len(gated_epilogue) < len(kept["none"])
    assert configs._fits(ops.CONFIGS, args, **ops.specialisation(torch.bfloat16, grad_hidden=True)) == kept["none"]
