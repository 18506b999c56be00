"""Launch wrapper of :func:`fused_gemm_kernel` and :func:`tma_gemm_kernel`: check,
allocate, choose the kernel, launch.

No autograd here: :mod:`torch_matgrad.triton_backend` builds the op's forward and
backward from :func:`fused_matmul`.

Two kernels compute the same products and fusions: the pointer kernel
(``fused_gemm.py``, any GPU, any strides) and the descriptor kernel (``tma_gemm.py``:
TMA tensor descriptors and a persistent grid, Hopper and later, fp16/bf16 operands that
meet the descriptor rules). :func:`gemm_kernel_for` is the one place that chooses;
:func:`gemm_kernel` (or ``$TORCH_MATGRAD_GEMM_KERNEL``) overrides the choice where the
descriptor kernel is valid, for benchmarks and tests. The launches with the ``act'``
prologue (``grad_activation``) and the MLP block's (:func:`fused_matmul`'s ``b2``,
``hidden``, ``grad_hidden``, ``colsum``: ``MLP_FLAGS``) are the pointer kernel's alone
(``POINTER_ONLY_FLAGS``).

Autotuning (compiled kernels only): a few configurations for Ampere and Hopper (the
small-M ones only for M <= ``SMALL_M`` rows, the others only above), pruned to those that
fit the device's shared memory, optionally narrowed by ``$TORCH_MATGRAD_TRITON_CONFIGS``
(fewer compilations on a cold cache), keyed on the next power of two of each
dimension plus the specialisation flags and dtypes, so a new batch size reuses the
tuning of its power-of-two bucket instead of benchmarking again. The descriptor kernel
has its own configurations (``TMA_CONFIGS``, names ``tma_...``), pruned the same way plus
its epilogue's staging buffer. Under the interpreter a single small configuration of each
runs without ``triton.autotune`` (which needs a GPU driver to benchmark).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import os
from typing import Iterator, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..formulas import activate
from .fused_gemm import ACT_CODES, INTERPRET, fused_gemm_kernel
from .tma_gemm import tma_gemm_kernel

try:  # host-side tensor descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): the large tiles feed Hopper and
# Ampere tensor cores on big GEMMs; the 64-row ones keep every SM busy when M or N is
# small; the 16- and 32-row ones are for decoding (M <= 64 rows), where the product is
# bound by reading B once and a 128-row tile would compute 87-99% padding. GROUP_M = 8
# block rows share the B columns in L2.
# Not here: 128 x 256 x 64 in 3 stages with 8 warps. On an H100 with Triton 3.6 it gave
# a wrong grad_W (A = G^T, 58% relative error) at 4096^3 while passing at small K; the
# GPU test that runs every configuration at 4096^3 is what caught it.
_CONFIGS = [
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (64, 64, 128, 3, 4),
    (32, 64, 128, 4, 4),
    (16, 64, 128, 4, 4),
    (16, 32, 256, 4, 4),
]
_GROUP_M = 8
# When no configuration fits (or fp64 leaves none): 64 x 64 x 32 in two stages fits any
# GPU Triton supports (24 KiB of shared memory in fp64).
_FALLBACK = triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=_GROUP_M), num_stages=2, num_warps=4)
#: Rows (M) up to which the autotuner tries only tiles of at most 64 rows, and above
#: which only tiles of at least 64: half the compilations and benchmarks per shape.
SMALL_M = 64

#: Environment variable restricting the autotuner to some of ``CONFIG_NAMES`` (a comma
#: list): fewer compilations on a cold cache, e.g. for correctness tests on a GPU.
CONFIGS_ENV_VAR = "TORCH_MATGRAD_TRITON_CONFIGS"

# Interpreter: tiles of 32 x 32 x 16 (tl.dot's minimum is 16) make the small test
# shapes span several blocks and a ragged edge in every dimension; GROUP_M = 2 so the
# grouped ordering is exercised too.
INTERPRETER_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2)

_BASE_KEY = [
    "M_BUCKET", "N_BUCKET", "K_BUCKET", "ROWSUM", "HAS_C", "HAS_BIAS", "EPI_ACT", "STORE_Z", "INPUT_PRECISION",
]
#: The pointer kernel's flags of the MLP block's launches (``fused_gemm.py``).
MLP_FLAGS = ("DUAL", "HIDDEN", "EPI_GRAD", "COLSUM", "MLP_ACT")
#: The flags that only the pointer kernel has: the ``act'`` prologue's (``tma_gemm.py``
#: says why the descriptor kernel has none) and the MLP block's. :func:`gemm_kernel_for`
#: sends a launch that sets any to the pointer kernel.
POINTER_ONLY_FLAGS = ("PRO_ACT",) + MLP_FLAGS
_AUTOTUNE_KEY = _BASE_KEY + list(POINTER_ONLY_FLAGS)


def config_name(config: "triton.Config") -> str:
    """``BMxBNxBK_sS_wW``: tile, pipeline stages and warps of an autotune configuration;
    the descriptor kernel's are ``tma_BMxBNxBK_sS_wW``, with ``_e2`` when the epilogue
    stores two half-width subtiles."""
    kw = config.kwargs
    name = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}_s{config.num_stages}_w{config.num_warps}"
    if "EPILOGUE_SPLIT" not in kw:
        return name
    return f"tma_{name}" + (f"_e{kw['EPILOGUE_SPLIT']}" if kw["EPILOGUE_SPLIT"] != 1 else "")


CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP_M), num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in _CONFIGS
]
CONFIG_NAMES = [config_name(c) for c in CONFIGS]

# The descriptor kernel's (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps,
# EPILOGUE_SPLIT). Tiles of at least 64 rows (wgmma's minimum per warpgroup), so it
# serves M > SMALL_M only (gemm_kernel_for). Compiled for sm_90 with Triton 3.6
# (bf16; registers / spilled bytes from ptxas): 128 x 256 x 64 in 3 stages stores its
# whole tile through one 64 KiB staging buffer (forward with bias, GELU-tanh and z:
# 184 / 0; grad_W with grad_b: 188 / 0); in 4 stages only two half-width subtiles fit
# beside the pipeline (229 KiB), and the split costs registers (forward 255 / 28), so
# both are here and the autotuner decides. 64 x 128 and 128 x 64 tiles keep the SMs
# busy when M or N is small.
_TMA_CONFIGS = [
    (128, 256, 64, 3, 8, 1),
    (128, 256, 64, 4, 8, 2),
    (128, 128, 64, 4, 8, 1),
    (128, 128, 64, 4, 4, 1),
    (128, 64, 64, 4, 4, 1),
    (64, 128, 64, 4, 4, 1),
]


def _set_block_shapes(nargs: dict) -> None:
    """Give the descriptors of a launch the block shapes of its configuration (a
    ``triton.Config`` pre-hook: the autotuner calls it before each configuration runs).
    A descriptor of a transposed operand holds the transposed block."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    sub_n = bn // nargs["EPILOGUE_SPLIT"]
    blocks = (
        ("a_desc", (bm, bk), nargs["A_T"]), ("b_desc", (bk, bn), nargs["B_T"]),
        ("c_desc", (bm, sub_n), False), ("z_desc", (bm, sub_n), False),
    )
    for name, shape, transposed in blocks:
        if nargs[name] is not None:
            nargs[name].block_shape = list(reversed(shape) if transposed else shape)


