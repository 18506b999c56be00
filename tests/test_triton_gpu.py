"""The Triton kernels compiled and run on a CUDA GPU (skipped without one): real sizes,
int64 offsets, CUDA graphs, determinism, autotuning, the fp32 precision setting, and
which of the two GEMM kernels this GPU gets; the MLP block's launches at real sizes, in
every configuration, and the allocator's proof that they never hold the hidden activation.

``test_triton_kernels.py``, ``test_triton_tma.py``, ``test_triton_mlp.py`` and
``test_triton_path.py`` (NaN/Inf propagation included) run on the GPU too when there is one.
"""

from __future__ import annotations

import pytest
import torch

from _util import REL_TOL, assert_rel_close, float32_matmul_precision, rel_err

pytestmark = pytest.mark.cuda
triton = pytest.importorskip("triton")

import torch_matgrad  # noqa: E402
from torch_matgrad import dispatch, formulas, triton_backend  # noqa: E402
from torch_matgrad.triton_kernels import launch, ops  # noqa: E402
from torch_matgrad.triton_kernels.fused_gemm import fused_gemm_kernel  # noqa: E402

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
        with torch_matgrad.use_backend("triton"):  # "auto" would capture cuBLAS
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
        cached = launch.tma_kernel([c for c in ops.TMA_CONFIGS if c.kwargs["BLOCK_N"] == 128][-2:])
    else:
        cached = launch.pointer_kernel([c for c in ops.CONFIGS if c.kwargs["BLOCK_M"] == 64][:2])
    monkeypatch.setattr(launch, kernel.upper(), cached)
    tuned = cached.tuner.cache  # the autotuner's: one entry per tuning
    w = torch.randn(256, 512, device="cuda", dtype=torch.float16)
    with ops.gemm_kernel(kernel):
        triton_backend.forward(torch.randn(1000, 512, device="cuda", dtype=torch.float16), w, None, None)
        assert len(tuned) == 1
        for rows in (999, 1010, 1024):
            triton_backend.forward(torch.randn(rows, 512, device="cuda", dtype=torch.float16), w, None, None)
        assert len(tuned) == 1
        triton_backend.forward(torch.randn(1025, 512, device="cuda", dtype=torch.float16), w, None, None)
        assert len(tuned) == 2


