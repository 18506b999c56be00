"""The linear cross-entropy kernels (``triton_kernels/cross_entropy.py``) against float64
references built from PyTorch's own ops: ``F.cross_entropy`` on ``F.linear`` (label
smoothing and ``ignore_index`` as PyTorch defines them), the soft cap ``c tanh(z / c)``
and the z-loss ``z_loss * lse^2`` written out, gradients by autograd.

Without a GPU they run under Triton's interpreter in 16 x 32 x 16 tiles, so 33 rows are
three row blocks and 70 classes three vocabulary tiles, both with ragged edges. Fresh
outputs are NaN-filled (``poisoned_outputs``, from the GEMM tests): a row the forward
forgets to write fails. The backward adds into zeroed fp32 buffers, so a tile it forgets
shows as a missing share of a gradient.

The logits kernel of the chunked op (``ce_logits_kernel``) is checked against the float64
``formulas.cross_entropy_rows`` and ``cross_entropy_grad_logits`` (themselves tested
against autograd in ``test_cross_entropy.py``) on the same rounded logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _util import REL_TOL, assert_rel_close

pytestmark = pytest.mark.kernels
triton = pytest.importorskip("triton")

from test_triton_kernels import DEVICE, _randn, _to, poisoned_outputs  # noqa: E402, F401 (autouse fixture)
from torch_matgrad import formulas, triton_backend  # noqa: E402
from torch_matgrad.triton_kernels import cross_entropy as ce  # noqa: E402

IGNORE = -100
ALL_NEEDS = (True, True, True)
# Rows, classes, hidden size of most tests: three row blocks, three vocabulary tiles and
# three slices of H, each with a ragged edge.
ROWS, VOCAB, HIDDEN = SHAPE = 33, 70, 40


@pytest.fixture
def launches(monkeypatch):
    """Every launch of the four kernels, in order: ``(kernel name, grid)``."""
    seen = []

    class Recorded:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((self.name, grid)) or self.kernel[grid](*args, **kwargs)

    for name in ("lce_forward_kernel", "lce_combine_kernel", "lce_backward_kernel", "ce_logits_kernel"):
        monkeypatch.setattr(ce, name, Recorded(name, getattr(ce, name)))
    return seen


def _targets(rows, vocab, ignored=()):
    t = torch.randint(0, vocab, (rows,))
    t[list(ignored)] = IGNORE
    return t.to(DEVICE)


def _inputs(rows, vocab, hidden, dtype, bias=True, layout="contiguous"):
    """``x``, ``W``, ``b`` in ``dtype`` (float64 data rounded to it) laid out as asked;
    ``W`` scaled so the logits spread over a few units."""
    x = _to(_randn(rows, hidden, layout=layout), dtype)
    w = _to(_randn(vocab, hidden, layout=layout), dtype).mul_(3 * hidden**-0.5)
    b = _to(torch.randn(vocab, dtype=torch.float64), dtype) if bias else None
    return x, w, b


def _reference(x, w, b, target, scale, *, label_smoothing=0.0, z_loss=0.0, softcap=None, needs=ALL_NEEDS):
    """float64 ``(per-row loss, lse, grad_x, grad_W, grad_b)`` of ``sum_i scale_i loss_i``
    (``scale`` 0-dim or per row) by autograd through PyTorch's ops."""
    leaves = [None if t is None else t.double().cpu().requires_grad_(need) for t, need in zip((x, w, b), needs)]
    xd, wd, bd = leaves
    s = F.linear(xd, wd, bd)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    t = target.cpu()
    kept = t != IGNORE
    lse = torch.logsumexp(s, 1)
    loss = F.cross_entropy(s, t, reduction="none", ignore_index=IGNORE, label_smoothing=label_smoothing)
    loss = loss + z_loss * torch.where(kept, lse.square(), 0.0)
    grads = [None] * 3
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    if wanted:
        found = iter(torch.autograd.grad((loss * scale.double().cpu()).sum(), wanted))
        grads = [next(found) if t is not None and t.requires_grad else None for t in leaves]
    return loss.detach(), torch.where(kept, lse, 0.0).detach(), *grads


