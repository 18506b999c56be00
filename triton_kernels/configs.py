"""The GEMM kernels' autotune configurations: the tiles, their pruning by shared memory
and by rows (``SMALL_M``), their names and ``$TORCH_MATGRAD_TRITON_CONFIGS``, the keys the
autotuner tunes on, and the autotuned kernels themselves (:func:`launcher`,
:func:`tma_launcher`; compiled kernels only).

Autotuning: a few configurations for Ampere and Hopper (the small-M ones only for M <=
``SMALL_M`` rows, the others only above), pruned to those that fit the device's shared
memory, optionally narrowed by ``$TORCH_MATGRAD_TRITON_CONFIGS`` (fewer compilations on
a cold cache), keyed on the next power of two of each dimension plus the specialisation
flags and dtypes, so a new batch size reuses the tuning of its power-of-two bucket
instead of benchmarking again. The descriptor kernel has its own configurations
(``TMA_CONFIGS``, names ``tma_...``), pruned the same way plus its epilogue's staging
buffer. A split-K launch (at most ``SPLIT_K_MAX_M`` rows) keeps the 16-row tiles and is
tuned on its slice length too; its sum has one configuration (``REDUCE_CONFIG``). Under
the interpreter a single small configuration of each runs without ``triton.autotune``
(which needs a GPU driver to benchmark): ``INTERPRETER_META``, ``INTERPRETER_TMA_META``,
``INTERPRETER_REDUCE_META``.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Optional

import torch
import triton

from .fused_gemm import fused_gemm_kernel, split_k_reduce_kernel
from .tma_gemm import tma_gemm_kernel

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
#: says why the descriptor kernel has none), the MLP block's and split-K's. :func:`gemm_kernel_for`
#: sends a launch that sets any to the pointer kernel.
POINTER_ONLY_FLAGS = ("PRO_ACT",) + MLP_FLAGS + ("SPLIT_K",)
# A split-K launch is also tuned on its slice length (its grid is tiles x slices).
_AUTOTUNE_KEY = _BASE_KEY + list(POINTER_ONLY_FLAGS) + ["k_split"]
#: Rows (M) up to which a plain product may be split along K (``ops.split_k``): decoding.
SPLIT_K_MAX_M = 16


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


def block_shapes(meta: dict, a_t: bool, b_t: bool):
    """The block shapes of the descriptor kernel's A, B and output (C, z) descriptors in
    the configuration ``meta``: a descriptor of a transposed operand holds the
    transposed block, an output's one epilogue subtile."""
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    return [bk, bm] if a_t else [bm, bk], [bn, bk] if b_t else [bk, bn], [bm, bn // meta["EPILOGUE_SPLIT"]]


def _set_block_shapes(nargs: dict) -> None:
    """Give the descriptors of a launch the block shapes of its configuration (a
    ``triton.Config`` pre-hook: the autotuner calls it before each configuration runs,
    which only the first launch of each kind goes through: ``launch.CachedKernel``)."""
    a_block, b_block, out_block = block_shapes(nargs, nargs["A_T"], nargs["B_T"])
    for name, shape in (("a_desc", a_block), ("b_desc", b_block), ("c_desc", out_block), ("z_desc", out_block)):
        if nargs[name] is not None:
            nargs[name].block_shape = list(shape)


TMA_CONFIGS = [
    triton.Config(
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP_M, EPILOGUE_SPLIT=e),
        num_stages=s, num_warps=w, pre_hook=_set_block_shapes,
    )
    for bm, bn, bk, s, w, e in _TMA_CONFIGS
]
TMA_CONFIG_NAMES = [config_name(c) for c in TMA_CONFIGS]


@functools.lru_cache(maxsize=None)
def _shared_memory_limit(device: torch.device) -> int:
    # Asked of the driver once per device: the query cost ~1 ms of host time per launch on
    # an H200 where a single named descriptor configuration made the rule ask every time.
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
    # A split-K launch has at most SPLIT_K_MAX_M rows: taller tiles would compute padding.
    most_rows = SPLIT_K_MAX_M if args.get("SPLIT_K") else SMALL_M
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
    sized = [c for c in fitting if (c.kwargs["BLOCK_M"] <= most_rows if small else c.kwargs["BLOCK_M"] >= SMALL_M)]
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


# The split-K sum: one 16-row block holds every row a split launch has (SPLIT_K_MAX_M);
# it moves S x M x N accumulators, nothing to tune. Under the interpreter 8 x 16, so the
# test shapes span several blocks in both dimensions.
REDUCE_CONFIG = triton.Config(dict(BLOCK_M=SPLIT_K_MAX_M, BLOCK_N=64), num_warps=4)
INTERPRETER_REDUCE_META = dict(BLOCK_M=8, BLOCK_N=16)


def reduce_launcher():
    """``split_k_reduce_kernel`` through ``triton.autotune`` with its one configuration
    (no benchmark), so that ``launch.CachedKernel`` launches it directly (compiled
    kernels only)."""
    return triton.autotune(configs=[REDUCE_CONFIG], key=[])(split_k_reduce_kernel)


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