TMA_CONFIGS = [
    triton.Config(
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP_M, EPILOGUE_SPLIT=e),
        num_stages=s, num_warps=w, pre_hook=_set_block_shapes,
    )
    for bm, bn, bk, s, w, e in _TMA_CONFIGS
]
TMA_CONFIG_NAMES = [config_name(c) for c in TMA_CONFIGS]


def _shared_memory_limit(device: torch.device) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]


def _fits(configs, named_args, **kwargs):
    """Drop configurations whose pipelined tiles exceed the device's shared memory, and
    those of the other side of ``SMALL_M``; never all of them."""
    args = {**named_args, **kwargs}
    elem = args["a_ptr"].element_size()
    limit = _shared_memory_limit(args["a_ptr"].device)
    # The act' prologue streams the saved tile beside A, the gated h prologue the gate's.
    a_tiles = 2 if args["PRO_ACT"] or args.get("HIDDEN") == 2 else 1
    small = args.get("M_BUCKET", SMALL_M + 1) <= SMALL_M
    fitting = []
    for cfg in configs:
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        # fp64 accumulators take twice the registers: 128 x 128 and up would spill.
        if elem == 8 and bm * bn > 128 * 64:
            continue
        # The gated MLP epilogue holds u and g beside the accumulator: above 64 accumulator
        # elements per thread it spills kilobytes (sm_90, Triton 3.6: 256 x 128 with 8
        # warps 5.8 KB, 128 x 128 with 4 warps 5.2 KB; at 64 per thread 92-180 bytes).
        if args.get("EPI_GRAD") == 2 and bm * bn > 64 * 32 * cfg.num_warps:
            continue
        if (a_tiles * bm * bk + bk * bn) * elem * cfg.num_stages <= limit:
            fitting.append(cfg)
    sized = [c for c in fitting if (c.kwargs["BLOCK_M"] <= SMALL_M if small else c.kwargs["BLOCK_M"] >= SMALL_M)]
    return sized or fitting or [_FALLBACK]


