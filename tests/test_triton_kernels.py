"""The fused GEMM kernels against float64 references (MATH.md items 1, 3, 6, 9-11).

Without a GPU they run under Triton's interpreter (``conftest.py`` switches it on), so
shapes stay small. Every output the wrapper allocates is NaN-filled first: a tile the
kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from _util import assert_rel_close, float32_matmul_precision

pytestmark = pytest.mark.kernels
triton = pytest.importorskip("triton")

from torch_matgrad import formulas, triton_backend  # noqa: E402
from torch_matgrad.triton_kernels import configs, launch, ops  # noqa: E402
from torch_matgrad.triton_kernels.fused_gemm import fused_gemm_kernel  # noqa: E402
from torch_matgrad.triton_kernels.tma_gemm import tma_gemm_kernel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ALL_NEEDS = (True, True, True)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """NaN in every fresh output, and float32 GEMMs without TF32 (REL_TOL's fp32 row)."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ops, "_empty", nan_empty)
    with float32_matmul_precision("highest"):
        yield


def _randn(*shape, layout="contiguous"):
    """float64 CPU data, laid out as asked: a transposed view or a sliced view."""
    if layout == "transposed":
        return torch.randn(*reversed(shape), dtype=torch.float64).t()
    if layout == "sliced":
        rows, cols = shape
        return torch.randn(rows + 3, 2 * cols + 1, dtype=torch.float64)[2 : rows + 2, 1::2]
    return torch.randn(*shape, dtype=torch.float64)


def _to(t, dtype):
    """``t`` in ``dtype`` on the test device, keeping its strides (views stay views)."""
    if t is None:
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=DEVICE).copy_(t)


def _check_all(m, k, n, dtype, activation, bias, layout="contiguous", needs=ALL_NEEDS):
    """Forward and backward through the kernels vs the float64 formulas."""
    # The reference sees the inputs rounded to `dtype`, as the kernels do: otherwise
    # ReLU's kink flips act' wherever rounding moves z across 0 (~5% error in bf16).
    xd, wd, gd = (_to(_randn(*s, layout=layout), dtype) for s in ((m, k), (n, k), (m, n)))
    bd = _to(torch.randn(n, dtype=torch.float64), dtype) if bias else None
    x, w, g, b = (None if t is None else t.double() for t in (xd, wd, gd, bd))
    out, z = triton_backend.forward(xd, wd, bd, activation)
    ref_out, ref_z = formulas.forward(x, w, b, activation)
    assert out.dtype == dtype and out.is_contiguous()
    assert_rel_close(out, ref_out, dtype, "out")
    assert (z is None) == (ref_z is None)
    if z is not None:
        assert_rel_close(z, ref_z, dtype, "z")

    saved = z if activation in formulas.NEEDS_PREACTIVATION else (out if activation == "relu" else None)
    # The backward is checked on the forward's own saved tensor (compared above): a
    # ReLU mask from the float64 output would flip wherever z rounds across 0.
    ref_saved = None if saved is None else saved.double()
    grads = triton_backend.backward(gd, None, xd, wd, saved, activation, needs)
    ref = formulas.backward(g, None, x, w, ref_saved, activation, needs)
    for name, got, want in zip(("grad_x", "grad_W", "grad_b"), grads, ref):
        assert (got is None) == (want is None), name
        if want is not None:
            assert got.dtype == dtype
            assert_rel_close(got, want, dtype, name)


@pytest.mark.parametrize("activation", formulas.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_and_activations(dtype, activation):
    # 65 x 33 x 40: three block rows, ragged edges in every dimension, K over two tiles.
    _check_all(65, 33, 40, dtype, activation, bias=True)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(1, 7, 33), (7, 33, 1), (33, 1, 65), (127, 17, 7)], ids=str)
def test_ragged_shapes_and_views(shape, bias, layout):
    # Every operand (x, W, G) in the same layout; GELU exercises both z and act'.
    _check_all(*shape, torch.float32, "gelu", bias, layout)


