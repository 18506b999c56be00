"""The MLP block with LoRA adapters (``torch_matgrad.mlp(..., up_lora=, gate_lora=,
down_lora=)``): PEFT's numbers (its dropout masks included, drawn in its order), the
explicit backward (float64 gradcheck and gradgradcheck), what it saves (never ``h``),
autocast, ``torch.compile``, both backends, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torch_matgrad as mg
from torch_matgrad.mlp import saved_bytes

from _backends import backend  # noqa: F401  (fixture)
from _util import REL_TOL, activate_ref, assert_rel_close, rel_err

D, H, D_OUT = 6, 10, 5
RANKS = {"up": 3, "gate": 2, "down": 4}


def _block(gated, bias, roles, dtype=torch.float64, frozen=False, dropout=0.0):
    """The block's weights and ``{role: LoRA}`` for ``roles`` (trainable adapters; the
    base weights frozen when ``frozen``)."""
    def make(*shape, train=True):
        return (torch.randn(*shape, dtype=dtype) / shape[-1] ** 0.5).requires_grad_(train)

    base = dict(up_w=make(H, D, train=not frozen), down_w=make(D_OUT, H, train=not frozen))
    if gated:
        base["gate_w"] = make(H, D, train=not frozen)
    if bias:
        base.update(up_b=make(H, train=not frozen), down_b=make(D_OUT, train=not frozen))
    features = {"up": (D, H), "gate": (D, H), "down": (H, D_OUT)}
    adapters = {role: mg.LoRA(make(RANKS[role], features[role][0]), make(features[role][1], RANKS[role]),
                              0.5 + i, dropout) for i, role in enumerate(roles)}
    return base, adapters


def _ours(x, base, adapters, activation):
    return mg.mlp(x, base["up_w"], base["down_w"], base.get("up_b"), base.get("down_b"), activation,
                  base.get("gate_w"), base.get("gate_b"), **{f"{r}_lora": a for r, a in adapters.items()})


def _peft(x, base, adapters, activation):
    """PEFT's LoRA layers in eager torch ops: ``base(v) + lora_B(lora_A(dropout(v))) * s``
    per projection, called in the gated block's order (gate, up, down)."""
    def project(v, role):
        out = F.linear(v, base[f"{role}_w"], base.get(f"{role}_b"))
        a = adapters.get(role)
        if a is None:
            return out
        return out + F.linear(F.linear(F.dropout(v, a.dropout), a.A), a.B) * a.scaling

    gate = activate_ref(project(x, "gate"), activation) if "gate_w" in base else None
    u = project(x, "up")
    return project(activate_ref(u, activation) if gate is None else gate * u, "down")


def _tensors(base, adapters):
    return [*base.values(), *(t for a in adapters.values() for t in (a.A, a.B))]


CASES = [(False, "gelu", True, ("up", "down")), (True, "silu", False, ("up", "gate", "down")),
         (True, "gelu_tanh", True, ("gate",)), (False, "relu", False, ("down",)), (False, None, True, ("up",))]
IDS = ["plain-gelu-up,down", "gated-silu-all", "gated-gelu_tanh-gate", "plain-relu-down", "plain-none-up"]


@pytest.mark.parametrize("gated,activation,bias,roles", CASES, ids=IDS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_and_gradgradcheck(gated, activation, bias, roles, dropout):
    base, adapters = _block(gated, bias, roles, dropout=dropout)
    x = torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True)  # leading dims
    names, tensors = list(base), _tensors(base, adapters)

    def fn(x, *ts):
        torch.manual_seed(0)  # one mask for every evaluation
        b = dict(zip(names, ts[: len(names)]))
        it = iter(ts[len(names):])
        a = {role: mg.LoRA(next(it), next(it), lora.scaling, lora.dropout) for role, lora in adapters.items()}
        return _ours(x, b, a, activation)

    assert torch.autograd.gradcheck(fn, (x, *tensors))
    if activation != "relu":  # relu'' is zero almost everywhere: nothing to check
        assert torch.autograd.gradgradcheck(fn, (x, *tensors))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 33, 0])
