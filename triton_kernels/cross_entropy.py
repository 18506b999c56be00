"""Linear cross-entropy kernels: ``loss = cross_entropy(x W^T + b, target)`` without
ever writing the ``(tokens, vocab)`` logits (the approach of Apple's Cut Cross-Entropy,
arXiv:2411.09009).

With ``z = x W^T + b`` (MATH.md item 6, rows), optionally soft-capped
``z' = c tanh(z / c)``, and per kept row (``target != ignore_index``) with
``lse = logsumexp(z')`` and label smoothing ``eps`` over ``V`` classes (PyTorch's
definition: the target gets ``1 - eps``, every class ``eps / V``):

    loss_row = lse - (1 - eps) z'_t - eps mean(z') + z_loss lse^2

and, for the backward, with ``d`` the row's upstream scale (``"mean"``: the loss's
gradient over the number of kept rows; ``"sum"``: the gradient; ``"none"``: the row's
own; ignored rows 0) and ``p = softmax(z')``:

    G_z = d (p (1 + 2 z_loss lse) - (1 - eps) onehot(t) - eps / V) * (1 - (z' / c)^2)

(MATH.md item 12; the last factor only with the soft cap), then ``grad_x = G_z W`` (item 11),
``grad_W = G_z^T x`` (items 9, 10) and ``grad_b = G_z.sum(0)`` (item 10 with ``x = 1``).

Kernels (Triton tutorial 03's layout; one banner per phase):

* :func:`lce_forward_kernel`: programs over (row block, vocabulary split). Each loops
  over the vocabulary tiles of its split; a ``z`` tile is ``BLOCK_M x BLOCK_V`` in
  registers (a ``tl.dot`` loop over the hidden dimension), reduced at once into an
  online logsumexp per row (running max and sum), the target's logit and, with label
  smoothing, the row sum of ``z'``. One split writes each row's loss and lse; several
  write those four partials and :func:`lce_combine_kernel` reduces them.

  Why split the vocabulary: a program owns ``BLOCK_M`` rows and walks the whole
  vocabulary, so 1024 tokens in 128-row blocks are 8 programs on a 132-SM GPU. The
  splits multiply the programs up to about two per SM (:func:`_vocab_splits`) for the
  price of 16 bytes per row and split and one small launch. Row blocks are the grid's
  first axis: the programs resident together are those of one split, which walk the
  same ``W`` tiles at about the same time, so each tile comes from HBM once and from L2
  for the other row blocks.
* :func:`lce_backward_kernel`: one program per ``(row block, vocabulary tile)`` in
  grouped order (``GROUP_M`` row blocks share each ``W`` tile in L2). It recomputes the
  ``z`` tile, forms the ``G_z`` tile in registers and multiplies it at once, per slice of
  the hidden dimension, with the ``W`` tile (``grad_x``) and the ``x`` tile (``grad_W``):
  ``G_z`` is never written and ``z`` is recomputed once, not once per product.

  Why atomics: every vocabulary tile adds to each ``grad_x`` row and every row block to
  each ``grad_W`` row, and neither sum fits one program's registers (``BLOCK_M x H``
  floats). Owning the outputs instead (a pass per product) would recompute ``z`` for each
  product and slice of ``H``. So each program adds its ``BLOCK_M x BLOCK_K`` and
  ``BLOCK_V x BLOCK_K`` pieces into zero-initialised fp32 buffers with relaxed
  ``tl.atomic_add`` (no ordering is needed: nothing reads the buffers before the kernel
  ends), cast to the operands' dtype afterwards (a copy only for fp16/bf16). Races are
  excluded by the atomics; the price is that fp32 sums come in a different order from run
  to run, so the gradients are not bitwise reproducible (each element is a sum of
  ``V / BLOCK_V`` or ``N / BLOCK_M`` fp32 terms).

  Skipped work: a row block whose rows are all ignored (or have ``d = 0``) computes
  nothing. With ``filter_eps`` (CCE's gradient filtering; off by default) a tile whose
  ``|dloss/dz'|`` entries are all below it skips its products: with a large vocabulary
  most softmax entries are negligible. Label smoothing's gradient is dense (``eps / V``
  everywhere), so the filter is off with smoothing.

* :func:`ce_logits_kernel`: the loss and ``G_z`` of logits already written, for the
  chunks of ``torch_matgrad.formulas.linear_cross_entropy`` (whose products stay cuBLAS's):
  one program per row walks its ``z`` row in ``BLOCK_V`` blocks twice, first for the online
  logsumexp (soft cap applied on the fly), then, with row weights, to write ``G_z`` over
  ``z`` in ``z``'s dtype. A chunk's logits are read twice and written once in their own
  dtype, where the same step in torch ops made ~8 fp32 passes.

Out-of-range targets (neither ``ignore_index`` nor in ``[0, V)``): nothing is read at
the target's index (its logit is picked from the ``z`` tiles by comparing column
indices), so a bad target cannot read out of bounds. The kernels mark it instead: that
row's loss is NaN, and its ``d`` is NaN in the backward, so the loss and every gradient
it reaches are NaN: a device-side check with no host synchronisation (PyTorch's CUDA
kernel asserts; here ``tl.device_assert`` does too, with ``TRITON_DEBUG=1``). Its lse
stays valid.

Precision: products accumulate in fp32 (``tl.dot``), ``z`` and every per-row statistic
stay fp32 (no rounding of the logits to the operand dtype, unlike ``F.linear`` followed
by ``F.cross_entropy`` in fp16/bf16); ``G_z`` is rounded to the operand dtype for the
two products, as a torch backward would store it. Operands: fp16, bf16, fp32 (IEEE or
TF32 products as ``torch.get_float32_matmul_precision`` says).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch, ops
from .fused_gemm import INTERPRET, _add_bias, _dot, _tanh, _tile_coords

#: Operand dtypes of the kernels (fp64 has no tensor-core path worth a kernel here).
CE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# GPU tiles, one configuration per kernel (no autotuning: benchmarking the backward
# would add into its own outputs). Chosen by ptxas's report (Triton 3.9, bf16, every flag
# on; tests/test_triton_compile.py's ce-report): 128 x 128 logit tiles need 233 (forward)
# and 254 (backward) registers per thread on sm_90 and spill on sm_80 (~400 bytes); the
# 128 x 64 tiles below take 127 / 164 registers on sm_90, 174 / 186 on sm_80, no spills,
# and 72 / 68 KiB of shared memory on sm_90 (the forward's registers let two programs
# share an SM, the backward's one).
FORWARD_META = dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=64, num_warps=8, num_stages=3)
BACKWARD_META = dict(BLOCK_M=128, BLOCK_V=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
COMBINE_META = dict(BLOCK_N=256, num_warps=4)
# A streaming kernel: 4096 columns over 8 warps are 16 per thread, two 16-byte loads of
# bf16 in flight per thread and pass; a 128256-class row is 32 blocks. ptxas (Triton 3.9,
# bf16, every flag): 80 registers on sm_90, 79 on sm_80, no spills: three programs (24
# warps, ~24 KiB of loads in flight) per SM.
LOGITS_META = dict(BLOCK_V=4096, num_warps=8)
# Interpreter: 16 x 32 x 16 tiles (tl.dot's minimum is 16) make the small test shapes
# span several tiles with ragged edges in every dimension.
INTERPRETER_FORWARD_META = dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16)
INTERPRETER_BACKWARD_META = dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16, GROUP_M=2)
INTERPRETER_COMBINE_META = dict(BLOCK_N=16)
# 128 columns: a vocabulary of 1000 is 8 blocks with a ragged last one.
INTERPRETER_LOGITS_META = dict(BLOCK_V=128)

if INTERPRET:
    FORWARD_META, BACKWARD_META, COMBINE_META, LOGITS_META = (
        INTERPRETER_FORWARD_META, INTERPRETER_BACKWARD_META, INTERPRETER_COMBINE_META, INTERPRETER_LOGITS_META,
    )

# Per-row partials of a split forward: running max, sum of exp(z' - max), target logit,
# row sum of z' (the four planes of a (4, splits, N) fp32 tensor).
_PARTIALS = 4


@triton.jit
def _logit_tile(x_rows, w_cols, H, stride_xh, stride_wh, bias_ptr, offs_v, V, stride_bias, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``z'`` tile (``BLOCK_M x BLOCK_V``): ``z = x W^T + b`` over slices of ``H``, then
    ``z' = c tanh(z / c)`` with the soft cap. ``x_rows`` and ``w_cols`` point at the
    tile's rows of ``x`` and of ``W``."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < H
        ks = offs_k.to(tl.int64)
        a = tl.load(x_rows + ks[None, :] * stride_xh, mask=k_mask[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None] * stride_wh, mask=k_mask[:, None], other=0.0)
        acc = _dot(a, b, acc, tl.float32, INPUT_PRECISION, UPCAST)
    acc = _add_bias(acc, bias_ptr, offs_v, V, stride_bias, HAS_BIAS)
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _store_rows(m, s, z_t, z_sum, target, kept, offs_m, row_mask, V, smoothing, z_loss,
                loss_ptr, lse_ptr, stride_loss, stride_lse):
    """Each row's ``lse = m + log(s)`` and loss from its statistics (module docstring);
    ignored rows get 0 for both, rows with an out-of-range target a NaN loss."""
    lse = tl.where(kept, m, 0.0) + tl.log(tl.where(kept, s, 1.0))
    loss = lse - (1.0 - smoothing) * z_t - (smoothing / V) * z_sum + z_loss * lse * lse
    bad = kept & ((target < 0) | (target >= V))
    tl.device_assert(~bad, "linear cross-entropy: target out of range")  # with TRITON_DEBUG only
    loss = tl.where(bad, float("nan"), tl.where(kept, loss, 0.0))
    rows = offs_m.to(tl.int64)
    tl.store(loss_ptr + rows * stride_loss, loss, mask=row_mask)
    tl.store(lse_ptr + rows * stride_lse, tl.where(kept, lse, 0.0), mask=row_mask)


@triton.jit
def lce_forward_kernel(
    # Pointers: operands, targets, outputs (per-row loss and lse), partials of a split
    x_ptr, w_ptr, bias_ptr, target_ptr, loss_ptr, lse_ptr, part_ptr,
    # Dimensions: x is N x H, W is V x H; each split walks TILES_PER_SPLIT vocabulary tiles
    N, V, H, TILES_PER_SPLIT,
    # Strides (elements); the partials are (4, splits, N)
    stride_xn, stride_xh, stride_wv, stride_wh, stride_bias, stride_target,
    stride_loss, stride_lse, stride_pq, stride_ps,
    # The loss's parameters
    ignore_index, smoothing, z_loss, softcap,
    # Specialisation flags
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr, SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # -----------------------------------------------------------
    # The program's rows and vocabulary tiles. Rows past N wrap (modulo) so the loads
    # stay in bounds unmasked; they count as ignored and their stores are masked. A block
    # of ignored rows walks no tile.
    pid_m = tl.program_id(axis=0)
    split = tl.program_id(axis=1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < N
    target = tl.load(target_ptr + offs_m.to(tl.int64) * stride_target, mask=row_mask, other=ignore_index)
    kept = target != ignore_index
    x_rows = x_ptr + (offs_m % N).to(tl.int64)[:, None] * stride_xn
    first = split * TILES_PER_SPLIT
    last = tl.minimum(first + TILES_PER_SPLIT, tl.cdiv(V, BLOCK_V))
    last = tl.where(tl.max(kept.to(tl.int32)) > 0, last, first)

    # -----------------------------------------------------------
    # Walk the tiles: each z' tile updates the online logsumexp (the running max m and
    # s = sum exp(z' - m)), the target's logit and the row sum of z'. Columns past V
    # wrap for the loads and are masked out of every statistic.
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(first, last):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        w_cols = w_ptr + (offs_v % V).to(tl.int64)[None, :] * stride_wv
        z = _logit_tile(x_rows, w_cols, H, stride_xh, stride_wh, bias_ptr, offs_v, V, stride_bias, softcap,
                           HAS_BIAS, SOFTCAP, INPUT_PRECISION, UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        is_target = (offs_v[None, :] == target[:, None]) & v_mask[None, :]
        z_t += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        if SMOOTHING:
            z_sum += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)

    # -----------------------------------------------------------
    # One split: the rows' loss and lse. Several: this split's partials, each program
    # its own (split, rows) slots, for lce_combine_kernel.
    if SPLIT:
        parts = part_ptr + split.to(tl.int64) * stride_ps + offs_m.to(tl.int64)
        tl.store(parts, m, mask=row_mask)
        tl.store(parts + stride_pq, s, mask=row_mask)
        tl.store(parts + 2 * stride_pq, z_t, mask=row_mask)
        tl.store(parts + 3 * stride_pq, z_sum, mask=row_mask)
    else:
        _store_rows(m, s, z_t, z_sum, target, kept, offs_m, row_mask, V, smoothing, z_loss,
                    loss_ptr, lse_ptr, stride_loss, stride_lse)


@triton.jit
def lce_combine_kernel(
    # Pointers: the forward's partials, targets, outputs
    part_ptr, target_ptr, loss_ptr, lse_ptr,
    # Dimensions and strides (elements); the partials are (4, splits, N)
    N, V, SPLITS, stride_pq, stride_ps, stride_target, stride_loss, stride_lse,
    # The loss's parameters
    ignore_index, smoothing, z_loss,
    # Meta-parameters
    BLOCK_N: tl.constexpr,
):
    # -----------------------------------------------------------
    # Merge the splits' logsumexps (rescaled to the common max) and sums, then the
    # rows' loss and lse as a one-split forward writes them. Ignored rows read nothing
    # (the splits of an ignored block hold an empty logsumexp).
    offs_m = tl.program_id(axis=0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < N
    target = tl.load(target_ptr + offs_m.to(tl.int64) * stride_target, mask=row_mask, other=ignore_index)
    kept = target != ignore_index
    read = row_mask & kept
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for split in range(0, SPLITS):
        parts = part_ptr + split * stride_ps + offs_m.to(tl.int64)
        m_i = tl.load(parts, mask=read, other=0.0)
        m_new = tl.maximum(m, m_i)
        s = s * tl.exp(m - m_new) + tl.load(parts + stride_pq, mask=read, other=0.0) * tl.exp(m_i - m_new)
        m = m_new
        z_t += tl.load(parts + 2 * stride_pq, mask=read, other=0.0)
        z_sum += tl.load(parts + 3 * stride_pq, mask=read, other=0.0)
    _store_rows(m, s, z_t, z_sum, target, kept, offs_m, row_mask, V, smoothing, z_loss,
                loss_ptr, lse_ptr, stride_loss, stride_lse)


@triton.jit
def lce_backward_kernel(
    # Pointers: operands, targets, the forward's lse, the rows' upstream scale d, outputs
    # (fp32, zero-initialised: the kernel adds into them)
    x_ptr, w_ptr, bias_ptr, target_ptr, lse_ptr, d_ptr, grad_x_ptr, grad_w_ptr, grad_b_ptr,
    # Dimensions: x is N x H, W is V x H
    N, V, H,
    # Strides (elements)
    stride_xn, stride_xh, stride_wv, stride_wh, stride_bias, stride_target, stride_lse, stride_d,
    stride_gxn, stride_gxh, stride_gwv, stride_gwh, stride_gb,
    # The loss's parameters; filter_eps = 0 filters nothing
    ignore_index, smoothing, z_loss, softcap, filter_eps,
    # Specialisation flags: the soft cap, label smoothing, the gradients to compute
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr,
    NEED_X: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -----------------------------------------------------------
    # The program's (row block, vocabulary tile) in grouped order, and each row's d:
    # 0 for ignored rows and rows past N, NaN for an out-of-range target. Rows past N
    # and columns past V wrap for the loads; their G_z is 0.
    pid_m, pid_v = _tile_coords(tl.program_id(axis=0), tl.cdiv(N, BLOCK_M), tl.cdiv(V, BLOCK_V), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = offs_m < N
    v_mask = offs_v < V
    target = tl.load(target_ptr + offs_m.to(tl.int64) * stride_target, mask=row_mask, other=ignore_index)
    kept = target != ignore_index
    d = tl.load(d_ptr + offs_m.to(tl.int64) * stride_d, mask=row_mask & kept, other=0.0).to(tl.float32)
    d = tl.where(kept & ((target < 0) | (target >= V)), float("nan"), d)
    rows = (offs_m % N).to(tl.int64)
    cols = (offs_v % V).to(tl.int64)

    # `d != 0` is true for NaN: a bad target still poisons the gradients.
    if tl.max((d != 0).to(tl.int32)) > 0:
        # -----------------------------------------------------------
        # Recompute the z' tile and form dloss/dz' = p (1 + 2 z_loss lse) - (1 - eps)
        # onehot(t) - eps / V, with p = exp(z' - lse) (0 on ignored rows, whose lse is 0,
        # and past V).
        lse = tl.load(lse_ptr + offs_m.to(tl.int64) * stride_lse, mask=row_mask, other=0.0)
        z = _logit_tile(x_ptr + rows[:, None] * stride_xn, w_ptr + cols[None, :] * stride_wv, H,
                            stride_xh, stride_wh, bias_ptr, offs_v, V, stride_bias, softcap,
                            HAS_BIAS, SOFTCAP, INPUT_PRECISION, UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)
        live = kept[:, None] & v_mask[None, :]
        p = tl.exp(tl.where(live, z - lse[:, None], float("-inf")))
        is_target = (offs_v[None, :] == target[:, None]) & v_mask[None, :]
        g = p * (1.0 + 2.0 * z_loss * lse)[:, None] - tl.where(is_target, 1.0 - smoothing, 0.0)
        if SMOOTHING:
            g -= tl.where(live, smoothing / V, 0.0)

        # -----------------------------------------------------------
        # Unless every entry is below filter_eps (`~(max < eps)` keeps NaN tiles): the
        # soft cap's chain rule, the rows' d, then grad_b's column sums and, per slice of
        # H, grad_x += G_z W and grad_W += G_z^T x, each added atomically (module docstring).
        if ~(tl.max(tl.abs(g)) < filter_eps):
            if SOFTCAP:
                g = g * (1.0 - (z / softcap) * (z / softcap))  # tanh' = 1 - tanh^2, tanh = z' / c
            g = g * d[:, None]
            if NEED_B:
                tl.atomic_add(grad_b_ptr + offs_v.to(tl.int64) * stride_gb, tl.sum(g, axis=0), mask=v_mask,
                              sem="relaxed")
            if NEED_X or NEED_W:
                # G_z is rounded to the operand dtype for the products, as torch would store it.
                g_op = g.to(x_ptr.dtype.element_ty)
                for k in range(0, tl.cdiv(H, BLOCK_K)):
                    offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
                    k_mask = offs_k < H
                    ks = offs_k.to(tl.int64)
                    if NEED_X:
                        w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wh,
                                    mask=k_mask[None, :], other=0.0)
                        gx = _dot(g_op, w, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), tl.float32,
                                  INPUT_PRECISION, UPCAST)
                        tl.atomic_add(grad_x_ptr + offs_m.to(tl.int64)[:, None] * stride_gxn + ks[None, :] * stride_gxh,
                                      gx, mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
                    if NEED_W:
                        xk = tl.load(x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xh,
                                     mask=k_mask[None, :], other=0.0)
                        gw = _dot(tl.trans(g_op), xk, tl.zeros((BLOCK_V, BLOCK_K), dtype=tl.float32), tl.float32,
                                  INPUT_PRECISION, UPCAST)
                        tl.atomic_add(grad_w_ptr + offs_v.to(tl.int64)[:, None] * stride_gwv + ks[None, :] * stride_gwh,
                                      gw, mask=v_mask[:, None] & k_mask[None, :], sem="relaxed")


@triton.jit
def ce_logits_kernel(
    # Pointers: the logits (G_z is written over them), targets, the rows' weights w
    # (WRITE_GRAD only), outputs (per-row loss and lse, fp32)
    z_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr,
    # Dimensions and strides (elements): z is N x V with unit column stride; a 0-dim w
    # has stride 0
    V, stride_zn, stride_target, stride_weight, stride_loss, stride_lse,
    # The loss's parameters
    ignore_index, smoothing, z_loss, softcap,
    # Specialisation flags
    SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr, WRITE_GRAD: tl.constexpr,
    # Meta-parameters
    BLOCK_V: tl.constexpr,
):
    """One row's loss and lse (``formulas.cross_entropy_rows`` on ``s = c tanh(z / c)``)
    and, with ``WRITE_GRAD``, its ``G_z`` (``formulas.cross_entropy_grad_logits``,
    MATH.md item 12) written over ``z``."""
    # -----------------------------------------------------------
    # The program's row and target. An ignored row reads nothing: loss and lse 0, G_z 0
    # (its w is 0). A target outside [0, V) reads nothing at its index: its loss is NaN
    # and so is its G_z (the op's device-side assert names it).
    row = tl.program_id(axis=0).to(tl.int64)
    target = tl.load(target_ptr + row * stride_target)
    kept = target != ignore_index
    bad = kept & ((target < 0) | (target >= V))
    z_row = z_ptr + row * stride_zn
    blocks = tl.cdiv(V, BLOCK_V)

    # -----------------------------------------------------------
    # Pass 1: the online logsumexp of s per lane (running max m, sum exp(s - m)), and the
    # row sum of s for label smoothing; ignored rows walk no block. Columns past V are
    # -inf to the logsumexp and 0 to the sum; a lane's max stays -inf until it sees a
    # column, and then exp(m - 0) = 0 keeps its sum at 0.
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    e = tl.zeros((BLOCK_V,), dtype=tl.float32)
    s_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for block in range(0, tl.where(kept, blocks, 0)):
        cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = cols < V
        s = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        m_new = tl.maximum(m, tl.where(mask, s, float("-inf")))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = e * tl.exp(m - m_safe) + tl.where(mask, tl.exp(s - m_safe), 0.0)
        m = m_new
        if SMOOTHING:
            s_sum += tl.where(mask, s, 0.0)
    m_row = tl.where(kept, tl.max(m, axis=0), 0.0)
    total = tl.sum(e * tl.exp(m - m_row), axis=0)
    lse = tl.where(kept, m_row + tl.log(tl.where(kept, total, 1.0)), 0.0)
    s_t = tl.load(z_row + tl.where(bad, 0, target), mask=kept & ~bad, other=0.0).to(tl.float32)
    if SOFTCAP:
        s_t = softcap * _tanh(s_t / softcap)
    loss = lse - (1.0 - smoothing) * s_t - (smoothing / V) * tl.sum(s_sum, axis=0) + z_loss * lse * lse
    loss = tl.where(bad, float("nan"), tl.where(kept, loss, 0.0))
    tl.store(loss_ptr + row * stride_loss, loss)
    tl.store(lse_ptr + row * stride_lse, lse)

    # -----------------------------------------------------------
    # Pass 2: G_z = w ((1 + 2 zl lse) p - (1 - eps) Y - eps / V) * (1 - (s / c)^2) with
    # p = exp(s - lse), stored over z in its dtype. Ignored rows read nothing and store
    # zeros (w = 0, s = 0); a bad target's w is NaN.
    if WRITE_GRAD:
        w = tl.load(weight_ptr + row * stride_weight).to(tl.float32)
        w = tl.where(bad, float("nan"), tl.where(kept, w, 0.0))
        coef = w * (1.0 + 2.0 * z_loss * lse)
        hit = w * (1.0 - smoothing)
        spread = w * smoothing / V
        read = tl.where(kept, V, 0)  # columns to read
        for block in range(0, blocks):
            cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
            mask = cols < V
            s = tl.load(z_row + cols, mask=cols < read, other=0.0).to(tl.float32)
            if SOFTCAP:
                s = softcap * _tanh(s / softcap)
            g = coef * tl.exp(s - lse) - tl.where(cols == target, hit, 0.0)
            if SMOOTHING:
                g -= spread
            if SOFTCAP:
                g = g * (1.0 - (s / softcap) * (s / softcap))  # tanh' = 1 - tanh^2, tanh = s / c
            tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- wrappers


def _check(name, x, weight, bias, target) -> None:
    """Shapes, dtypes and devices of the operands both wrappers take."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: x {tuple(x.shape)} and weight {tuple(weight.shape)} must be (N, H) and (V, H)")
    if x.dtype not in CE_DTYPES:
        raise TypeError(f"{name}: unsupported dtype {x.dtype}; the kernels take {', '.join(map(str, CE_DTYPES))}")
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: {what} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias of shape {tuple(bias.shape)} for {weight.shape[0]} classes")
    if target.shape != (x.shape[0],) or target.dtype not in (torch.int64, torch.int32) or target.device != x.device:
        raise ValueError(f"{name}: target must be an int64/int32 tensor of shape ({x.shape[0]},) on x's device")
    if weight.shape[0] == 0:
        raise ValueError(f"{name}: no classes (weight has 0 rows)")


