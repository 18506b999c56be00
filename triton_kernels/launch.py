"""The launches of the two GEMM kernels: the arguments of each, and a cache that turns
every launch after the first of its kind into a direct call of the compiled kernel.

Triton's own path costs ~100-300 us of host time per launch on an H100's host
(``Autotuner.run`` builds its key from every argument, ``JITFunction.run`` binds them
and computes each one's specialisation, then looks the binary up), against 3-9 us for
the compiled kernel's launcher alone, which is what Inductor's and vLLM's cached
launchers call. :class:`CachedKernel` does the same: the first launch of a kind goes
through the autotuner (which benchmarks the configurations once per key, as before)
and keeps the configuration it chose and the binary it ran; later launches of that
kind call the binary's launcher (``CompiledKernel.run``, the same call with the same
arguments as in ``JITFunction.run``, Triton 3.6 to 3.9) with no pre-hook, no binding
and no checks.

A kind of launch (the cache key) is everything that selects the configuration or the
binary: the device, the dtype of every input (Triton compiles a binary per pointer type,
and ``check=False`` launches come unchecked; the outputs are the caller's, allocated in
the first operand's), the constexpr flags (``ops.specialisation``) and, for
the descriptor kernel, which operands are transposed and the grid's size; the shape
buckets (the autotuner's key, with the flags and the dtype); and the class Triton
specialises each runtime argument on: a pointer is absent (a constexpr None) or
16-byte aligned or not; an integer is 1 (a constexpr), a multiple of 16 or not, 32- or
64-bit (:func:`int_classes`). Launches with equal keys get the same binary from Triton's
own path; the GPU test ``test_direct_launch_is_tritons_binary`` checks that they do,
bit for bit.

A split-K product (``ops.split_k``) is two launches: the pointer kernel into a workspace
(one ``torch.empty``), then ``split_k_reduce_kernel`` (``REDUCE``, cached the same way:
an autotuner of one configuration makes its first launch, so that the later ones are
direct too). The product's key also holds the slice length, on which its autotuner
tunes (the grid is tiles x slices).

Under the interpreter (``TRITON_INTERPRET=1``) there is no binary to call: the cache
still computes the key, chooses the configuration (the single interpreter one) and
packs the arguments, and the launch goes to the interpreter with exactly the packed
arguments, so the tests on the CPU run the direct path's arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch
import triton

from .configs import (
    INTERPRETER_META,
    INTERPRETER_NUM_SMS,
    INTERPRETER_REDUCE_META,
    INTERPRETER_TMA_META,
    POINTER_ONLY_FLAGS,
    SPLIT_K_MAX_M,
    block_shapes,
    launcher,
    reduce_launcher,
    selected_configs,
    selected_tma_configs,
    tma_launcher,
)
from .fused_gemm import INTERPRET, fused_gemm_kernel, split_k_reduce_kernel
from .tma_gemm import tma_gemm_kernel

try:  # host-side tensor descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

_I32_MAX = 2**31 - 1


def int_classes(ints) -> tuple:
    """The class Triton specialises each integer argument on: 4 for 1 (passed as a
    constexpr), else 1 if a multiple of 16, plus 2 if it needs 64 bits."""
    return tuple([(v == 1) * 4 + (v % 16 == 0 and v != 1) + 2 * (v > _I32_MAX) for v in ints])


# classify()'s answers by the integer arguments' values: a model repeats a few shapes and
# strides, and the classes of the pointer kernel's 26 integers cost ~4 us of Python a
# launch (2-core CPU), the lookup ~0.3 us. Cleared when full: shapes that never repeat
# (a growing sequence) cost one classification each, as before.
_CLASSIFIED: dict = {}
_CLASSIFIED_MAX = 4096


def classify(ints: tuple) -> tuple:
    """``(int_classes(ints), buckets)`` of a launch's integer arguments, which begin with
    ``m, n, k``: the buckets are theirs (:func:`bucket`, the autotuner's key)."""
    known = _CLASSIFIED.get(ints)
    if known is None:
        if len(_CLASSIFIED) >= _CLASSIFIED_MAX:
            _CLASSIFIED.clear()
        m, n, k = ints[:3]
        known = _CLASSIFIED[ints] = (int_classes(ints), (bucket(m), bucket(n), bucket(k)))
    return known


class Entry(NamedTuple):
    """One kind of launch: its configuration's meta-parameters, the constexpr arguments
    after the runtime ones (flags, then meta-parameters, in the kernel's order), the
    compile options (warps, stages), and the binary's launcher (None: interpreter)."""

    meta: dict
    tail: tuple
    options: dict
    kernel: object
    run: Optional[Callable]
    function: object
    packed_metadata: object


_direct = True


@contextlib.contextmanager
def direct_launches(enabled: bool) -> Iterator[None]:
    """Inside the block, cached launches call the binary directly (``True``, the
    default) or go through Triton's ``JITFunction.run`` with the cached configuration
    (``False``): benchmarks time the two, tests compare their binaries and bits."""
    global _direct
    previous, _direct = _direct, enabled
    try:
        yield
    finally:
        _direct = previous


class CachedKernel:
    """``fn`` launched through ``tuner`` (its ``triton.autotune`` wrapper) once per
    key, then directly; with ``meta`` (the interpreter): in those fixed meta-parameters,
    no compile options, ``tuner`` (if any) only telling its configurations.
    ``first_constexpr`` names ``fn``'s first constexpr parameter: the runtime arguments
    are those before it."""

    def __init__(self, fn, tuner=None, meta: Optional[dict] = None, *, first_constexpr: str):
        self.fn, self.tuner, self.meta = fn, tuner, meta
        self.constexpr_names = fn.arg_names[fn.arg_names.index(first_constexpr):]
        self.entries: dict = {}
        self._first_launch = threading.Lock()

    @property
    def configs(self) -> Optional[list]:
        """The autotuner's configurations (None without one)."""
        return None if self.tuner is None else self.tuner.configs

    @functools.cached_property
    def split_tile(self) -> Tuple[int, int]:
        """``(BLOCK_N, BLOCK_K)`` by which ``ops`` sizes a split-K launch of the pointer
        kernel: the widest tile of the configurations such a launch keeps (at most
        ``SPLIT_K_MAX_M`` rows: ``configs._fits``), so that if it under-fills the SMs any
        of them does, and the largest BLOCK_K, a multiple of every configuration's (powers
        of two), so that each slice ends on a block edge whichever runs."""
        metas = [self.meta] if self.meta is not None else [c.kwargs for c in self.configs]
        short = [m for m in metas if m["BLOCK_M"] <= SPLIT_K_MAX_M] or metas
        return max(m["BLOCK_N"] for m in short), max(m["BLOCK_K"] for m in metas)

    def __call__(self, key, grid: Callable[[dict], int], args, constexprs: dict) -> None:
        """Launch ``fn`` on ``grid(meta)`` programs with the runtime ``args`` (a tuple,
        or a callable giving them for the meta-parameters, None before the autotuner
        has chosen) and the constexpr arguments ``constexprs``."""
        entry = self.entries.get(key)
        if entry is None:
            # One first launch at a time: the autotuner is shared and tells its choice only
            # after the call (best_config, set before it compiles), so two first launches
            # at once (the autograd engine's device thread beside another) could pair one
            # configuration with the other's binary.
            with self._first_launch:
                entry = self.entries.get(key)
                if entry is None:
                    self.entries[key] = self._first(grid, args, constexprs)
                    return
        meta = entry.meta
        if callable(args):
            args = args(meta)
        if entry.run is None or not _direct:
            self.fn[(grid(meta),)](*args, *entry.tail, **entry.options)
            return
        stream = _current_stream()
        full = (*args, *entry.tail)
        grid0 = grid(meta)
        knobs = triton.knobs.runtime
        enter, leave = knobs.launch_enter_hook, knobs.launch_exit_hook
        if _hooked(enter) or _hooked(leave):  # a profiler's hooks get what JITFunction.run gives them
            metadata = entry.kernel.launch_metadata((grid0, 1, 1), stream, *full)
        else:  # none: the launcher calls nothing (Triton 3.6 would build the metadata and call two empty chains)
            metadata = enter = leave = None
        entry.run(grid0, 1, 1, stream, entry.function, entry.packed_metadata, metadata, enter, leave, *full)

    def _first(self, grid, args, constexprs: dict) -> Entry:
        """The first launch of a key, through the autotuner (or the fixed meta), and
        its :class:`Entry`."""
        if self.meta is not None:
            meta = self.meta
            tail = self._tail(constexprs, meta)
            self.fn[(grid(meta),)](*(args(meta) if callable(args) else args), *tail)
            return Entry(meta, tail, {}, None, None, None, None)
        kernel = self.tuner[lambda bound: (grid(bound),)](*(args(None) if callable(args) else args), **constexprs)
        if hasattr(kernel, "result"):  # Triton 3.6's asynchronous compilation hands a future
            kernel = kernel.result()
        config = self.tuner.best_config
        meta = dict(config.kwargs)
        options = {k: v for k, v in config.all_kwargs().items() if k not in meta}
        run = kernel.run  # loads the binary (Triton does so lazily) before .function is read
        return Entry(meta, self._tail(constexprs, meta), options, kernel, run, kernel.function, kernel.packed_metadata)

    def _tail(self, constexprs: dict, meta: dict) -> tuple:
        return tuple(constexprs[n] if n in constexprs else meta[n] for n in self.constexpr_names)


def _hooked(hook) -> bool:
    """Whether a launch hook would do anything: a non-empty ``HookChain`` (Triton >= 3.5)
    or a function (older: None when unset)."""
    return bool(getattr(hook, "calls", hook))


@functools.lru_cache(maxsize=None)
def _stream_getter():
    from triton.runtime import driver

    active = driver.active
    get_device, get_stream = active.get_current_device, active.get_current_stream
    return lambda: get_stream(get_device())


def _current_stream():
    """The current device's current stream, as ``JITFunction.run`` asks for it."""
    return _stream_getter()()


if INTERPRET:
    POINTER = CachedKernel(fused_gemm_kernel, meta=INTERPRETER_META, first_constexpr="PRO_ACT")
    TMA = CachedKernel(tma_gemm_kernel, meta=INTERPRETER_TMA_META, first_constexpr="ROWSUM")
    REDUCE = CachedKernel(split_k_reduce_kernel, meta=INTERPRETER_REDUCE_META, first_constexpr="HAS_BIAS")
else:
    POINTER = CachedKernel(fused_gemm_kernel, launcher(selected_configs()), first_constexpr="PRO_ACT")
    REDUCE = CachedKernel(split_k_reduce_kernel, reduce_launcher(), first_constexpr="HAS_BIAS")
    _tma_configs = selected_tma_configs()
    TMA = CachedKernel(tma_gemm_kernel, tma_launcher(_tma_configs), first_constexpr="ROWSUM") if _tma_configs else None


def pointer_kernel(configs: list) -> CachedKernel:
    """The pointer kernel autotuned over ``configs``; under the interpreter, in the
    first one's tiles (tests and benchmarks that run chosen configurations)."""
    return CachedKernel(fused_gemm_kernel, launcher(configs), dict(configs[0].kwargs) if INTERPRET else None,
                        first_constexpr="PRO_ACT")


def tma_kernel(configs: list) -> CachedKernel:
    """The descriptor kernel autotuned over ``configs`` (as :func:`pointer_kernel`)."""
    return CachedKernel(tma_gemm_kernel, tma_launcher(configs), dict(configs[0].kwargs) if INTERPRET else None,
                        first_constexpr="ROWSUM")


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (at least 1): ``triton.next_power_of_2``, in
    integer arithmetic (that one is a Triton function object, ~10x slower to call, and
    each launch calls this three times)."""
    return 1 << (max(n, 1) - 1).bit_length()


_NO_STRIDES = (0, 0)


def run_pointer_kernel(a, b, c, saved, bias, z, sums, flags, flags_key, mlp, k_split=0) -> None:
    """One launch of ``fused_gemm_kernel`` (``b`` and ``c`` None: row sums only);
    ``saved`` is the prologue's ``S`` (``act'``'s tensor, or the gate of ``h``), ``mlp``
    the ``ops.MLPOperands``, ``flags`` the constexpr flags and ``flags_key`` their items
    (``ops.specialisation``). With ``k_split`` (``SPLIT_K``), ``c`` is the ``(S, m, n)``
    workspace of the partial products, a slice of ``k_split`` elements of K each. The
    arguments are checked by the caller."""
    m, k = a.shape
    n = 0 if b is None else b.shape[1]
    b2, bias2, e, e2, colsum = mlp
    ptrs = (a, b, c, saved, bias, z, sums, *mlp)
    ints = (
        m, n, k,
        *a.stride(), *(_NO_STRIDES if b is None else b.stride()), *(_NO_STRIDES if c is None else c.stride()[-2:]),
        *(_NO_STRIDES if saved is None else saved.stride()), 0 if bias is None else bias.stride(0),
        0 if sums is None else sums.stride(0),
        *(_NO_STRIDES if e is None else e.stride()), *(_NO_STRIDES if e2 is None else e2.stride()),
        0 if colsum is None else colsum.stride(0), k_split, c.stride(0) if k_split else 0,
    )
    classes, buckets = classify(ints)
    dtypes = (  # every input's, written out: 0.3-0.5 us a launch (2-core CPU), twice that as a loop
        a.dtype, None if b is None else b.dtype, None if saved is None else saved.dtype,
        None if bias is None else bias.dtype, None if b2 is None else b2.dtype, None if bias2 is None else bias2.dtype,
        None if e is None else e.dtype, None if e2 is None else e2.dtype,
    )
    key = (
        a.device.index, dtypes, flags_key, (buckets, k_split),
        tuple([None if p is None else p.data_ptr() % 16 == 0 for p in ptrs]), classes,
    )
    programs = (2 if flags["DUAL"] else 1) * (-(-k // k_split) if k_split else 1)  # per tile

    def grid(meta):  # -(-x // y): the ceiling, in integers (triton.cdiv is a JIT function, ~10 us a call)
        return -(-m // meta["BLOCK_M"]) * (programs * -(-n // meta["BLOCK_N"]) if b is not None else 1)

    POINTER(key, grid, (*ptrs, *ints, *buckets), flags)


_NO_MLP = (None,) * 5


def _workspace(shape, dtype, device) -> torch.Tensor:
    """The split-K partial products' allocation (the tests poison it to catch unwritten
    partials)."""
    return torch.empty(shape, dtype=dtype, device=device)


def run_split_k(a, b, c, bias, z, flags, flags_key, reduce_flags, reduce_key, k_split) -> None:
    """A split-K product (``ops.split_k``) in two launches: ``fused_gemm_kernel`` with
    ``SPLIT_K`` (``flags``) stores each slice's partial product into a workspace, then
    ``split_k_reduce_kernel`` (``reduce_flags``: the bias, activation and ``z`` of the
    caller's launch) sums them into ``c`` (and ``z``)."""
    m, k = a.shape
    n = b.shape[1]
    splits = -(-k // k_split)
    workspace = _workspace((splits, m, n), torch.float64 if a.dtype == torch.float64 else torch.float32, a.device)
    run_pointer_kernel(a, b, workspace, None, None, None, None, flags, flags_key, _NO_MLP, k_split)
    ptrs = (workspace, c, bias, z)
    ints = (m, n, splits, *workspace.stride(), *c.stride(), 0 if bias is None else bias.stride(0))
    classes, _ = classify(ints)
    key = (
        a.device.index, (a.dtype, None if bias is None else bias.dtype), reduce_key,
        tuple([None if p is None else p.data_ptr() % 16 == 0 for p in ptrs]), classes,
    )

    def grid(meta):
        return -(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"])

    REDUCE(key, grid, (*ptrs, *ints), reduce_flags)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Programs of the persistent grid: one per SM."""
    if device.type != "cuda":
        return INTERPRETER_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


if TensorDescriptor is not None:
    # What a descriptor holds besides its tensor, shape, strides and block shape (padding,
    # and Triton 3.9's TF32 rounding), at the dataclass's defaults.
    _DESCRIPTOR_DEFAULTS = {
        f.name: f.default for f in dataclasses.fields(TensorDescriptor) if f.default is not dataclasses.MISSING
    }


def describe(t, block_shape, transposed: bool = False) -> "TensorDescriptor":
    """A ``TensorDescriptor`` of ``t`` (rows contiguous), or with ``transposed`` of
    ``t.t()`` (columns contiguous; no view is made: ~2 us each), without the
    constructor's checks, which ``ops._descriptor_layout`` made once per operand (base
    aligned to 16 bytes, the other stride a multiple of 16 bytes) and which cost ~10 us a
    descriptor."""
    shape, strides = list(t.shape), list(t.stride())
    if transposed:
        shape.reverse()
        strides.reverse()
    d = object.__new__(TensorDescriptor)
    d.__dict__.update(_DESCRIPTOR_DEFAULTS, base=t, shape=shape, strides=strides, block_shape=block_shape)
    return d


def run_tma_kernel(plan, c, bias, z, sums, flags_key) -> None:
    """One launch of ``tma_gemm_kernel`` with A and B as ``ops._descriptor_plan`` gave
    them: ``((a, A_T), (b, B_T))``, each described through its transpose where flagged."""
    (a, a_t), (b, b_t) = plan
    m, n = c.shape
    k = a.shape[1]
    sms = num_sms(c.device)
    ints = (m, n, k, 0 if bias is None else bias.stride(0), 0 if sums is None else sums.stride(0))
    classes, buckets = classify(ints)
    key = (
        c.device.index, (a.dtype, b.dtype, None if bias is None else bias.dtype), flags_key, a_t, b_t, sms, buckets,
        z is None,
        None if bias is None else bias.data_ptr() % 16 == 0, None if sums is None else sums.data_ptr() % 16 == 0,
        classes,
    )

    def args(meta):
        # Before a configuration is chosen, [1, 1]: its pre-hook sets them (configs._set_block_shapes).
        a_block, b_block, c_block = ([1, 1],) * 3 if meta is None else block_shapes(meta, a_t, b_t)
        return (
            describe(a, a_block, a_t), describe(b, b_block, b_t), describe(c, c_block),
            None if z is None else describe(z, list(c_block)), bias, sums, *ints, *buckets,
        )

    def grid(meta):
        return min(sms, -(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"]))

    TMA(key, grid, args, _tma_flags(flags_key, a_t, b_t, sms))


@functools.lru_cache(maxsize=None)
def _tma_flags(flags_key: tuple, a_t: bool, b_t: bool, sms: int) -> dict:
    """The descriptor kernel's constexpr flags: the pointer kernel's (``flags_key``, its
    items) without ``POINTER_ONLY_FLAGS`` (all off: ``ops.gemm_kernel_for``), the layouts
    and the grid."""
    return dict([(name, v) for name, v in flags_key if name not in POINTER_ONLY_FLAGS], A_T=a_t, B_T=b_t, NUM_SMS=sms)
