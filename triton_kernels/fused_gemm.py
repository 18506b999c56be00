"""One fused GEMM kernel for the forward and every product of the backward of the op.

``C = prologue(A) @ B``, then the epilogue ``act(C + bias)``:

* forward (MATH.md item 6, rows): ``A = x``, ``B = W^T``; epilogue adds the bias,
  stores the pre-activation ``z`` when the backward needs it (``STORE_Z``) and the
  activated output;
* ``grad_x = G_z W`` (item 11): ``A = G``, ``B = W``; the prologue turns the ``G`` tile
  into the ``G_z = G * act'(z)`` tile (items 1, 3) where it is loaded;
* ``grad_W = G_z^T x`` (items 9, 10): ``A = G^T``, ``B = x``, same prologue on the
  transposed tiles; the programs of the first ``N``-block column also sum their
  prologued ``A`` tiles over the reduction dimension, which is ``grad_b = G_z.sum(0)``
  (item 10 with ``x = 1``). Each such program owns one slice of ``grad_b``, so the sum
  is deterministic and needs no atomics. ``HAS_C = False`` keeps only that sum (the
  bias gradient without the weight gradient).

MLP blocks (``torch_matgrad.mlp``: ``out = h Wd^T + bd`` with the hidden activation
``h = act(u)``, or gated ``h = act(g) * u``, from the pre-activations ``u = x Wu^T + bu``
and ``g = x Wg^T + bg``) add four specialisations, so that ``h`` is never written:

* ``DUAL``: the gated block's first GEMM over the concatenated ``[Wg; Wu]`` without
  concatenating it: ``C = [A B + bias | A B2 + bias2]`` (``M x 2N``), the programs of the
  first ``cdiv(N, BLOCK_N)`` block columns reading ``B`` and ``bias``, the others ``B2``
  and ``bias2`` (same strides) and storing ``N`` columns further; both halves share each
  ``A`` tile in L2 (grouped order);
* ``HIDDEN`` (an ``A`` prologue, exclusive with ``PRO_ACT``): the loaded tile of the
  pre-activation ``A = u`` becomes ``act(u)`` (``HIDDEN = 1``) or ``act(S) * u`` with the
  gate ``S = g`` read with ``A``'s indices (``HIDDEN = 2``; item 1's product), ``act``
  being ``MLP_ACT``. It builds ``h`` for ``out = h Wd^T`` (``A = u``) and for
  ``grad_Wd^T = h^T G`` (``A = u^T``, items 9, 10; stored through transposed strides);
* ``EPI_GRAD`` (replaces the bias/activation epilogue): the accumulator is
  ``grad_h = G Wd`` (item 11) and the epilogue reads ``E = u`` (and ``E2 = g``) with
  ``C``'s indices: ``C = grad_h * act'(u)`` (``EPI_GRAD = 1``, items 1, 3), or
  ``C = [grad_h * u * act'(g) | grad_h * act(g)]`` = ``[G_g | G_u]`` (``EPI_GRAD = 2``, the
  product rule of item 1 with items 1, 3 for ``act``), ``act'`` computed once per element;
* ``COLSUM``: the programs of the first block row also sum the ``B`` tiles over the
  reduction dimension (``grad_bd = G^T 1`` in the ``h^T G`` launch, item 10 with
  ``x = 1``), one slice per program as for ``ROWSUM``.

Split-K (``SPLIT_K``, for decoding rows: ``ops.split_k``): a product of a few rows is
bound by reading ``B`` once, and its single block row of ``cdiv(N, BLOCK_N)`` programs
can leave SMs idle (64 programs for 4096 columns on an H100's 132), and their bandwidth
with them. With ``SPLIT_K`` each tile has ``S`` adjacent programs, each reducing a slice
of ``k_split`` elements of K (a multiple of ``BLOCK_K``) and storing its partial product
unrounded into its slice of ``C``, an ``(S, M, N)`` workspace in the accumulator's dtype;
no epilogue. ``split_k_reduce_kernel`` then sums each element's ``S`` partials in slice
order and applies the epilogue (``_epilogue``, this kernel's own). Two launches, not one
whose last program per tile (found by an atomic counter) would sum: no counters to keep
zeroed and unshared across streams and CUDA graphs, no acquire/release ordering that no
CPU test can race, and the same bits run to run; the price is one more launch (predicted
~2 us in a CUDA graph beside a product of ~11 us; not yet timed on a GPU).

One general kernel rather than three copies: every operand is read through its own
strides, so ``W^T``, ``G^T``, ``x^T`` and sliced views are stride swaps, and constexpr
flags select each specialisation at compile time (no runtime branches on them).

Offsets are products ``index * stride`` computed in int64: Triton passes small ints
as i32, and an operand with more than 2^31 elements would wrap (silently so under the
interpreter).

The activation formulas themselves are :mod:`torch_matgrad.formulas` (PyTorch's own
ops); ``_activation`` and ``_activation_grad`` below are the same formulas in Triton,
in the accumulator's precision, matching ``F.gelu``/``F.silu`` and their ``aten``
derivative kernels.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

try:  # Triton >= 3.4 reads its environment through ``knobs``.
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # pragma: no cover - older Triton
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Activation name -> the ``ACT`` constexpr code of the kernel.
ACT_CODES = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}

# The constants are literals in the kernels: compiled kernels may read only
# tl.constexpr globals, and under the interpreter `tl.constexpr * tensor` is broken
# (Triton 3.9). 0.7071067811865476 = 1/sqrt(2) (GELU's erf argument),
# 0.3989422804014327 = 1/sqrt(2 pi) (the normal density), 0.7978845608028654 =
# sqrt(2/pi) and 0.044715 (GELU-tanh's inner polynomial).


@triton.jit
def _sigmoid(v):
    # With e = exp(-|v|) <= 1 nothing overflows (1 / (1 + exp(-v)) would pass through
    # inf for v < -88 in fp32).
    e = tl.exp(-tl.abs(v))
    return tl.where(v >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _tanh(v):
    # tanh through exp: tl.math has no tanh in every supported Triton version.
    # 2 sigmoid(2v) - 1 saturates to +-1 without overflow.
    return 2.0 * _sigmoid(2.0 * v) - 1.0


@triton.jit
def _activation(z, ACT: tl.constexpr):
    """``act(z)`` as ``torch.nn.functional`` computes it (codes: ``ACT_CODES``)."""
    if ACT == 1:
        # `z < 0` (not `z > 0`) keeps NaN, as F.relu does.
        return tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        return 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 4:
        return z * _sigmoid(z)
    else:
        return z


@triton.jit
def _activation_grad(g, s, ACT: tl.constexpr):
    """``G_z = G * act'(z)`` (MATH.md items 1, 3). ``s`` is the tensor the backward saved:
    the output for ReLU, ``z`` otherwise (``formulas.NEEDS_PREACTIVATION``)."""
    if ACT == 1:
        # aten.threshold_backward(g, out, 0): zero where out <= 0.
        return tl.where(s <= 0, 0.0, g)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476))
        pdf = tl.exp(-0.5 * s * s) * 0.3989422804014327
        return g * (cdf + s * pdf)
    elif ACT == 3:
        inner = 0.7978845608028654 * (s + 0.044715 * s * s * s)
        t = _tanh(inner)
        d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * s * s)
        return g * (0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * d_inner)
    elif ACT == 4:
        sig = _sigmoid(s)
        return g * sig * (1.0 + s * (1.0 - sig))
    else:
        return g


# Pieces of the kernels shared with the descriptor kernel (``tma_gemm.py``): the same
# tile order, product and epilogue arithmetic, whatever loads the tiles.


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of tile ``tile_id`` in grouped order: ``GROUP_M`` block rows at
    a time, so that consecutive tiles share B columns in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _prologue(a, s, PRO_ACT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``(A' tile for the dot, A' tile in the accumulator's precision)`` with
    ``A' = A * act'(S)`` when ``PRO_ACT`` names an activation, ``A' = A`` otherwise."""
    if PRO_ACT != 0:
        a_acc = _activation_grad(a.to(ACC_DTYPE), s.to(ACC_DTYPE), PRO_ACT)
        # G_z is rounded to the operand dtype for the dot, as the torch path does.
        return a_acc.to(a.dtype), a_acc
    else:
        return a, a.to(ACC_DTYPE)