def _named_configs(spec: Optional[str], configs: list, names: list) -> list:
    spec = os.environ.get(CONFIGS_ENV_VAR, "") if spec is None else spec
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    if not wanted or wanted == ["all"]:
        return list(configs)
    unknown = [n for n in wanted if n not in CONFIG_NAMES + TMA_CONFIG_NAMES]
    if unknown:
        raise ValueError(
            f"{CONFIGS_ENV_VAR}={spec!r}: unknown configuration(s) {', '.join(unknown)}; "
            f"choose from all, {', '.join(CONFIG_NAMES + TMA_CONFIG_NAMES)}"
        )
    return [configs[names.index(n)] for n in wanted if n in names]


def selected_configs(spec: Optional[str] = None) -> list:
    """The pointer kernel's autotune configurations named in ``spec`` (default:
    ``$TORCH_MATGRAD_TRITON_CONFIGS``; unset or ``all``: every one). A list that names
    only descriptor-kernel configurations gives ``[]``: the pointer kernel then runs,
    where it must, in the fallback configuration."""
    return _named_configs(spec, CONFIGS, CONFIG_NAMES)


def selected_tma_configs(spec: Optional[str] = None) -> list:
    """The descriptor kernel's configurations named in ``spec`` (as
    :func:`selected_configs`). A list that names none of them gives ``[]``: the
    descriptor kernel is then not used at all (restricting the configurations to
    pointer-kernel names keeps the pointer kernel everywhere)."""
    return _named_configs(spec, TMA_CONFIGS, TMA_CONFIG_NAMES)


def _autotune_bench(fn, quantiles):
    # 5 ms warm-up and 25 ms of repeats per configuration (Triton's default is 25 + 100):
    # enough to rank GEMMs of 10 us and up, and a cold shape costs ~0.3 s, not ~1.4 s.
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _autotuned(kernel, configs: list, key: list, prune):
    extra = {"do_bench": _autotune_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, **extra)(kernel)


def launcher(configs: list):
    """``fused_gemm_kernel`` autotuned over ``configs`` (compiled kernels only)."""
    return _autotuned(fused_gemm_kernel, configs or [_FALLBACK], _AUTOTUNE_KEY, _fits)


# The descriptor kernel when none of its configurations fits (e.g. the 99 KiB of a
# consumer Blackwell card): 64 x 64 x 64 in three stages, 56 KiB with the staging buffer.
_TMA_FALLBACK = triton.Config(
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=_GROUP_M, EPILOGUE_SPLIT=1),
    num_stages=3, num_warps=4, pre_hook=_set_block_shapes,
)


def tma_config_fits(cfg: "triton.Config", *, elem: int, limit: int) -> bool:
    """Whether the descriptor kernel may run ``cfg``: its pipelined A and B tiles plus
    the epilogue's staging buffer (one output subtile) within ``limit`` bytes of shared
    memory."""
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    pipeline = (bm * bk + bk * bn) * elem * cfg.num_stages
    return pipeline + bm * (bn // cfg.kwargs["EPILOGUE_SPLIT"]) * elem <= limit


def _tma_fits(configs, named_args, **kwargs):
    """The autotuner's pruning for the descriptor kernel (:func:`tma_config_fits` on
    this device); never none."""
    args = {**named_args, **kwargs}
    base = args["a_desc"].base
    elem, limit = base.element_size(), _shared_memory_limit(base.device)
    fitting = [c for c in configs if tma_config_fits(c, elem=elem, limit=limit)]
    return fitting or [_TMA_FALLBACK]


# The autotuner keys on the tensors' dtypes by itself, but descriptors have no dtype:
# fp16 and bf16 launches of one shape share a tuning.
_TMA_AUTOTUNE_KEY = _BASE_KEY + ["A_T", "B_T"]


def tma_launcher(configs: list):
    """``tma_gemm_kernel`` autotuned over ``configs`` (compiled kernels only)."""
    return _autotuned(tma_gemm_kernel, configs, _TMA_AUTOTUNE_KEY, _tma_fits)


# Interpreter: the descriptor kernel in the same small tiles, with the split epilogue,
# and a persistent grid of 3 programs, so that programs loop over several tiles.
INTERPRETER_TMA_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, EPILOGUE_SPLIT=2)
INTERPRETER_NUM_SMS = 3

if INTERPRET:
    _launch = fused_gemm_kernel
    _META = INTERPRETER_META
    _tma_launch = tma_gemm_kernel
    _TMA_META = INTERPRETER_TMA_META