def _loss_params(label_smoothing: float, z_loss: float, softcap: Optional[float]) -> dict:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive (or None), got {softcap}")
    return dict(smoothing=float(label_smoothing), z_loss=float(z_loss), softcap=float(softcap or 0.0))


def _device(x: Tensor):
    """Triton launches on the current device: make it the tensors' (cuda:1 from cuda:0)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _vocab_splits(row_blocks: int, tiles: int, device: torch.device) -> int:
    """Vocabulary splits of the forward: enough programs for about two per SM, never
    more splits than tiles (module docstring)."""
    return max(1, min(tiles, triton.cdiv(2 * launch.num_sms(device), row_blocks)))


def linear_cross_entropy_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    splits: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """``(loss, lse)``: each row's loss (module docstring; 0 for ignored rows, NaN for an
    out-of-range target) and its logsumexp of the (soft-capped) logits ``z'`` (0 for
    ignored rows), both fp32 of shape ``(N,)``, for ``x`` ``(N, H)``, ``weight``
    ``(V, H)``, ``bias`` ``(V,)`` or None and integer ``target`` ``(N,)``. Any strides.

    ``splits``: the number of vocabulary splits (default: enough for the GPU's SMs,
    :func:`_vocab_splits`); 1 is one launch, more add the combining launch.
    """
    _check("linear_cross_entropy_forward", x, weight, bias, target)
    params = _loss_params(label_smoothing, z_loss, softcap)
    (n, h), v = x.shape, weight.shape[0]
    loss, lse = ops._empty((n,), torch.float32, x.device), ops._empty((n,), torch.float32, x.device)
    if n == 0:
        return loss, lse
    meta = FORWARD_META
    row_blocks, tiles = triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(v, meta["BLOCK_V"])
    splits = _vocab_splits(row_blocks, tiles, x.device) if splits is None else max(1, min(splits, tiles))
    per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, per_split)  # no empty split
    parts = ops._empty((_PARTIALS, splits, n), torch.float32, x.device) if splits > 1 else None
    with _device(x):
        lce_forward_kernel[(row_blocks, splits)](
            x, weight, bias, target, loss, lse, parts,
            n, v, h, per_split,
            *x.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0, target.stride(0),
            loss.stride(0), lse.stride(0), *(parts.stride()[:2] if parts is not None else (0, 0)),
            ignore_index, params["smoothing"], params["z_loss"], params["softcap"],
            HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, SMOOTHING=label_smoothing > 0,
            SPLIT=parts is not None, INPUT_PRECISION=ops.input_precision(x.dtype),
            UPCAST=INTERPRET and x.dtype == torch.bfloat16,
            **meta,
        )
        if parts is not None:
            lce_combine_kernel[(triton.cdiv(n, COMBINE_META["BLOCK_N"]),)](
                parts, target, loss, lse,
                n, v, splits, *parts.stride()[:2], target.stride(0), loss.stride(0), lse.stride(0),
                ignore_index, params["smoothing"], params["z_loss"],
                **COMBINE_META,
            )
    return loss, lse


def linear_cross_entropy_backward(
    grad_rows: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    lse: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    needs: Tuple[bool, bool, bool] = (True, True, True),
    filter_eps: float = 0.0,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(grad_x, grad_W, grad_b)`` for the gradients flagged in ``needs`` (None for the
    others, and ``grad_b`` without a bias), in ``x``'s dtype, contiguous.

    ``grad_rows`` ``(N,)``: each row's upstream scale ``d`` (any float dtype, any stride:
    ``"mean"`` may pass ``(g / n_kept).expand(N)``); the kernel zeroes ignored rows itself.
    ``lse``: the forward's. The loss parameters must be the forward's. ``filter_eps > 0``
    skips the products of tiles whose ``|dloss/dz'|`` is below it everywhere (CCE's
    filtering, e.g. ``2**-12`` for bf16: an approximation; ignored with label smoothing).
    """
    _check("linear_cross_entropy_backward", x, weight, bias, target)
    params = _loss_params(label_smoothing, z_loss, softcap)
    (n, h), v = x.shape, weight.shape[0]
    if lse.shape != (n,) or lse.dtype != torch.float32 or grad_rows.shape != (n,):
        raise ValueError("linear_cross_entropy_backward: lse (fp32) and grad_rows must be of shape (N,)")
    need_x, need_w, need_b = needs
    need_b = need_b and bias is not None
    # fp32 accumulators for the atomic sums (zeros: the kernel only adds).
    grad_x = torch.zeros((n, h), dtype=torch.float32, device=x.device) if need_x else None
    grad_w = torch.zeros((v, h), dtype=torch.float32, device=x.device) if need_w else None
    grad_b = torch.zeros((v,), dtype=torch.float32, device=x.device) if need_b else None
    if n > 0 and (need_x or need_w or need_b):
        meta = BACKWARD_META
        grid = (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(v, meta["BLOCK_V"]),)
        with _device(x):
            lce_backward_kernel[grid](
                x, weight, bias, target, lse, grad_rows, grad_x, grad_w, grad_b,
                n, v, h,
                *x.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0, target.stride(0),
                lse.stride(0), grad_rows.stride(0),
                *(grad_x.stride() if need_x else (0, 0)), *(grad_w.stride() if need_w else (0, 0)),
                grad_b.stride(0) if need_b else 0,
                ignore_index, params["smoothing"], params["z_loss"], params["softcap"],
                0.0 if label_smoothing > 0 else float(filter_eps),
                HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, SMOOTHING=label_smoothing > 0,
                NEED_X=need_x, NEED_W=need_w, NEED_B=need_b,
                INPUT_PRECISION=ops.input_precision(x.dtype), UPCAST=INTERPRET and x.dtype == torch.bfloat16,
                **meta,
            )
    return tuple(None if t is None else t.to(x.dtype) for t in (grad_x, grad_w, grad_b))