@pytest.mark.parametrize("activation", formulas.ACTIVATIONS)
@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True), (True, False, True)], ids=str
)
def test_partial_needs(needs, activation):
    # grad_b without grad_W is the launch that only sums.
    _check_all(33, 17, 40, torch.float32, activation, bias=True, needs=needs)


@pytest.mark.parametrize("activation", formulas.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(0, 7, 5), (7, 0, 5), (7, 5, 0), (0, 0, 0)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_empty_dims(shape, bias, activation):
    # M = 0: empty out, zero grad_W/grad_b; K = 0: out = act(bias or 0), grad_b = G_z.sum(0).
    _check_all(*shape, torch.float32, activation, bias)


def test_stride_zero_gradient():
    # The gradient of out.sum() arrives expanded (all strides 0): read as is, no copy.
    x, w = torch.randn(33, 17, device=DEVICE), torch.randn(9, 17, device=DEVICE)
    g = torch.ones((), device=DEVICE).expand(33, 9)
    grads = triton_backend.backward(g, None, x, w, None, None, ALL_NEEDS)
    for got, want in zip(grads, formulas.backward(g, None, x, w, None, None, ALL_NEEDS)):
        assert_rel_close(got, want, torch.float32)


def test_inputs_not_modified():
    x, w, b = (torch.randn(*s, device=DEVICE) for s in ((33, 17), (9, 17), (9,)))
    copies = [t.clone() for t in (x, w, b)]
    out, z = triton_backend.forward(x, w, b, "silu")
    g = torch.randn_like(out)
    g_copy = g.clone()
    triton_backend.backward(g, None, x, w, z, "silu", ALL_NEEDS)
    for t, c in zip((x, w, b, g), (*copies, g_copy)):
        assert torch.equal(t, c)


_FAR_ROWS = textwrap.dedent(
    """
    import torch
    from torch_matgrad import formulas, triton_backend

    # 3 rows 2^30 elements apart in one 4 GiB storage that stays mostly untouched (so
    # never resident): the last row starts 2^31 elements in, where int32 offsets wrap.
    storage = torch.empty(2**31 + 40, dtype=torch.float16)
    x = storage.as_strided((3, 40), (2**30, 1))
    x.copy_(torch.randn(3, 40))
    w, g = torch.randn(9, 40, dtype=torch.float16), torch.randn(3, 9, dtype=torch.float16)
    out, z = triton_backend.forward(x, w, None, "gelu")
    got = [out, *triton_backend.backward(g, None, x, w, z, "gelu", (True, True, True))]
    ref_out, ref_z = formulas.forward(x.double(), w.double(), None, "gelu")
    want = [ref_out, *formulas.backward(g.double(), None, x.double(), w.double(), ref_z, "gelu", (True,) * 3)]
    errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, want)]
    assert max(errs) < 4e-3, errs
    """
)


@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU test has a real >2^31-element operand")
def test_offsets_past_2_31_elements():
    # A wrapped int32 offset reads outside the storage, which crashes the interpreter:
    # run in a child so that shows as a failure, not a dead test run.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, "-c", _FAR_ROWS], env=env, capture_output=True, text=True)
    assert child.returncode == 0, f"exit {child.returncode}\n{child.stderr[-3000:]}"


def test_wrapper_rejects_mismatches():
    a = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="do not chain"):
        ops.fused_matmul(a, torch.randn(4, 2, device=DEVICE))
    with pytest.raises(ValueError, match="float64"):
        ops.fused_matmul(a, torch.randn(3, 2, device=DEVICE, dtype=torch.float64))
    with pytest.raises(ValueError, match="saved shaped like a"):
        ops.fused_matmul(a, torch.randn(3, 2, device=DEVICE), grad_activation="gelu")


