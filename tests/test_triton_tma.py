"""The descriptor (TMA) kernel against float64 references, and the rule that chooses it.

Without a GPU the kernels run under Triton's interpreter, which supports tensor
descriptors; there the descriptor kernel runs only when asked for by name
(``ops.gemm_kernel("tma")``), in 32 x 32 x 16 tiles with the split epilogue and a
persistent grid of 3 programs (``configs.INTERPRETER_TMA_META``), so the test shapes span
several tiles per program with ragged edges. Every output is NaN-filled first
(``poisoned_outputs``), and every test counts the launches of each kernel: a case
that should take the descriptor kernel and silently fell back would pass otherwise.
The backward's ``act'`` prologue is the pointer kernel's only, even when the
descriptor kernel is asked for. On a GPU without TMA (before Hopper) only the rule's
tests run.
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from _util import assert_rel_close

pytestmark = pytest.mark.kernels
triton = pytest.importorskip("triton")

from test_triton_kernels import DEVICE, _check_all, _to, poisoned_outputs  # noqa: E402, F401 (autouse fixture)
from torch_matgrad import formulas, triton_backend  # noqa: E402
from torch_matgrad.triton_kernels import configs, launch, ops  # noqa: E402
from torch_matgrad.triton_kernels.fused_gemm import fused_gemm_kernel  # noqa: E402
from torch_matgrad.triton_kernels.tma_gemm import tma_gemm_kernel  # noqa: E402

TMA_DTYPES = [torch.float16, torch.bfloat16]
ALL_NEEDS = (True, True, True)
_TMA_DEVICE = DEVICE == "cpu" or (torch.version.hip is None and torch.cuda.get_device_capability() >= (9, 0))
runs_tma = pytest.mark.skipif(
    not (ops.TMA_AVAILABLE and _TMA_DEVICE), reason="no descriptor kernel here (GPU before Hopper, or old Triton)"
)


@pytest.fixture
def launches(monkeypatch):
    """The kernels launched, in order: ``"tma"`` or ``"pointer"`` per launch."""
    seen = []
    for kind in ("tma", "pointer"):
        run = getattr(launch, f"run_{kind}_kernel")

        def counting(*args, _run=run, _kind=kind):
            seen.append(_kind)
            return _run(*args)

        monkeypatch.setattr(launch, f"run_{kind}_kernel", counting)
    return seen


# -------------------------------------------------------------------------------------
# Every specialisation under the kernel: 104 x 40 x 48 is ragged against the 32-wide
# tiles in every dimension of every product (forward M, N, K = 104, 48, 40; grad_x 104,
# 40, 48; grad_W 48, 40, 104), and every dimension is a multiple of 8 (16 bytes in
# fp16/bf16) so that every operand can be described.
SHAPE = (104, 40, 48)


@runs_tma
@pytest.mark.parametrize("strategy", ["prologue", "pass"])
@pytest.mark.parametrize("activation", formulas.ACTIVATIONS)
@pytest.mark.parametrize("dtype", TMA_DTYPES, ids=str)
def test_every_specialisation(launches, dtype, activation, strategy):
    # Forward (bias, activation, z), grad_x and grad_W + grad_b, with G_z from the
    # elementwise pass: three launches of the descriptor kernel. With act' in the
    # prologue, the two backward launches take the pointer kernel although the
    # descriptor kernel is asked for (it has no prologue), and still match.
    with ops.gemm_kernel("tma"), triton_backend.gz_strategy(strategy):
        _check_all(*SHAPE, dtype, activation, bias=True)
    backward = "pointer" if strategy == "prologue" and activation is not None else "tma"
    assert launches == ["tma"] + [backward] * 2


@runs_tma
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    "needs", [ALL_NEEDS, (True, False, False), (False, True, False), (False, False, True)], ids=str
)
def test_layouts_and_partial_needs(launches, needs, bias, layout):
    # Transposed views flip which descriptor holds a transpose (A_T, B_T) in every
    # product. grad_b alone is a launch without a product: the pointer kernel's.
    with ops.gemm_kernel("tma"), triton_backend.gz_strategy("pass"):
        _check_all(*SHAPE, torch.bfloat16, "gelu", bias, layout, needs)
    need_x, need_w, need_b = needs
    backward = ["tma"] * need_x + (["tma"] if need_w else ["pointer"] if need_b else [])
    assert launches == ["tma"] + backward


# -------------------------------------------------------------------------------------
# Operands a descriptor cannot describe take the pointer kernel, product by product.


def _operands(case):
    """x, W, b, G in bf16 (SHAPE) with one of them laid out as ``case`` says."""
    m, k, n = SHAPE
    x, w, g = (torch.randn(*s, dtype=torch.float64) for s in ((m, k), (n, k), (m, n)))
    x, w, g = (_to(t, torch.bfloat16) for t in (x, w, g))
    b = _to(torch.randn(n, dtype=torch.float64), torch.bfloat16)
    if case == "x: base 2 bytes past 16-byte alignment":
        storage = torch.empty(m * k + 8, dtype=torch.bfloat16, device=DEVICE)
        x = storage[1 : 1 + m * k].view(m, k).copy_(x)
    elif case == "x: every other column":
        x = torch.empty(m, 2 * k, dtype=torch.bfloat16, device=DEVICE)[:, ::2].copy_(x)
    elif case == "x: rows of 41 elements (82 bytes)":
        x = torch.empty(m, k + 1, dtype=torch.bfloat16, device=DEVICE)[:, :k].copy_(x)
    elif case == "G: expanded (strides 0)":
        g = g[:1, :1].expand(m, n)
    return x, w, b, g


_FALLBACKS = {
    # case: kernels of forward, grad_x (G W), grad_W + grad_b (G^T x)
    "x: base 2 bytes past 16-byte alignment": ["pointer", "tma", "pointer"],
    "x: every other column": ["pointer", "tma", "pointer"],
    "x: rows of 41 elements (82 bytes)": ["pointer", "tma", "pointer"],
    "G: expanded (strides 0)": ["tma", "pointer", "pointer"],
}


@runs_tma
@pytest.mark.parametrize("case", list(_FALLBACKS))
def test_views_a_descriptor_cannot_describe_fall_back(launches, case):
    # No activation: G itself (not a G_z computed from it) is the GEMMs' operand.
    x, w, b, g = _operands(case)
    with ops.gemm_kernel("tma"):
        out, _ = triton_backend.forward(x, w, b, None)
        got = [out, *triton_backend.backward(g, None, x, w, None, None, ALL_NEEDS)]
    assert launches == _FALLBACKS[case]
    x64, w64, b64, g64 = (t.double() for t in (x, w, b, g))
    ref_out, _ = formulas.forward(x64, w64, b64, None)
    want = [ref_out, *formulas.backward(g64, None, x64, w64, None, None, ALL_NEEDS)]
    for name, u, v in zip(("out", "grad_x", "grad_W", "grad_b"), got, want):
        assert_rel_close(u, v, torch.bfloat16, name)


@runs_tma
def test_fp32_and_fp64_keep_the_pointer_kernel(launches):
    for dtype in (torch.float32, torch.float64):
        with ops.gemm_kernel("tma"):
            _check_all(*SHAPE, dtype, "relu", bias=True)
    assert launches == ["pointer"] * 6


# -------------------------------------------------------------------------------------
# Every autotune configuration of both kernels, in its own tiles, on a shape that spans
# more than one tile in every dimension of every product (ragged; multiples of 8 for
# the descriptor kernel): forward with bias, GELU and z; the backward (grad_x; grad_W
# with the grad_b row sums), for the pointer kernel with act' in the prologue, for the
# descriptor kernel (which has none) with G_z from the elementwise pass. On a GPU also
# 4096^3 (the steady state of the software pipeline), with the pointer kernel's
# prologue only where the configuration holds it (a single configuration is not
# pruned: one that does not fit would not launch).
_SWEEP = [("tma", name) for name in ops.TMA_CONFIG_NAMES] + [("pointer", name) for name in ops.CONFIG_NAMES]
_SIZES = ["ragged"] + (["4096"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("size", _SIZES)
@pytest.mark.parametrize("kernel, config", _SWEEP, ids=[name for _, name in _SWEEP])
def test_every_autotune_configuration_of_both_kernels(monkeypatch, launches, kernel, config, size):
    if kernel == "tma" and not (ops.TMA_AVAILABLE and _TMA_DEVICE):
        pytest.skip("no descriptor kernel here")
    configs, names = (ops.TMA_CONFIGS, ops.TMA_CONFIG_NAMES) if kernel == "tma" else (ops.CONFIGS, ops.CONFIG_NAMES)
    cfg = configs[names.index(config)]
    if kernel == "tma":
        monkeypatch.setattr(launch, "TMA", launch.tma_kernel([cfg]))
    else:
        monkeypatch.setattr(launch, "POINTER", launch.pointer_kernel([cfg]))
    bm, bn, bk = (cfg.kwargs[f"BLOCK_{d}"] for d in "MNK")
    wide = max(bm, bn)
    if size == "4096":
        m = k = n = 4096
    elif kernel == "tma":
        m, k, n = wide + 40, max(2 * bk, wide) + 8, wide + 24
    else:
        m, k, n = wide + 37, max(2 * bk, wide) + 5, wide + 11
    # The pointer kernel's backward with act' in the prologue where its autotuner would
    # ever run this configuration with it (on a GPU; everywhere under the interpreter),
    # else, and for the descriptor kernel always, the pass.
    strategy = "prologue" if kernel == "pointer" and _runs_with_prologue(cfg) else "pass"
    with ops.gemm_kernel(kernel), triton_backend.gz_strategy(strategy):
        _check_all(m, k, n, torch.bfloat16, "gelu", bias=True)
    assert launches == [kernel] * 3
    if DEVICE == "cuda":  # what the GPU compiled: registers and spills (pytest -rP prints them)
        fn = tma_gemm_kernel if kernel == "tma" else fused_gemm_kernel
        for compiled in _compiled(fn, cfg):
            print(f"{config} {size}: {compiled.metadata.name}: {getattr(compiled, 'n_regs', '?')} registers, "
                  f"{getattr(compiled, 'n_spills', '?')} spilled, {compiled.metadata.shared} bytes shared")


def _runs_with_prologue(cfg) -> bool:
    """Whether the pointer kernel's autotuner keeps ``cfg`` for a bf16 launch with the
    ``act'`` prologue on this GPU (its pruning; under the interpreter nothing is pruned)."""
    if ops.INTERPRET:
        return True
    t = torch.empty(64, 64, device="cuda", dtype=torch.bfloat16)
    return configs._fits([cfg], {"a_ptr": t, "M_BUCKET": 4096}, PRO_ACT=2) == [cfg]


