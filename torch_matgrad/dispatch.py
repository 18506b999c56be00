"""The one place that chooses which implementation computes the op.

Backends:

``"torch"``
    :mod:`torch_matgrad.formulas`, plain torch ops. Runs anywhere, is differentiable
    (double backward), and is the reference for every other backend.
``"triton"``
    :mod:`torch_matgrad.triton_backend`, fused Triton GEMM kernels. CUDA tensors; CPU
    tensors too when Triton's interpreter is on (``TRITON_INTERPRET=1`` set before
    torch_matgrad's kernels are imported: that is how CI runs them without a GPU).
    Anything else is an error when forced.
``"auto"`` (default)
    The backend measured fastest for the case, which today is ``"torch"`` everywhere
    (:data:`AUTO`): on an H100 (Triton 3.6, bf16) the Triton path took 0.98-1.07x
    eager's time for inference and 1.06-1.69x for a training step at the four quick
    shapes (``benchmarks/results/nvidia-h100-80gb-hbm3/quick.md``), and more at
    decoding shapes. At 4096^3 its three kernels took 0.67 ms of GPU time where
    cuBLAS's took 0.54, and each launch spent 130-320 us on the host against 20-50 for
    ``F.linear``. A shape class where the kernels win becomes a rule here. The linear
    cross-entropy has one of its own (:func:`cross_entropy_backend`): on CUDA its
    chunks' elementwise step is a Triton kernel, its products stay cuBLAS's (predicted
    ~1.04x eager's step time where torch ops took 1.9x; the GPU run is pending).
    Within the Triton backend, each product of the linear op runs on the fused kernel
    or on cuBLAS by card and shape class (:func:`cublas_products`, whose table is
    measured by ``benchmarks/product_choice.py``).

Force a backend for a block of code with :func:`use_backend`, or for a whole process
with the environment variable ``TORCH_MATGRAD_BACKEND`` (read once, when torch_matgrad
is imported; a bad value makes every op raise); the context manager wins. Both take
the names above in any case.

The choice is made once per op, when its forward runs (:func:`chosen_backend`), and
the op's backward runs the same implementation, wherever and whenever it is called
(as autocast's state is captured at forward time). Two cases hand a Triton op's
backward to ``"torch"``: a backward under ``create_graph`` (it must itself be
differentiable) and a gradient flowing straight into ``z`` (double backward); so do
gradients the kernels cannot read (tensor subclasses, the batched tensors of
``vmap`` over a backward) and a backward that ``torch.compile`` is tracing.

When asked for, ``"triton"`` still hands these forwards to ``"torch"`` (the list is
:func:`_triton_fallback`): tensor subclasses and functorch-wrapped tensors (DTensor,
the tensors of ``torch.func`` transforms), meta tensors, mixed dtypes, and code that
``torch.compile`` or ``torch.jit.trace`` is tracing. Set the logger ``torch_matgrad``
to DEBUG to see each fallback and why; :func:`recording` counts which implementation ran each half.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import re
from typing import Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.autograd.forward_ad as _fw_ad
from torch import Tensor

from . import formulas

ENV_VAR = "TORCH_MATGRAD_BACKEND"

#: What "auto" runs: the backend that measured fastest. No shape class has measured
#: faster on the Triton kernels than on cuBLAS (module docstring), so every case runs
#: torch ops; the kernels run when "triton" is asked for.
AUTO = "torch"
#: What may be requested.
BACKENDS = ("auto", "torch", "triton")

log = logging.getLogger("torch_matgrad")

_forced: Optional[str] = None
_ran: Optional[collections.Counter] = None


def _check_backend(name, source: str) -> str:
    """``name`` as one of ``BACKENDS`` (any case, surrounding spaces ignored), or a
    ValueError naming ``source``: where the name came from."""
    normal = name.strip().lower() if isinstance(name, str) else name
    if normal not in BACKENDS:
        raise ValueError(
            f"torch_matgrad: {source} names no backend; choose one of {', '.join(map(repr, BACKENDS))} (any case)"
        )
    return normal


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the backend of the ops whose forward runs inside a ``with`` block; their
    backward runs the same backend wherever it is called.

    >>> with torch_matgrad.use_backend("torch"):
    ...     y = torch_matgrad.linear(x, w)
    >>> y.sum().backward()  # the torch backend's backward
    """
    global _forced
    previous, _forced = _forced, _check_backend(name, f"use_backend({name!r})")
    try:
        yield
    finally:
        _forced = previous