else:
    _launch = launcher(selected_configs())
    _META = {}
    _tma_configs = selected_tma_configs()
    _tma_launch = tma_launcher(_tma_configs) if _tma_configs else None
    _TMA_META = {}

_ACC_DTYPE = {torch.float64: tl.float64}  # fp32 accumulation for the others
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tf32_allowed() -> bool:
    # torch >= 2.9 also has per-backend settings ("ieee", "tf32", or "none": inherit
    # from the parent); once a program uses them, the legacy getter raises.
    for setting in (
        getattr(torch.backends.cuda.matmul, "fp32_precision", None),
        getattr(torch.backends, "fp32_precision", None),
    ):
        if setting not in (None, "none"):
            return setting == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``.

    float32 follows PyTorch's setting for CUDA matmuls, as cuBLAS does:
    ``torch.get_float32_matmul_precision()`` ``"highest"`` (the default) -> ``"ieee"``
    (true fp32 products); ``"high"`` or ``"medium"`` -> ``"tf32"``.
    ``torch.backends.cuda.matmul.allow_tf32`` is the same switch (setting one sets the
    other), and so is ``torch.backends.cuda.matmul.fp32_precision`` on torch >= 2.9.
    Other dtypes have one precision, written ``"ieee"``.
    """
    if dtype == torch.float32 and _tf32_allowed():
        return "tf32"
    return "ieee"


def _bucket(n: int) -> int:
    """The power of two at or above ``n`` (at least 1): ``triton.next_power_of_2``, in
    integer arithmetic (that one is a Triton function object, ~10x slower to call, and
    each launch calls this three times)."""
    return 1 << (max(n, 1) - 1).bit_length()


def _empty(shape, dtype, device) -> Tensor:
    """Every output's allocation (the tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


#: Values of :func:`gemm_kernel` and ``$TORCH_MATGRAD_GEMM_KERNEL``: ``"auto"`` (the rule
#: of :func:`gemm_kernel_for`), ``"tma"`` (the descriptor kernel wherever it is valid,
#: also under the interpreter), ``"pointer"`` (the pointer kernel everywhere).
GEMM_KERNELS = ("auto", "tma", "pointer")
KERNEL_ENV_VAR = "TORCH_MATGRAD_GEMM_KERNEL"
#: Operand dtypes of the descriptor kernel: the wgmma types. fp32 (IEEE or TF32) and
#: fp64 stay on the pointer kernel (no tensor cores for IEEE fp32 and fp64; wgmma reads
#: 32-bit operands only K-major, which the transposed operands of the backward are not).
TMA_DTYPES = (torch.float16, torch.bfloat16)
#: The oldest Triton the descriptor kernel was verified with (the GPU machines' 3.6; CI
#: runs 3.8 and 3.9). Older versions keep the pointer kernel.
TMA_MIN_TRITON = (3, 6)


def _version_tuple(version: str) -> Tuple[int, ...]:
    """``(major, minor)`` of a version string such as ``3.10.0+git1234``."""
    return tuple(int("".join(itertools.takewhile(str.isdigit, part)) or 0) for part in version.split(".")[:2])


#: Whether this Triton can run the descriptor kernel at all.
TMA_AVAILABLE = TensorDescriptor is not None and _version_tuple(triton.__version__) >= TMA_MIN_TRITON


def _kernel_mode_from_env() -> str:
    mode = os.environ.get(KERNEL_ENV_VAR, "").strip() or "auto"
    if mode not in GEMM_KERNELS:
        raise ValueError(f"{KERNEL_ENV_VAR}={mode!r}: choose one of {', '.join(GEMM_KERNELS)}")
    return mode


# Context-local: a benchmark's choice in one thread leaves another's alone.
_kernel_mode = contextvars.ContextVar("torch_matgrad_gemm_kernel", default=_kernel_mode_from_env())


@contextlib.contextmanager
def gemm_kernel(name: str) -> Iterator[None]:
    """Inside the block, launch the GEMMs with the kernel ``name`` (one of
    ``GEMM_KERNELS``) wherever it is valid: benchmarks time the two kernels against each
    other, tests run the descriptor kernel under the interpreter. Wins over
    ``$TORCH_MATGRAD_GEMM_KERNEL``."""
    if name not in GEMM_KERNELS:
        raise ValueError(f"gemm_kernel: unknown kernel {name!r}; choose one of {', '.join(GEMM_KERNELS)}")
    token = _kernel_mode.set(name)
    try:
        yield
    finally:
        _kernel_mode.reset(token)