def _compiled(fn, cfg):
    """The kernels of ``fn`` compiled so far in ``cfg``'s warps and stages."""
    return [
        k for caches in fn.device_caches.values() for k in caches[0].values()
        if (k.metadata.num_warps, k.metadata.num_stages) == (cfg.num_warps, cfg.num_stages)
    ]


@pytest.mark.cuda
@runs_tma
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("activation", formulas.ACTIVATIONS)
@pytest.mark.parametrize("dtype", TMA_DTYPES, ids=str)
def test_real_sizes_on_the_gpu(launches, dtype, activation, layout):
    # Ragged against every configuration's tiles, multiples of 8 so that the
    # descriptor kernel is valid; "auto" takes it by itself on this GPU.
    _check_all(2056, 1032, 1544, dtype, activation, bias=True, layout=layout)
    assert launches == ["tma"] * 3


@pytest.mark.cuda
@runs_tma
def test_auto_falls_back_on_the_gpu(launches):
    # Rows of 4095 bf16 elements cannot be described; every product reads or writes a
    # matrix with such rows (x in the forward and grad_W, grad_x itself), so all three
    # take the pointer kernel. 4095 rows of 4096 are fine.
    _check_all(1024, 4095, 4096, torch.bfloat16, "gelu_tanh", bias=True)
    _check_all(4095, 4096, 1024, torch.bfloat16, "gelu_tanh", bias=True)
    assert launches == ["pointer"] * 3 + ["tma"] * 3