def requested_backend() -> str:
    """The backend asked for: ``use_backend`` first, then ``$TORCH_MATGRAD_BACKEND``
    (unset or empty: ``"auto"``)."""
    return _forced or _env_backend or _bad_env()


def read_env() -> None:
    """Read ``$TORCH_MATGRAD_BACKEND`` again (torch_matgrad reads it once, on import:
    looking it up costs ~1 us, a sixth of ``F.linear`` on small inputs, per call)."""
    global _env_backend, _env_error
    raw = os.environ.get(ENV_VAR)
    try:
        _env_backend, _env_error = (_check_backend(raw, f"${ENV_VAR}={raw!r}") if raw and raw.strip() else "auto"), None
    except ValueError as e:
        _env_backend, _env_error = None, e


def _bad_env():
    raise ValueError(str(_env_error))


_env_backend: Optional[str] = None
_env_error: Optional[ValueError] = None
read_env()


@contextlib.contextmanager
def recording() -> Iterator[collections.Counter]:
    """Count, inside the block, which implementation ran each half of the op: the
    counter's keys are ``("forward" | "backward", "torch" | "triton")``; a product of the
    Triton backend that ran on cuBLAS (:func:`cublas_products`) adds ``("cublas",
    product)``.

    >>> with torch_matgrad.dispatch.recording() as ran:
    ...     torch_matgrad.linear(x, w).sum().backward()
    >>> ran  # Counter({('forward', 'torch'): 1, ('backward', 'torch'): 1})
    """
    global _ran
    previous, _ran = _ran, collections.Counter()
    try:
        yield _ran
    finally:
        if previous is not None:
            previous.update(_ran)
        _ran = previous


_triton_module = None
_triton_import_error: Optional[str] = None


def _triton():
    """:mod:`torch_matgrad.triton_backend`, or None when Triton does not import."""
    global _triton_module, _triton_import_error
    if _triton_module is None and _triton_import_error is None:
        try:
            from . import triton_backend
        except (ImportError, RuntimeError) as e:  # no triton wheel, or a broken install
            _triton_import_error = f"{type(e).__name__}: {e}"
        else:
            _triton_module = triton_backend
    return _triton_module


# functorch's wrappers, and the legacy batched tensors that autograd.grad(...,
# is_grads_batched=True) passes a backward (functorch does not count those as its own),
# looked up once: this runs for every operand of every Triton-backend op.
_FUNCTORCH_CHECKS = tuple(
    check for check in (getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None),
                        getattr(torch._C._functorch, "is_legacy_batchedtensor", None))
    if check is not None
)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _triton_fallback(tensors) -> Optional[str]:
    """Why the Triton backend, asked for, hands these tensors to torch ops instead (None:
    it does not)."""
    dtype = tensors[0].dtype
    for t in tensors:
        if type(t) not in _PLAIN_TENSORS:
            return f"tensor subclass {type(t).__name__}"
        if any(check(t) for check in _FUNCTORCH_CHECKS):
            return "functorch-wrapped tensor (vmap/grad transform)"
        if t.is_meta:
            return "meta tensor"
        if t.dtype != dtype:
            dtype = None
    if dtype not in _triton().SUPPORTED_DTYPES:
        return f"unsupported dtype combination {sorted({str(t.dtype) for t in tensors})}"
    return None


