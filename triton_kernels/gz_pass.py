"""The backward's elementwise pass with the bias gradient in it: ``G_z = G * act'(s)``
(MATH.md items 1, 3) written once, and ``grad_b = G_z^T 1`` (item 10) summed from the
same tiles, for a backward whose ``grad_W`` product runs on cuBLAS.

On the fused GEMM kernel ``grad_b`` comes free with ``grad_W`` (the launch sums the
``G_z`` tiles it loads). A ``grad_W`` on cuBLAS has no such launch: PyTorch's derivative
kernel followed by ``G_z.sum(0)`` reads ``G_z`` a second time; here the sum is taken from
the tiles the pass has just written, so ``G`` and ``s`` are read once and ``G_z`` written
once. Each program sums a stripe of rows into a partial of its columns (fp32; fp64 for
fp64), a fixed order, so the result is the same from run to run; the few stripes'
partials are added by one ``sum`` (``(stripes, N)``, at most ~4 per SM's worth).

The sums are of the rounded ``G_z`` (the output dtype's values), as the fused kernel's
row sums and as cuBLAS's products read them: ``grad_b`` is the bias gradient of the
``G_z`` that ``grad_x`` and ``grad_W`` use.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fused_gemm import ACT_CODES, INTERPRET, _activation_grad
from .launch import CachedKernel, classify, num_sms
from .ops import _ACC_DTYPE


@triton.jit
def gz_bias_kernel(
    g_ptr, s_ptr, gz_ptr, part_ptr,
    M, N, rows_per_program,
    stride_gm, stride_gn, stride_sm, stride_sn, stride_zm, stride_zn,
    ACT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program ``i * column_blocks + j``: rows ``[i R, (i + 1) R)`` (``R =
    rows_per_program``, a multiple of ``BLOCK_M``) of column block ``j``; writes ``G_z``
    there and the stripe's column sums into ``part[i, :]``."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_pid_n
    pid_n = tl.program_id(0) % num_pid_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    start = pid_m * rows_per_program
    for row in range(start, tl.minimum(start + rows_per_program, M), BLOCK_M):
        offs_m = row + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < M) & mask_n[None, :]
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
        gz = _activation_grad(g.to(ACC_DTYPE), s.to(ACC_DTYPE), ACT).to(gz_ptr.dtype.element_ty)
        tl.store(gz_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn, gz, mask=mask)
        # Masked elements load 0 and act'(0) is finite: they add 0.
        acc += tl.sum(gz.to(ACC_DTYPE), axis=0)
    tl.store(part_ptr + pid_m * N + offs_n, acc, mask=mask_n)


# 32 x 128 tiles (8 KiB of bf16 per operand) in 4 warps: an elementwise pass bound by
# memory, with enough bytes in flight per program; the interpreter's small tiles make the
# test shapes span several of them.
_META = dict(BLOCK_M=8, BLOCK_N=16) if INTERPRET else dict(BLOCK_M=32, BLOCK_N=128)
# Programs per SM the stripes aim for (more than one hides each one's load latency).
_PROGRAMS_PER_SM = 4

if INTERPRET:
    _KERNEL = CachedKernel(gz_bias_kernel, meta=_META, first_constexpr="ACT")
else:
    _KERNEL = CachedKernel(
        gz_bias_kernel, triton.autotune([triton.Config(dict(_META), num_warps=4)], key=[]), first_constexpr="ACT"
    )


@functools.lru_cache(maxsize=4096)
def _rows_per_program(m: int, n: int, sms: int) -> int:
    """Rows of one stripe: a multiple of ``BLOCK_M`` giving about ``_PROGRAMS_PER_SM``
    programs per SM with the column blocks, at least one block of rows."""
    block_m, block_n = _META["BLOCK_M"], _META["BLOCK_N"]
    column_blocks = -(-n // block_n)
    stripes = max(1, min(-(-m // block_m), (_PROGRAMS_PER_SM * sms) // column_blocks))
    rows = -(-m // stripes)
    return -(-rows // block_m) * block_m


def grad_preactivation_and_bias(
    grad_out: Tensor, saved: Tensor, activation: Optional[str]
) -> Tuple[Tensor, Tensor]:
    """``(G_z, grad_b)`` of a 2-D ``grad_out`` and ``saved`` (``z``, or the output for
    ReLU: ``formulas.NEEDS_PREACTIVATION``) of one shape and dtype, on one device, in one
    launch and one small sum (unchecked: the op checked its operands). ``G_z`` is a new
    contiguous tensor, ``grad_b`` has ``grad_out``'s dtype."""
    m, n = grad_out.shape
    dtype, device = grad_out.dtype, grad_out.device
    gz = torch.empty((m, n), dtype=dtype, device=device)
    if m == 0 or n == 0:
        return gz, torch.zeros(n, dtype=dtype, device=device)
    rows = _rows_per_program(m, n, num_sms(device))
    stripes = -(-m // rows)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    part = torch.empty((stripes, n), dtype=acc_dtype, device=device)
    ints = (m, n, rows, *grad_out.stride(), *saved.stride(), *gz.stride())
    classes, _ = classify(ints)
    ptrs = (grad_out, saved, gz, part)
    key = (device.index, dtype, saved.dtype, activation, tuple([p.data_ptr() % 16 == 0 for p in ptrs]), classes)

    def grid(meta):
        return stripes * -(-n // meta["BLOCK_N"])

    _KERNEL(key, grid, (*ptrs, *ints), dict(ACT=ACT_CODES[activation], ACC_DTYPE=_ACC_DTYPE.get(dtype, tl.float32)))
    return gz, part.sum(0, dtype=dtype) if stripes > 1 else part[0].to(dtype)