def test_matches_peft_with_its_dropout_masks(dtype, rows):
    # Against PEFT's computation in float64 with the same masks (the same seed): ours
    # within the dtype's tolerance of it, or of PEFT's own distance in the dtype, twice.
    base, adapters = _block(True, True, ("up", "gate", "down"), dtype=dtype, frozen=True, dropout=0.25)
    x = torch.randn(rows, D, dtype=dtype, requires_grad=True)
    wide = {k: v.detach().double() for k, v in base.items()}
    wide_adapters = {r: a._replace(A=a.A.detach().double().requires_grad_(), B=a.B.detach().double().requires_grad_())
                     for r, a in adapters.items()}
    x64 = x.detach().double().requires_grad_()
    cot = torch.randn(rows, D_OUT, dtype=dtype)
    results = {}
    for name, fn, args in (("ours", _ours, (x, base, adapters)), ("peft", _peft, (x, base, adapters)),
                           ("truth", _peft, (x64, wide, wide_adapters))):
        torch.manual_seed(1)
        out = fn(*args, "silu")
        params = [args[0], *(t for a in args[2].values() for t in (a.A, a.B))]
        results[name] = [out, *torch.autograd.grad(out, params, cot.to(out.dtype))]
    for i, (ours, peft, truth) in enumerate(zip(*results.values())):
        bound = max(REL_TOL[dtype], 2 * rel_err(peft, truth))
        assert rel_err(ours, truth) <= bound, (i, rel_err(ours, truth), bound)


@pytest.mark.parametrize("input_grad", [True, False], ids=["x-grad", "x-frozen"])
def test_adapter_gradients_whatever_else_needs_one(input_grad):
    # The first block of a model with frozen embeddings: x needs no gradient, so the
    # block keeps neither up_w nor gate_w; the adapters' gradients are still PEFT's.
    base, adapters = _block(True, False, ("up", "gate", "down"), dtype=torch.float64, frozen=True)
    x = torch.randn(9, D, dtype=torch.float64, requires_grad=input_grad)
    factors = [t for a in adapters.values() for t in (a.A, a.B)]
    got = torch.autograd.grad(_ours(x, base, adapters, "silu").sum(), factors)
    want = torch.autograd.grad(_peft(x, base, adapters, "silu").sum(), factors)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_rel_close(g, w, torch.float64, what=f"adapter factor #{i}")


def test_transposed_input_and_no_adapter_gradient_for_frozen_adapters():
    base, adapters = _block(False, True, ("up", "down"), dtype=torch.float32, frozen=True)
    adapters["up"].A.requires_grad_(False)  # a frozen adapter factor gets no gradient
    x = torch.randn(D, 9).t().requires_grad_()  # (9, D), non-contiguous
    out = _ours(x, base, adapters, "gelu")
    grads = torch.autograd.grad(out.sum(), [x, adapters["up"].B, adapters["down"].A, adapters["down"].B])
    want = torch.autograd.grad(_peft(x, base, adapters, "gelu").sum(),
                               [x, adapters["up"].B, adapters["down"].A, adapters["down"].B])
    for g, w in zip(grads, want):
        assert_rel_close(g, w, torch.float32)
    assert all(t.grad is None for t in (adapters["up"].A, *base.values()))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saves_x_preactivations_ts_and_masks_never_h(dropout):
    # Frozen base weights, trainable adapters, x needing its gradient: what LoRA
    # fine-tuning saves. Ours: x, u, g, each t (r a row), and a byte an element of mask
    # for x (up's, gate's) and for h (down's); PEFT's eager layers also keep act(g), h and
    # the dropped copies.
    m = 64
    base, adapters = _block(True, False, ("up", "gate", "down"), dtype=torch.float32, frozen=True, dropout=dropout)
    x = torch.randn(m, D, requires_grad=True)
    params = _tensors(base, adapters)
    _, ours = saved_bytes(lambda v: _ours(v, base, adapters, "silu"), x, params=params)
    _, peft = saved_bytes(lambda v: _peft(v, base, adapters, "silu"), x, params=params)
    masks = (2 * m * D + m * H) if dropout else 0
    assert ours == 4 * m * (D + 2 * H + sum(RANKS.values())) + masks, ours
    assert ours < peft, (ours, peft)


def test_autocast_bf16_matches_peft():
    base, adapters = _block(True, True, ("up", "gate", "down"), dtype=torch.float32, frozen=True)
    x = torch.randn(17, D, requires_grad=True)
    params = [x, *(t for a in adapters.values() for t in (a.A, a.B))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = _ours(x, base, adapters, "silu"), _peft(x, base, adapters, "silu")
    assert out.dtype == torch.bfloat16
    cot = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, params, cot), torch.autograd.grad(want, params, cot)):
        assert g.dtype == torch.float32
        assert_rel_close(g, w, torch.bfloat16)