def _descriptor_view(t: Tensor) -> Optional[Tuple[Tensor, bool]]:
    """``(t, False)`` or ``(t.t(), True)``: the one of the two that a tensor descriptor
    can describe, or None. The rules (TMA's): a 16-byte aligned base address, the last
    dimension contiguous, the other stride a multiple of 16 bytes (a bf16 row of 4095
    elements is not), rows that do not overlap, and the hardware's limits (strides below
    2^40 bytes; dimensions below 2^31 elements, as block coordinates are signed 32-bit)."""
    elem = t.element_size()
    if t.data_ptr() % 16:
        return None
    (m, n), (s0, s1) = t.shape, t.stride()
    # The transposed view is built only when it is the answer (a view costs microseconds).
    for transposed, (rows, cols, row_stride, col_stride) in ((False, (m, n, s0, s1)), (True, (n, m, s1, s0))):
        if (
            col_stride == 1 and row_stride >= cols and (row_stride * elem) % 16 == 0
            and row_stride * elem < 2**40 and max(rows, cols) < 2**31
        ):
            return (t.t() if transposed else t), transposed
    return None


def _tma_hardware(device: torch.device) -> bool:
    """Whether ``device`` runs the descriptor kernel: an NVIDIA GPU of compute capability
    9.0 or later (Hopper's TMA; not ROCm, whose capabilities mean something else), or the
    interpreter on CPU tensors when the kernel is asked for by name."""
    if device.type == "cuda":
        return torch.version.hip is None and torch.cuda.get_device_capability(device) >= (9, 0)
    return INTERPRET and device.type == "cpu" and _kernel_mode.get() == "tma"


def gemm_kernel_for(
    a: Tensor, b: Optional[Tensor], saved: Optional[Tensor] = None, outputs=(), flags: Optional[dict] = None
) -> str:
    """``"tma"`` or ``"pointer"``: the kernel that computes ``prologue(a) @ b`` into
    ``outputs`` (C and z; ``b`` None: only row sums) with the kernel flags ``flags``
    (:func:`specialisation`; None: the linear layer's). The one place that chooses.

    The descriptor kernel where all of these hold, the pointer kernel everywhere else:
    the launch has no ``act'`` prologue (no ``saved``) and sets none of the MLP block's
    flags (``POINTER_ONLY_FLAGS``: only the pointer kernel has them, whatever
    :func:`gemm_kernel` asks for; ``tma_gemm.py`` says why there is no prologue); the
    kernel is not overridden to ``"pointer"`` (:func:`gemm_kernel`); Triton
    supports it (``TMA_AVAILABLE``) and ``$TORCH_MATGRAD_TRITON_CONFIGS`` leaves it a
    configuration; the device has TMA (:func:`_tma_hardware`); the dtype is fp16 or bf16;
    there is a product (a launch that only sums has no tensor-core work); every operand
    meets the descriptor rules (:func:`_descriptor_view`) and every output does so with
    its rows contiguous (the kernel stores them as they are); on a GPU, a single named
    configuration fits its shared memory (:func:`tma_config_fits`); and, under
    ``"auto"``, more than ``SMALL_M`` rows: decoding shapes keep the pointer kernel's
    16- and 32-row tiles. ``benchmarks/kernel_choice.py`` times the two on a GPU; where
    the pointer kernel wins a shape class, the rule is the place to say so.
    """
    return "pointer" if _descriptor_plan(a, b, saved, outputs, flags) is None else "tma"


def _descriptor_plan(a, b, saved, outputs, flags):
    """:func:`gemm_kernel_for`'s rule, answered with what the descriptor launch needs:
    the descriptor views ``((a_view, A_T), (b_view, B_T))`` of ``a`` and ``b``, or None
    for the pointer kernel."""
    if saved is not None or (flags is not None and any(flags.get(name) for name in POINTER_ONLY_FLAGS)):
        return None
    mode = _kernel_mode.get()
    if mode == "pointer" or not TMA_AVAILABLE or _tma_launch is None:
        return None
    if a.dtype not in TMA_DTYPES or b is None or b.shape[1] == 0 or not _tma_hardware(a.device):
        return None
    if mode == "auto" and a.shape[0] <= SMALL_M:
        return None
    views = _descriptor_view(a), _descriptor_view(b)
    if None in views:
        return None
    for t in outputs:
        view = None if t is None else _descriptor_view(t)
        if t is not None and (view is None or view[1]):
            return None
    configs = getattr(_tma_launch, "configs", None)  # None: one configuration, no autotuner
    if (
        configs is not None and len(configs) == 1 and a.device.type == "cuda"
        and not tma_config_fits(configs[0], elem=a.element_size(), limit=_shared_memory_limit(a.device))
    ):
        # The autotuner prunes only among several configurations: a single one named in
        # $TORCH_MATGRAD_TRITON_CONFIGS that does not fit this GPU is not run. (Only a
        # CUDA device has a shared-memory limit to ask for; the interpreter has none.)
        return None
    return views


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Programs of the persistent grid: one per SM."""
    if device.type != "cuda":
        return INTERPRETER_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


class MLPOperands(NamedTuple):
    """The tensors that only the MLP block's launches pass to ``fused_gemm_kernel``
    (absent: None): ``DUAL``'s second ``B`` and bias, ``EPI_GRAD``'s ``u`` (``e``) and
    ``g`` (``e2``), and ``COLSUM``'s output."""

    b2: Optional[Tensor] = None
    bias2: Optional[Tensor] = None
    e: Optional[Tensor] = None
    e2: Optional[Tensor] = None
    colsum: Optional[Tensor] = None