# -------------------------------------------------------------------------------------
# The rule (ops.gemm_kernel_for): no kernel runs in these.


@pytest.fixture
def hopper(monkeypatch):
    """CPU tensors treated as on a TMA-capable GPU, under ``"auto"``."""
    monkeypatch.setattr(ops, "_tma_hardware", lambda device: True)
    monkeypatch.setattr(ops, "TMA_AVAILABLE", True)
    monkeypatch.setattr(launch, "TMA", launch.TMA or launch.tma_kernel(ops.TMA_CONFIGS))


def _bf16(*shape):
    return torch.empty(*shape, dtype=torch.bfloat16)


def test_rule_takes_the_descriptor_kernel_only_where_valid(hopper):
    a, b = _bf16(128, 4096), _bf16(4096, 256)
    assert ops.gemm_kernel_for(a, b) == "tma"
    assert ops.gemm_kernel_for(a.half(), b.half()) == "tma"
    assert ops.gemm_kernel_for(_bf16(4096, 128).t(), _bf16(256, 4096).t()) == "tma"  # both described transposed
    assert ops.gemm_kernel_for(a.float(), b.float()) == "pointer"
    assert ops.gemm_kernel_for(a.double(), b.double()) == "pointer"
    assert ops.gemm_kernel_for(a, None) == "pointer"  # row sums only
    assert ops.gemm_kernel_for(a, b[:, :0]) == "pointer"
    # A bf16 row of 4095 elements (8190 bytes) is no multiple of 16 bytes, as an operand
    # or as an output; nor is an odd base address.
    assert ops.gemm_kernel_for(_bf16(128, 4095), _bf16(4095, 256)) == "pointer"
    assert ops.gemm_kernel_for(a, _bf16(4096, 4095)) == "pointer"
    assert ops.gemm_kernel_for(a, b, outputs=(_bf16(128, 4095),)) == "pointer"
    assert ops.gemm_kernel_for(_bf16(128 * 4096 + 8)[1:].as_strided((128, 4096), (4096, 1)), b) == "pointer"
    assert ops.gemm_kernel_for(a[:, ::2], b[::2]) == "pointer"
    # Decoding rows keep the pointer kernel's small tiles under "auto", not when asked.
    assert ops.gemm_kernel_for(a[: ops.SMALL_M], b) == "pointer"
    assert ops.gemm_kernel_for(a[: ops.SMALL_M + 8], b) == "tma"
    with ops.gemm_kernel("tma"):
        assert ops.gemm_kernel_for(a[:16], b) == "tma"
    with ops.gemm_kernel("pointer"):
        assert ops.gemm_kernel_for(a, b) == "pointer"