def test_fp32_precision_follows_torch():
    # "highest" is true fp32 products; anything lower allows TF32, as cuBLAS does.
    assert ops.input_precision(torch.float32) == "ieee"
    torch.set_float32_matmul_precision("high")
    assert ops.input_precision(torch.float32) == "tf32"
    assert ops.input_precision(torch.bfloat16) == "ieee"
    assert ops.input_precision(torch.float64) == "ieee"


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
def test_fp32_precision_follows_the_per_backend_setting():
    # After the newer API is used the legacy getter raises; the setting is still read.
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    try:
        for value in ("tf32", "ieee"):
            matmul.fp32_precision = value
            assert ops.input_precision(torch.float32) == value
    finally:
        matmul.fp32_precision = previous



def _configs(*, bm_min=0, bm_max=1 << 30):
    return [c for c in ops.CONFIGS if bm_min <= c.kwargs["BLOCK_M"] <= bm_max]


# Per shared-memory limit: configurations kept for a large M (tiles of >= 64 rows) and
# for a decoding M (<= 64 rows), bf16 without a prologue.
@pytest.mark.parametrize(
    "limit_kib, large, small",
    [(227, len(_configs(bm_min=64)), len(_configs(bm_max=64))), (163, 7, 6), (99, 5, 6), (16, 1, 1)],
)
def test_autotune_configs_fit_shared_memory(monkeypatch, limit_kib, large, small):
    # H100 (227 KiB per block), A100 (163), consumer Ampere (99); with nothing that fits,
    # the smallest tile with two stages is the fallback. The prologue's saved tile counts.
    monkeypatch.setattr(configs, "_shared_memory_limit", lambda device: limit_kib * 1024)
    a = torch.empty(2, 2, dtype=torch.bfloat16)
    for m_bucket, kept in ((4096, large), (16, small)):
        chosen = configs._fits(ops.CONFIGS, {"a_ptr": a, "M_BUCKET": m_bucket}, PRO_ACT=0)
        assert len(chosen) == kept, [ops.config_name(c) for c in chosen]
        with_prologue = configs._fits(ops.CONFIGS, {"a_ptr": a, "M_BUCKET": m_bucket}, PRO_ACT=2)
        assert len(with_prologue) <= kept
        for cfg in with_prologue:
            m, n, k = (cfg.kwargs[f"BLOCK_{d}"] for d in "MNK")
            fits = (2 * m * k + k * n) * 2 * cfg.num_stages <= limit_kib * 1024
            assert fits or len(with_prologue) == 1


def test_shape_buckets_are_triton_powers_of_two():
    # The autotune key's buckets, in integer arithmetic, equal triton.next_power_of_2.
    for n in [*range(0, 1100), 4095, 4096, 4097, 11008, 2**31 - 1, 2**31, 2**40 + 3]:
        assert launch.bucket(n) == triton.next_power_of_2(max(n, 1)), n


def test_float64_never_gets_a_large_tile(monkeypatch):
    # fp64 accumulators of 128 x 128 and up spill; a one-configuration list that holds
    # only such a tile falls back to a small one rather than running it.
    monkeypatch.setattr(configs, "_shared_memory_limit", lambda device: 227 * 1024)
    a = torch.empty(2, 2, dtype=torch.float64)
    for tried in (ops.CONFIGS, ops.CONFIGS[:1]):
        for cfg in configs._fits(tried, {"a_ptr": a, "M_BUCKET": 4096}, PRO_ACT=0):
            assert cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] <= 128 * 64


def test_configs_are_chosen_by_name(monkeypatch):
    assert ops.selected_configs("") == ops.CONFIGS == ops.selected_configs("all")
    picked = ops.selected_configs(f"{ops.CONFIG_NAMES[2]}, {ops.CONFIG_NAMES[0]}")
    assert picked == [ops.CONFIGS[2], ops.CONFIGS[0]]
    monkeypatch.setenv(ops.CONFIGS_ENV_VAR, ops.CONFIG_NAMES[-1])
    assert ops.selected_configs() == [ops.CONFIGS[-1]]
    with pytest.raises(ValueError, match=f"{ops.CONFIGS_ENV_VAR}='64x64': unknown configuration.*choose from all, "):
        ops.selected_configs("64x64")