def _row_scale(target, reduction, grad=1.7):
    """The rows' upstream scale ``d`` as the op passes it: ``grad / n_kept`` (0-dim) for
    "mean", ``grad`` for "sum", one per row for "none"."""
    if reduction == "mean":
        return torch.tensor(grad / max(int((target != IGNORE).sum()), 1), device=DEVICE)
    if reduction == "sum":
        return torch.tensor(grad, device=DEVICE)
    return torch.randn(target.shape[0], device=DEVICE)


def _check(x, w, b, target, dtype, reduction="sum", needs=ALL_NEEDS, splits=None, **params):
    """Forward and backward through the kernels against :func:`_reference`."""
    loss, lse = ce.linear_cross_entropy_forward(x, w, b, target, ignore_index=IGNORE, splits=splits, **params)
    scale = _row_scale(target, reduction)
    got = triton_backend.lce_backward(scale, x, w, b, target, lse, ignore_index=IGNORE, needs=needs, **params)
    want = _reference(x, w, b, target, scale, needs=needs, **params)
    assert loss.dtype == lse.dtype == torch.float32
    # The forward's statistics are fp32 from exact fp32 products: fp32's tolerance even
    # for fp16/bf16 operands (the reference sees the same rounded operands).
    assert_rel_close(loss, want[0], torch.float32, "loss")
    assert_rel_close(lse, want[1], torch.float32, "lse")
    for name, g, ref in zip(("grad_x", "grad_W", "grad_b"), got, want[2:]):
        assert (g is None) == (ref is None), name
        if ref is not None:
            assert g.dtype == dtype and g.is_contiguous()
            assert_rel_close(g, ref, dtype, name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("hidden", [3, 40])
@pytest.mark.parametrize("vocab", [1, 5, 130])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_ragged_shapes(rows, vocab, hidden, bias):
    # Rows 1, 7 (< one block), 33 (three blocks); vocabularies within one tile or over
    # five; hidden sizes within one slice or over three; a few ignored rows.
    x, w, b = _inputs(rows, vocab, hidden, torch.float32, bias)
    _check(x, w, b, _targets(rows, vocab, ignored=range(2, rows, 5)), torch.float32)


OPTIONS = {
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=2.5),
    "all": dict(label_smoothing=0.2, z_loss=1e-3, softcap=4.0),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_options_and_reductions(options, reduction):
    x, w, b = _inputs(*SHAPE, torch.float32)
    _check(x, w, b, _targets(ROWS, VOCAB, ignored=(0, 9, 10, 32)), torch.float32, reduction, **OPTIONS[options])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(dtype):
    x, w, b = _inputs(*SHAPE, dtype)
    _check(x, w, b, _targets(ROWS, VOCAB, ignored=(4,)), dtype, "mean", **OPTIONS["all"])


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_strided_views(layout):
    # x and W read through a transpose (W^T as GPT-2's Conv1D stores it) or a sliced view.
    x, w, b = _inputs(*SHAPE, torch.float32, layout=layout)
    assert not x.is_contiguous() and not w.is_contiguous()
    _check(x, w, b, _targets(ROWS, VOCAB, ignored=(1,)), torch.float32, "none", softcap=3.0)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)], ids=str)
def test_partial_needs(needs):
    x, w, b = _inputs(*SHAPE, torch.float32)
    _check(x, w, b, _targets(ROWS, VOCAB), torch.float32, needs=needs, z_loss=1e-2)


def test_ignore_index_inside_the_vocabulary():
    # ignore_index may name a class: its rows count for nothing, the class's logits stay.
    x, w, b = _inputs(7, 5, 40, torch.float32)
    target = torch.tensor([1, 3, 1, 0, 4, 1, 2], device=DEVICE)
    loss, lse = ce.linear_cross_entropy_forward(x, w, b, target, ignore_index=1, label_smoothing=0.1)
    ref = F.cross_entropy(F.linear(x.double(), w.double(), b.double()), target, reduction="none", ignore_index=1,
                          label_smoothing=0.1)
    assert_rel_close(loss, ref, torch.float32)
    assert torch.equal(lse[target == 1], torch.zeros(3, device=DEVICE))