def chosen_backend(x: Tensor, *params: Optional[Tensor], auto: Optional[str] = None) -> str:
    """The implementation (``"torch"`` or ``"triton"``) of an op on the input ``x`` and
    its parameters (weights and biases, None for absent ones) whose forward starts now:
    the request (``"auto"`` meaning ``auto``, default :data:`AUTO`), then every fallback.
    The op records it, and its backward runs the same one (see the module docstring for
    the exceptions)."""
    requested = _forced or _env_backend or _bad_env()
    if requested == "auto":
        requested = auto or AUTO
    if requested == "torch":
        return "torch"
    if torch.compiler.is_compiling() or torch._C._is_tracing():
        # Inductor fuses the GEMM epilogue itself, and tracing an autotuned user kernel
        # (or importing it mid-trace) is not supported on every torch >= 2.4. No log
        # here: logging while tracing breaks the graph. torch.jit.trace (and the legacy
        # ONNX export) records aten ops only: a kernel launch would vanish from the trace.
        return "torch"
    backend = _triton()
    if backend is None:
        raise RuntimeError(
            f"torch_matgrad: backend 'triton' needs Triton, which failed to import ({_triton_import_error})"
        )
    reason = _triton_fallback([t for t in (x, *params) if t is not None])
    if reason is not None:
        return _fallback(reason)
    if not x.is_cuda and not backend.INTERPRET:
        raise RuntimeError(
            f"torch_matgrad: backend 'triton' runs {x.device.type} tensors only under Triton's interpreter: "
            "set TRITON_INTERPRET=1 before importing torch_matgrad (or use CUDA tensors)"
        )
    return "triton"


def _fallback(reason: str) -> str:
    log.debug("torch_matgrad: using torch ops instead of Triton: %s", reason)
    return "torch"


def _backward_backend(backend: str, grad_out: Optional[Tensor], grad_z: Optional[Tensor]) -> str:
    """The implementation of a backward whose forward ran on ``backend``."""
    if backend == "torch":
        return "torch"
    if grad_z is not None:
        return _fallback("a gradient flows directly into z (double backward)")
    if grad_out is None:  # nothing flows in: torch ops return the Nones
        return "torch"
    if torch.is_grad_enabled():  # create_graph: the backward itself is recorded
        return _fallback("backward under create_graph must be differentiable")
    if torch.compiler.is_compiling():  # compiled autograd traces the backward: no log
        return "torch"
    reason = _triton_fallback([grad_out])
    return "triton" if reason is None else _fallback(f"output gradient: {reason}")


def _implementation(backend: str):
    return formulas if backend == "torch" else _triton()


# ------------------------------------------- each product on the Triton kernel or cuBLAS

#: The products of the Triton backend's linear op: the forward with its epilogue,
#: ``grad_x = G_z W``, and ``grad_W = G_z^T x`` with ``grad_b``.
PRODUCTS = ("forward", "grad_x", "grad_w")
#: Shape classes of a linear op with ``m`` rows (tokens) and ``k`` in-features
#: (:func:`shape_class`): decoding rows, a narrow layer (the fused elementwise work is
#: the larger share of its step), the rest.
SHAPE_CLASSES = ("decode", "narrow", "wide")
DECODE_ROWS = 16
NARROW_IN_FEATURES = 2048

#: Which products of the Triton backend run on cuBLAS (torch's products, the elementwise
#: work still fused: the activation's ``G_z`` pass writes ``grad_b`` beside it), per card
#: (:func:`card`, the name of its ``benchmarks/results/`` folder) and shape class: the
#: classes where cuBLAS measured faster under CUDA-graph replay, from the table that
#: ``benchmarks/product_choice.py`` writes (``product_choice.md`` in the card's folder;
#: it prints this entry). A card or class not listed runs every product on the kernels.
#: No card has been measured yet.
CUBLAS_PRODUCTS: Dict[str, Dict[str, FrozenSet[str]]] = {}

_NONE: FrozenSet[str] = frozenset()
_forced_products: Optional[FrozenSet[str]] = None


def shape_class(m: int, k: int) -> str:
    """The shape class (``SHAPE_CLASSES``) of a linear op on ``m`` rows of ``k`` features."""
    if m <= DECODE_ROWS:
        return "decode"
    return "narrow" if k <= NARROW_IN_FEATURES else "wide"