# On the GPU also a 4096^3 product: 64+ iterations over K bring the software pipeline
# into its steady state, which the small shape (3 K tiles) never reaches.
_SIZES = ["ragged"] + (["4096"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("size", _SIZES)
@pytest.mark.parametrize("config", ops.CONFIG_NAMES)
def test_every_autotune_configuration(monkeypatch, config, size):
    # The tiles the GPU runs, each on a shape that spans more than one tile in every
    # dimension with ragged edges: forward with the bias/GELU epilogue and the z store,
    # both products of the backward and the grad_b row sums.
    cfg = ops.CONFIGS[ops.CONFIG_NAMES.index(config)]
    monkeypatch.setattr(launch, "POINTER", launch.pointer_kernel([cfg]))
    bm, bn, bk = (cfg.kwargs[f"BLOCK_{d}"] for d in "MNK")
    # As rows (M) the forward sees m, the grad_W product n; reduction: k, then m.
    m, k, n = (max(bm, bn) + 37, 2 * bk + 5, max(bm, bn) + 11) if size == "ragged" else (4096, 4096, 4096)
    with ops.gemm_kernel("pointer"):  # these are the pointer kernel's configurations (Hopper would take TMA)
        _check_all(m, k, n, torch.bfloat16, "gelu", bias=True)


@pytest.mark.parametrize("strategy", ["prologue", "pass"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_gz_strategies(monkeypatch, strategy, activation):
    # Both ways of forming G_z give the formulas' gradients; "pass" launches the GEMMs
    # without the prologue (its G_z comes from PyTorch's derivative kernel).
    launched = []
    fused = ops.fused_matmul

    def counting(*args, **kwargs):
        launched.append(kwargs.get("grad_activation"))
        return fused(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "fused_matmul", counting)
    with triton_backend.gz_strategy(strategy):
        _check_all(65, 33, 40, torch.float32, activation, bias=True)
    # The forward, then grad_x and grad_W + grad_b.
    assert launched[1:] == ([activation] * 2 if strategy == "prologue" else [None, None])


def test_gz_strategy_names_the_choices():
    with pytest.raises(ValueError, match="choose one of auto, prologue, pass"):
        with triton_backend.gz_strategy("fused"):
            pass


# ------------------------------------------------------------------------------------
# The cached launcher (launch.py): the key, the configuration, the packed arguments.


def test_cache_key_classes_are_tritons_specialisation():
    # Two launches share an entry only where Triton would specialise every argument
    # alike: the integer classes map one to one onto Triton's own, and so does a
    # pointer's 16-byte alignment.
    libtriton = pytest.importorskip("triton._C.libtriton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))

    def tritons(v):
        return libtriton.native_specialize_impl(backend, v, False, True, True)

    values = [0, 1, 2, 3, 15, 16, 17, 32, 48, 1000, 4096, 4097, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**40 + 3]
    ours = launch.int_classes(values)
    pairs = set(zip(ours, (tritons(v) for v in values)))
    assert len(pairs) == len({o for o, _ in pairs}) == len({t for _, t in pairs}), pairs
    t = torch.empty(64, dtype=torch.bfloat16)
    for view in (t, t[1:], t[8:], t[9:]):
        assert (tritons(view)[1] == "D") == (view.data_ptr() % 16 == 0)


class _Compiled:
    """A stand-in for Triton's CompiledKernel: records what its launcher is given."""

    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launched = []

    def run(self, *args):
        self.launched.append(args)

    def launch_metadata(self, grid, stream, *args):
        return "launch metadata"


class _Tuner:
    """A stand-in for triton.autotune's wrapper: chooses ``config``, records its call."""

    def __init__(self, config):
        self.configs, self.best_config, self.calls, self.kernel = [config], config, [], _Compiled()

    def __getitem__(self, grid):
        def run(*args, **constexprs):
            self.calls.append((grid, args, constexprs))
            return self.kernel

        return run


@pytest.mark.skipif(not ops.INTERPRET, reason="CPU tensors through stand-ins (the GPU test runs the binaries)")
@pytest.mark.parametrize("kernel", ["pointer", "tma"])
def test_direct_launch_passes_what_triton_binds(monkeypatch, kernel):
    # The first launch of a kind goes through the autotuner; the next calls the binary's
    # launcher with the arguments JITFunction.run would bind: the runtime arguments, then
    # every constexpr (flags, then the chosen configuration's), in the kernel's order.
    if kernel == "tma" and not ops.TMA_AVAILABLE:
        pytest.skip("no tensor descriptors in this Triton")
    config = (ops.TMA_CONFIGS if kernel == "tma" else ops.CONFIGS)[2]
    tuner = _Tuner(config)
    fn = tma_gemm_kernel if kernel == "tma" else fused_gemm_kernel
    cached = launch.CachedKernel(fn, tuner, first_constexpr="ROWSUM" if kernel == "tma" else "PRO_ACT")
    monkeypatch.setattr(launch, kernel.upper(), cached)
    monkeypatch.setattr(launch, "_current_stream", lambda: "stream")
    x, w, b = (torch.randn(*s, dtype=torch.bfloat16) for s in ((100, 64), (48, 64), (48,)))
    with ops.gemm_kernel(kernel):
        triton_backend.forward(x, w, b, "gelu_tanh")
        assert len(tuner.calls) == 1 and not tuner.kernel.launched
        triton_backend.forward(x, w, b, "gelu_tanh")
    assert len(tuner.calls) == 1 and len(tuner.kernel.launched) == 1
    grid, args, constexprs = tuner.calls[0]
    bound = {**dict(zip(fn.arg_names, args)), **constexprs, **config.kwargs}
    launched = tuner.kernel.launched[0]
    programs = -(-100 // config.kwargs["BLOCK_M"]) * -(-48 // config.kwargs["BLOCK_N"])
    if kernel == "tma":
        programs = min(programs, launch.num_sms(x.device))
    assert launched[:9] == (programs, 1, 1, "stream", "function", "metadata", None, None, None)  # no hooks to call
    assert grid(bound) == (programs,)
    assert len(launched) == 9 + len(fn.arg_names)
    blocks = configs.block_shapes(config.kwargs, bound.get("A_T"), bound.get("B_T")) if kernel == "tma" else ()
    for name, got in zip(fn.arg_names, launched[9:]):
        want = bound[name]
        if isinstance(want, torch.Tensor):
            # Each launch's own outputs; the operands themselves.
            assert (got.shape, got.stride(), got.dtype) == (want.shape, want.stride(), want.dtype), name
        elif name.endswith("_desc") and want is not None:
            # A fresh descriptor of the same view, with the configuration's block shape
            # (through the autotuner, its pre-hook sets that).
            assert (got.shape, got.strides, got.padding) == (want.shape, want.strides, want.padding), name
            assert (got.base.shape, got.base.stride()) == (want.base.shape, want.base.stride()), name
            assert got.block_shape == blocks[{"a_desc": 0, "b_desc": 1}.get(name, 2)], name
        else:
            assert got == want, name
    # A profiler's hook installed: the launcher gets the launch metadata and both hooks.
    hooks = triton.knobs.runtime
    if hasattr(hooks.launch_enter_hook, "add"):  # HookChain, Triton >= 3.5
        hook = lambda metadata: None  # noqa: E731
        hooks.launch_enter_hook.add(hook)
        try:
            with ops.gemm_kernel(kernel):
                triton_backend.forward(x, w, b, "gelu_tanh")
        finally:
            hooks.launch_enter_hook.remove(hook)
        assert tuner.kernel.launched[1][6:9] == ("launch metadata", hooks.launch_enter_hook, hooks.launch_exit_hook)


def test_one_entry_per_kind_of_launch(monkeypatch):
    # Under the interpreter the cache still keys, configures and packs every launch:
    # rows in one bucket and specialisation class share an entry; a multiple of 16 rows,
    # another bucket, a misaligned view or another dtype are new kinds.
    cached = launch.pointer_kernel([c for c in ops.CONFIGS if c.kwargs["BLOCK_M"] == 64][:1])
    monkeypatch.setattr(launch, "POINTER", cached)
    w = torch.randn(40, 24, device=DEVICE)

    def forward(x, w=w):
        with ops.gemm_kernel("pointer"):
            out, _ = triton_backend.forward(x, w, None, None)
        assert_rel_close(out, x.double() @ w.double().t(), x.dtype, "out")

    forward(torch.randn(70, 24, device=DEVICE))
    forward(torch.randn(100, 24, device=DEVICE))
    assert len(cached.entries) == 1
    forward(torch.randn(96, 24, device=DEVICE))  # 96 rows: a multiple of 16
    forward(torch.randn(130, 24, device=DEVICE))  # bucket 256
    forward(torch.randn(70, 25, device=DEVICE)[:, 1:])  # 4 bytes off alignment, row stride 25
    forward(torch.randn(70, 24, device=DEVICE, dtype=torch.float64), w.double())
    assert len(cached.entries) == 5


def _tritons_binder(fn):
    """Triton's own argument binder of the kernel ``fn`` for an sm_90 target, what
    ``JITFunction.run`` calls on every launch: ``(arguments by name, specialisation,
    options)``, the specialisation (each argument's type, 16-byte alignment or integer
    class, and every constexpr) being the key of Triton's binary cache."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)  # the interpreter wraps the Python function
    return create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))


# (m, k, n, layout, dtype, bias, activation): what Triton specialises on, crossed: one row
# (a constexpr 1), rows a multiple of 16 or not within one bucket (20, 24, 32), another
# bucket (33), K not a multiple of 16 (40), no bias, a transposed view (describable at 24
# and 32 rows, not at 20), a sliced view (misaligned rows: the pointer kernel only),
# another dtype, each kernel's epilogue with and without z.
_SWEEP = [
    (1, 32, 48, "contiguous", torch.bfloat16, True, "gelu_tanh"),
    (20, 32, 48, "contiguous", torch.bfloat16, False, None),
    (32, 32, 48, "contiguous", torch.bfloat16, False, None),
    (32, 32, 48, "contiguous", torch.bfloat16, True, "gelu_tanh"),
    (33, 32, 48, "contiguous", torch.bfloat16, True, "gelu_tanh"),
    (20, 40, 48, "contiguous", torch.bfloat16, True, None),
    (32, 32, 48, "transposed", torch.bfloat16, True, None),
    (24, 32, 48, "transposed", torch.bfloat16, False, "gelu_tanh"),
    (20, 32, 48, "transposed", torch.bfloat16, True, None),
    (20, 32, 48, "sliced", torch.bfloat16, True, "relu"),
    (20, 32, 48, "contiguous", torch.float32, True, "relu"),
]


@pytest.mark.skipif(not ops.INTERPRET, reason="on a GPU test_direct_launch_is_tritons_binary runs both paths")
def record_launch_kinds(monkeypatch, tuned_on: dict) -> dict:
    """Records, for each cache entry ``(kernel, key)`` that launches, the set of launches
    it served as Triton would tell them apart: ``(specialisation from Triton's own binder,
    the autotuner's key)`` (``tuned_on``: each autotuned kernel's key names; a kernel not
    in it has no autotuner). One entry, one element: the direct call runs the binary
    ``JITFunction.run`` would pick, in the configuration the autotuner would choose."""
    binders, seen = {}, {}
    call = launch.CachedKernel.__call__

    def recording(self, key, grid, args, constexprs):
        call(self, key, grid, args, constexprs)
        entry = self.entries[key]
        if self.fn not in binders:
            binders[self.fn] = _tritons_binder(self.fn)
        bound, specialisation, _ = binders[self.fn](*(args(entry.meta) if callable(args) else args), *entry.tail)
        # Autotuner.run's key: the named arguments, then the dtype of every argument that
        # has one (the configuration's meta-parameters are not arguments yet).
        given = {name: v for name, v in bound.items() if name not in entry.meta}
        tuning = [given[name] for name in tuned_on.get(self.fn, ())]
        tuning += [str(v.dtype) for v in given.values() if hasattr(v, "dtype")]
        seen.setdefault((self.fn, key), set()).add((repr(specialisation), repr(tuning)))

    monkeypatch.setattr(launch.CachedKernel, "__call__", recording)
    return seen


@pytest.mark.parametrize("kernel", ["pointer", "tma"])
def test_one_entry_is_one_binary_and_one_tuning(monkeypatch, kernel):
    # Every launch the cache serves from one entry is one launch to Triton: one
    # specialisation from Triton's own binder (so the direct call runs the binary
    # JITFunction.run would pick) and one key of its autotuner (so the configuration is
    # the one it would choose). The sweep: the linear op's three launches per case of
    # _SWEEP, and on the pointer kernel the MLP blocks' launches at 1, 20 and 32 tokens.
    import torch_matgrad

    if kernel == "tma" and not ops.TMA_AVAILABLE:
        pytest.skip("no tensor descriptors in this Triton")
    seen = record_launch_kinds(
        monkeypatch, {fused_gemm_kernel: configs._AUTOTUNE_KEY, tma_gemm_kernel: configs._TMA_AUTOTUNE_KEY})
    with ops.gemm_kernel(kernel):
        for m, k, n, layout, dtype, bias, activation in _SWEEP:
            _check_all(m, k, n, dtype, activation, bias, layout)
        # Pointers 2 bytes past a 16-byte boundary, strides as before.
        x, w, b = (_to(torch.randn(*s, dtype=torch.float64), torch.bfloat16) for s in ((32, 32), (48, 32), (48,)))
        for xi, bi in ((x, b), (_off_alignment(x), b), (x, _off_alignment(b))):
            out, _ = triton_backend.forward(xi, w, bi, None)
            assert_rel_close(out, formulas.forward(x.double(), w.double(), b.double(), None)[0], torch.bfloat16, "out")
        if kernel == "pointer":
            for m, gated in ((1, True), (20, False), (20, True), (32, True)):
                x = torch.randn(m, 32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
                shapes = ((48, 32), (48, 32), (24, 48))
                up, gate, down = (torch.randn(*s, device=DEVICE, dtype=torch.bfloat16) for s in shapes)
                with torch_matgrad.use_backend("triton"):
                    out = torch_matgrad.mlp(x, up, down, None, None, "silu", gate if gated else None)
                out.backward(torch.randn_like(out))
    split = {entry: launches for entry, launches in seen.items() if len(launches) > 1}
    assert not split, f"one cache entry, several Triton launches: {split}"
    # The sweep can tell: with the integer classes or the alignments left out of the key
    # (their places in launch.py's keys), launches Triton compiles apart would share an entry.
    fn = tma_gemm_kernel if kernel == "tma" else fused_gemm_kernel
    assert sum(f is fn for f, _ in seen) >= 8
    for part in (-1, 8 if kernel == "tma" else 4):  # integer classes; (bias) pointer alignment
        coarse = {}
        for (f, key), launches in seen.items():
            if f is fn:
                rest = list(key)
                del rest[part]
                coarse.setdefault(tuple(rest), set()).update(spec for spec, _ in launches)
        assert any(len(specs) > 1 for specs in coarse.values()), part


def _off_alignment(t):
    """A copy of ``t`` with its strides, starting one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    return flat.view(t.shape).copy_(t)