def cross_entropy_logits(
    z: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """``(loss, lse)`` per row (fp32, ``(N,)``) of the logits ``z`` ``(N, V)`` against
    integer ``target`` ``(N,)``: ``formulas.cross_entropy_rows`` on the soft-capped
    logits, 0 for ignored rows (their lse too), NaN for a target outside ``[0, V)``.

    With ``weight`` (``w`` of MATH.md item 12: 0-dim or ``(N,)``, any float dtype; the
    kernel zeroes ignored rows itself), ``G_z`` (``formulas.cross_entropy_grad_logits``)
    is written over ``z`` IN PLACE, in ``z``'s dtype: pass only a buffer of your own.
    ``z``: fp16, bf16 or fp32, unit column stride (any row stride).
    """
    if z.dim() != 2 or (z.shape[1] > 1 and z.stride(1) != 1):
        raise ValueError(f"cross_entropy_logits: z must be (N, V) with unit column stride, got shape "
                         f"{tuple(z.shape)}, strides {z.stride()}")
    if z.dtype not in CE_DTYPES:
        raise TypeError(f"cross_entropy_logits: unsupported dtype {z.dtype}; the kernel takes "
                        f"{', '.join(map(str, CE_DTYPES))}")
    n, v = z.shape
    if v == 0:
        raise ValueError("cross_entropy_logits: no classes (z has 0 columns)")
    if target.shape != (n,) or target.dtype not in (torch.int64, torch.int32) or target.device != z.device:
        raise ValueError(f"cross_entropy_logits: target must be an int64/int32 tensor of shape ({n},) on z's device")
    if weight is not None and (weight.shape not in ((), (n,)) or not weight.is_floating_point()
                               or weight.device != z.device):
        raise ValueError(f"cross_entropy_logits: weight must be a float tensor of shape () or ({n},) on z's device")
    params = _loss_params(label_smoothing, z_loss, softcap)
    loss, lse = ops._empty((n,), torch.float32, z.device), ops._empty((n,), torch.float32, z.device)
    if n == 0:
        return loss, lse
    if weight is not None:
        weight = weight.to(torch.float32)
    with _device(z):
        ce_logits_kernel[(n,)](
            z, target, weight, loss, lse,
            v, z.stride(0), target.stride(0), weight.stride(0) if weight is not None and weight.dim() else 0,
            loss.stride(0), lse.stride(0),
            ignore_index, params["smoothing"], params["z_loss"], params["softcap"],
            SOFTCAP=softcap is not None, SMOOTHING=label_smoothing > 0, WRITE_GRAD=weight is not None,
            **LOGITS_META,
        )
    return loss, lse
