"""Launch wrapper of :func:`fused_gemm_kernel`: check, allocate, launch.

No autograd here: :mod:`torch_matgrad.triton_backend` builds the op's forward and
backward from :func:`fused_matmul`.

Autotuning (compiled kernels only): a few configurations for Ampere and Hopper (the
small-M ones only for M <= ``SMALL_M`` rows, the others only above), pruned to those that
fit the device's shared memory, optionally narrowed by ``$TORCH_MATGRAD_TRITON_CONFIGS``
(fewer compilations on a cold cache), keyed on the next power of two of each
dimension plus the specialisation flags and dtypes, so a new batch size reuses the
tuning of its power-of-two bucket instead of benchmarking again. Under the interpreter
a single small configuration runs without ``triton.autotune`` (which needs a GPU
driver to benchmark).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..formulas import activate
from .fused_gemm import ACT_CODES, INTERPRET, fused_gemm_kernel

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

_AUTOTUNE_KEY = [
    "M_BUCKET", "N_BUCKET", "K_BUCKET",
    "PRO_ACT", "ROWSUM", "HAS_C", "HAS_BIAS", "EPI_ACT", "STORE_Z", "INPUT_PRECISION",
]


def config_name(config: "triton.Config") -> str:
    """``BMxBNxBK_sS_wW``: tile, pipeline stages and warps of an autotune configuration."""
    kw = config.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}_s{config.num_stages}_w{config.num_warps}"


CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP_M), num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in _CONFIGS
]
CONFIG_NAMES = [config_name(c) for c in CONFIGS]


def _shared_memory_limit(device: torch.device) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]


def _fits(configs, named_args, **kwargs):
    """Drop configurations whose pipelined tiles exceed the device's shared memory, and
    those of the other side of ``SMALL_M``; never all of them."""
    args = {**named_args, **kwargs}
    elem = args["a_ptr"].element_size()
    limit = _shared_memory_limit(args["a_ptr"].device)
    a_tiles = 2 if args["PRO_ACT"] else 1  # the prologue streams the saved tile beside A
    small = args.get("M_BUCKET", SMALL_M + 1) <= SMALL_M
    fitting = []
    for cfg in configs:
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        # fp64 accumulators take twice the registers: 128 x 128 and up would spill.
        if elem == 8 and bm * bn > 128 * 64:
            continue
        if (a_tiles * bm * bk + bk * bn) * elem * cfg.num_stages <= limit:
            fitting.append(cfg)
    sized = [c for c in fitting if (c.kwargs["BLOCK_M"] <= SMALL_M if small else c.kwargs["BLOCK_M"] >= SMALL_M)]
    return sized or fitting or [_FALLBACK]


def selected_configs(spec: Optional[str] = None) -> list:
    """The autotune configurations named in ``spec`` (default: ``$TORCH_MATGRAD_TRITON_CONFIGS``;
    unset or ``all``: every one)."""
    spec = os.environ.get(CONFIGS_ENV_VAR, "") if spec is None else spec
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names or names == ["all"]:
        return list(CONFIGS)
    unknown = [n for n in names if n not in CONFIG_NAMES]
    if unknown:
        raise ValueError(
            f"{CONFIGS_ENV_VAR}={spec!r}: unknown configuration(s) {', '.join(unknown)}; "
            f"choose from all, {', '.join(CONFIG_NAMES)}"
        )
    return [CONFIGS[CONFIG_NAMES.index(n)] for n in names]


def _autotune_bench(fn, quantiles):
    # 5 ms warm-up and 25 ms of repeats per configuration (Triton's default is 25 + 100):
    # enough to rank GEMMs of 10 us and up, and a cold shape costs ~0.3 s, not ~1.4 s.
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def launcher(configs: list):
    """``fused_gemm_kernel`` autotuned over ``configs`` (compiled kernels only)."""
    extra = {"do_bench": _autotune_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(
        configs=configs, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _fits}, **extra
    )(fused_gemm_kernel)


if INTERPRET:
    _launch = fused_gemm_kernel
    _META = INTERPRETER_META
else:
    _launch = launcher(selected_configs())
    _META = {}

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
    return triton.next_power_of_2(max(n, 1))


def _empty(shape, dtype, device) -> Tensor:
    """Every output's allocation (the tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


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
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(C, z, rowsum)`` with ``A' = A * act'(saved)`` if ``grad_activation`` is given
    (``saved`` shaped like ``a``), ``z = A' @ B + bias`` and ``C = act(z)``.

    ``b=None`` computes no product (``C`` and ``z`` are None): only the row sums of
    ``A'``. ``z`` is returned when ``store_z``; ``rowsum`` (``A'.sum(1)``) when asked.
    Every operand may be any strided view; the outputs are new contiguous tensors.
    Dimensions of size zero launch nothing.
    """
    m, k = a.shape
    n = 0 if b is None else b.shape[1]
    dtype, device = a.dtype, a.device
    operands = [("a", a), ("b", b), ("saved", saved), ("bias", bias)]
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

    has_c = b is not None
    c = _empty((m, n), dtype, device) if has_c else None
    z = _empty((m, n), dtype, device) if has_c and store_z else None
    sums = _empty((m,), dtype, device) if rowsum else None
    if m == 0 or (n == 0 and not rowsum):
        return c, z, sums
    if k == 0:
        # An empty sum: C = act(bias or 0), no product to launch.
        pre = torch.zeros((m, n), dtype=dtype, device=device) if has_c else None
        if bias is not None:
            pre += bias
        if z is not None:
            z.copy_(pre)
        if sums is not None:
            sums.zero_()
        return (activate(pre, activation) if has_c else None), z, sums

    # With n == 0 only the row sums are left to compute; C (m x 0) is already complete.
    has_c = has_c and n > 0
    b_arg, c_arg = (b, c) if has_c else (None, None)
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(m, meta["BLOCK_M"]) * (triton.cdiv(n, meta["BLOCK_N"]) if has_c else 1),
    )
    # Triton launches on the current device: make it the tensors' (cuda:1 from cuda:0).
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _launch[grid](
            a, b_arg, c_arg, saved, bias, z, sums,  # absent ones are None: constexpr, never read
            m, n, k,
            a.stride(0), a.stride(1),
            b.stride(0) if has_c else 0, b.stride(1) if has_c else 0,
            c.stride(0) if has_c else 0, c.stride(1) if has_c else 0,
            saved.stride(0) if saved is not None else 0, saved.stride(1) if saved is not None else 0,
            bias.stride(0) if bias is not None else 0, sums.stride(0) if rowsum else 0,
            _bucket(m), _bucket(n), _bucket(k),
            **specialisation(
                dtype, grad_activation=grad_activation, rowsum=rowsum, has_c=has_c,
                has_bias=bias is not None, activation=activation, store_z=z is not None,
            ),
            **_META,
        )
    return c, z, sums


def specialisation(
    dtype: torch.dtype,
    *,
    grad_activation: Optional[str] = None,
    rowsum: bool = False,
    has_c: bool = True,
    has_bias: bool = False,
    activation: Optional[str] = None,
    store_z: bool = False,
) -> dict:
    """The kernel's constexpr flags for one kind of launch (the compile test builds
    every specialisation the backend launches from this)."""
    return dict(
        PRO_ACT=ACT_CODES[grad_activation], ROWSUM=rowsum, HAS_C=has_c,
        HAS_BIAS=has_bias, EPI_ACT=ACT_CODES[activation], STORE_Z=store_z,
        ACC_DTYPE=_ACC_DTYPE.get(dtype, tl.float32), INPUT_PRECISION=input_precision(dtype),
        UPCAST=INTERPRET and dtype == torch.bfloat16,
    )