def test_rule_sends_the_prologue_to_the_pointer_kernel(hopper):
    # The act' prologue (a saved tensor, or its flag) is the pointer kernel's only, even
    # where every operand could be described and the descriptor kernel is asked for.
    a, b = _bf16(128, 4096), _bf16(4096, 256)
    prologue = ops.specialisation(torch.bfloat16, grad_activation="gelu")
    for mode in ("auto", "tma"):
        with ops.gemm_kernel(mode):
            assert ops.gemm_kernel_for(a, b) == "tma"
            assert ops.gemm_kernel_for(a, b, saved=a) == "pointer"
            assert ops.gemm_kernel_for(a.t(), _bf16(128, 256), saved=a.t()) == "pointer"  # grad_W + grad_b
            assert ops.gemm_kernel_for(a, b, saved=a, flags=prologue) == "pointer"
            assert ops.gemm_kernel_for(a, b, flags=prologue) == "pointer"
    assert "PRO_ACT" not in configs._TMA_AUTOTUNE_KEY
    assert set(ops.POINTER_ONLY_FLAGS) <= set(configs._AUTOTUNE_KEY)


def test_rule_needs_triton_support_and_a_configuration(hopper, monkeypatch):
    a, b = _bf16(128, 4096), _bf16(4096, 256)
    monkeypatch.setattr(ops, "TMA_AVAILABLE", False)
    assert ops.gemm_kernel_for(a, b) == "pointer"
    monkeypatch.setattr(ops, "TMA_AVAILABLE", True)
    monkeypatch.setattr(launch, "TMA", None)  # $TORCH_MATGRAD_TRITON_CONFIGS named none of its configurations
    assert ops.gemm_kernel_for(a, b) == "pointer"