def fused_matmul(
    a: Tensor,
    b: Optional[Tensor],
    *,
    saved: Optional[Tensor] = None,
    grad_activation: Optional[str] = None,
    rowsum: bool = False,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    store_z: bool = False,
    b2: Optional[Tensor] = None,
    bias2: Optional[Tensor] = None,
    hidden: bool = False,
    gate: Optional[Tensor] = None,
    mlp_activation: Optional[str] = None,
    grad_hidden: Optional[Tuple[Tensor, Optional[Tensor]]] = None,
    colsum: bool = False,
    transpose_c: bool = False,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(C, z, sums)`` with ``A' = A * act'(saved)`` if ``grad_activation`` is given
    (``saved`` shaped like ``a``), ``z = A' @ B + bias`` and ``C = act(z)``.

    ``b=None`` computes no product (``C`` and ``z`` are None): only the row sums of
    ``A'``. ``z`` is returned when ``store_z``; ``sums`` are the row sums (``A'.sum(1)``)
    when ``rowsum``. Every operand may be any strided view; the outputs are new
    contiguous tensors. Dimensions of size zero launch nothing.

    The MLP block's launches (``fused_gemm.py``; the pointer kernel only):

    * ``b2`` (shaped like ``b``) and ``bias2``: ``C = [A B + bias | A B2 + bias2]``, one
      ``(m, 2n)`` tensor from one launch (a missing one of the two biases is zero); no
      other keyword applies;
    * ``hidden``: the product reads ``h = act(A)``, or ``act(gate) * A`` with ``gate``
      shaped like ``a``, ``act`` being ``mlp_activation`` (instead of ``saved``);
    * ``grad_hidden=(u, g)`` (each ``(m, n)``; ``g`` None for a plain block): ``A @ B``
      is ``grad_h`` and ``C`` is ``grad_h * act'(u)``, or the ``(m, 2n)``
      ``[grad_h * u * act'(g) | grad_h * act(g)]`` (``[G_g | G_u]``), ``act`` being
      ``mlp_activation``; no bias, ``activation`` or ``z``;
    * ``colsum``: ``sums`` are the column sums of ``B`` (``B.sum(0)``, ``(n,)``) instead;
    * ``transpose_c``: ``C`` is returned transposed, a contiguous ``(n, m)`` tensor (the
      kernel stores through the transposed strides).
    """
    m, k = a.shape
    n = 0 if b is None else b.shape[1]
    dtype, device = a.dtype, a.device
    u, g = (None, None) if grad_hidden is None else grad_hidden
    operands = [("a", a), ("b", b), ("saved", saved), ("bias", bias), ("b2", b2), ("bias2", bias2),
                ("gate", gate), ("grad_hidden's u", u), ("grad_hidden's g", g)]
    for name, t in operands:
        if t is not None and (t.dtype != dtype or t.device != device):
            raise ValueError(f"fused_matmul: {name} is {t.dtype} on {t.device}, a is {dtype} on {device}")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fused_matmul: unsupported dtype {dtype}")
    if b is not None and b.shape[0] != k:
        raise ValueError(f"fused_matmul: a {tuple(a.shape)} @ b {tuple(b.shape)} do not chain")
    if (grad_activation is not None) != (saved is not None) or (saved is not None and saved.shape != a.shape):
        raise ValueError("fused_matmul: grad_activation needs saved shaped like a")
    if bias is not None and (b is None or bias.shape != (n,)):
        raise ValueError(f"fused_matmul: bias of shape {tuple(bias.shape)} for {n} output columns")
    _check_mlp_keywords(a, b, saved, rowsum, bias, activation, store_z, b2, bias2, hidden, gate, grad_hidden, colsum)
    dual = b2 is not None
    if dual and (bias is None) != (bias2 is None):
        bias, bias2 = (torch.zeros(n, dtype=dtype, device=device) if t is None else t for t in (bias, bias2))
    # A plain block without an activation has h = u and G_u = grad_h: nothing to fuse.
    hidden = hidden and (gate is not None or mlp_activation is not None)
    epi_grad = grad_hidden is not None and (g is not None or mlp_activation is not None)

    has_c = b is not None
    width = 2 * n if dual or (grad_hidden is not None and g is not None) else n

    def output() -> Tuple[Tensor, Tensor]:
        """(what is returned, the (m, width) view the kernel writes)."""
        if transpose_c:
            t = _empty((width, m), dtype, device)
            return t, t.t()
        t = _empty((m, width), dtype, device)
        return t, t

    c, c_view = output() if has_c else (None, None)
    z, z_view = output() if has_c and store_z else (None, None)
    sums = _empty((n,) if colsum else (m,), dtype, device) if rowsum or colsum else None
    if m == 0 or (n == 0 and not rowsum):
        if colsum and n > 0:  # no row of C, but B's columns still have sums
            sums.copy_(fused_matmul(b.t(), None, rowsum=True)[2])
        return c, z, sums
    if k == 0:
        # An empty sum: C = act(bias or 0) (each half its bias), no product to launch.
        if has_c:
            pre = torch.zeros((m, width), dtype=dtype, device=device)
            for t, cols in ((bias, slice(0, n)), (bias2, slice(n, width))):
                if t is not None:
                    pre[:, cols] += t
            if z is not None:
                z_view.copy_(pre)
            c_view.copy_(activate(pre, activation))
        if sums is not None:
            sums.zero_()
        return c, z, sums

    # With n == 0 only the row sums are left to compute; C (m x 0) is already complete.
    has_c = has_c and n > 0
    flags = specialisation(
        dtype, grad_activation=grad_activation, rowsum=rowsum, has_c=has_c,
        has_bias=bias is not None, activation=activation, store_z=z is not None,
        dual=dual and has_c, hidden=hidden, grad_hidden=epi_grad, gated=(gate if hidden else g) is not None,
        colsum=colsum and has_c, mlp_activation=mlp_activation if hidden or epi_grad else None,
    )
    mlp = MLPOperands(
        b2=b2, bias2=bias2, e=u if epi_grad else None, e2=g if epi_grad else None, colsum=sums if colsum else None
    )
    rowsums = sums if rowsum else None
    plan = _descriptor_plan(a, b if has_c else None, saved, (c_view, z_view) if has_c else (), flags)
    # Triton launches on the current device: make it the tensors' (cuda:1 from cuda:0).
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if plan is not None:
            _run_tma_kernel(plan, c_view, bias, z_view, rowsums, flags)
        elif dual and not _same_strides((b, b2), (bias, bias2)):
            # The kernel reads B2 and bias2 through B's and bias's strides: one launch a half.
            one = dict(flags, DUAL=False)
            _run_pointer_kernel(a, b, c_view[:, :n], None, bias, None, None, one, _NO_MLP)
            _run_pointer_kernel(a, b2, c_view[:, n:], None, bias2, None, None, one, _NO_MLP)
        else:
            _run_pointer_kernel(
                a, b if has_c else None, c_view if has_c else None, gate if hidden else saved, bias, z_view, rowsums,
                flags, mlp,
            )
    return c, z, sums


_NO_MLP = MLPOperands()


def _same_strides(*pairs) -> bool:
    return all(x is None or y is None or x.stride() == y.stride() for x, y in pairs)


def _check_mlp_keywords(a, b, saved, rowsum, bias, activation, store_z, b2, bias2, hidden, gate, grad_hidden, colsum):
    """:func:`fused_matmul`'s MLP keywords: shapes, and the combinations the kernel has."""
    m, n = a.shape[0], 0 if b is None else b.shape[1]
    if b2 is not None:
        if b is None or b2.shape != b.shape:
            raise ValueError(f"fused_matmul: b2 of shape {tuple(b2.shape)} must be shaped like b")
        if saved is not None or rowsum or activation is not None or store_z or hidden or grad_hidden or colsum:
            raise ValueError("fused_matmul: b2 (the two-half product) takes only bias and bias2")
    if bias2 is not None and (b2 is None or bias2.shape != (n,)):
        raise ValueError(f"fused_matmul: bias2 of shape {tuple(bias2.shape)} needs b2 with {n} columns")
    if gate is not None and (not hidden or gate.shape != a.shape):
        raise ValueError("fused_matmul: gate needs hidden=True and a's shape")
    if hidden and saved is not None:
        raise ValueError("fused_matmul: hidden and grad_activation are two prologues; one at a time")
    if grad_hidden is not None:
        u, g = grad_hidden
        if b is None or u.shape != (m, n) or (g is not None and g.shape != (m, n)):
            raise ValueError(f"fused_matmul: grad_hidden needs a product and u (and g) of shape {(m, n)}")
        if bias is not None or activation is not None or store_z:
            raise ValueError("fused_matmul: grad_hidden replaces the epilogue (no bias, activation or z)")
    if colsum and (b is None or rowsum):
        raise ValueError("fused_matmul: colsum needs a product, and sums either rows or columns")


def _run_pointer_kernel(a, b, c, saved, bias, z, sums, flags, mlp) -> None:
    """One launch of ``fused_gemm_kernel`` (``b`` and ``c`` None: row sums only);
    ``saved`` is the prologue's ``S`` (``act'``'s tensor, or the gate of ``h``), ``mlp``
    the :class:`MLPOperands`."""
    m, k = a.shape
    n = 0 if b is None else b.shape[1]
    halves = 2 if flags["DUAL"] else 1
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(m, meta["BLOCK_M"]) * (halves * triton.cdiv(n, meta["BLOCK_N"]) if b is not None else 1),
    )

    def strides(t, dims=2):
        return t.stride() if t is not None else (0,) * dims

    _launch[grid](
        a, b, c, saved, bias, z, sums,  # absent ones are None: constexpr, never read
        *mlp,
        m, n, k,
        *a.stride(), *strides(b), *strides(c), *strides(saved), *strides(bias, 1), *strides(sums, 1),
        *strides(mlp.e), *strides(mlp.e2), *strides(mlp.colsum, 1),
        _bucket(m), _bucket(n), _bucket(k),
        **flags,
        **_META,
    )