@triton.jit
def _hidden(a, s, HIDDEN: tl.constexpr, ACT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``(h tile for the dot, h tile in the accumulator's precision)`` from a tile of the
    pre-activation ``a``: ``h = act(a)`` (``HIDDEN == 1``) or ``h = act(s) * a`` with ``s``
    the gate's tile (``HIDDEN == 2``)."""
    if HIDDEN == 1:
        h = _activation(a.to(ACC_DTYPE), ACT)
    else:
        h = _activation(s.to(ACC_DTYPE), ACT) * a.to(ACC_DTYPE)
    # h is rounded to the operand dtype for the dot, as the torch path stores it.
    return h.to(a.dtype), h


@triton.jit
def _dot(a, b, acc, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``."""
    if UPCAST:
        # Interpreter only: its bf16 tl.dot is wrong (triton-lang/triton#11584),
        # so the tiles go to fp32 there; compiled kernels keep bf16 operands.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _add_bias(acc, bias_ptr, offs_n, N, stride_bias, HAS_BIAS: tl.constexpr):
    """``acc + bias[offs_n]`` (columns past ``N`` add nothing)."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=offs_n < N, other=0.0)
        acc += bias.to(acc.dtype)[None, :]
    return acc


@triton.jit
def _epilogue(acc, c_ptr, z_ptr, bias_ptr, offs_m, offs_n, offs_cn, M, N, stride_cm, stride_cn, stride_bias,
              HAS_BIAS: tl.constexpr, EPI_ACT: tl.constexpr, STORE_Z: tl.constexpr):
    """The forward's epilogue on ``acc`` (rows ``offs_m``, columns ``offs_n`` of the
    product, stored in C's columns ``offs_cn``): ``z = acc + bias``, stored when
    ``STORE_Z`` (with C's strides), then ``C = act(z)``; masked at the edges."""
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_offs = offs_m.to(tl.int64)[:, None] * stride_cm + offs_cn.to(tl.int64)[None, :] * stride_cn
    acc = _add_bias(acc, bias_ptr, offs_n, N, stride_bias, HAS_BIAS)
    if STORE_Z:
        tl.store(z_ptr + c_offs, acc.to(z_ptr.dtype.element_ty), mask=c_mask)
    out = _activation(acc, EPI_ACT)
    tl.store(c_ptr + c_offs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _store_rowsum(rowsum_ptr, rowsum, offs_m, M, stride_rowsum):
    """A vector of sums at ``offs_m`` (those past ``M`` dropped); the column sums too."""
    tl.store(rowsum_ptr + offs_m.to(tl.int64) * stride_rowsum, rowsum.to(rowsum_ptr.dtype.element_ty),
             mask=offs_m < M)


@triton.jit
def _store_grad_hidden(acc, c_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
                       e_ptr, stride_em, stride_en, e2_ptr, stride_e2m, stride_e2n,
                       EPI_GRAD: tl.constexpr, ACT: tl.constexpr):
    """The MLP backward's epilogue on ``acc = grad_h``: reads ``u`` (``e_ptr``) and, gated,
    ``g`` (``e2_ptr``) with ``C``'s indices and stores ``G_u = grad_h * act'(u)``
    (``EPI_GRAD == 1``), or ``G_g = grad_h * u * act'(g)`` in columns ``[0, N)`` and
    ``G_u = grad_h * act(g)`` in columns ``[N, 2N)`` (``EPI_GRAD == 2``)."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)[None, :]
    c_offs = rows * stride_cm + cols * stride_cn
    u = tl.load(e_ptr + rows * stride_em + cols * stride_en, mask=mask, other=0.0).to(acc.dtype)
    if EPI_GRAD == 1:
        tl.store(c_ptr + c_offs, _activation_grad(acc, u, ACT).to(c_ptr.dtype.element_ty), mask=mask)
    else:
        g = tl.load(e2_ptr + rows * stride_e2m + cols * stride_e2n, mask=mask, other=0.0).to(acc.dtype)
        tl.store(c_ptr + c_offs, _activation_grad(acc * u, g, ACT).to(c_ptr.dtype.element_ty), mask=mask)
        cols_u = (offs_n + N).to(tl.int64)[None, :]
        tl.store(c_ptr + rows * stride_cm + cols_u * stride_cn,
                 (acc * _activation(g, ACT)).to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fused_gemm_kernel(
    # Pointers: operands, output, the prologue's saved tensor, bias, z output, row sums
    a_ptr, b_ptr, c_ptr, s_ptr, bias_ptr, z_ptr, rowsum_ptr,
    # MLP blocks: the second B and bias (DUAL), the epilogue's u and g (EPI_GRAD), column sums
    b2_ptr, bias2_ptr, e_ptr, e2_ptr, colsum_ptr,
    # Matrix dimensions: C (M x N) = A (M x K) @ B (K x N)
    M, N, K,
    # Strides (elements) of each operand; S is read with A's indices, z with C's;
    # B2 and bias2 have the strides of B and bias
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_sm, stride_sk, stride_bias, stride_rowsum,
    stride_em, stride_en, stride_e2m, stride_e2n, stride_colsum,
    # SPLIT_K: the K elements of each slice (a multiple of BLOCK_K) and C's stride from
    # one slice's partial product to the next (0 and 0 otherwise)
    k_split, stride_cs,
    # Coarse shape buckets: only the autotuner's key reads them
    M_BUCKET, N_BUCKET, K_BUCKET,
    # Specialisation flags
    PRO_ACT: tl.constexpr, ROWSUM: tl.constexpr, HAS_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, EPI_ACT: tl.constexpr, STORE_Z: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT_K: tl.constexpr,
    # MLP flags (module docstring); MLP_ACT is the activation of HIDDEN and EPI_GRAD
    DUAL: tl.constexpr, HIDDEN: tl.constexpr, EPI_GRAD: tl.constexpr, COLSUM: tl.constexpr,
    MLP_ACT: tl.constexpr,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -----------------------------------------------------------
    # Map the program id to the block of C it computes, in groups of GROUP_M block
    # rows so that consecutive programs share B columns in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N) if HAS_C else 1
    if DUAL:
        num_pid_n = 2 * num_pid_n
    tile_id = tl.program_id(axis=0)
    k_start = 0
    k_end = tl.cdiv(K, BLOCK_K)
    if SPLIT_K:
        tl.static_assert(HAS_C and not (ROWSUM or HAS_BIAS or STORE_Z or DUAL or COLSUM) and EPI_ACT == 0
                         and EPI_GRAD == 0, "a split-K launch stores the plain partial products")
        # The programs of one tile are adjacent: each reduces its slice of K blocks and
        # stores the partial product into its own slice of C (the workspace).
        splits = tl.cdiv(K, k_split)
        split = tile_id % splits
        tile_id = tile_id // splits
        k_start = split * (k_split // BLOCK_K)
        k_end = min(k_end, k_start + k_split // BLOCK_K)
        c_ptr += split.to(tl.int64) * stride_cs
    pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
    if DUAL:
        # The second half of the block columns: B2 and bias2, stored N columns further.
        half = tl.cdiv(N, BLOCK_N)
        second = pid_n >= half
        pid_n = tl.where(second, pid_n - half, pid_n)
        c_col0 = tl.where(second, N, 0)
        if second:
            b_ptr = b2_ptr
            if HAS_BIAS:
                bias_ptr = bias2_ptr

    # -----------------------------------------------------------
    # Row offsets of A and column offsets of B, in int64. Rows and columns past the
    # edge wrap (modulo) so the loads stay in bounds unmasked; their results are
    # dropped by the masked stores.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_a = (offs_m % M).to(tl.int64)
    a_rows = a_ptr + rows_a[:, None] * stride_am
    if HAS_C:
        cols_b = (offs_n % N).to(tl.int64)
        b_cols = b_ptr + cols_b[None, :] * stride_bn
    if PRO_ACT != 0 or HIDDEN == 2:
        s_rows = s_ptr + rows_a[:, None] * stride_sm

    # -----------------------------------------------------------
    # Iterate over K: prologue on the A tile, optional row sum, then the dot.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if ROWSUM:
        rowsum = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    if COLSUM:
        colsum = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for k in range(k_start, k_end):
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        ks = offs_k.to(tl.int64)
        a = tl.load(a_rows + ks[None, :] * stride_ak, mask=k_mask[None, :], other=0.0)
        s = None
        if PRO_ACT != 0 or HIDDEN == 2:
            s = tl.load(s_rows + ks[None, :] * stride_sk, mask=k_mask[None, :], other=0.0)
        if HIDDEN != 0:
            a, a_acc = _hidden(a, s, HIDDEN, MLP_ACT, ACC_DTYPE)
        else:
            a, a_acc = _prologue(a, s, PRO_ACT, ACC_DTYPE)
        if ROWSUM:
            if pid_n == 0:
                rowsum += tl.sum(a_acc, axis=1)
        if HAS_C:
            b = tl.load(b_cols + ks[:, None] * stride_bk, mask=k_mask[:, None], other=0.0)
            if COLSUM:
                if pid_m == 0:
                    colsum += tl.sum(b.to(ACC_DTYPE), axis=0)
            acc = _dot(a, b, acc, ACC_DTYPE, INPUT_PRECISION, UPCAST)

    # -----------------------------------------------------------
    # Epilogue on the accumulator: bias, z, activation (or the MLP's gradients);
    # masked stores at the edges.
    if ROWSUM:
        if pid_n == 0:
            _store_rowsum(rowsum_ptr, rowsum, offs_m, M, stride_rowsum)
    if COLSUM:
        if pid_m == 0:
            _store_rowsum(colsum_ptr, colsum, offs_n, N, stride_colsum)
    if HAS_C:
        if EPI_GRAD != 0:
            _store_grad_hidden(acc, c_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
                               e_ptr, stride_em, stride_en, e2_ptr, stride_e2m, stride_e2n, EPI_GRAD, MLP_ACT)
        else:
            offs_cn = offs_n + c_col0 if DUAL else offs_n
            _epilogue(acc, c_ptr, z_ptr, bias_ptr, offs_m, offs_n, offs_cn, M, N, stride_cm, stride_cn, stride_bias,
                      HAS_BIAS, EPI_ACT, STORE_Z)


@triton.jit
def split_k_reduce_kernel(
    # The partial products (S x M x N, the accumulator's dtype), output, bias, z output
    ws_ptr, c_ptr, bias_ptr, z_ptr,
    M, N, splits,
    stride_ws, stride_wm, stride_wn, stride_cm, stride_cn, stride_bias,
    HAS_BIAS: tl.constexpr, EPI_ACT: tl.constexpr, STORE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The second launch of a split-K product: ``C = act(sum_s ws[s] + bias)`` (and ``z``),
    the ``splits`` partials summed in the order of ``s``, so a result is the same bits
    run to run; then the pointer kernel's own epilogue."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(axis=0)
    offs_m = (pid // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ws = ws_ptr + offs_m.to(tl.int64)[:, None] * stride_wm + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.load(ws, mask=mask, other=0.0)
    # Pipelined: the next slices' loads are in flight while one is added (a plain loop
    # waits out an L2 round trip per slice).
    for _ in tl.range(1, splits, num_stages=3):
        ws += stride_ws
        acc += tl.load(ws, mask=mask, other=0.0)
    _epilogue(acc, c_ptr, z_ptr, bias_ptr, offs_m, offs_n, offs_n, M, N, stride_cm, stride_cn, stride_bias,
              HAS_BIAS, EPI_ACT, STORE_Z)