def test_rule_with_one_named_configuration_on_cpu_tensors(hopper, monkeypatch):
    # One configuration named in $TORCH_MATGRAD_TRITON_CONFIGS (an autotuner without a
    # choice, so no pruning): the rule checks its shared memory on a GPU only. With CPU
    # tensors it asked the driver about device index None (a TypeError on a GPU machine;
    # without a GPU there is no driver to ask).
    big = ops.TMA_CONFIGS[ops.TMA_CONFIG_NAMES.index("tma_128x256x64_s4_w8_e2")]
    monkeypatch.setattr(launch, "TMA", launch.tma_kernel([big]))
    assert len(launch.TMA.configs) == 1
    assert ops.gemm_kernel_for(_bf16(128, 4096), _bf16(4096, 256)) == "tma"


@pytest.mark.cuda
def test_rule_with_one_named_configuration_on_the_gpu(hopper, monkeypatch):
    # A single named configuration runs only where it fits the GPU's shared memory:
    # 128 x 256 x 64 in 4 stages with half-tile stores needs 224 KiB.
    a = torch.empty(128, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.empty(4096, 256, device="cuda", dtype=torch.bfloat16)
    big = ops.TMA_CONFIGS[ops.TMA_CONFIG_NAMES.index("tma_128x256x64_s4_w8_e2")]
    monkeypatch.setattr(launch, "TMA", launch.tma_kernel([big]))
    monkeypatch.setattr(ops, "_shared_memory_limit", lambda device: 227 * 1024)
    assert ops.gemm_kernel_for(a, b) == "tma"
    monkeypatch.setattr(ops, "_shared_memory_limit", lambda device: 163 * 1024)
    assert ops.gemm_kernel_for(a, b) == "pointer"
    monkeypatch.setattr(launch, "TMA", launch.tma_kernel(ops.TMA_CONFIGS))  # the autotuner prunes
    assert ops.gemm_kernel_for(a, b) == "tma"


@pytest.mark.parametrize(
    "capability, hip, takes",
    [((8, 0), None, False), ((8, 9), None, False), ((9, 0), None, True), ((10, 0), None, True), ((9, 4), "6.2", False)],
    ids=["sm80", "sm89", "sm90", "sm100", "rocm-mi300"],
)
def test_hardware_rule(monkeypatch, capability, hip, takes):
    # Compute capability 9.0 and up on NVIDIA GPUs (ROCm reports MI300 as 9.4).
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(ops, "_TMA_GPUS", {})  # asked once per device
    assert ops._tma_hardware(torch.device("cuda", 0)) is takes
    monkeypatch.setattr(torch.cuda, "get_device_capability", None)
    assert ops._tma_hardware(torch.device("cuda", 0)) is takes


def test_interpreter_runs_the_descriptor_kernel_only_when_asked():
    cpu = torch.device("cpu")
    assert not ops._tma_hardware(cpu)
    with ops.gemm_kernel("tma"):
        assert ops._tma_hardware(cpu) is ops.INTERPRET


def test_descriptor_layouts():
    t = _bf16(64, 4096)
    assert ops._descriptor_layout(t) is False
    assert ops._descriptor_layout(t.t()) is True  # described through its transpose, t
    for bad in (_bf16(64, 4095), _bf16(64, 4095).t(), t[:, 1:], t[:, ::2], _bf16(64, 1).expand(64, 16)):
        assert ops._descriptor_layout(bad) is None
    assert ops._descriptor_layout(torch.empty(64, 4, dtype=torch.float32)) is False  # 16-byte rows
    # The rule is memoised by shape, strides and element size; the base's alignment is not.
    assert ops._descriptor_layout(_bf16(4097)[1:].view(64, 64)) is None


def test_transposed_descriptor_describes_the_transpose_without_a_view():
    t = _bf16(32, 48).t()  # columns contiguous: its transpose is described
    d = launch.describe(t, [16, 8], transposed=True)
    want = launch.TensorDescriptor(t.t(), list(t.t().shape), list(t.t().stride()), [16, 8])
    assert d.base is t and (d.shape, d.strides, d.block_shape) == (want.shape, want.strides, want.block_shape)
    assert vars(d) == {**vars(want), "base": t}


def test_a_forced_choice_reaches_the_autograd_thread():
    # On CUDA the autograd engine runs a backward on its device thread: the kernel (and
    # split) forced around loss.backward() in the calling thread must reach it.
    x = torch.empty(256, 64, dtype=torch.bfloat16, device=DEVICE)
    w, out = torch.empty(128, 64, dtype=torch.bfloat16, device=DEVICE), torch.empty(256, 128, device=DEVICE)
    seen = []

    def look():
        seen.append((ops.gemm_kernel_for(x, w.t(), None, (out.bfloat16(),)), ops._split_k_mode))

    for kernel, split in (("tma", "off"), ("pointer", 3)):
        with ops.gemm_kernel(kernel), ops.split_k(split):
            thread = threading.Thread(target=look)
            thread.start()
            thread.join()
    assert seen == [("tma", "off"), ("pointer", 3)]


def test_kernel_override_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="unknown kernel 'cuda'; choose one of auto, tma, pointer"):
        with ops.gemm_kernel("cuda"):
            pass
    monkeypatch.setenv(ops.KERNEL_ENV_VAR, "tma")
    assert ops._kernel_mode_from_env() == "tma"
    monkeypatch.setenv(ops.KERNEL_ENV_VAR, "wgmma")
    with pytest.raises(ValueError, match=f"{ops.KERNEL_ENV_VAR}='wgmma': choose one of auto, tma, pointer"):
        ops._kernel_mode_from_env()
    monkeypatch.delenv(ops.KERNEL_ENV_VAR)
    assert ops._kernel_mode_from_env() == "auto"