def test_every_row_ignored(launches):
    # Loss and lse 0, the gradients exactly 0; no tile is walked, but every launch runs
    # (and writes every row).
    x, w, b = _inputs(*SHAPE, torch.float32)
    target = torch.full((ROWS,), IGNORE, device=DEVICE)
    loss, lse = ce.linear_cross_entropy_forward(x, w, b, target)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(lse, torch.zeros_like(lse))
    for g in triton_backend.lce_backward(torch.tensor(1.0, device=DEVICE), x, w, b, target, lse):
        assert torch.equal(g, torch.zeros_like(g))
    assert [name for name, _ in launches] == ["lce_forward_kernel", "lce_combine_kernel", "lce_backward_kernel"]


def test_vocabulary_splits(launches):
    # The occupancy rule splits the vocabulary of a few row blocks (the interpreter
    # stands for a GPU of 3 SMs: 3 blocks get 2 splits), at most one split per tile (one
    # block of 7 rows gets them all); one split is a single launch; every split count
    # gives the same result.
    x, w, b = _inputs(*SHAPE, torch.float32)
    target = _targets(ROWS, VOCAB, ignored=(5,))
    params = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    results = {}
    for splits in (None, 1, 99):
        launches.clear()
        results[splits] = ce.linear_cross_entropy_forward(x, w, b, target, splits=splits, **params)
        grids = dict(launches)
        assert ("lce_combine_kernel" in grids) == (splits != 1)
        results[splits, "grid"] = grids["lce_forward_kernel"]
    blocks, tiles = (triton.cdiv(n, ce.FORWARD_META[f"BLOCK_{d}"]) for n, d in ((ROWS, "M"), (VOCAB, "V")))
    assert results[1, "grid"] == (blocks, 1) and results[99, "grid"] == (blocks, tiles)
    if ce.INTERPRET:
        assert results[None, "grid"] == (3, 2)
    want = _reference(x, w, b, target, torch.tensor(0.0), **params)
    for splits in (None, 1, 99):
        assert_rel_close(results[splits][0], want[0], torch.float32, f"loss, {splits} splits")
        assert_rel_close(results[splits][1], want[1], torch.float32, f"lse, {splits} splits")
    one_block = ce.linear_cross_entropy_forward(x[:7], w, b, target[:7], **params)
    assert launches[-2][1] == (1, tiles)
    assert_rel_close(one_block[0], want[0][:7], torch.float32)


def test_launches_and_outputs(launches):
    # One backward launch over (row blocks x vocabulary tiles); none when nothing is needed.
    x, w, b = _inputs(*SHAPE, torch.float32)
    target = _targets(ROWS, VOCAB)
    _, lse = ce.linear_cross_entropy_forward(x, w, b, target, splits=1)
    launches.clear()
    ce.linear_cross_entropy_backward(torch.ones(ROWS, device=DEVICE), x, w, b, target, lse)
    tiles = [triton.cdiv(n, ce.BACKWARD_META[f"BLOCK_{d}"]) for n, d in ((ROWS, "M"), (VOCAB, "V"))]
    assert launches == [("lce_backward_kernel", (tiles[0] * tiles[1],))]
    launches.clear()
    ones = torch.ones(ROWS, device=DEVICE)
    assert ce.linear_cross_entropy_backward(ones, x, w, b, target, lse, needs=(False,) * 3) == (None,) * 3
    assert launches == []


def test_out_of_range_target_gives_nan_rows():
    # Nothing is read at a bad target (far past V, or negative but not ignore_index): the
    # row's loss is NaN, the others are right; grad_x is NaN on that row only, grad_W and
    # grad_b everywhere (every class's gradient sums over the row).
    x, w, b = _inputs(*SHAPE, torch.float32)
    target = _targets(ROWS, VOCAB, ignored=(3,))
    good = target.clone()
    for bad in (2**40, -5):
        target[20] = bad
        loss, lse = ce.linear_cross_entropy_forward(x, w, b, target)
        want = _reference(x, w, b, good, torch.tensor(1.0))
        rest = torch.arange(ROWS, device=DEVICE) != 20
        assert torch.isnan(loss[20]) and torch.isfinite(lse).all()
        assert_rel_close(loss[rest], want[0][rest.cpu()], torch.float32)
        gx, gw, gb = ce.linear_cross_entropy_backward(torch.ones(ROWS, device=DEVICE), x, w, b, target, lse)
        assert torch.isnan(gx[20]).all() and torch.isfinite(gx[rest]).all()
        assert torch.isnan(gw).all() and torch.isnan(gb).all()