def _run_tma_kernel(plan, c, bias, z, sums, flags) -> None:
    """One launch of ``tma_gemm_kernel`` with the descriptor views of A and B that
    :func:`_descriptor_plan` gave. Each descriptor's block shape comes from the
    configuration that runs (``_set_block_shapes``); ``[1, 1]`` until then."""
    (a_view, a_t), (b_view, b_t) = plan
    m, n = c.shape
    k = a_view.shape[0] if a_t else a_view.shape[1]

    def describe(t):
        return None if t is None else TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1])

    descs = dict(a_desc=describe(a_view), b_desc=describe(b_view), c_desc=describe(c), z_desc=describe(z))
    meta = dict(A_T=a_t, B_T=b_t, NUM_SMS=_num_sms(c.device))
    if _TMA_META:  # one configuration, no autotuner (the interpreter; tests)
        _set_block_shapes({**descs, **meta, **_TMA_META})
    grid = lambda meta: (  # noqa: E731
        min(meta["NUM_SMS"], triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),
    )
    _tma_launch[grid](
        descs["a_desc"], descs["b_desc"], descs["c_desc"], descs["z_desc"], bias, sums,
        m, n, k,
        bias.stride(0) if bias is not None else 0, sums.stride(0) if sums is not None else 0,
        _bucket(m), _bucket(n), _bucket(k),
        **{name: v for name, v in flags.items() if name not in POINTER_ONLY_FLAGS},  # all off (gemm_kernel_for)
        **meta,
        **_TMA_META,
    )