def slug(name: str) -> str:
    """``name`` as the results' folders spell it: lower case, runs of other characters
    one ``-`` ("NVIDIA H100 80GB HBM3" -> ``"nvidia-h100-80gb-hbm3"``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def card(device: torch.device) -> str:
    """The :data:`CUBLAS_PRODUCTS` key of ``device``: its card's :func:`slug`, or the
    device type for a non-CUDA device (``"cpu"``: the interpreter's tensors)."""
    return slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else device.type


def cublas_products(device: torch.device, m: int, k: int) -> FrozenSet[str]:
    """The products (``PRODUCTS``) that the Triton backend runs on cuBLAS for a linear op
    on ``device`` with ``m`` rows and ``k`` in-features: :func:`products_on_cublas`'s set
    inside one, else :data:`CUBLAS_PRODUCTS`'s entry."""
    if _forced_products is not None:
        return _forced_products
    if not CUBLAS_PRODUCTS:  # nothing measured: no lookup on the host path
        return _NONE
    return CUBLAS_PRODUCTS.get(card(device), {}).get(shape_class(m, k), _NONE)


@contextlib.contextmanager
def products_on_cublas(products: Iterable[str]) -> Iterator[None]:
    """Run ``products`` (of ``PRODUCTS``) of the Triton backend's linear ops on cuBLAS,
    and the others on the kernels, at every shape, inside the block (the backward: where
    it is called): benchmarks time the choices against each other. ``()`` runs every
    product on the kernels."""
    global _forced_products
    chosen = frozenset(products)
    if not chosen <= set(PRODUCTS):
        raise ValueError(f"products_on_cublas: unknown products {sorted(chosen - set(PRODUCTS))}; "
                         f"choose among {', '.join(map(repr, PRODUCTS))}")
    previous, _forced_products = _forced_products, chosen
    try:
        yield
    finally:
        _forced_products = previous


def _on_cublas(device: torch.device, m: int, k: int, wanted: Tuple[str, ...]) -> FrozenSet[str]:
    """:func:`cublas_products`, counted where :func:`recording` for the ``wanted``
    products (those the launch computes)."""
    products = cublas_products(device, m, k)
    if _ran is not None:
        for product in wanted:
            if product in products:
                _ran["cublas", product] += 1
    return products


def forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str], backend: str
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(out, z)`` of ``out = act(x W^T + b)`` on ``backend`` (the answer of
    :func:`chosen_backend`); ``z`` only if needed. ``x`` may have leading dims."""
    if _ran is not None:
        _ran["forward", backend] += 1
    if backend == "torch":
        return formulas.forward(x, weight, bias, activation)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    on_cublas = _on_cublas(x.device, x2.shape[0], x2.shape[1], ("forward",))
    out, z = _triton().forward(x2, weight, bias, activation, on_cublas)
    if x.dim() == 2:
        return out, z
    shape = (*x.shape[:-1], weight.shape[0])
    return out.view(shape), None if z is None else z.view(shape)


def backward(
    grad_out: Optional[Tensor],
    grad_z: Optional[Tensor],
    x: Optional[Tensor],
    weight: Optional[Tensor],
    saved: Optional[Tensor],
    activation: Optional[str],
    needs: Tuple[bool, bool, bool],
    backend: str,
):
    """``(grad_x, grad_W, grad_b)`` of an op whose forward ran on ``backend``; see
    :func:`torch_matgrad.formulas.backward`."""
    backend = _backward_backend(backend, grad_out, grad_z)
    if _ran is not None and (grad_out is not None or grad_z is not None):
        _ran["backward", backend] += 1
    if backend == "torch":
        return formulas.backward(grad_out, grad_z, x, weight, saved, activation, needs)
    need_x, need_w, need_b = needs
    wanted = ("grad_x",) * need_x + ("grad_w",) * (need_w or need_b)
    k = next((t.shape[-1] for t in (weight, x) if t is not None), 0)  # in-features (0: only grad_b asked for)
    on_cublas = _on_cublas(grad_out.device, grad_out.shape[0], k, wanted)
    return _triton().backward(grad_out, None, x, weight, saved, activation, needs, on_cublas)


def mlp_forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation, backend: str):
    """``(out, u, g)`` of an MLP block on ``backend``; see :func:`formulas.mlp_forward`."""
    if _ran is not None:
        _ran["forward", backend] += 1
    return _implementation(backend).mlp_forward(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation)


def mlp_backward(grad_out, grad_u, grad_g, x, up_w, gate_w, down_w, u, g, activation, needs, backend: str):
    """The MLP block's gradients on the backend its forward ran (the same exceptions as
    :func:`backward`); see :func:`formulas.mlp_backward`."""
    direct = grad_u if grad_u is not None else grad_g
    backend = _backward_backend(backend, grad_out, direct)
    if _ran is not None and (grad_out is not None or direct is not None):
        _ran["backward", backend] += 1
    return _implementation(backend).mlp_backward(
        grad_out, grad_u, grad_g, x, up_w, gate_w, down_w, u, g, activation, needs
    )


#: How the Triton backend computes the linear cross-entropy (:func:`cross_entropy_strategy`).
CE_STRATEGIES = ("chunked", "gemm", "kernels")
_ce_strategy = "chunked"


@contextlib.contextmanager
def cross_entropy_strategy(name: str) -> Iterator[None]:
    """How the Triton backend runs the linear cross-entropy of the ops whose forward runs
    inside the block (a backward that recomputes chunks follows the forward's strategy):

    ``"chunked"`` (default)
        :func:`formulas.linear_cross_entropy`'s chunks with torch's products (cuBLAS on a
        GPU) and each chunk's losses and ``G_z`` in one fused kernel, written over the
        chunk's logits (``triton_backend.lce_chunk``; fp16, bf16, fp32): the gradients
        come in the forward, as on every other device.
    ``"gemm"``
        The same, with each product in the fused GEMM kernel
        (``triton_backend.forward`` / ``backward``).
    ``"kernels"``
        The cross-entropy kernels (``triton_kernels/cross_entropy.py``, CCE's way): the
        forward keeps each row's logsumexp, the backward recomputes the logits tile by
        tile; no ``(rows, V)`` chunk is ever written. For fp16, bf16 and fp32.

    Measured before the fused kernel, on an H200 (bf16; ``bench --lm-head``,
    ``benchmarks/results/nvidia-h200``): the kernels took 1.7x and 1.5x the step time of
    ``"gemm"`` with torch's elementwise ops at 4096 x 2048 x 32000 and 8192 x 4096 x
    128256, and the torch backend's chunks 0.89x and 0.64x of it; ``"chunked"`` is that
    torch path with its elementwise passes fused."""
    global _ce_strategy
    if name not in CE_STRATEGIES:
        raise ValueError(f"cross_entropy_strategy: unknown strategy {name!r}; choose one of {', '.join(CE_STRATEGIES)}")
    previous, _ce_strategy = _ce_strategy, name
    try:
        yield
    finally:
        _ce_strategy = previous


def current_cross_entropy_strategy() -> str:
    """The strategy in force (:func:`cross_entropy_strategy`): the op keeps its forward's."""
    return _ce_strategy


def cross_entropy_backend(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> str:
    """:func:`chosen_backend` for the linear cross-entropy, with one rule of its own:
    ``"auto"`` runs CUDA tensors of the fused kernel's dtypes (fp16, bf16, fp32) on the
    Triton backend when Triton imports, outside ``torch.compile`` and ``torch.func``
    transforms (forward-mode AD included), whose fallbacks still apply. Its default
    strategy, ``"chunked"``, is the torch backend's chunks and cuBLAS products with each
    chunk's elementwise step in one kernel: on an H200 (bf16, 8192 x 4096 x 128256) the
    torch backend took 77.5 ms a step against eager's 40.7, its products ~38 ms of it and
    the rest ~8 fp32 elementwise passes per chunk and ``grad_W``'s traffic, which the
    kernel and larger chunks remove (``docs/lm_head.md``)."""
    fused = (x.is_cuda and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
             and _fw_ad._current_level < 0 and _triton() is not None and x.dtype in _triton().CE_DTYPES)
    return chosen_backend(x, weight, bias, auto="triton" if fused else None)


def _chunk_hooks(x: Tensor, strategy: str):
    """``(linear, elementwise)`` of :func:`formulas.linear_cross_entropy` on the Triton
    backend: the fused GEMM for the products under ``"gemm"`` (else torch ops), the fused
    kernel for each chunk's losses and ``G_z`` in its dtypes (else torch ops)."""
    backend = _triton()
    return (backend if strategy == "gemm" else None), (backend.lce_chunk if x.dtype in backend.CE_DTYPES else None)


# Under torch.compile the torch ops' chunks, where nothing differentiates them, are one
# custom op: the compiler sees its inputs and outputs, and the chunks run as outside it,
# in their reused buffers (formulas.linear_cross_entropy). Traced, the chunks gave
# Inductor grad_W's in-place accumulation made functional (each chunk's addmm into a new
# grad_W while the last one lived) and fresh buffers for the ragged last chunk: 424 MiB at
# 4096 x 1024 x 32000 fp32 on a CPU, against the op's 173 outside compile.
@torch.library.custom_op("torch_matgrad::linear_cross_entropy_chunks", mutates_args=())
def _chunks_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, softcap: Optional[float], chunk_rows: Optional[int],
    row_weight: Optional[Tensor], needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    options = formulas.CrossEntropyOptions(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_rows)
    loss, *grads = formulas.linear_cross_entropy(x, weight, bias, target, options, row_weight, tuple(needs))
    return (loss, *(x.new_empty(0) if g is None else g for g in grads))  # empty: not computed


@_chunks_op.register_fake
def _(x, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_rows, row_weight,
      needs):
    shapes = (x.shape, weight.shape, weight.shape[:1])
    grads = (x.new_empty(shape if need and row_weight is not None else 0) for shape, need in zip(shapes, needs))
    return (x.new_empty(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32)), *grads)


def _chunks(x, weight, bias, target, options, row_weight, needs, linear=None, elementwise=None):
    """:func:`formulas.linear_cross_entropy`; on torch ops under ``torch.compile``, where
    nothing differentiates the chunks, through the custom op above."""
    if linear is None and elementwise is None and torch.compiler.is_compiling() and formulas.chunks_undifferentiated():
        loss, *grads = torch.ops.torch_matgrad.linear_cross_entropy_chunks(
            x, weight, bias, target, *options, row_weight, list(needs))
        computed = row_weight is not None
        return (loss, *(g if computed and need else None for g, need in zip(grads, needs)))
    return formulas.linear_cross_entropy(x, weight, bias, target, options, row_weight, needs, linear, elementwise)


def _kernel_options(options) -> dict:
    return dict(ignore_index=options.ignore_index, label_smoothing=options.label_smoothing, z_loss=options.z_loss,
                softcap=options.softcap)


def cross_entropy_forward(x, weight, bias, target, options, row_weight, needs, backend: str):
    """``(loss, grad_x, grad_W, grad_b, lse)`` of the linear cross-entropy on ``backend``:
    the chunked rows of :func:`formulas.linear_cross_entropy` (``lse`` None), on the
    Triton backend with :func:`_chunk_hooks`; or, on the Triton backend under
    ``cross_entropy_strategy("kernels")``, the kernels' per-row losses and logsumexps (no
    gradients: the backward computes them)."""
    if _ran is not None:
        _ran["forward", backend] += 1
    if backend == "torch":
        return (*_chunks(x, weight, bias, target, options, row_weight, needs), None)
    if _ce_strategy == "kernels" and x.dtype in _triton().CE_DTYPES:
        loss, lse = _triton().lce_forward(x, weight, bias, target, **_kernel_options(options))
        return loss, None, None, None, lse
    return (*_chunks(x, weight, bias, target, options, row_weight, needs, *_chunk_hooks(x, _ce_strategy)), None)


def cross_entropy_backward(grad_loss, stored, lse, x, weight, bias, target, options, needs, backend: str,
                           strategy: str):
    """The linear cross-entropy's gradients on the backend its forward ran (the same
    exceptions as :func:`backward`: under grad mode, torch ops), ``strategy`` the
    forward's: the kernels' backward where the forward kept ``lse``, else
    :func:`formulas.linear_cross_entropy_backward`."""
    backend = _backward_backend(backend, grad_loss, None)
    if _ran is not None and grad_loss is not None:
        _ran["backward", backend] += 1
    if backend == "torch":
        return formulas.linear_cross_entropy_backward(grad_loss, stored, x, weight, bias, target, options, needs,
                                                      _chunks)
    if lse is not None:
        row_weight = formulas.backward_row_weight(grad_loss, target, options, torch.float32)
        return _triton().lce_backward(row_weight, x, weight, bias, target, lse, needs=needs, **_kernel_options(options))
    hooks = _chunk_hooks(x, strategy)
    return formulas.linear_cross_entropy_backward(
        grad_loss, stored, x, weight, bias, target, options, needs, lambda *args: _chunks(*args, *hooks)
    )
