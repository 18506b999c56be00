"""Split-K products of decoding rows (``ops.split_k``) against float64 references.

A plain product of at most ``SPLIT_K_MAX_M`` rows may split K into S slices: the pointer
kernel with ``SPLIT_K`` stores each slice's partial product into a workspace and
``split_k_reduce_kernel`` sums them, then applies the bias, the activation and the store
of ``z``. Under the interpreter the pointer kernel runs here in 16 x 16 x 16 tiles (the
GPU's decoding tiles have 16 rows), so that the shapes span several tiles and slices;
every output and the workspace are NaN-filled first, so a tile or a partial that no
program writes fails the comparison.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from _util import activate_ref, assert_rel_close, float32_matmul_precision

pytestmark = pytest.mark.kernels
triton = pytest.importorskip("triton")

from torch_matgrad import formulas, triton_backend  # noqa: E402
from torch_matgrad.triton_kernels import configs, launch, ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_TILES = triton.Config(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2), num_stages=1, num_warps=1)
# K is written in granules of the split (16 elements here under the interpreter, 256 on
# a GPU: launch.CachedKernel.split_tile), so that a GPU run splits the same cases.
G = _TILES.kwargs["BLOCK_K"] if ops.INTERPRET else launch.POINTER.split_tile[1]


@pytest.fixture(autouse=True)
def split_launches(monkeypatch):
    """Poisoned outputs and workspace, IEEE fp32 products, the small tiles under the
    interpreter; yields the list of split launches made, each ``(m, n, k, splits)``."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ops, "_empty", nan_empty)
    monkeypatch.setattr(launch, "_workspace", nan_empty)
    if ops.INTERPRET:
        monkeypatch.setattr(launch, "POINTER", launch.pointer_kernel([_TILES]))
    launched = []
    run = launch.run_split_k

    def counting(a, b, *args):
        launched.append((a.shape[0], b.shape[1], a.shape[1], -(-a.shape[1] // args[-1])))
        return run(a, b, *args)

    monkeypatch.setattr(launch, "run_split_k", counting)
    with float32_matmul_precision("highest"):
        yield launched


def _operand(rows, cols, dtype, layout="contiguous"):
    """float64 data rounded to ``dtype`` on the test device, in ``layout``: as is, a
    transposed view, or a sliced view (no unit stride)."""
    if layout == "transposed":
        t = torch.randn(cols, rows, dtype=torch.float64).t()
    elif layout == "sliced":
        t = torch.randn(rows + 3, 2 * cols + 1, dtype=torch.float64)[2 : rows + 2, 1::2]
    else:
        t = torch.randn(rows, cols, dtype=torch.float64)
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=DEVICE).copy_(t)


def _forward(m, k, n, dtype, activation, bias, store_z, x_layout="contiguous", w_layout="contiguous",
             transpose_c=False):
    """``fused_matmul``'s forward against float64 on the same rounded inputs."""
    x, w = _operand(m, k, dtype, x_layout), _operand(n, k, dtype, w_layout)
    b = _operand(1, n, dtype)[0] if bias else None
    c, z, _ = ops.fused_matmul(x, w.t(), bias=b, activation=activation, store_z=store_z, transpose_c=transpose_c)
    ref_z = x.double() @ w.double().t() + (0 if b is None else b.double())
    if transpose_c:
        c, z = c.t(), None if z is None else z.t()
    assert c.dtype == dtype and (z is None) == (not store_z)
    assert_rel_close(c, activate_ref(ref_z, activation), dtype, "out")
    if store_z:
        assert_rel_close(z, ref_z, dtype, "z")
    return c, z


@pytest.mark.parametrize("k", [2 * G + 1, 8 * G - 1, 62 * G + 8])  # interpreter: 33, 127, 1000
@pytest.mark.parametrize("m", [1, 7, 16])
def test_ragged_shapes(split_launches, m, k):
    # Three slices of whole granules: K = 33 gives slices of 16, 16 and 1. No
    # activation: a single output (N = 1) of a curved one can sit where its relative
    # error is large in any summation order (GELU at -4.5: 5e-3).
    columns = (1, 7, 33, 130)
    with ops.split_k(3):
        for n in columns:
            _forward(m, k, n, torch.float32, None, True, True)
    assert split_launches == [(m, n, k, 3) for n in columns]


@pytest.mark.parametrize("activation", formulas.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_dtypes_and_epilogues(split_launches, dtype, activation):
    # Each with and without bias and z. bf16 products run on fp32 tiles under the
    # interpreter (the kernel's UPCAST flag).
    with ops.split_k(4):
        for bias, store_z in itertools.product((True, False), repeat=2):
            _forward(7, 8 * G - 1, 33, dtype, activation, bias, store_z)
    assert split_launches == [(7, 33, 8 * G - 1, 4)] * 4


@pytest.mark.parametrize("transpose_c", [False, True], ids=["c", "c^T"])
@pytest.mark.parametrize("w_layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("x_layout", ["contiguous", "transposed", "sliced"])
def test_views(split_launches, x_layout, w_layout, transpose_c):
    with ops.split_k(5):
        _forward(5, 6 * G + 4, 20, torch.float32, "silu", True, True, x_layout, w_layout, transpose_c)
    assert len(split_launches) == 1


def test_two_runs_are_the_same_bits():
    # The partials are summed in slice order by one program per output tile: no atomics.
    k = 62 * G + 8
    x, w, b = _operand(16, k, torch.float32), _operand(33, k, torch.float32), _operand(1, 33, torch.float32)[0]
    with ops.split_k(7):
        first = ops.fused_matmul(x, w.t(), bias=b, activation="gelu_tanh", store_z=True)
        second = ops.fused_matmul(x, w.t(), bias=b, activation="gelu_tanh", store_z=True)
    for one, two in zip(first[:2], second[:2]):
        assert torch.equal(one.view(torch.int32), two.view(torch.int32))


def test_auto_splits_only_an_underfilled_grid(monkeypatch, split_launches):
    # One block row of N / BLOCK_N tiles against the SM count: split where it falls
    # short, into the slices the rule gives, the same result either way.
    block_n, granule = launch.POINTER.split_tile
    n = 2 * block_n
    # 2 tiles: on 2 SMs, no split; on 8, 2 programs an SM are 8 slices (of 5 granules),
    # unless K holds fewer slices of two granules (3 granules: one).
    for sms, k, splits in ((2, 40 * granule, 1), (8, 40 * granule, 8), (8, 3 * granule, 1)):
        monkeypatch.setattr(launch, "num_sms", lambda device, sms=sms: sms)
        split_launches.clear()
        _forward(1, k, n, torch.float32, None, False, False)
        assert split_launches == ([(1, n, k, splits)] if splits > 1 else [])


def test_what_does_not_split(monkeypatch, split_launches):
    monkeypatch.setattr(launch, "num_sms", lambda device: 1000)
    rows = configs.SPLIT_K_MAX_M
    a, b = _operand(rows, 12 * G + 8, torch.float32), _operand(12 * G + 8, 24, torch.float32)
    with ops.split_k(4):
        # More rows than decoding has; a K of one granule; the act' prologue; row sums;
        # the MLP block's two-half product and hidden prologue.
        ops.fused_matmul(_operand(rows + 1, 12 * G + 8, torch.float32), b)
        ops.fused_matmul(a[:, :G], b[:G])
        ops.fused_matmul(a, b, grad_activation="gelu", saved=a)
        ops.fused_matmul(a, b, rowsum=True)
        ops.fused_matmul(a, b, b2=b)
        ops.fused_matmul(a, b, hidden=True, mlp_activation="silu")
    with ops.split_k("off"):
        ops.fused_matmul(a, b)
    assert split_launches == []
    with ops.split_k(4):
        got = ops.fused_matmul(a, b)[0]  # the same product, plain: split
    assert len(split_launches) == 1
    assert_rel_close(got, a.double() @ b.double(), torch.float32)


def test_descriptor_kernel_keeps_its_launches(split_launches):
    # Asked for by name, the descriptor kernel takes a decoding product it can describe.
    if not ops.TMA_AVAILABLE:
        pytest.skip("no tensor descriptors in this Triton")
    x, w = _operand(8, 64, torch.bfloat16), _operand(32, 64, torch.bfloat16)
    with ops.gemm_kernel("tma"), ops.split_k(4):
        out = ops.fused_matmul(x, w.t())[0]
    assert split_launches == []
    assert_rel_close(out, x.double() @ w.double().t(), torch.bfloat16)


def test_the_layer_op_and_its_backward_split(monkeypatch, split_launches):
    # Every caller of fused_matmul: the Triton backend's forward, and its grad_x = G_z W
    # (the pass strategy's G_z: a plain product); grad_W's row sums stay unsplit.
    monkeypatch.setattr(launch, "num_sms", lambda device: 1000)
    k, n = 19 * G - 4, 6 * G + 4  # interpreter: 300, 100
    x, w, b = _operand(3, k, torch.float32), _operand(n, k, torch.float32), _operand(1, n, torch.float32)[0]
    out, z = triton_backend.forward(x, w, b, "gelu")
    ref_out, ref_z = formulas.forward(x.double(), w.double(), b.double(), "gelu")
    assert_rel_close(out, ref_out, torch.float32, "out")
    assert_rel_close(z, ref_z, torch.float32, "z")
    g = _operand(3, n, torch.float32)
    with triton_backend.gz_strategy("pass"):
        grads = triton_backend.backward(g, None, x, w, z, "gelu", (True, True, True))
    want = formulas.backward(g.double(), None, x.double(), w.double(), z.double(), "gelu", (True, True, True))
    for name, got, ref in zip(("grad_x", "grad_W", "grad_b"), grads, want):
        assert_rel_close(got, ref, torch.float32, name)
    assert [launched[:3] for launched in split_launches] == [(3, n, k), (3, k, n)]


def test_the_rule_at_decoding_shapes():
    # An H100 (132 SMs) in the GPU's split tiles (64 columns wide, 256-element granules):
    # 4096 columns are 64 tiles, 4 slices fill 256 of 264 program slots; 14336 columns
    # fill the SMs alone; 4 slices of 14336 are 3584 elements each.
    assert ops._split_rule(4096, 4096, 132, 64, 256, "auto") == 1024
    assert ops._split_rule(14336, 4096, 132, 64, 256, "auto") == 0
    assert ops._split_rule(4096, 14336, 132, 64, 256, "auto") == 3584
    assert ops._split_rule(4096, 4096, 132, 64, 256, "off") == 0
    assert ops._split_rule(14336, 4096, 132, 64, 256, 8) == 512


def test_modes_are_checked():
    for bad in ("on", "1", 1, 0, None):
        with pytest.raises(ValueError, match="auto, off or a number of slices"):
            with ops.split_k(bad):
                pass
    assert ops._split_mode("6") == 6


@pytest.mark.skipif(not ops.INTERPRET, reason="on a GPU the shadow plugin checks each launch's binary")
def test_one_entry_is_one_binary_and_one_tuning(monkeypatch):
    # Each cache entry of the two split launches is one Triton specialisation (and, for
    # the product, one key of its autotuner, which tunes on the slice too): launches
    # that differ in a class Triton specialises on (one row or 16, a slice a multiple of
    # 16 or not, bias or none, an odd output stride) are other entries.
    from test_triton_kernels import record_launch_kinds

    seen = record_launch_kinds(monkeypatch, {launch.POINTER.fn: configs._AUTOTUNE_KEY})
    cases = ((1, 100, 20, True, False), (16, 100, 20, True, False), (7, 100, 20, False, False),
             (7, 100, 20, True, True), (7, 95, 20, True, False), (5, 100, 40, True, False))
    for m, k, n, bias, transpose_c in cases:
        for splits in (3, 4):
            with ops.split_k(splits):
                _forward(m, k, n, torch.float32, "relu", bias, False, transpose_c=transpose_c)
    assert not {entry: launches for entry, launches in seen.items() if len(launches) > 1}
    kinds = [fn for fn, _ in seen]
    assert kinds.count(launch.POINTER.fn) >= 6 and kinds.count(launch.REDUCE.fn) >= 4, kinds


@pytest.mark.cuda
def test_split_runs_inside_cuda_graphs(split_launches):
    # Both launches and the workspace's allocation are captured (the workspace in the
    # graph's pool) and replayed; the first of their kind ran outside, as autotuning must.
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    out = triton_backend.forward(x, w, b, "gelu_tanh")[0]
    assert len(split_launches) == 1  # 1024 columns: too few tiles for the SMs
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_backend.forward(x, w, b, "gelu_tanh")[0]
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, triton_backend.forward(x, w, b, "gelu_tanh")[0])
    assert not torch.equal(captured, out)
    assert_rel_close(captured, activate_ref(x.double() @ w.double().t() + b.double(), "gelu_tanh"), torch.bfloat16)