def test_triton_versions():
    assert ops._version_tuple("3.6.0") == (3, 6) >= ops.TMA_MIN_TRITON
    assert ops._version_tuple("3.10.0+git1234") == (3, 10) >= ops.TMA_MIN_TRITON
    assert ops._version_tuple("3.5.1") < ops.TMA_MIN_TRITON


# -------------------------------------------------------------------------------------
# Configurations: names, pruning, block shapes.


def test_configuration_names():
    assert ops.TMA_CONFIG_NAMES[:2] == ["tma_128x256x64_s3_w8", "tma_128x256x64_s4_w8_e2"]
    assert not set(ops.TMA_CONFIG_NAMES) & set(ops.CONFIG_NAMES)
    assert ops.selected_tma_configs("") == ops.TMA_CONFIGS == ops.selected_tma_configs("all")
    both = f"{ops.CONFIG_NAMES[0]},{ops.TMA_CONFIG_NAMES[2]}"
    assert ops.selected_configs(both) == [ops.CONFIGS[0]]
    assert ops.selected_tma_configs(both) == [ops.TMA_CONFIGS[2]]
    assert ops.selected_tma_configs(ops.CONFIG_NAMES[0]) == []  # pointer names only: no descriptor kernel
    assert ops.selected_configs(ops.TMA_CONFIG_NAMES[0]) == []
    with pytest.raises(ValueError, match="unknown configuration.*tma_128x256x64_s3_w8"):
        ops.selected_tma_configs("tma_64x64")