def test_auto_takes_the_descriptor_kernel_on_hopper():
    # The one rule, on this GPU: bf16 and fp16 operands that descriptors can describe,
    # more than SMALL_M rows, compute capability 9.0 or later.
    x = torch.empty(1024, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.empty(4096, 4096, device="cuda", dtype=torch.bfloat16)
    expected = "tma" if _DESCRIPTOR_GPU else "pointer"
    assert ops.gemm_kernel_for(x, w.t()) == expected
    assert ops.gemm_kernel_for(x.half(), w.t().half()) == expected
    # Rows of 4095 bf16 elements (8190 bytes) are not 16-byte aligned: no descriptor. (A
    # 4095-column slice of a 4096-wide tensor keeps its 8192-byte rows and is one.)
    x_odd, w_odd = x[:, :4095].contiguous(), w[:, :4095].contiguous()
    assert ops.gemm_kernel_for(x_odd, w_odd.t()) == "pointer"
    assert ops.gemm_kernel_for(x[:, :4095], w[:4095].t()) == expected
    assert ops.gemm_kernel_for(x[: ops.SMALL_M], w.t()) == "pointer"
    assert ops.gemm_kernel_for(x.float(), w.t().float()) == "pointer"


def test_auto_runs_cublas_on_cuda_and_triton_when_asked():
    # "auto" takes what measured fastest on the H100: torch ops (cuBLAS) at every shape.
    x = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for name, want in (("auto", "torch"), ("triton", "triton")):
        with torch_matgrad.use_backend(name), dispatch.recording() as ran:
            torch_matgrad.linear(x, w, activation="gelu_tanh").sum().backward()
        assert ran == {("forward", want): 1, ("backward", want): 1}, (name, ran)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_device_that_is_not_current():
    x, w, b, g = (t.to("cuda:1") for t in _inputs(300, 200, 100, torch.bfloat16))
    with torch.cuda.device(0):
        got, want = _both(x, w, b, g, "gelu")
    for g, r in zip(got, want):
        assert g.device == x.device
        assert_rel_close(g, r, torch.bfloat16)


# -------------------------------------------------------------------------------------
# The MLP block (triton_backend.mlp_forward / mlp_backward): the DUAL, HIDDEN, EPI_GRAD and
# COLSUM launches of the pointer kernel at real sizes (test_triton_mlp.py runs the small
# shapes, the launch sequence and the proof that h is never written, on the GPU too).


def _mlp_params(m, d, hidden, d_out, dtype, gated):
    """x, up_w, up_b, gate_w, gate_b, down_w, down_b on the GPU, scaled so that the
    pre-activations and the output stay O(1)."""

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda") * scale).to(dtype)

    return (
        make(m, d), make(hidden, d, scale=d**-0.5), make(hidden),
        make(hidden, d, scale=d**-0.5) if gated else None, make(hidden) if gated else None,
        make(d_out, hidden, scale=hidden**-0.5), make(d_out),
    )


def _mlp_both(params, activation, grad):
    """The Triton block and the float64 formulas on the same inputs; the backward on the
    forward's own pre-activations."""
    out, u, g = triton_backend.mlp_forward(*params, activation)
    x, up_w, _, gate_w, _, down_w, _ = params
    needs = (True,) * 7
    got = [out, u, g, *triton_backend.mlp_backward(grad, None, None, x, up_w, gate_w, down_w, u, g, activation, needs)]
    p64 = [None if t is None else t.double() for t in params]
    x64, up64, _, gate64, _, down64, _ = p64
    g64 = None if g is None else g.double()
    want = [*formulas.mlp_forward(*p64, activation),
            *formulas.mlp_backward(grad.double(), None, None, x64, up64, gate64, down64, u.double(), g64, activation,
                                   needs)]
    return got, want


_MLP_NAMES = ("out", "u", "g", "grad_x", "grad_up_w", "grad_up_b", "grad_gate_w", "grad_gate_b", "grad_down_w",
              "grad_down_b")


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", formulas.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mlp_real_sizes(dtype, activation, gated):
    # Ragged against every configuration's tiles in every dimension of every product;
    # K = 1031 (inputs) and 2753 (hidden) span many K tiles.
    params = _mlp_params(2049, 1031, 2753, 1537, dtype, gated)
    grad = torch.randn(2049, 1537, device="cuda", dtype=dtype)
    got, want = _mlp_both(params, activation, grad)
    for name, a, b in zip(_MLP_NAMES, got, want):
        assert (a is None) == (b is None), name
        if b is not None:
            assert a.dtype == dtype, name
            assert_rel_close(a, b, dtype, name)


@pytest.mark.parametrize("size", ["ragged", "4096"])
@pytest.mark.parametrize("config", ops.CONFIG_NAMES)
def test_mlp_every_autotune_configuration(monkeypatch, config, size):
    # The MLP launches in each configuration's own tiles (gated SiLU: the two-half product,
    # the gated h prologue with and without the column sums, the gated epilogue; plain
    # GELU-tanh: the plain h prologue and epilogue), ragged and at 4096 (the pipeline's
    # steady state). A configuration the autotuner would prune for a launch is still
    # run here: a single configuration is never pruned.
    cfg = ops.CONFIGS[ops.CONFIG_NAMES.index(config)]
    monkeypatch.setattr(launch, "POINTER", launch.pointer_kernel([cfg]))
    bm, bn, bk = (cfg.kwargs[f"BLOCK_{d}"] for d in "MNK")
    wide = max(bm, bn)
    m, d, hidden, d_out = (wide + 37, max(2 * bk, wide) + 5, wide + 11, wide + 29) if size == "ragged" else (4096,) * 4
    for gated, activation in ((True, "silu"), (False, "gelu_tanh")):
        params = _mlp_params(m, d, hidden, d_out, torch.bfloat16, gated)
        grad = torch.randn(m, d_out, device="cuda", dtype=torch.bfloat16)
        got, want = _mlp_both(params, activation, grad)
        for name, a, b in zip(_MLP_NAMES, got, want):
            if b is not None:
                assert_rel_close(a, b, torch.bfloat16, f"{name}, gated={gated}")
    from test_triton_tma import _compiled

    for compiled in _compiled(fused_gemm_kernel, cfg):  # registers and spills (pytest -rP prints them)
        print(f"{config} {size}: {compiled.metadata.name}: {getattr(compiled, 'n_regs', '?')} registers, "
              f"{getattr(compiled, 'n_spills', '?')} spilled, {compiled.metadata.shared} bytes shared")


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_mlp_never_allocates_the_hidden_activation(gated):
    # At real sizes the allocator sees it: the forward allocates the pre-activations and
    # the output, the backward the gradients, the pre-activations' gradients and (gated)
    # the first layer's grad_x summand; never a tensor of h's size beside them.
    m, d, hidden = 4096, 1024, 4096
    params = _mlp_params(m, d, hidden, d, torch.bfloat16, gated)
    grad = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    x, up_w, _, gate_w, _, down_w, _ = params
    h_bytes = m * hidden * 2
    triton_backend.mlp_forward(*params, "silu")  # compile and tune outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, u, g = triton_backend.mlp_forward(*params, "silu")
    pre = h_bytes * (2 if gated else 1)
    assert torch.cuda.max_memory_allocated() - base <= pre + out.nbytes + h_bytes // 8
    needs = (True,) * 7
    triton_backend.mlp_backward(grad, None, None, x, up_w, gate_w, down_w, u, g, "silu", needs)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = triton_backend.mlp_backward(grad, None, None, x, up_w, gate_w, down_w, u, g, "silu", needs)
    kept = sum(t.nbytes for t in grads if t is not None)
    transient = pre + (x.nbytes if gated else 0)  # [G_g | G_u] (G_u), and the gate's grad_x summand
    assert torch.cuda.max_memory_allocated() - base <= kept + transient + h_bytes // 8


# The cached launcher (triton_kernels/launch.py): a launch after the first of its kind
# calls the compiled kernel directly. Layouts whose specialisation classes differ:
# contiguous, transposed weight, a view one element off 16-byte alignment, odd sizes.
_LAYOUTS = {
    "contiguous": lambda t: t,
    "transposed": lambda t: t.t().contiguous().t(),
    "misaligned": lambda t: torch.cat([t.new_zeros(t.shape[0], 1), t], 1)[:, 1:],
}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("m, k, n", [(1000, 512, 768), (77, 300, 130)])
def test_direct_launch_is_tritons_binary(monkeypatch, layout, m, k, n):
    # Direct and Triton's own path (JITFunction.run with the cached configuration) run
    # the same binary, by hash, and write the same bits.
    x = _LAYOUTS[layout](torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    w = _LAYOUTS[layout](torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    kind = ops.gemm_kernel_for(x, w.t(), None, (torch.empty(m, n, device="cuda", dtype=torch.bfloat16),))
    cached = launch.TMA if kind == "tma" else launch.POINTER
    monkeypatch.setattr(cached, "entries", {})
    triton_backend.forward(x, w, b, "gelu_tanh")  # the first of its kind: autotuned
    (entry,) = cached.entries.values()
    ran = []
    jit_run = cached.fn.run
    monkeypatch.setattr(cached.fn, "run", lambda *a, **kw: ran.append(jit_run(*a, **kw)) or ran[-1])
    with launch.direct_launches(False):
        normal = triton_backend.forward(x, w, b, "gelu_tanh")
    direct = triton_backend.forward(x, w, b, "gelu_tanh")
    assert len(ran) == 1 and len(cached.entries) == 1  # the direct launch did not go through Triton
    assert ran[0].hash == entry.kernel.hash
    for got, want in zip(direct, normal):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_direct_launches_run_inside_cuda_graphs():
    # The direct call launches on the current stream: captured into a graph, replayed.
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(384, 256, device="cuda", dtype=torch.bfloat16)
    out = triton_backend.forward(x, w, None, "silu")[0]  # the first of its kind, outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_backend.forward(x, w, None, "silu")[0]
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, triton_backend.forward(x, w, None, "silu")[0])
    assert not torch.equal(captured, out)