def specialisation(
    dtype: torch.dtype,
    *,
    grad_activation: Optional[str] = None,
    rowsum: bool = False,
    has_c: bool = True,
    has_bias: bool = False,
    activation: Optional[str] = None,
    store_z: bool = False,
    dual: bool = False,
    hidden: bool = False,
    grad_hidden: bool = False,
    gated: bool = False,
    colsum: bool = False,
    mlp_activation: Optional[str] = None,
) -> dict:
    """The kernel's constexpr flags for one kind of launch (the compile test builds
    every specialisation the backend launches from this). ``dual``, ``hidden``,
    ``grad_hidden`` (plain, or ``gated``), ``colsum`` and ``mlp_activation`` are the MLP
    block's (:func:`fused_matmul`'s ``b2``, ``hidden``/``gate``, ``grad_hidden``,
    ``colsum``, ``mlp_activation``)."""
    kind = 2 if gated else 1
    return dict(
        PRO_ACT=ACT_CODES[grad_activation], ROWSUM=rowsum, HAS_C=has_c,
        HAS_BIAS=has_bias, EPI_ACT=ACT_CODES[activation], STORE_Z=store_z,
        ACC_DTYPE=_ACC_DTYPE.get(dtype, tl.float32), INPUT_PRECISION=input_precision(dtype),
        UPCAST=INTERPRET and dtype == torch.bfloat16,
        DUAL=dual, HIDDEN=kind if hidden else 0, EPI_GRAD=kind if grad_hidden else 0, COLSUM=colsum,
        MLP_ACT=ACT_CODES[mlp_activation],
    )
