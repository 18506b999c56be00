"""The fused GEMM of :mod:`.fused_gemm` for Hopper and later: the linear layer's
products with their bias/activation epilogue and ``grad_b`` row sums (not the ``act'``
prologue, nor the MLP block's fusions), with every tile moved by the Tensor Memory
Accelerator (TMA) through tensor descriptors, and a persistent grid.

``C = A @ B``, then the epilogue ``act(C + bias)``, exactly as ``fused_gemm_kernel``
without ``PRO_ACT`` (MATH.md items 6, 9-11; the shared ``@triton.jit`` helpers of
``fused_gemm.py`` do the arithmetic), with three differences:

* **Descriptors, not pointers.** A and B are read, and C and z written, through
  host-side tensor descriptors (``TensorDescriptor``): each tile is one bulk copy
  (``cp.async.bulk.tensor``) into shared memory that Hopper's ``wgmma`` reads directly,
  with no address arithmetic in the threads. A descriptor needs its last dimension
  contiguous, so an operand whose *rows* are contiguous (``W^T`` in the forward, ``G^T``
  in ``grad_W``) is described as its transpose, which is contiguous, and the loaded
  block is transposed in shared memory (``A_T``, ``B_T``: a view, not a copy). Blocks
  past the edges read as zeros and stores past them are clipped, so there are no masks.
* **A persistent grid.** One program per SM (``NUM_SMS``), each looping over the
  output tiles ``start, start + NUM_SMS, ...`` in the grouped order of ``fused_gemm``
  (``_tile_coords``), so the launch, the descriptors' prefetch and the program's setup
  are paid once per SM rather than once per tile.
* **Stores through descriptors, whole or in subtiles.** The epilogue (bias, ``z``,
  activation) stages each output tile in shared memory and stores it with one bulk
  copy. With ``EPILOGUE_SPLIT = 2`` it does so in two ``BLOCK_M x BLOCK_N / 2`` halves,
  which halves the staging buffer: at 128 x 256 that is what makes room for a fourth
  pipeline stage. Compiled for sm_90, the whole-tile store keeps 128 x 256 x 64 within
  the register file (184 registers, no spills, for the forward with bias, GELU-tanh and
  ``z``), while splitting the accumulator costs registers (255, a few bytes spilled), so
  both are autotune configurations (``ops.TMA_CONFIGS``).

No ``act'`` prologue (``G_z = G * act'(S)`` formed where the ``G`` tile loads): a launch
with one takes ``fused_gemm_kernel``. Here, on an H100 (Triton 3.6), it computed a
wrong ``grad_x`` at 4096^3 in ``tma_128x128x64_s4_w8`` (relative error 0.112; the ragged
size passed), the same pattern that broke the row sums below (registers reading a
TMA-loaded tile inside the pipelined ``wgmma`` loop), and the backward with it ran
2.6-5.2x slower than with ``G_z`` from the elementwise pass, the backend's default.

The ``grad_b`` row sums are reduced, without atomics, by the program that owns each
tile of the first block column (``pid_n == 0``), as in ``fused_gemm``, but in a loop of
their own after the product's. Summed inside the pipelined loop, from the shared-memory
tiles that ``wgmma`` reads, the launch came out wrong on an H100 (Triton 3.6: relative
error 0.1-0.66 over ``grad_W`` and ``grad_b`` at the quick shapes, where the interpreter
agreed with torch). The second pass reads the A row block once more: one extra read of
the ``M x N`` gradient, spread over the first block column's programs. A launch that only
sums (no product: ``HAS_C = False``) is not this kernel's either: without a product
there is no tensor-core work for the descriptors to feed. Which kernel runs is decided
in one place, ``ops.gemm_kernel_for``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fused_gemm import _activation, _add_bias, _dot, _store_rowsum, _tile_coords


@triton.jit
def _load_block(desc, off_r, off_c, TRANSPOSED: tl.constexpr):
    """The block at ``(off_r, off_c)`` of the matrix that ``desc`` describes, or, if
    ``TRANSPOSED``, of the transpose of the matrix it describes."""
    if TRANSPOSED:
        return desc.load([off_c, off_r]).T
    else:
        return desc.load([off_r, off_c])


@triton.jit
def _store_subtile(acc, c_desc, z_desc, bias_ptr, off_m, off_n, N, stride_bias,
                   HAS_BIAS: tl.constexpr, EPI_ACT: tl.constexpr, STORE_Z: tl.constexpr,
                   SUB_N: tl.constexpr):
    """Bias, ``z`` and ``act`` on one ``BLOCK_M x SUB_N`` piece of the accumulator, stored
    at ``(off_m, off_n)`` (the descriptors clip what lies past the edges)."""
    acc = _add_bias(acc, bias_ptr, off_n + tl.arange(0, SUB_N), N, stride_bias, HAS_BIAS)
    if STORE_Z:
        z_desc.store([off_m, off_n], acc.to(z_desc.dtype))
    c_desc.store([off_m, off_n], _activation(acc, EPI_ACT).to(c_desc.dtype))


@triton.jit
def tma_gemm_kernel(
    # Descriptors: A (or A^T), B (or B^T), C, z; absent: None
    a_desc, b_desc, c_desc, z_desc,
    # Pointers: bias, row sums
    bias_ptr, rowsum_ptr,
    # Matrix dimensions: C (M x N) = A (M x K) @ B (K x N)
    M, N, K,
    stride_bias, stride_rowsum,
    # Coarse shape buckets: only the autotuner's key reads them
    M_BUCKET, N_BUCKET, K_BUCKET,
    # Specialisation flags (fused_gemm_kernel's without PRO_ACT; HAS_C must be true)
    ROWSUM: tl.constexpr, HAS_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, EPI_ACT: tl.constexpr, STORE_Z: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    # Layouts: whether a_desc, b_desc describe the transposed operand
    A_T: tl.constexpr, B_T: tl.constexpr,
    # Programs of the persistent grid
    NUM_SMS: tl.constexpr,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    tl.static_assert(HAS_C, "a launch without a product takes fused_gemm_kernel")
    tl.static_assert(EPILOGUE_SPLIT == 1 or EPILOGUE_SPLIT == 2, "EPILOGUE_SPLIT is 1 or 2")
    SUB_N: tl.constexpr = BLOCK_N // EPILOGUE_SPLIT
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)

    # -----------------------------------------------------------
    # Each program computes the tiles start, start + NUM_SMS, ... in grouped order.
    for tile_id in range(tl.program_id(axis=0), num_tiles, NUM_SMS):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N

        # Iterate over K.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = _load_block(a_desc, off_m, off_k, A_T)
            b = _load_block(b_desc, off_k, off_n, B_T)
            acc = _dot(a, b, acc, ACC_DTYPE, INPUT_PRECISION, UPCAST)

        # -------------------------------------------------------
        # Row sums: the first block column's programs read their A row block once more.
        if ROWSUM:
            if pid_n == 0:
                rowsum = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
                for ki in range(k_tiles):
                    a = _load_block(a_desc, off_m, ki * BLOCK_K, A_T)
                    rowsum += tl.sum(a.to(ACC_DTYPE), axis=1)
                _store_rowsum(rowsum_ptr, rowsum, off_m + tl.arange(0, BLOCK_M), M, stride_rowsum)

        # -------------------------------------------------------
        # Epilogue: bias, z and act per subtile.
        if EPILOGUE_SPLIT == 2:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, SUB_N)), (0, 2, 1))
            acc0, acc1 = tl.split(halves)
            _store_subtile(acc0, c_desc, z_desc, bias_ptr, off_m, off_n, N, stride_bias,
                           HAS_BIAS, EPI_ACT, STORE_Z, SUB_N)
            _store_subtile(acc1, c_desc, z_desc, bias_ptr, off_m, off_n + SUB_N, N, stride_bias,
                           HAS_BIAS, EPI_ACT, STORE_Z, SUB_N)
        else:
            _store_subtile(acc, c_desc, z_desc, bias_ptr, off_m, off_n, N, stride_bias,
                           HAS_BIAS, EPI_ACT, STORE_Z, SUB_N)