def _fit_names(limit_kib):
    return [
        name for cfg, name in zip(ops.TMA_CONFIGS, ops.TMA_CONFIG_NAMES)
        if ops.tma_config_fits(cfg, elem=2, limit=limit_kib * 1024)
    ]


def test_configurations_fit_shared_memory():
    # H100 (227 KiB per block): every configuration (128 x 256 in 3 stages with a
    # whole-tile store, or in 4 stages with half-tile stores).
    assert _fit_names(227) == ops.TMA_CONFIG_NAMES
    # 4 stages of 128 x 256 x 64 bf16 are 192 KiB: with a whole-tile staging buffer
    # (64 KiB) they would not fit, with a half tile (32 KiB) they do.
    split = ops.TMA_CONFIGS[ops.TMA_CONFIG_NAMES.index("tma_128x256x64_s4_w8_e2")]
    assert split.num_stages == 4 and split.kwargs["EPILOGUE_SPLIT"] == 2
    whole = triton.Config({**split.kwargs, "EPILOGUE_SPLIT": 1}, num_stages=4, num_warps=8)
    assert not ops.tma_config_fits(whole, elem=2, limit=227 * 1024)
    # 163 KiB: the tiles up to 128 x 128 in 4 stages.
    assert _fit_names(163) == [n for n in ops.TMA_CONFIG_NAMES if "x256x" not in n]
    # 99 KiB (consumer Blackwell, compute capability 12): none; the fallback fits.
    assert _fit_names(99) == []
    assert ops.tma_config_fits(configs._TMA_FALLBACK, elem=2, limit=99 * 1024)


def test_autotuner_pruning_never_leaves_none(monkeypatch):
    monkeypatch.setattr(configs, "_shared_memory_limit", lambda device: 16 * 1024)
    desc = launch.TensorDescriptor(_bf16(64, 64), [64, 64], [64, 1], [16, 16])
    assert configs._tma_fits(ops.TMA_CONFIGS, {"a_desc": desc}) == [configs._TMA_FALLBACK]
    monkeypatch.setattr(configs, "_shared_memory_limit", lambda device: 227 * 1024)
    assert configs._tma_fits(ops.TMA_CONFIGS, {"a_desc": desc}) == ops.TMA_CONFIGS


@pytest.mark.parametrize("a_t, b_t", list(itertools.product((False, True), repeat=2)))
def test_block_shapes_follow_the_configuration(a_t, b_t):
    # A descriptor of a transposed operand holds the transposed block; C and z hold one
    # epilogue subtile.
    descs = {name: launch.TensorDescriptor(_bf16(64, 64), [64, 64], [64, 1], [16, 16]) for name in
             ("a_desc", "b_desc", "c_desc", "z_desc")}
    cfg = ops.TMA_CONFIGS[ops.TMA_CONFIG_NAMES.index("tma_128x256x64_s4_w8_e2")]
    cfg.pre_hook({**descs, **cfg.kwargs, "A_T": a_t, "B_T": b_t})
    assert descs["a_desc"].block_shape == ([64, 128] if a_t else [128, 64])
    assert descs["b_desc"].block_shape == ([256, 64] if b_t else [64, 256])
    assert descs["c_desc"].block_shape == descs["z_desc"].block_shape == [128, 128]