def test_gradient_filter_skips_negligible_tiles():
    # The classes of the second vocabulary tile get a -30 bias and no target: p ~ 1e-13
    # there, so with filter_eps = 2^-12 that tile's products are skipped (its gradients
    # exactly 0) and the rest agree with the unfiltered reference; with label smoothing
    # nothing is skipped.
    tile = ce.BACKWARD_META["BLOCK_V"]
    second = slice(tile, 2 * tile)
    x, w, b = _inputs(ROWS, 2 * tile + 6, HIDDEN, torch.float32)
    b[second] = -30.0
    target = _targets(ROWS, 2 * tile + 6)
    target[target // tile == 1] = 0
    _, lse = ce.linear_cross_entropy_forward(x, w, b, target)
    ones = torch.ones(ROWS, device=DEVICE)
    gx, gw, gb = ce.linear_cross_entropy_backward(ones, x, w, b, target, lse, filter_eps=2**-12)
    want = _reference(x, w, b, target, torch.tensor(1.0))
    assert not gb[second].any() and not gw[second].any()
    for g, ref, name in ((gx, want[2], "grad_x"), (gw, want[3], "grad_W"), (gb, want[4], "grad_b")):
        assert_rel_close(g, ref, torch.float32, name)
    _, lse = ce.linear_cross_entropy_forward(x, w, b, target, label_smoothing=0.1)
    gb = ce.linear_cross_entropy_backward(ones, x, w, b, target, lse, label_smoothing=0.1, filter_eps=2**-12)[2]
    assert gb[second].all()


def test_inputs_not_modified():
    x, w, b = _inputs(*SHAPE, torch.float32)
    target = _targets(ROWS, VOCAB, ignored=(2,))
    scale = torch.randn(ROWS, device=DEVICE)
    copies = [t.clone() for t in (x, w, b, target, scale)]
    _, lse = triton_backend.lce_forward(x, w, b, target, softcap=3.0)
    lse_copy = lse.clone()
    triton_backend.lce_backward(scale, x, w, b, target, lse, softcap=3.0)
    for t, c in zip((x, w, b, target, scale, lse), (*copies, lse_copy)):
        assert torch.equal(t, c)


def test_no_rows():
    x, w, b = _inputs(0, 5, 3, torch.float32)
    target = torch.empty(0, dtype=torch.int64, device=DEVICE)
    loss, lse = ce.linear_cross_entropy_forward(x, w, b, target)
    assert loss.shape == lse.shape == (0,)
    gx, gw, gb = ce.linear_cross_entropy_backward(torch.ones(0, device=DEVICE), x, w, b, target, lse)
    assert gx.shape == (0, 3) and gw.shape == (5, 3) and gb.shape == (5,) and not gw.any() and not gb.any()


def test_wrapper_rejects_mismatches():
    x, w, b = _inputs(7, 5, 3, torch.float32)
    target = _targets(7, 5)
    forward = ce.linear_cross_entropy_forward
    with pytest.raises(ValueError, match=r"must be \(N, H\) and \(V, H\)"):
        forward(x, w.t(), b, target)
    with pytest.raises(TypeError, match="unsupported dtype torch.float64"):
        forward(x.double(), w.double(), b.double(), target)
    with pytest.raises(ValueError, match="weight is torch.float16"):
        forward(x, w.half(), b, target)
    with pytest.raises(ValueError, match="target must be"):
        forward(x, w, b, target.float())
    with pytest.raises(ValueError, match="no classes"):
        forward(x, w[:0], None, target)
    with pytest.raises(ValueError, match="label_smoothing"):
        forward(x, w, b, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap"):
        forward(x, w, b, target, softcap=0.0)
    with pytest.raises(ValueError, match="lse"):
        ce.linear_cross_entropy_backward(torch.ones(7, device=DEVICE), x, w, b, target,
                                         torch.zeros(7, dtype=torch.float64, device=DEVICE))


# ------------------------------------------------------------------ the logits kernel
# ``ce_logits_kernel`` (``cross_entropy_logits``): the loss and G_z of logits already
# written, G_z over them. Under the interpreter a row is walked in blocks of 128 columns,
# so 1000 classes are 8 blocks with a ragged last one; 1, 7 and 33 fit one block.


def _logits_reference(z, target, weight, *, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """float64 ``(loss, lse, G_z)`` by ``formulas.cross_entropy_rows`` and
    ``cross_entropy_grad_logits`` on the same (rounded) logits; ignored rows 0."""
    s = formulas.softcapped(z.double().cpu(), softcap)
    t = target.cpu()
    kept = t != IGNORE
    t_safe = torch.where(kept, t, 0)
    loss, lse, e, total = formulas.cross_entropy_rows(s, t_safe, label_smoothing, z_loss)
    w = torch.where(kept, weight.double().cpu().expand(t.shape), 0.0)
    g = formulas.cross_entropy_grad_logits(s, e, total, lse, t_safe, w, label_smoothing, z_loss, softcap)
    return torch.where(kept, loss, 0.0), torch.where(kept, lse, 0.0), g


def _logits(rows, vocab, dtype):
    """Logits spread over a few units (softmax neither flat nor one-hot), in ``dtype``."""
    return _to(3 * torch.randn(rows, vocab, dtype=torch.float64), dtype)


def _assert_close_to_terms(got, want, terms, dtype, what):
    """``|got - want| <= REL_TOL[dtype] * (|want| + |terms|)`` (Frobenius norms): a
    difference is rounded relative to the terms it is made of, and at ``V = 1`` the loss
    and ``G_z`` cancel to 0 (``lse = s``, ``p = 1``) from terms of the size of ``lse``
    and ``w``."""
    err = (got.double().cpu() - want).norm().item()
    bound = REL_TOL[dtype] * (want.norm() + terms.norm()).item()
    assert err <= bound, f"{what}: error {err:.2e} > {bound:.2e} for {dtype}"


def _check_logits(z, target, weight, dtype, **params):
    """The kernel on a copy of ``z`` against :func:`_logits_reference`: loss and lse at
    fp32's tolerance (fp32 statistics of the same logits), G_z at the dtype's."""
    want = _logits_reference(z, target, weight, **params)
    buf = z.clone()
    loss, lse = ce.cross_entropy_logits(buf, target, weight, ignore_index=IGNORE, **params)
    assert loss.dtype == lse.dtype == torch.float32 and buf.dtype == dtype
    kept = (target != IGNORE).cpu()
    _assert_close_to_terms(loss, want[0], want[1], torch.float32, "loss")
    assert_rel_close(lse, want[1], torch.float32, "lse")
    _assert_close_to_terms(buf, want[2], torch.where(kept, weight.double().cpu().expand(kept.shape), 0.0),
                           dtype, "G_z")


LOGITS_OPTIONS = {"plain": {}, **OPTIONS}


@pytest.mark.parametrize("options", LOGITS_OPTIONS, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 33, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_logits_kernel_matches_float64(dtype, vocab, options):
    # Per-row weights (as "none" passes them), some rows ignored.
    rows = 9
    target = _targets(rows, vocab, ignored=(2, 7))
    _check_logits(_logits(rows, vocab, dtype), target, torch.randn(rows, device=DEVICE), dtype,
                  **LOGITS_OPTIONS[options])


@pytest.mark.parametrize("weight", ["0-dim", "per-row"])
def test_logits_kernel_weights(weight):
    # A 0-dim w (the mean's 1 / n_kept, the sum's 1) reads one number for every row.
    rows, vocab = 20, 300
    target = _targets(rows, vocab, ignored=(0, 19))
    w = torch.tensor(1 / 18, device=DEVICE) if weight == "0-dim" else torch.rand(rows, device=DEVICE)
    _check_logits(_logits(rows, vocab, torch.bfloat16), target, w.double(), torch.bfloat16, **OPTIONS["all"])


def test_logits_kernel_losses_alone_leave_the_logits(launches):
    # Without a weight nothing is written over z; one launch of one program per row.
    z = _logits(11, 70, torch.float32)
    target = _targets(11, 70, ignored=(3,))
    buf = z.clone()
    loss, lse = ce.cross_entropy_logits(buf, target, ignore_index=IGNORE, label_smoothing=0.1, softcap=3.0)
    want = _logits_reference(z, target, torch.tensor(1.0), label_smoothing=0.1, softcap=3.0)
    assert torch.equal(buf, z)
    assert_rel_close(loss, want[0], torch.float32)
    assert_rel_close(lse, want[1], torch.float32)
    assert launches == [("ce_logits_kernel", (11,))]


def test_logits_kernel_every_row_ignored():
    # Loss, lse and G_z exactly 0: nothing is read, zeros are written.
    z = _logits(6, 200, torch.bfloat16)
    target = torch.full((6,), IGNORE, device=DEVICE)
    loss, lse = ce.cross_entropy_logits(z, target, torch.ones(6, device=DEVICE), z_loss=1e-2, softcap=2.0)
    for t in (loss, lse, z):
        assert torch.equal(t, torch.zeros_like(t))


def test_logits_kernel_row_stride_and_ignore_index_as_a_class():
    # z as rows of a wider buffer: the columns past V are never touched. ignore_index may
    # name a class: its rows count for nothing, the class's logits stay in the others.
    vocab = 150
    wide = _logits(8, vocab + 10, torch.float32)
    before = wide.clone()
    z = wide[:, :vocab]
    target = torch.randint(0, vocab, (8,), device=DEVICE)
    target[[1, 4]] = 5
    w = torch.rand(8, device=DEVICE)
    want = _logits_reference(z, torch.where(target == 5, IGNORE, target), w, label_smoothing=0.2)
    loss, _ = ce.cross_entropy_logits(z, target, w, ignore_index=5, label_smoothing=0.2)
    assert torch.equal(wide[:, vocab:], before[:, vocab:])
    assert_rel_close(loss, want[0], torch.float32)
    assert_rel_close(z, want[2], torch.float32)


def test_logits_kernel_out_of_range_target_gives_nan_rows():
    # Nothing is read at a bad target: that row's loss and G_z are NaN, the rest right.
    z = _logits(7, 40, torch.float32)
    target = _targets(7, 40, ignored=(0,))
    good = target.clone()
    w = torch.rand(7, device=DEVICE)
    want = _logits_reference(z, good, w)
    rest = torch.arange(7) != 3
    for bad in (40, 2**40, -5):
        target[3] = bad
        buf = z.clone()
        loss, _ = ce.cross_entropy_logits(buf, target, w)
        assert torch.isnan(loss[3]) and torch.isnan(buf[3]).all()
        assert_rel_close(loss[rest], want[0][rest], torch.float32)
        assert_rel_close(buf[rest], want[2][rest], torch.float32)


def test_logits_wrapper_rejects_mismatches():
    z = _logits(4, 6, torch.float32)
    target = _targets(4, 6)
    with pytest.raises(ValueError, match="unit column stride"):
        ce.cross_entropy_logits(z.t(), _targets(6, 4))
    with pytest.raises(TypeError, match="unsupported dtype torch.float64"):
        ce.cross_entropy_logits(z.double(), target)
    with pytest.raises(ValueError, match="no classes"):
        ce.cross_entropy_logits(z[:, :0], target)
    with pytest.raises(ValueError, match="target must be"):
        ce.cross_entropy_logits(z, target[:3])
    with pytest.raises(ValueError, match=r"weight must be a float tensor of shape \(\) or \(4,\)"):
        ce.cross_entropy_logits(z, target, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="label_smoothing"):
        ce.cross_entropy_logits(z, target, label_smoothing=-0.1)
