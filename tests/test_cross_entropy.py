"""The LM head and its loss as one op (``torch_matgrad.linear_cross_entropy``,
``LinearCrossEntropy``): the numbers of ``F.linear`` + ``F.cross_entropy`` (label
smoothing, z-loss and soft cap added by hand), the explicit gradient of MATH.md item 12,
float64 gradcheck and gradgradcheck, logits never formed whole, clear errors, autocast,
torch.func, torch.compile, the module."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_matgrad as mg
from torch_matgrad import formulas
from torch_matgrad.check import lm_head_reference as reference  # F.linear, F.cross_entropy: torch ops alone

from _backends import backend  # noqa: F401  (fixture)
from _util import REL_TOL, assert_rel_close, rel_err

# (label_smoothing, z_loss, softcap): plain, and everything switched on at once.
VARIANTS = {"plain": (0.0, 0.0, None), "smooth_zloss_softcap": (0.1, 1e-2, 3.0)}


def _targets(shape, vocab, ignore_every=4):
    t = torch.randint(0, vocab, shape)
    t.view(-1)[1::ignore_every] = -100  # some rows count for nothing
    return t


def _call(fn, x, w, t, b, reduction, variant, **kw):
    eps, zl, cap = VARIANTS[variant]
    return fn(x, w, t, b, reduction=reduction, label_smoothing=eps, z_loss=zl, softcap=cap, **kw)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_and_gradgradcheck(variant, reduction, bias):
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)  # leading dims
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True) if bias else None
    t = _targets((2, 3), 7)
    inputs = [v for v in (x, w, b) if v is not None]

    def fn(x, w, b=None):
        return _call(mg.linear_cross_entropy, x, w, t, b, reduction, variant, chunk_size=2)  # three chunks

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(1,), (5, 13), (0,)], ids=lambda r: "x".join(map(str, r)))
def test_matches_eager_and_float64(backend, variant, reduction, dtype, rows):  # noqa: F811
    vocab, hidden = 67, 33  # ragged: two interpreter tiles and a tail each way
    x64 = torch.randn(*rows, hidden, dtype=torch.float64)
    w64 = torch.randn(vocab, hidden, dtype=torch.float64) / hidden ** 0.5
    b64 = torch.randn(vocab, dtype=torch.float64)
    t = _targets(rows, vocab)
    leaves64 = [v.requires_grad_() for v in (x64, w64, b64)]
    ref = _call(reference, x64, w64, t, b64, reduction, variant)
    leaves = [v.detach().to(dtype).requires_grad_() for v in leaves64]
    got = _call(mg.linear_cross_entropy, *leaves[:2], t, leaves[2], reduction, variant, chunk_size=32)
    assert got.dtype == dtype and got.shape == ref.shape
    if ref.numel() == 0 or (reduction == "mean" and rows == (0,)):
        assert torch.equal(got.isnan(), ref.isnan())  # the mean of nothing is NaN, as PyTorch's
        return
    grad = torch.randn_like(ref)
    got_grads = torch.autograd.grad(got, leaves, grad.to(dtype))
    ref_grads = torch.autograd.grad(ref, leaves64, grad)
    # The eager head and loss in the same dtype set the bar (at least the dtype's own).
    eager_leaves = [v.detach().to(dtype).requires_grad_() for v in leaves64]
    eager = _call(reference, *eager_leaves[:2], t, eager_leaves[2], reduction, variant)
    eager_grads = torch.autograd.grad(eager, eager_leaves, grad.to(dtype))
    for name, a, b, e in zip(["loss", "x", "w", "b"], [got, *got_grads], [ref, *ref_grads], [eager, *eager_grads]):
        tol = max(REL_TOL[dtype], 2 * rel_err(e, b))
        assert rel_err(a, b) <= tol, f"{name} ({backend}): {rel_err(a, b):.2e} > {tol:.2e}"


@pytest.mark.parametrize("strategy", ["gemm", "kernels"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_strategies_match_float64(strategy, reduction, dtype):
    """The Triton backend's other strategies: the chunks' products in the fused GEMM, or
    the cross-entropy kernels (CCE's way)."""
    x64 = torch.randn(37, 33, dtype=torch.float64, requires_grad=True)
    w64 = (torch.randn(67, 33, dtype=torch.float64) / 33**0.5).requires_grad_()
    t = _targets((37,), 67)
    ref = _call(reference, x64, w64, t, None, reduction, "smooth_zloss_softcap")
    x, w = (v.detach().to(dtype).requires_grad_() for v in (x64, w64))
    with mg.use_backend("triton"), mg.dispatch.cross_entropy_strategy(strategy), mg.dispatch.recording() as ran:
        got = _call(mg.linear_cross_entropy, x, w, t, None, reduction, "smooth_zloss_softcap")
        grad = torch.randn_like(ref)
        got_grads = torch.autograd.grad(got, [x, w], grad.to(dtype))
    assert ran == {("forward", "triton"): 1, ("backward", "triton"): 1}
    for a, b in zip([got, *got_grads], [ref, *torch.autograd.grad(ref, [x64, w64], grad)]):
        assert_rel_close(a, b, dtype)
    with pytest.raises(ValueError, match="unknown strategy 'fused'; choose one of chunked, gemm, kernels"):
        with mg.dispatch.cross_entropy_strategy("fused"):
            pass


@pytest.fixture
def logits_launches(monkeypatch):
    """The grid of every launch of the fused logits kernel (the Triton backend's
    ``"chunked"`` strategy), in order."""
    kernels = pytest.importorskip("torch_matgrad.triton_kernels.cross_entropy")
    kernel, seen = kernels.ce_logits_kernel, []

    class Recorded:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(grid) or kernel[grid](*args, **kwargs)

    monkeypatch.setattr(kernels, "ce_logits_kernel", Recorded())
    return seen


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fused_chunks_match_float64(logits_launches, reduction, bias, dtype):
    """The Triton backend's default strategy (CPU tensors under the interpreter, as CUDA
    ones): torch's products, each chunk's losses and G_z from the fused kernel, written
    over the chunk's logits. 37 rows in chunks of 16: the forward launches the kernel once
    a chunk; under "none" the backward recomputes the chunks, once more each."""
    rows, vocab, hidden = 37, 150, 24  # 150 classes: two interpreter blocks, the last ragged
    x64 = torch.randn(rows, hidden, dtype=torch.float64, requires_grad=True)
    w64 = (torch.randn(vocab, hidden, dtype=torch.float64) * 2 / hidden**0.5).requires_grad_()
    b64 = torch.randn(vocab, dtype=torch.float64, requires_grad=True) if bias else None
    leaves64 = [v for v in (x64, w64, b64) if v is not None]
    t = _targets((rows,), vocab)
    ref = _call(reference, x64, w64, t, b64, reduction, "smooth_zloss_softcap")
    grad = torch.randn_like(ref)
    leaves = [v.detach().to(dtype).requires_grad_() for v in leaves64]
    x, w, b = leaves if bias else (*leaves, None)
    with mg.use_backend("triton"), mg.dispatch.recording() as ran:
        got = _call(mg.linear_cross_entropy, x, w, t, b, reduction, "smooth_zloss_softcap", chunk_size=16)
        got_grads = torch.autograd.grad(got, leaves, grad.to(dtype))
    assert ran == {("forward", "triton"): 1, ("backward", "triton"): 1}
    assert logits_launches == [(16,), (16,), (5,)] * (2 if reduction == "none" else 1)
    # The eager head and loss in the same dtype set the bar (at least the dtype's own).
    eager_leaves = [v.detach().to(dtype).requires_grad_() for v in leaves64]
    eager = _call(reference, eager_leaves[0], eager_leaves[1], t, eager_leaves[2] if bias else None, reduction,
                  "smooth_zloss_softcap")
    eager_grads = torch.autograd.grad(eager, eager_leaves, grad.to(dtype))
    want = torch.autograd.grad(ref, leaves64, grad)
    for name, a, r, e in zip(["loss", "x", "w", "b"], [got, *got_grads], [ref, *want], [eager, *eager_grads]):
        tol = max(REL_TOL[dtype], 2 * rel_err(e, r))
        assert a.dtype == dtype and rel_err(a, r) <= tol, f"{name}: {rel_err(a, r):.2e} > {tol:.2e}"


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_chunks_stay_out_of_grad_mode(logits_launches, reduction):
    """The kernel writes G_z in place and is not differentiable: a backward under
    create_graph runs torch ops (one differentiable chunk), whose own gradient is the
    torch backend's; the forward's launches are all there is."""
    x = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    t, upstream = _targets((12,), 30), torch.rand(12 if reduction == "none" else ())

    def second_order(backend):
        with mg.use_backend(backend), mg.dispatch.recording() as ran:
            loss = mg.linear_cross_entropy(x, w, t, reduction=reduction, z_loss=1e-2, chunk_size=5)
            gx, gw = torch.autograd.grad(loss, [x, w], upstream, create_graph=True)
        return ran, torch.autograd.grad(gx.square().sum() + gw.square().sum(), [x, w])

    ran, got = second_order("triton")
    assert ran == {("forward", "triton"): 1, ("backward", "torch"): 1}
    assert logits_launches == [(5,), (5,), (2,)]
    for a, b in zip(got, second_order("torch")[1]):
        assert_rel_close(a, b, torch.float32)


def test_fused_chunks_without_gradients_and_their_default_size(logits_launches):
    """Under no_grad the kernel gives the losses alone and nothing is written over the
    inputs. The default chunk counts the kernel's logits in the input dtype: on a GPU
    256 MiB are 1046 rows of bf16 at Llama-3's 128256 classes, 1024 in whole 128-row
    tiles (512 of fp32), the K of grad_W's product; torch ops count fp32 on every device,
    and a CPU's chunks are not rounded."""
    x, w = torch.randn(20, 8, dtype=torch.bfloat16), torch.randn(50, 8, dtype=torch.bfloat16)
    t = _targets((20,), 50)
    before = [v.clone() for v in (x, w, t)]
    with mg.use_backend("triton"), torch.no_grad():
        got = mg.linear_cross_entropy(x, w, t, label_smoothing=0.1)
    assert_rel_close(got, reference(x.double(), w.double(), t, label_smoothing=0.1), torch.bfloat16)
    assert all(torch.equal(a, v) for a, v in zip(before, (x, w, t)))
    assert logits_launches == [(20,)]
    assert formulas.chunk_rows(10**6, 128256, None, "cuda", itemsize=2) == 1024
    assert formulas.chunk_rows(10**6, 128256, None, "cuda", itemsize=4) == 512  # and torch ops'
    assert formulas.chunk_rows(10**6, 128256, None, "cpu") == 65
    assert formulas.chunk_rows(10**6, 2**20, None, "cuda", itemsize=2) == 128  # one tile still
    assert formulas.chunk_rows(10**6, 2**22, None, "cuda", itemsize=2) == 32  # less: as many as fit


@pytest.mark.cuda
def test_auto_runs_the_fused_chunks_on_cuda(logits_launches):
    """On CUDA "auto" gives the LM head to the Triton backend's fused chunks (fp16, bf16,
    fp32); "torch" stays torch ops, and so does float64."""
    x = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(100, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = _targets((64,), 100).cuda()
    with mg.dispatch.recording() as ran:
        mg.linear_cross_entropy(x, w, t).backward()
    assert ran == {("forward", "triton"): 1, ("backward", "triton"): 1} and logits_launches == [(64,)]
    for backend, dtype in (("torch", torch.bfloat16), ("auto", torch.float64)):
        with mg.use_backend(backend), mg.dispatch.recording() as ran:
            mg.linear_cross_entropy(x.detach().to(dtype).requires_grad_(), w.detach().to(dtype), t).backward()
        assert ran == {("forward", "torch"): 1, ("backward", "torch"): 1} and len(logits_launches) == 1


def test_grad_logits_is_autograd_of_the_rows_loss():
    """Item 12 evaluated on its own: G_z against autograd of sum_i w_i loss_i."""
    z = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    t, w = torch.randint(0, 9, (6,)), torch.rand(6, dtype=torch.float64)
    for eps, zl, cap in VARIANTS.values():
        s = formulas.softcapped(z, cap)
        loss, lse, e, total = formulas.cross_entropy_rows(s, t, eps, zl)
        want = torch.autograd.grad((w * loss).sum(), z)[0]
        got = formulas.cross_entropy_grad_logits(s, e, total, lse, t, w, eps, zl, cap)
        assert_rel_close(got, want, torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_target_ignored_gives_what_pytorch_gives(reduction):
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    t = torch.full((5,), 3)
    t[:] = 7
    got = mg.linear_cross_entropy(x, w, t, reduction=reduction, ignore_index=7)
    want = F.cross_entropy(F.linear(x, w), t, reduction=reduction, ignore_index=7)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    g = torch.ones_like(want)
    for a, b in zip(torch.autograd.grad(got, [x, w], g), torch.autograd.grad(want, [x, w], g)):
        assert torch.equal(a, b)  # zeros


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_are_never_formed_whole(reduction):
    rows, vocab, hidden, chunk = 64, 300, 8, 16
    x = torch.randn(rows, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    t = torch.randint(0, vocab, (rows,))
    with _LargestTensor() as seen:
        loss = mg.linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=chunk)
        torch.autograd.grad(loss.sum(), [x, w])
    assert seen.largest == chunk * vocab  # a chunk's logits, never more (W is vocab x 8)
    default = formulas.chunk_rows(10**6, 32000)
    assert default * 32000 * 4 <= formulas.CHUNK_BYTES["cpu"] < (default + 1) * 32000 * 4


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_working_memory_is_one_set_of_chunk_buffers(variant, reduction, dtype):
    """Every chunk reuses the same buffers: the step's peak of torch's storages is the
    gradients, the chunk's logits, an fp32 copy of them for a half dtype and a second
    fp32 buffer under a soft cap, plus per-row vectors; a chunk-sized temporary more
    (what the chunks allocated and freed one by one, wherever the allocator put them)
    breaks the bound."""
    from torch_matgrad.bench.allocations import block_bytes, step_allocations

    rows, vocab, hidden, chunk = 256, 1000, 16, 32  # eight chunks
    x = torch.randn(rows, hidden, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=dtype, requires_grad=True)
    t = _targets((rows,), vocab)
    cap = VARIANTS[variant][2]

    def step():
        loss = _call(mg.linear_cross_entropy, x, w, t, None, reduction, variant, chunk_size=chunk)
        return torch.autograd.grad(loss.sum(), [x, w])

    peak, _ = step_allocations(step)
    logits = chunk * vocab
    buffers = block_bytes(logits * dtype.itemsize) + block_bytes(logits * 4) * ((dtype != torch.float32) + (cap is not None))
    grads = block_bytes(x.numel() * x.element_size()) + block_bytes(w.numel() * w.element_size())
    assert grads + buffers <= peak < grads + buffers + logits  # rows' vectors: a few KiB


def test_what_is_kept_is_the_inputs_and_the_gradients():
    x = torch.randn(64, 16, requires_grad=True)
    w = nn.Parameter(torch.randn(100, 16))
    t = torch.randint(0, 100, (64,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        loss = mg.linear_cross_entropy(x, w, t, chunk_size=8)
    assert [s.shape for s in saved] == [x.shape, w.shape, t.shape]  # the inputs: nothing of (rows, vocab)
    grad_x, grad_w, grad_b = loss.grad_fn.stored  # the forward's gradients, handed to the backward
    assert grad_x.shape == x.shape and grad_w.shape == w.shape and grad_b is None
    address = grad_w.data_ptr()
    del grad_x, grad_w
    loss.backward()
    assert w.grad.data_ptr() == address and loss.grad_fn.stored is None  # taken without a copy


def test_a_second_backward_recomputes_what_the_first_handed_over():
    x = torch.randn(20, 8, requires_grad=True)
    w = nn.Parameter(torch.randn(30, 8))
    t = _targets((20,), 30)
    loss = mg.linear_cross_entropy(x, w, t, z_loss=1e-3, chunk_size=6)
    first = torch.autograd.grad(loss, [x, w], torch.tensor(2.0), retain_graph=True)
    second = torch.autograd.grad(loss, [x, w], torch.tensor(2.0))
    want = torch.autograd.grad(2 * reference(x, w, t, z_loss=1e-3), [x, w])
    for a, b, e in zip(first, second, want):
        assert_rel_close(a, e, torch.float32)
        assert_rel_close(b, e, torch.float32)


def test_backend_of_the_forward_runs_the_backward(backend):  # noqa: F811
    x = torch.randn(33, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    for reduction in ("mean", "none"):  # gradients in the forward, or recomputed
        with mg.dispatch.recording() as ran:
            mg.linear_cross_entropy(x, w, torch.randint(0, 40, (33,)), reduction=reduction).sum().backward()
        assert ran == {("forward", backend): 1, ("backward", backend): 1}


def test_inputs_not_modified_and_views():
    x = torch.randn(16, 10).t()  # a transposed view
    w, b = torch.randn(12, 16, requires_grad=True), torch.randn(12, requires_grad=True)
    t = _targets((10,), 12).int()  # int32 targets too
    before = [v.detach().clone() for v in (x, w, b, t)]
    loss = mg.linear_cross_entropy(x, w, t, b, label_smoothing=0.2, chunk_size=3)
    assert_rel_close(loss, reference(x, w, t.long(), b, label_smoothing=0.2), torch.float32)
    loss.backward()
    assert all(torch.equal(a, v) for a, v in zip(before, (x, w, b, t)))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(t=torch.tensor([0, 5, 6, 1])), ValueError,
         r"target 6 at \(2,\) is not a class index in \[0, 6\) .*ignore_index=-100"),
        (dict(t=torch.tensor([0, -1, 2, 1])), ValueError, r"target -1 at \(1,\)"),
        (dict(t=torch.rand(4)), TypeError, r"target must hold integer class indices, got shape \(4,\), torch.float32"),
        (dict(t=torch.zeros(4, 1, dtype=torch.long)), ValueError, r"target must have input's shape .* \(4,\), got \(4, 1\)"),
        (dict(t=torch.zeros(4, dtype=torch.long, device="meta")), RuntimeError, r"one device.* target on meta; move the target with target.to\('cpu'\)"),
        (dict(w=torch.randn(6, 5)), ValueError, r"linear_cross_entropy: input has 3 features .* weight of shape \(6, 5\)"),
        (dict(b=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
        (dict(w=torch.randn(6, 3, dtype=torch.float64)), TypeError, r"one dtype .* weight torch.float64"),
        (dict(reduction="avg"), ValueError, r"unknown reduction 'avg'; choose one of 'mean', 'sum', 'none'"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
        (dict(z_loss=-1.0), ValueError, r"z_loss must be >= 0"),
        (dict(softcap=0.0), ValueError, r"softcap must be None or > 0"),
        (dict(chunk_size=0), ValueError, r"chunk_size must be None or a positive int"),
    ],
)
def test_bad_input_errors(change, error, match):
    args = dict(x=torch.randn(4, 3), w=torch.randn(6, 3), t=torch.tensor([0, 5, -100, 1]), b=None)
    kw = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with pytest.raises(error, match=match):
        mg.linear_cross_entropy(args["x"], args["w"], args["t"], args["b"], **kw)


def test_autocast_behaves_like_the_eager_head_and_loss():
    head = mg.LinearCrossEntropy(16, 50, bias=True)
    x, t = torch.randn(2, 9, 16), _targets((2, 9), 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(x, t)
        want = F.cross_entropy(F.linear(x, head.weight, head.bias).flatten(0, 1), t.flatten())
    assert got.dtype == want.dtype == torch.float32
    assert_rel_close(got, want, torch.bfloat16)
    got.backward()
    assert head.weight.grad.dtype == torch.float32


def test_torch_func_grad_and_vmap():
    x, t = torch.randn(5, 6, dtype=torch.float64), _targets((5,), 9)
    w = torch.randn(9, 6, dtype=torch.float64)

    def loss(w, x, t):
        return mg.linear_cross_entropy(x, w, t, z_loss=1e-2, chunk_size=2)

    def loss_ref(w, x, t):
        return reference(x, w, t, z_loss=1e-2)

    assert_rel_close(torch.func.grad(loss)(w, x, t), torch.func.grad(loss_ref)(w, x, t), torch.float64)
    kept = t != -100
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, x[kept, None], t[kept, None])
    want = torch.stack([torch.func.grad(loss_ref)(w, x[i : i + 1], t[i : i + 1]) for i in kept.nonzero()[:, 0]])
    assert_rel_close(per_sample, want, torch.float64)


def test_compile_gives_the_same_loss_and_gradients():
    torch._dynamo.reset()
    head = mg.LinearCrossEntropy(16, 40, bias=False, label_smoothing=0.1, chunk_size=8)
    x, t = torch.randn(30, 16, requires_grad=True), _targets((30,), 40)
    compiled = torch.compile(head, backend="aot_eager")
    got = compiled(x, t)
    want = reference(x, head.weight, t, label_smoothing=0.1)
    assert_rel_close(got, want, torch.float32)
    for a, b in zip(torch.autograd.grad(got, [x, head.weight]), torch.autograd.grad(want, [x, head.weight])):
        assert_rel_close(a, b, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_runs_the_chunks_as_one_op(reduction):
    """The compiler gets the chunk loop as one custom op, not its ops (whose functional
    form kept two grad_W's), in the forward and in the recomputing backward; a step
    gives eager's loss and gradients (float64 reference)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(graph, _):
        graphs.append({str(n.target) for n in graph.graph.nodes if n.op == "call_function"})
        return make_boxed_func(graph.forward)

    torch._dynamo.reset()
    x64, w64 = torch.randn(30, 16, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64)
    t = _targets((30,), 40)
    x, w = (v.float().requires_grad_() for v in (x64, w64))
    fn = torch.compile(functools.partial(mg.linear_cross_entropy, reduction=reduction, chunk_size=8),
                       backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    got = fn(x, w, t)
    grads = torch.autograd.grad(got.sum(), [x, w])
    op, products = "torch_matgrad.linear_cross_entropy_chunks.default", {"aten.mm.default", "aten.addmm.default"}
    forward, backward = graphs
    assert op in forward and not forward & products
    assert (op in backward) == (reduction == "none") and not backward & products  # mean: scaled, not recomputed
    leaves = [v.requires_grad_() for v in (x64, w64)]
    want = reference(*leaves, t, reduction=reduction)
    assert_rel_close(got, want, torch.float32)
    for a, b in zip(grads, torch.autograd.grad(want.sum(), leaves)):
        assert_rel_close(a, b, torch.float32)


def test_module_has_the_linear_heads_parameters_and_keys():
    torch.manual_seed(1)
    linear = nn.Linear(16, 30, bias=False)
    torch.manual_seed(1)
    head = mg.LinearCrossEntropy(16, 30, bias=False, z_loss=1e-4)
    assert torch.equal(head.weight, linear.weight)  # nn.Linear's initialisation
    assert list(head.state_dict()) == list(linear.state_dict()) == ["weight"]
    assert not isinstance(head, nn.Linear)
    assert repr(head) == "LinearCrossEntropy(in_features=16, out_features=30, bias=False, z_loss=0.0001)"
    shared = mg.LinearCrossEntropy.from_linear(linear, softcap=30.0)
    assert shared.weight is linear.weight and shared.bias is None
    x, t = torch.randn(3, 4, 16), torch.randint(0, 30, (3, 4))
    assert_rel_close(shared(x, t), reference(x, linear.weight, t, softcap=30.0), torch.float32)
    assert_rel_close(shared.logits(x), 30.0 * torch.tanh(linear(x) / 30.0), torch.float32)
    copied = copy.deepcopy(head)
    copied.load_state_dict(nn.Linear(16, 30, bias=False).state_dict())
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        mg.LinearCrossEntropy.from_linear(head)
