r"""The notes' full Jacobians (``docs/MATH.md`` items 1-8), made executable.

Nothing here is on the training path. The module is a verified reference for the
derivation (``docs/derivation.md``) and a third oracle for the backward: for any
``G = dL/dout``, ``vec(G)^T J`` from these Jacobians must equal what
:class:`torch_matgrad.LinearFunction` computes, and what autograd computes.

Conventions (MATH.md, "Conventions of the notes"):

* :func:`vec` is the **row-major** vectorisation ``W~`` (rows laid end to end);
  :func:`as_mat` is its inverse.
* A Jacobian ``dY/dW`` of matrices means ``dY~/dW~``, a ``(size Y) x (size W)`` matrix
  in numerator layout.
* ``(x)`` is the Kronecker product; for row-major vec,
  ``vec(A X B) = (A (x) B^T) vec(X)``, which is what :class:`Kron` uses so that a
  product with the Jacobian is a matrix product and never an ``(mb) x (mn)`` matrix.

The notes' Jacobians (samples in columns, ``Y = W X``):

==========================  ===================  ============================  =====
Jacobian                    function             structure                     item
==========================  ===================  ============================  =====
``dy/dW~``, ``y = W x``     :func:`dy_dW`        ``I_m (x) x^T``               5
``dY~/dW~``, ``Y = W X``    :func:`dY_dW`        ``I_m (x) X^T``               6
``d(Y^T)~/d(X^T)~``         :func:`dYT_dXT`      ``I_b (x) W``                 7
``dY~/dX~``                 :func:`dY_dX`        ``W (x) I_b``                 8
``dY_ij/dX_kl`` (4-D)       :func:`dY_dX_4d`     ``I_b (x) W`` reshaped        7, 8
==========================  ===================  ============================  =====

and PyTorch's row convention ``out = act(x W^T + b)``: :func:`linear_jacobians`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import formulas, function

#: :meth:`Kron.dense` refuses a Jacobian larger than this many bytes (and larger than the
#: memory free right now, where that is cheap to ask). 4 GiB is a float64 square matrix
#: of side 23170: far past any size worth printing, well short of exhausting a host.
DENSE_LIMIT_BYTES = 4 * 2**30

#: A Kronecker factor: a 2-D tensor, or an ``int`` ``k`` standing for the identity ``I_k``
#: (kept symbolic, so a product with it costs nothing).
Factor = Union[int, Tensor]


# --- vec, as_mat and the block embedding (conventions, item 4) --------------------------


def vec(a: Tensor) -> Tensor:
    """Row-major vectorisation ``a~`` of a matrix (any view: non-contiguous inputs are
    read in row-major order, never in memory order)."""
    return a.reshape(-1)


def as_mat(v: Tensor, shape: Sequence[int]) -> Tensor:
    """The inverse of :func:`vec`: the notes' ``(.)_as_mat``. A ``1 x mn`` row such as
    ``dz/dW~`` becomes the ``m x n`` matrix ``dz/dW`` that PyTorch stores in ``W.grad``."""
    shape = tuple(shape)
    if v.numel() != math.prod(shape):
        raise ValueError(f"torch_matgrad.jacobian.as_mat: {v.numel()} elements cannot form a {shape} matrix")
    return v.reshape(shape)


def embed_block(i: int, a: Union[Tensor, float], blocks: int) -> Tensor:
    """``e_i^T(A) = (0, ..., 0, A, 0, ..., 0)`` (item 4): a block row of ``blocks``
    blocks with ``A`` at position ``i`` (0-based; the notes count from 1) and zero blocks
    of ``A``'s shape elsewhere. A vector is taken as a row (``x^T``); a scalar ``A`` gives
    the unit row ``e_i^T``."""
    a = torch.as_tensor(a)
    if a.dim() > 2:
        raise ValueError(
            f"torch_matgrad.jacobian.embed_block: A must be a scalar, vector or matrix, got shape {tuple(a.shape)}"
        )
    a = a.reshape(1, 1) if a.dim() == 0 else (a.reshape(1, -1) if a.dim() == 1 else a)
    if not 0 <= i < blocks:
        raise IndexError(f"torch_matgrad.jacobian.embed_block: position {i} outside 0..{blocks - 1}")
    out = a.new_zeros(a.shape[0], blocks * a.shape[1])
    out[:, i * a.shape[1] : (i + 1) * a.shape[1]] = a
    return out


# --- items 1-3: the rules that combine Jacobians ----------------------------------------


def product_rule(u: Tensor, du: Tensor, b: Tensor, db: Tensor) -> Tensor:
    """Item 1: ``v(x) = b(x) u(x)`` with scalar ``b`` gives ``dv/dx = u (db/dx) + b (du/dx)``.

    ``u``: ``(m,)``; ``du``: ``(m, n)``; ``b``: scalar; ``db``: ``(n,)`` or ``(1, n)``."""
    return torch.outer(u, db.reshape(-1)) + b * du


def inner_product_rule(u: Tensor, du: Tensor, v: Tensor, dv: Tensor) -> Tensor:
    """Item 2: ``k(x) = u^T v`` gives ``dk/dx = v^T (du/dx) + u^T (dv/dx)``, an ``(n,)`` row.

    ``u, v``: ``(m,)``; ``du, dv``: ``(m, n)``."""
    return v @ du + u @ dv


def linear_map_rule(a: Tensor, du: Tensor) -> Tensor:
    """Item 3: ``v(x) = A u(x)`` with constant ``A`` gives ``dv/dx = A (du/dx)``. With
    ``A = dv/du`` of any map this is the chain rule (e.g. ``A = diag(act'(z))``)."""
    return a @ du


# --- structured Jacobians ---------------------------------------------------------------


def _factor_shape(f: Factor) -> Tuple[int, int]:
    if isinstance(f, int) and f >= 0:
        return (f, f)
    if isinstance(f, Tensor) and f.dim() == 2:
        return tuple(f.shape)
    got = f"shape {tuple(f.shape)}" if isinstance(f, Tensor) else repr(f)
    raise ValueError(f"torch_matgrad.jacobian.Kron: a factor must be a 2-D tensor or an int size of I, got {got}")


def _free_bytes(device: torch.device) -> Optional[int]:
    """Memory available on ``device`` now, or None where that is not cheap to ask."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            # MemAvailable counts reclaimable page cache; "free" pages alone would refuse
            # matrices that fit on any host that has read a few files.
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, ValueError, RuntimeError):
        pass
    return None


def check_dense_size(
    shape: Tuple[int, int], dtype: torch.dtype, device: torch.device, max_bytes: Optional[int] = None
) -> None:
    """Raise ``MemoryError`` naming the shape and bytes if a dense ``shape`` matrix is
    over ``max_bytes`` (default :data:`DENSE_LIMIT_BYTES`) or over the free memory."""
    nbytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    limit = DENSE_LIMIT_BYTES if max_bytes is None else max_bytes
    free = _free_bytes(device)
    if nbytes > limit or (free is not None and nbytes > free):
        where = f"the limit of {limit:,} bytes" if nbytes > limit else f"the {free:,} bytes free on {device}"
        raise MemoryError(
            f"torch_matgrad.jacobian: a dense {shape[0]} x {shape[1]} {dtype} Jacobian needs {nbytes:,} bytes"
            + (f" ({nbytes / 2**30:.3g} GiB)" if nbytes >= 2**30 else "")
            + f", over {where}; use matvec/rmatvec, which never materialise it"
        )


class Kron:
    r"""The structured Jacobian ``J = diag(scale) (A (x) B) P``, never materialised unless asked.

    ``A`` (``p x q``) and ``B`` (``r x s``) are tensors or ``int`` identities. ``J`` maps
    ``vec(V)`` to ``vec(U)`` with ``U`` of shape :attr:`out_shape` ``= (p, r)`` and ``V``
    of shape :attr:`in_shape`: ``(q, s)``, or ``(s, q)`` when ``transpose_input`` (then
    ``P`` is the permutation ``vec(V) -> vec(V^T)``, which PyTorch's row convention needs
    for the weight). ``scale`` (``(p r,)``, optional) is the ``diag(act'(z))`` of an
    elementwise activation (items 1, 3).

    By ``vec(A X B^T) = (A (x) B) vec(X)`` (row-major vec), :meth:`matvec` and
    :meth:`rmatvec` are a matrix product per non-identity factor: one for every Jacobian
    in this module, as in the backward itself (items 9-11).
    """

    def __init__(self, a: Factor, b: Factor, *, scale: Optional[Tensor] = None, transpose_input: bool = False):
        self.a, self.b, self.scale, self.transpose_input = a, b, scale, transpose_input
        p, q = _factor_shape(a)
        r, s = _factor_shape(b)
        self.out_shape = (p, r)
        self.in_shape = (s, q) if transpose_input else (q, s)
        self.shape = (p * r, q * s)
        if scale is not None and tuple(scale.shape) != (p * r,):
            raise ValueError(f"torch_matgrad.jacobian.Kron: scale must have shape ({p * r},), got {tuple(scale.shape)}")
        tensors = [t for t in (a, b, scale) if isinstance(t, Tensor)]
        self.dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
        self.device = tensors[0].device if tensors else torch.device("cpu")

    def __repr__(self) -> str:
        def name(f):
            return f"I_{f}" if isinstance(f, int) else f"<{f.shape[0]} x {f.shape[1]}>"

        extra = ("diag(scale) " if self.scale is not None else "", " P" if self.transpose_input else "")
        return f"Kron({extra[0]}{name(self.a)} (x) {name(self.b)}{extra[1]}, shape={self.shape})"

    def _check_vector(self, t: Tensor, size: int, what: str) -> None:
        if t.dim() < 1 or t.shape[-1] != size:
            raise ValueError(
                f"torch_matgrad.jacobian.Kron.{what}: expected a vector (or batch of vectors) of length {size} "
                f"for a {self.shape[0]} x {self.shape[1]} Jacobian, got shape {tuple(t.shape)}"
            )

    def matvec(self, v: Tensor) -> Tensor:
        """``J v`` for ``v = vec(V)``: the directional derivative. Leading dims batch."""
        self._check_vector(v, self.shape[1], "matvec")
        lead = v.shape[:-1]
        x = v.reshape(*lead, *self.in_shape)
        if self.transpose_input:
            x = x.transpose(-1, -2)
        if not isinstance(self.a, int):
            x = self.a @ x
        if not isinstance(self.b, int):
            x = x @ self.b.transpose(-1, -2)
        out = x.reshape(*lead, self.shape[0])
        return out if self.scale is None else out * self.scale

    def rmatvec(self, u: Tensor) -> Tensor:
        """``u^T J`` for ``u = vec(G)``: the backward (items 9-11). Leading dims batch.
        ``as_mat(J.rmatvec(vec(G)), J.in_shape)`` is the gradient as a matrix."""
        self._check_vector(u, self.shape[0], "rmatvec")
        lead = u.shape[:-1]
        if self.scale is not None:
            u = u * self.scale
        g = u.reshape(*lead, *self.out_shape)
        if not isinstance(self.a, int):
            g = self.a.transpose(-1, -2) @ g
        if not isinstance(self.b, int):
            g = g @ self.b
        if self.transpose_input:
            g = g.transpose(-1, -2)
        return g.reshape(*lead, self.shape[1])

    def dense(self, max_bytes: Optional[int] = None) -> Tensor:
        """The ``rows x cols`` matrix; ``MemoryError`` (before allocating) if it is over
        ``max_bytes`` (default :data:`DENSE_LIMIT_BYTES`) or the memory free now."""
        check_dense_size(self.shape, self.dtype, self.device, max_bytes)

        def mat(f):
            return torch.eye(f, dtype=self.dtype, device=self.device) if isinstance(f, int) else f

        # (A (x) B)[(i, j), (k, l)] = A[i, k] B[j, l]. Written out rather than torch.kron,
        # which views its operands and fails on transposed ones such as item 6's X^T.
        a, b = mat(self.a), mat(self.b)
        out = (a[:, None, :, None] * b[None, :, None, :]).reshape(self.shape)
        if self.scale is not None:
            out = self.scale[:, None] * out
        if self.transpose_input:
            # Column (j, k) of J is column (k, j) of A (x) B.
            q, s = self.in_shape[1], self.in_shape[0]
            out = out.reshape(-1, q, s).transpose(1, 2).reshape(self.shape)
        return out


# --- the notes' Jacobians (samples in columns) ------------------------------------------


def _check_matrix(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor) or t.dim() != 2:
        got = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"torch_matgrad.jacobian: {name} must be a 2-D tensor, got {got}")


def dy_dW(x: Tensor, m: int) -> Kron:
    """Item 5: ``y = W x`` (``W`` is ``m x n``, ``x`` is ``(n,)``) gives
    ``dy/dW~ = diag(x^T, ..., x^T) = I_m (x) x^T`` (``m x mn``): row ``i`` is ``e_i^T(x^T)``
    because ``y_i = w_i^T x``."""
    if x.dim() != 1:
        raise ValueError(f"torch_matgrad.jacobian.dy_dW: x must be a vector, got shape {tuple(x.shape)}")
    return Kron(m, x.reshape(1, -1))


def dY_dW(X: Tensor, m: int) -> Kron:
    """Item 6: ``Y = W X`` (``X`` is ``n x b``) gives ``dY~/dW~ = I_m (x) X^T``
    (``(mb) x (mn)``), because row ``i`` of ``Y`` is ``w_i^T X``."""
    _check_matrix("X", X)
    return Kron(m, X.transpose(0, 1))


def dYT_dXT(W: Tensor, b: int) -> Kron:
    """Item 7: from ``Y^T = X^T W^T``, ``d(Y^T)~/d(X^T)~ = I_b (x) W`` (``(bm) x (bn)``):
    sample ``j`` (row ``j`` of ``Y^T``) depends on sample ``j`` alone, through ``W``."""
    _check_matrix("W", W)
    return Kron(b, W)


def dY_dX(W: Tensor, b: int) -> Kron:
    """Item 8 as a matrix: ``dY~/dX~ = W (x) I_b`` (``(mb) x (nb)``): ``dY_ij/dX_kl =
    w_ik`` if ``j = l``, else 0."""
    _check_matrix("W", W)
    return Kron(W, b)


def dY_dX_4d(W: Tensor, b: int, max_bytes: Optional[int] = None) -> Tensor:
    """Items 7-8 as the notes write them: ``I_b (x) W`` reshaped to ``A`` of shape
    ``(b, m, b, n)`` (``A[j, i, l, k] = d(Y^T)_ji / d(X^T)_lk``), then
    ``A.permute(1, 0, 3, 2)`` (the notes' ``permute_axes(2, 1, 4, 3)``, 1-based): the
    4-D Jacobian ``dY_ij/dX_kl`` of shape ``(m, b, n, b)``, as
    ``torch.autograd.functional.jacobian`` returns it."""
    flat = dYT_dXT(W, b).dense(max_bytes)
    m, n = W.shape
    return flat.reshape(b, m, b, n).permute(1, 0, 3, 2)


# --- PyTorch's row convention: out = act(x W^T + b) -------------------------------------


class LinearJacobians(NamedTuple):
    """The Jacobians of ``vec(out)``, ``out = act(x W^T + b)``, each a :class:`Kron`
    (``None`` for the bias when there is none)."""

    input: Kron
    weight: Kron
    bias: Optional[Kron]


def activation_derivative(z: Tensor, activation: Optional[str]) -> Optional[Tensor]:
    """``act'(z)`` elementwise (``None`` for the identity), read off
    :func:`torch_matgrad.formulas.grad_preactivation` with ``G = 1``: the diagonal of the
    Jacobian ``diag(act'(z))`` of the elementwise map (items 1, 3)."""
    activation = formulas.canonical_activation(activation)
    if activation is None:
        return None
    out = formulas.activate(z, activation)
    # What the op saves for the derivative: z where act' needs it, else the output (ReLU).
    saved = z if activation in formulas.NEEDS_PREACTIVATION else out
    return formulas.grad_preactivation(torch.ones_like(z), saved, activation)


def linear_jacobians(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None
) -> LinearJacobians:
    """Jacobians of ``vec(out)`` for ``out = act(z)``, ``z = x W^T + b`` (``x``: ``B x n``,
    ``W``: ``m x n``), from items 5-8 and MATH.md "From the notes to nn.Linear", with
    ``D = diag(act'(vec z))`` on the left (items 1, 3; omitted for the identity):

    * input: ``z = I_B x W^T``, so ``dz~/dx~ = I_B (x) W`` (item 7 with ``X^T = x``);
      ``d out~/dx~ = D (I_B (x) W)``, ``(Bm) x (Bn)``.
    * weight: ``z = x W^T I_m``, so ``dz~/d(W^T)~ = x (x) I_m``; with ``P: W~ -> (W^T)~``,
      ``d out~/dW~ = D (x (x) I_m) P``, ``(Bm) x (mn)`` (item 6 with rows and columns swapped).
    * bias: ``z = 1_B b^T I_m + ...``, so ``d out~/db = D (1_B (x) I_m)``, ``(Bm) x m``
      (item 10 with ``x = 1``).

    ``rmatvec(vec(G))`` of each is then ``G_z W``, ``G_z^T x`` and ``G_z^T 1`` (items 9-11).
    """
    # The op's own checks (types, dtypes, shapes, devices, activation), then 2-D rows:
    # the Jacobians are of the Function, which sees leading dims already flattened.
    function._check(x, weight, bias, activation)
    function._check_dtypes(x, weight, bias)
    _check_matrix("x", x)
    rows, m = x.shape[0], weight.shape[0]
    d = activation_derivative(formulas.preactivation(x, weight, bias), activation)
    scale = None if d is None else vec(d)
    return LinearJacobians(
        input=Kron(rows, weight, scale=scale),
        weight=Kron(x, m, scale=scale, transpose_input=True),
        bias=None if bias is None else Kron(x.new_ones(rows, 1), m, scale=scale),
    )


def linear_vjp(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(grad_x, grad_W, grad_b)``: ``vec(G)^T J`` for each Jacobian of
    :func:`linear_jacobians`, as matrices of the inputs' shapes (``as_mat``, items 9-11).
    The backward read off the notes' Jacobians, independent of :mod:`torch_matgrad.formulas`
    except for ``act'``; it must equal :func:`torch_matgrad.linear`'s backward."""
    jacobians = linear_jacobians(x, weight, bias, activation)
    if tuple(grad_out.shape) != jacobians.input.out_shape:
        raise ValueError(
            f"torch_matgrad.jacobian.linear_vjp: grad_out must have shape {jacobians.input.out_shape}, "
            f"got {tuple(grad_out.shape)}"
        )
    u = vec(grad_out)
    return tuple(
        None if j is None else as_mat(j.rmatvec(u), t.shape) for j, t in zip(jacobians, (x, weight, bias))
    )
