"""The GEMM kernels' entry point: :func:`fused_matmul` checks its arguments, allocates
the outputs, chooses the kernel and hands the launch to :mod:`.launch`.

No autograd here: :mod:`torch_matgrad.triton_backend` builds the op's forward and
backward from :func:`fused_matmul`, with ``check=False``: the op checked its arguments
once, and a launch adds no checks of its own.

Two kernels compute the same products and fusions: the pointer kernel
(``fused_gemm.py``, any GPU, any strides) and the descriptor kernel (``tma_gemm.py``:
TMA tensor descriptors and a persistent grid, Hopper and later, fp16/bf16 operands that
meet the descriptor rules). :func:`gemm_kernel_for` is the one place that chooses;
:func:`gemm_kernel` (or ``$TORCH_MATGRAD_GEMM_KERNEL``) overrides the choice where the
descriptor kernel is valid, for benchmarks and tests. The launches with the ``act'``
prologue (``grad_activation``) and the MLP block's (:func:`fused_matmul`'s ``b2``,
``hidden``, ``grad_hidden``, ``colsum``: ``MLP_FLAGS``) are the pointer kernel's alone
(``POINTER_ONLY_FLAGS``). The autotune configurations are :mod:`.configs`' (their names
are re-exported here: ``CONFIG_NAMES``, ``TMA_CONFIG_NAMES``).

Decoding rows (at most ``SPLIT_K_MAX_M``) of a plain product on the pointer kernel (the
forward with its bias, activation and ``z``, or a product without prologue) split K
where their grid leaves SMs idle (:func:`_split_rule`): the pointer kernel's ``SPLIT_K``
and a sum (``fused_gemm.py`` says why two launches). :func:`split_k` (or
``$TORCH_MATGRAD_SPLIT_K``) forces it off or into a given number of slices.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from typing import Iterator, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..formulas import activate
from . import launch
from .configs import (  # noqa: F401 -- the configuration names, public here since before the split
    CONFIG_NAMES,
    CONFIGS,
    CONFIGS_ENV_VAR,
    MLP_FLAGS,
    POINTER_ONLY_FLAGS,
    SMALL_M,
    SPLIT_K_MAX_M,
    TMA_CONFIG_NAMES,
    TMA_CONFIGS,
    _shared_memory_limit,
    config_name,
    selected_configs,
    selected_tma_configs,
    tma_config_fits,
)
from .fused_gemm import ACT_CODES, INTERPRET
from .launch import TensorDescriptor

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


# A module global, as use_backend's and gz_strategy's: on CUDA the autograd engine runs a
# backward on its device thread, which a context variable set around loss.backward()
# would not reach (the backward's launches would take "auto").
_kernel_mode = _kernel_mode_from_env()


@contextlib.contextmanager
def gemm_kernel(name: str) -> Iterator[None]:
    """Inside the block, launch the GEMMs with the kernel ``name`` (one of
    ``GEMM_KERNELS``) wherever it is valid: benchmarks time the two kernels against each
    other, tests run the descriptor kernel under the interpreter. Wins over
    ``$TORCH_MATGRAD_GEMM_KERNEL``. Process-wide, as :func:`torch_matgrad.use_backend`:
    it reaches the backward on CUDA's autograd thread; enter it in one thread, around the
    work, not in threads whose blocks overlap (each restores what it found)."""
    global _kernel_mode
    if name not in GEMM_KERNELS:
        raise ValueError(f"gemm_kernel: unknown kernel {name!r}; choose one of {', '.join(GEMM_KERNELS)}")
    previous, _kernel_mode = _kernel_mode, name
    try:
        yield
    finally:
        _kernel_mode = previous


#: ``$TORCH_MATGRAD_SPLIT_K``, read once on import: the default of :func:`split_k`.
SPLIT_K_ENV_VAR = "TORCH_MATGRAD_SPLIT_K"
#: Programs per SM that an automatic split aims at: two streams of W per SM, in one wave
#: (a 16 x 64 x 128 tile in 4 stages takes 60 KiB of shared memory on sm_90: three fit).
SPLIT_K_PROGRAMS_PER_SM = 2
#: The fewest ``BLOCK_K`` granules (:attr:`launch.CachedKernel.split_tile`) in each slice
#: of an automatic split: a slice of one or two blocks would be all pipeline prologue.
SPLIT_K_MIN_SLICE = 2


def _split_mode(value) -> object:
    """``"auto"``, ``"off"`` or a number of slices (at least 2), checked."""
    if value in ("auto", "off"):
        return value
    try:
        splits = int(value)
    except (TypeError, ValueError):
        splits = 0
    if splits < 2:
        raise ValueError(f"split-K: {value!r}: choose auto, off or a number of slices >= 2")
    return splits


# A module global, as _kernel_mode (the backward's launches run on CUDA's autograd thread).
_split_k_mode = _split_mode(os.environ.get(SPLIT_K_ENV_VAR, "").strip() or "auto")


@contextlib.contextmanager
def split_k(mode) -> Iterator[None]:
    """Inside the block, the plain products of at most ``SPLIT_K_MAX_M`` rows on the
    pointer kernel split K as ``mode`` says: ``"auto"`` (the default, or
    ``$TORCH_MATGRAD_SPLIT_K``): where :func:`_split_rule` finds the SMs under-filled;
    ``"off"``: never; an integer ``S >= 2``: into ``S`` slices (whole granules, so
    fewer where K is short; none where K is one granule or less) whatever the SMs (tests,
    and benchmarks sweeping ``S``). Wins over the variable. Process-wide, as
    :func:`gemm_kernel`."""
    global _split_k_mode
    previous, _split_k_mode = _split_k_mode, _split_mode(mode)
    try:
        yield
    finally:
        _split_k_mode = previous


@functools.lru_cache(maxsize=4096)
def _split_rule(n: int, k: int, sms: int, block_n: int, granule: int, mode) -> int:
    """The slice of K (elements, a multiple of ``granule``; 0: no split) for a product of
    ``n`` columns over ``k`` on ``sms`` SMs, in tiles ``block_n`` wide.

    Decoding rows are bound by reading B once, and a grid of ``cdiv(n, block_n)``
    programs (one block row) under the SM count leaves bandwidth unused. ``"auto"``
    splits only then, into ``S`` slices filling one wave of
    ``SPLIT_K_PROGRAMS_PER_SM`` programs per SM (``S = PROGRAMS_PER_SM * sms // tiles``),
    at most as many as K holds slices of ``SPLIT_K_MIN_SLICE`` granules; the slice is
    rounded up to a granule, which may leave fewer slices. Memoised: a model repeats a
    few shapes."""
    if mode == "off":
        return 0
    if mode == "auto":
        tiles = -(-n // block_n)
        if tiles >= sms:
            return 0
        splits = min(SPLIT_K_PROGRAMS_PER_SM * sms // tiles, k // (SPLIT_K_MIN_SLICE * granule))
    else:
        splits = mode
    if splits < 2:
        return 0
    k_split = -(-k // splits)  # ceilings, in integers (launch.bucket says why)
    k_split = -(-k_split // granule) * granule
    return k_split if k_split < k else 0


@functools.lru_cache(maxsize=None)
def _splittable(flags_key: tuple) -> bool:
    """Whether a launch with these flags (as items) may split K: a product with at
    most the forward's bias, activation and ``z`` (no ``act'`` prologue, row or column
    sums, or MLP flags), where the sum of the slices can take the epilogue."""
    flags = dict(flags_key)
    return flags["HAS_C"] and not flags["ROWSUM"] and not _pointer_only(flags_key)


@functools.lru_cache(maxsize=None)
def _split_flags(flags_key: tuple) -> Tuple[dict, tuple, dict, tuple]:
    """A split launch's two sets of flags, with their items: the pointer kernel's
    (``SPLIT_K``, the plain product) and the sum's (the epilogue's)."""
    flags = dict(flags_key)
    product = dict(flags, SPLIT_K=True, HAS_BIAS=False, EPI_ACT=0, STORE_Z=False)
    epilogue = {name: flags[name] for name in ("HAS_BIAS", "EPI_ACT", "STORE_Z")}
    return product, _FlagsKey(product.items()), epilogue, _FlagsKey(epilogue.items())


def _descriptor_layout(t: Tensor) -> Optional[bool]:
    """How a tensor descriptor describes the 2-D ``t``: ``False``, as it is; ``True``,
    through its transpose ``t.t()``; None: neither can be. The rules (TMA's): a 16-byte
    aligned base address, the last dimension contiguous, the other stride a multiple of
    16 bytes (a bf16 row of 4095 elements is not), rows that do not overlap, and the
    hardware's limits (strides below 2^40 bytes; dimensions below 2^31 elements, as block
    coordinates are signed 32-bit)."""
    if t.data_ptr() % 16:
        return None
    return _layout_rule(t.shape, t.stride(), t.element_size())


@functools.lru_cache(maxsize=4096)
def _layout_rule(shape, strides, elem: int) -> Optional[bool]:
    # Memoised: a model describes a few shapes, and the rule costs ~1.5 us of Python a
    # tensor (2-core CPU), up to four tensors a launch.
    (m, n), (s0, s1) = shape, strides
    for transposed, (rows, cols, row_stride, col_stride) in ((False, (m, n, s0, s1)), (True, (n, m, s1, s0))):
        if (
            col_stride == 1 and row_stride >= cols and (row_stride * elem) % 16 == 0
            and row_stride * elem < 2**40 and max(rows, cols) < 2**31
        ):
            return transposed
    return None


# _tma_hardware's answers per CUDA device index: torch.cuda.get_device_capability costs
# a few microseconds of Python, and the rule runs on every launch.
_TMA_GPUS: dict = {}


def _tma_hardware(device: torch.device) -> bool:
    """Whether ``device`` runs the descriptor kernel: an NVIDIA GPU of compute capability
    9.0 or later (Hopper's TMA; not ROCm, whose capabilities mean something else), or the
    interpreter on CPU tensors when the kernel is asked for by name."""
    if device.type == "cuda":
        has = _TMA_GPUS.get(device.index)
        if has is None:
            has = _TMA_GPUS[device.index] = (
                torch.version.hip is None and torch.cuda.get_device_capability(device) >= (9, 0)
            )
        return has
    return INTERPRET and device.type == "cpu" and _kernel_mode == "tma"


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
    meets the descriptor rules (:func:`_descriptor_layout`) and every output does so with
    its rows contiguous (the kernel stores them as they are); on a GPU, a single named
    configuration fits its shared memory (:func:`tma_config_fits`); and, under
    ``"auto"``, more than ``SMALL_M`` rows: decoding shapes keep the pointer kernel's
    16- and 32-row tiles. ``benchmarks/kernel_choice.py`` times the two on a GPU; where
    the pointer kernel wins a shape class, the rule is the place to say so.
    """
    return "pointer" if _descriptor_plan(a, b, saved, outputs, None if flags is None else tuple(flags.items())) is None else "tma"


def _descriptor_plan(a, b, saved, outputs, flags_key):
    """:func:`gemm_kernel_for`'s rule (the flags as their items), answered with what the
    descriptor launch needs: ``((a, A_T), (b, B_T))``, each operand with whether its
    descriptor describes its transpose (:func:`_descriptor_layout`), or None for the
    pointer kernel."""
    if saved is not None or (flags_key is not None and _pointer_only(flags_key)):
        return None
    mode = _kernel_mode
    if mode == "pointer" or not TMA_AVAILABLE or launch.TMA is None:
        return None
    if a.dtype not in TMA_DTYPES or b is None or b.shape[1] == 0 or not _tma_hardware(a.device):
        return None
    if mode == "auto" and a.shape[0] <= SMALL_M:
        return None
    a_t, b_t = _descriptor_layout(a), _descriptor_layout(b)
    if a_t is None or b_t is None:
        return None
    for t in outputs:
        if t is not None and _descriptor_layout(t) is not False:
            return None
    configs = launch.TMA.configs  # None: one configuration, no autotuner
    if (
        configs is not None and len(configs) == 1 and a.device.type == "cuda"
        and not tma_config_fits(configs[0], elem=a.element_size(), limit=_shared_memory_limit(a.device))
    ):
        # The autotuner prunes only among several configurations: a single one named in
        # $TORCH_MATGRAD_TRITON_CONFIGS that does not fit this GPU is not run. (Only a
        # CUDA device has a shared-memory limit to ask for; the interpreter has none.)
        return None
    return (a, a_t), (b, b_t)


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
    check: bool = True,
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

    ``check=False`` skips the checks of dtypes, devices, shapes and keyword combinations:
    for callers that checked them once for the whole op (:mod:`torch_matgrad.triton_backend`).
    """
    m, k = a.shape
    n = 0 if b is None else b.shape[1]
    dtype, device = a.dtype, a.device
    u, g = (None, None) if grad_hidden is None else grad_hidden
    if check:
        _check_arguments(a, b, saved, grad_activation, rowsum, bias, activation, store_z, b2, bias2, hidden, gate,
                         grad_hidden, colsum)
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
    flags, flags_key = _flags(
        dtype, input_precision(dtype), grad_activation, rowsum, has_c, bias is not None, activation, z is not None,
        dual and has_c, hidden, epi_grad, (gate if hidden else g) is not None, colsum and has_c,
        mlp_activation if hidden or epi_grad else None,
    )
    mlp = _NO_MLP if b2 is None and not epi_grad and not colsum else MLPOperands(
        b2=b2, bias2=bias2, e=u if epi_grad else None, e2=g if epi_grad else None, colsum=sums if colsum else None
    )
    rowsums = sums if rowsum else None
    plan = _descriptor_plan(a, b if has_c else None, saved, (c_view, z_view) if has_c else (), flags_key)
    k_split = 0
    if plan is None and m <= SPLIT_K_MAX_M and _splittable(flags_key):
        k_split = _split_rule(n, k, launch.num_sms(device), *launch.POINTER.split_tile, _split_k_mode)
    launch_args = (plan, a, b if has_c else None, c_view if has_c else None, gate if hidden else saved, bias, z_view,
                   rowsums, flags, flags_key, mlp, n, k_split)
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):  # Triton launches on the current device (cuda:1 from cuda:0)
            _launch(*launch_args)
    else:
        _launch(*launch_args)
    return c, z, sums


def _launch(plan, a, b, c, saved, bias, z, sums, flags, flags_key, mlp, n, k_split) -> None:
    """The launch (or two) of one :func:`fused_matmul`: the descriptor kernel where
    ``plan`` says so, else the pointer kernel, split along K where ``k_split`` is set
    (:func:`_split_rule`)."""
    if plan is not None:
        launch.run_tma_kernel(plan, c, bias, z, sums, flags_key)
    elif k_split:
        launch.run_split_k(a, b, c, bias, z, *_split_flags(flags_key), k_split)
    elif mlp.b2 is not None and flags["DUAL"] and not _same_strides((b, mlp.b2), (bias, mlp.bias2)):
        # The kernel reads B2 and bias2 through B's and bias's strides: one launch a half.
        one = dict(flags, DUAL=False)
        one_key = _FlagsKey(one.items())
        launch.run_pointer_kernel(a, b, c[:, :n], None, bias, None, None, one, one_key, _NO_MLP)
        launch.run_pointer_kernel(a, mlp.b2, c[:, n:], None, mlp.bias2, None, None, one, one_key, _NO_MLP)
    else:
        launch.run_pointer_kernel(a, b, c, saved, bias, z, sums, flags, flags_key, mlp)


_NO_MLP = MLPOperands()


def _same_strides(*pairs) -> bool:
    return all(x is None or y is None or x.stride() == y.stride() for x, y in pairs)


def _check_arguments(a, b, saved, grad_activation, rowsum, bias, activation, store_z, b2, bias2, hidden, gate,
                     grad_hidden, colsum) -> None:
    """:func:`fused_matmul`'s checks: one dtype and device, shapes that chain, and the
    keyword combinations the kernel has."""
    k, n = a.shape[1], 0 if b is None else b.shape[1]
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
    split_k: bool = False,
) -> dict:
    """The kernel's constexpr flags for one kind of launch (the compile test builds
    every specialisation the backend launches from this). ``dual``, ``hidden``,
    ``grad_hidden`` (plain, or ``gated``), ``colsum`` and ``mlp_activation`` are the MLP
    block's (:func:`fused_matmul`'s ``b2``, ``hidden``/``gate``, ``grad_hidden``,
    ``colsum``, ``mlp_activation``); ``split_k`` the partial products of a split launch
    (:func:`split_k`; a plain product, no epilogue)."""
    return dict(_flags(dtype, input_precision(dtype), grad_activation, rowsum, has_c, has_bias, activation, store_z,
                       dual, hidden, grad_hidden, gated, colsum, mlp_activation, split_k)[0])


@functools.lru_cache(maxsize=None)
def _pointer_only(flags_key: tuple) -> bool:
    """Whether flags (as their items) set any of ``POINTER_ONLY_FLAGS``."""
    return any(v for name, v in flags_key if name in POINTER_ONLY_FLAGS)


class _FlagsKey(tuple):
    """A launch's flags as their items (equal to, and hashed as, the plain tuple), the
    hash computed once: a launch hashes them two or three times (the launch cache's key,
    :func:`_pointer_only`, ``launch._tma_flags``), ~0.45 us each on a 2-core CPU, Triton's
    dtypes hashing in Python."""

    def __new__(cls, items):
        key = super().__new__(cls, items)
        key._hash = tuple.__hash__(key)
        return key

    def __hash__(self) -> int:
        return self._hash


@functools.lru_cache(maxsize=None)
def _flags(dtype, precision, grad_activation, rowsum, has_c, has_bias, activation, store_z, dual, hidden, grad_hidden,
           gated, colsum, mlp_activation, split_k=False) -> Tuple[dict, tuple]:
    """:func:`specialisation`'s flags (``precision``: :func:`input_precision`'s answer)
    and their items (:class:`_FlagsKey`), the launch cache's key: built once per kind of
    launch (the dict is shared, never to be changed)."""
    kind = 2 if gated else 1
    flags = dict(
        PRO_ACT=ACT_CODES[grad_activation], ROWSUM=rowsum, HAS_C=has_c,
        HAS_BIAS=has_bias, EPI_ACT=ACT_CODES[activation], STORE_Z=store_z,
        ACC_DTYPE=_ACC_DTYPE.get(dtype, tl.float32), INPUT_PRECISION=precision,
        UPCAST=INTERPRET and dtype == torch.bfloat16, SPLIT_K=split_k,
        DUAL=dual, HIDDEN=kind if hidden else 0, EPI_GRAD=kind if grad_hidden else 0, COLSUM=colsum,
        MLP_ACT=ACT_CODES[mlp_activation],
    )
    return flags, _FlagsKey(flags.items())
