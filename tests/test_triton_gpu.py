"""The Triton kernels compiled and run on a CUDA GPU (skipped without one): real sizes,
int64 offsets, CUDA graphs, determinism, autotuning, the fp32 precision setting, and
which of the two GEMM kernels this GPU gets.

``test_triton_kernels.py``, ``test_triton_tma.py`` and ``test_triton_path.py`` (NaN/Inf
propagation included) run on the GPU too when there is one.
"""

from __future__ import annotations

import pytest
import torch

from _util import REL_TOL, assert_rel_close, float32_matmul_precision, rel_err

pytestmark = pytest.mark.cuda
triton = pytest.importorskip("triton")

import torch_matgrad  # noqa: E402
from torch_matgrad import dispatch, formulas, triton_backend  # noqa: E402
from torch_matgrad.triton_kernels import ops  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _ieee_fp32():
    with float32_matmul_precision("highest"):
        yield


def _inputs(m, k, n, dtype, transposed=False):
    """x, W, b, G in ``dtype`` on the GPU (x, W, G as transposed views if asked)."""

    def make(rows, cols):
        if transposed:
            return torch.randn(cols, rows, device="cuda", dtype=dtype).t()
        return torch.randn(rows, cols, device="cuda", dtype=dtype)

    return make(m, k), make(n, k), torch.randn(n, device="cuda", dtype=dtype), make(m, n)


def _both(x, w, b, g, activation):
    """Kernel results and float64 references of the same (rounded) inputs."""
    out, z = triton_backend.forward(x, w, b, activation)
    saved = z if activation in formulas.NEEDS_PREACTIVATION else out
    got = [out, *triton_backend.backward(g, None, x, w, saved, activation, (True, True, True))]
    x64, w64, b64, g64 = (t.double() for t in (x, w, b, g))
    ref_out, _ = formulas.forward(x64, w64, b64, activation)
    # The backward is checked on the forward's own saved tensor: ReLU's mask from a
    # float64 output would flip wherever z rounds across 0 (one flip in 3M entries is
    # 5e-4 of grad_x in fp32), which is a property of the forward, tested above.
    want = [ref_out, *formulas.backward(g64, None, x64, w64, saved.double(), activation, (True, True, True))]
    return got, want


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("activation", formulas.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_real_sizes(dtype, activation, transposed):
    # Ragged in every dimension; K = 1031 spans many K tiles of every config.
    got, want = _both(*_inputs(2049, 1031, 1537, dtype, transposed), activation)
    for name, g, w in zip(("out", "grad_x", "grad_W", "grad_b"), got, want):
        assert g.dtype == dtype
        assert_rel_close(g, w, dtype, name)


def test_fp32_precision_setting_reaches_the_kernel():
    x, w, b, _ = _inputs(1024, 1024, 1024, torch.float32)
    ref = formulas.forward(x.double(), w.double(), b.double(), None)[0]
    ieee = rel_err(triton_backend.forward(x, w, b, None)[0], ref)
    torch.set_float32_matmul_precision("high")
    tf32 = rel_err(triton_backend.forward(x, w, b, None)[0], ref)
    # TF32 keeps 10 mantissa bits: ~1e-4..1e-3 relative error; IEEE fp32 ~1e-7.
    assert ieee < REL_TOL[torch.float32] < tf32 < 5e-3


def test_more_than_2_31_elements():
    # x has (2^31 / 4096 + 1) x 4096 > 2^31 elements (4.3 GB in bf16): row offsets of
    # the last rows pass 2^31 and would wrap in int32.
    m, k, n = 2**31 // 4096 + 1, 4096, 64
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out, z = triton_backend.forward(x, w, b, "gelu")
    tail = slice(m - 37, m)
    ref_z = formulas.preactivation(x[tail].double(), w.double(), b.double())
    assert_rel_close(z[tail], ref_z, torch.bfloat16, "z, last rows")
    assert_rel_close(out[tail], formulas.activate(ref_z, "gelu"), torch.bfloat16, "out, last rows")
    g = torch.randn_like(out)
    grad_x, grad_w, grad_b = triton_backend.backward(g, None, x, w, z, "gelu", (True, True, True))
    del out
    gz = formulas.grad_preactivation(g[tail].double(), z[tail].double(), "gelu")
    assert_rel_close(grad_x[tail], formulas.grad_input(gz, w.double()), torch.bfloat16, "grad_x, last rows")
    del grad_x
    # grad_W and grad_b sum over every row: compare with fp32 torch ops on the same G_z.
    gz_all = formulas.grad_preactivation(g, z, "gelu")
    assert_rel_close(grad_w, formulas.grad_weight(gz_all.float(), x.float()), torch.bfloat16, "grad_W")
    assert_rel_close(grad_b, formulas.grad_bias(gz_all.float()), torch.bfloat16, "grad_b")


def test_cuda_graph_capture_and_replay():
    layer = torch_matgrad.Linear(512, 384, activation="gelu", device="cuda", dtype=torch.bfloat16)
    static_x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out = layer(static_x)
        out.backward(torch.ones_like(out))
        return out

    # Warm up on a side stream (autotuning and compilation happen here, not in capture).
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            layer.zero_grad(set_to_none=True)
            static_x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)

    # Gradients set to None are allocated inside the capture: each replay rewrites them.
    graph = torch.cuda.CUDAGraph()
    layer.zero_grad(set_to_none=True)
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_out = step()

    new_x = torch.randn_like(static_x)
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()

    x = new_x.detach().requires_grad_()
    w = layer.weight.detach().requires_grad_()
    b = layer.bias.detach().requires_grad_()
    with torch_matgrad.use_backend("torch"):
        ref = torch_matgrad.linear(x, w, b, activation="gelu")
    ref.backward(torch.ones_like(ref))
    pairs = [(static_out, ref), (static_x.grad, x.grad), (layer.weight.grad, w.grad), (layer.bias.grad, b.grad)]
    for got, want in pairs:
        assert_rel_close(got, want, torch.bfloat16)