def test_backends_match_float64(backend):  # noqa: F811
    # The base products on the backend (the Triton GEMM under the interpreter on a CPU),
    # the rank-r products as torch ops: against the float64 block.
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    base, adapters = _block(True, True, ("up", "gate", "down"), dtype=torch.float64)
    x = torch.randn(33, D, dtype=torch.float64, requires_grad=True)
    tensors = [x, *_tensors(base, adapters)]
    want = torch.autograd.grad(_peft(x, base, adapters, "silu").square().sum(), tensors)

    def cast(t):
        return t.detach().to(device, torch.float32).requires_grad_()

    base32 = {k: cast(v) for k, v in base.items()}
    adapters32 = {r: mg.LoRA(cast(a.A), cast(a.B), a.scaling, a.dropout) for r, a in adapters.items()}
    x32 = cast(x)
    with mg.dispatch.recording() as ran:
        got = torch.autograd.grad(_ours(x32, base32, adapters32, "silu").square().sum(),
                                  [x32, *_tensors(base32, adapters32)])
    assert ran[("forward", backend)] == 3 and ran[("backward", backend)] == 3  # one per projection
    for g, w in zip(got, want):
        assert_rel_close(g, w, torch.float32)


def test_compiled_block_with_adapters_saves_what_the_eager_one_does():
    import torch._inductor  # noqa: F401  (the partitioner asks Inductor what fuses)

    torch._dynamo.reset()
    base, adapters = _block(True, False, ("up", "gate", "down"), dtype=torch.float32, frozen=True)
    x = torch.randn(40, D, requires_grad=True)
    params = _tensors(base, adapters)

    def block(v):
        return _ours(v, base, adapters, "silu")

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager_decomp_partition")
    out, got_bytes = saved_bytes(compiled, x, params=params)
    want, want_bytes = saved_bytes(block, x, params=params)
    assert got_bytes == want_bytes, (got_bytes, want_bytes)
    cot = torch.randn_like(out)
    grads = [x, *(t for a in adapters.values() for t in (a.A, a.B))]
    for g, w in zip(torch.autograd.grad(out, grads, cot), torch.autograd.grad(want, grads, cot)):
        assert_rel_close(g, w, torch.float32)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "role, change, error, match",
    [
        ("gate", {}, ValueError, r"gate_lora given without gate_weight"),
        ("up", {"A": torch.randn(3, D + 1)}, ValueError, r"up_lora.A must be 2-D \(r, 6\)"),
        ("down", {"A": torch.randn(4, D)}, ValueError, r"down_lora.A must be 2-D \(r, 10\)"),
        ("up", {"B": torch.randn(H, 2)}, ValueError, r"up_lora.B must have shape \(out_features, r\) = \(10, 3\)"),
        ("down", {"dropout": 1.5}, ValueError, r"dropout is a probability"),
        ("up", {"B": torch.randn(H, 3, dtype=torch.float64)}, TypeError, r"one dtype"),
        ("up", {"A": torch.randn(3, D, device="meta")}, RuntimeError, r"up_lora.A on meta"),
    ],
)
def test_bad_adapters_are_named(role, change, error, match):
    base, _ = _block(False, False, (), dtype=torch.float32)
    features = {"up": D, "gate": D, "down": H}[role]
    out_features = {"up": H, "gate": H, "down": D_OUT}[role]
    lora = mg.LoRA(torch.randn(RANKS[role], features), torch.randn(out_features, RANKS[role]), 1.0)._replace(**change)
    with pytest.raises(error, match=match):
        _ours(torch.randn(4, D), base, {role: lora}, "gelu")
    with pytest.raises(TypeError, match=r"up_lora must be a torch_matgrad.LoRA"):
        _ours(torch.randn(4, D), base, {"up": (lora.A, lora.B)}, "gelu")


def test_inputs_are_never_modified_and_no_grad_matches():
    base, adapters = _block(True, True, ("up", "gate", "down"), dtype=torch.float32)
    x = torch.randn(8, D)
    before = [t.clone() for t in (x, *_tensors(base, adapters))]
    with torch.no_grad():
        fast = _ours(x, base, adapters, "gelu")
    slow = _ours(x, base, adapters, "gelu")
    slow.sum().backward()
    assert torch.equal(fast, slow.detach())
    assert all(torch.equal(a, b) for a, b in zip(before, (x, *_tensors(base, adapters))))