@pytest.mark.parametrize("k, n", [(700, 900), (704, 896)], ids=["pointer", "descriptor-where-valid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_repeated_calls_are_bit_identical(dtype, k, n):
    # Rows of 704 and 896 bf16 elements can be described: the descriptor kernel's
    # persistent grid gives each tile to a fixed program, so it repeats bit for bit too.
    x, w, b, g = _inputs(1500, k, n, dtype)
    first, _ = _both(x, w, b, g, "silu")
    again, _ = _both(x, w, b, g, "silu")
    for a, c in zip(first, again):
        assert torch.equal(a, c)


_DESCRIPTOR_GPU = (
    torch.cuda.is_available() and ops.TMA_AVAILABLE and torch.version.hip is None
    and torch.cuda.get_device_capability() >= (9, 0)
)


@pytest.mark.parametrize("kernel", ["pointer", "tma"])
def test_autotune_key_is_coarse(monkeypatch, kernel):
    # Batch sizes in one power-of-two bucket share a tuning result: no re-benchmarking.
    # Two configurations of 64+ rows, so that the autotuner really chooses (with one it
    # keeps no cache), whatever $TORCH_MATGRAD_TRITON_CONFIGS says. Each kernel forced
    # (where valid: these shapes are, for the descriptor kernel).
    if kernel == "tma":
        if not _DESCRIPTOR_GPU:
            pytest.skip("the descriptor kernel needs compute capability 9.0")
        launch = ops.tma_launcher([c for c in ops.TMA_CONFIGS if c.kwargs["BLOCK_N"] == 128][-2:])
        monkeypatch.setattr(ops, "_tma_launch", launch)
    else:
        launch = ops.launcher([c for c in ops.CONFIGS if c.kwargs["BLOCK_M"] == 64][:2])
        monkeypatch.setattr(ops, "_launch", launch)
    w = torch.randn(256, 512, device="cuda", dtype=torch.float16)
    with ops.gemm_kernel(kernel):
        triton_backend.forward(torch.randn(1000, 512, device="cuda", dtype=torch.float16), w, None, None)
        assert len(launch.cache) == 1
        for rows in (999, 1010, 1024):
            triton_backend.forward(torch.randn(rows, 512, device="cuda", dtype=torch.float16), w, None, None)
        assert len(launch.cache) == 1
        triton_backend.forward(torch.randn(1025, 512, device="cuda", dtype=torch.float16), w, None, None)
        assert len(launch.cache) == 2


def test_auto_takes_the_descriptor_kernel_on_hopper():
    # The one rule, on this GPU: bf16 and fp16 operands that descriptors can describe,
    # more than SMALL_M rows, compute capability 9.0 or later.
    x = torch.empty(1024, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.empty(4096, 4096, device="cuda", dtype=torch.bfloat16)
    expected = "tma" if _DESCRIPTOR_GPU else "pointer"
    assert ops.gemm_kernel_for(x, w.t()) == expected
    assert ops.gemm_kernel_for(x.half(), w.t().half()) == expected
    assert ops.gemm_kernel_for(x[:, :4095], w[:4095].t()) == "pointer"
    assert ops.gemm_kernel_for(x[: ops.SMALL_M], w.t()) == "pointer"
    assert ops.gemm_kernel_for(x.float(), w.t().float()) == "pointer"


def test_auto_uses_triton_on_cuda_except_float64_and_decoding():
    rows = dispatch.AUTO_TORCH_MAX_ROWS
    t = torch.randn(rows + 1, 4, device="cuda", dtype=torch.bfloat16)
    with torch_matgrad.use_backend("auto"):
        assert dispatch.chosen_backend(t, t) == "triton"
        assert dispatch.chosen_backend(t.double(), t.double()) == "torch"
        assert dispatch.chosen_backend(t[:rows], t) == "torch"
    with torch_matgrad.use_backend("triton"):
        assert dispatch.chosen_backend(t[:rows], t) == "triton"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_device_that_is_not_current():
    x, w, b, g = (t.to("cuda:1") for t in _inputs(300, 200, 100, torch.bfloat16))
    with torch.cuda.device(0):
        got, want = _both(x, w, b, g, "gelu")
    for g, r in zip(got, want):
        assert g.device == x.device
        assert_rel_close(g, r, torch.bfloat16)
