"""The notes' Jacobians (MATH.md items 1-8) against autograd, and the three-way check
notes = the op's backward = autograd (items 9-11). All float64."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch.autograd.functional import jacobian as autograd_jacobian
from torch.utils.flop_counter import FlopCounterMode

import torch_matgrad
from torch_matgrad import jacobian as J
from torch_matgrad.__main__ import main

from _backends import BACKENDS, DEVICES
from _util import activate_ref, assert_rel_close, reference

F64 = torch.float64
# (m, n, b): ragged, including 1s; dense Jacobians stay below (7*33) x (7*33).
SHAPES = [(1, 1, 1), (2, 3, 2), (7, 1, 33), (1, 33, 7), (7, 33, 1)]


def randn(*shape):
    return torch.randn(*shape, dtype=F64)


def jacobians_by_autograd(fn, arg, out_size):
    """``d vec(fn(arg)) / d vec(arg)`` as a matrix, by both autograd oracles."""
    flat = lambda a: fn(a).reshape(-1)  # noqa: E731
    return [jac.reshape(out_size, arg.numel()) for jac in (autograd_jacobian(flat, arg), torch.func.jacrev(flat)(arg))]


def assert_matches_autograd(structured, fn, arg, what):
    got = structured.dense()
    assert tuple(got.shape) == structured.shape
    for want in jacobians_by_autograd(fn, arg, structured.shape[0]):
        assert_rel_close(got, want, F64, what)


# --- vec, as_mat, e_i^T (conventions, item 4) -------------------------------------------


def test_vec_is_row_major_on_any_view_and_as_mat_inverts_it():
    a = randn(5, 3).t()  # a transposed (non-contiguous) view: vec must not follow memory order
    assert torch.equal(J.vec(a), torch.cat(list(a)))
    assert torch.equal(J.as_mat(J.vec(a), a.shape), a)
    with pytest.raises(ValueError, match=r"15 elements cannot form a \(4, 4\) matrix"):
        J.as_mat(J.vec(a), (4, 4))


def test_embed_block_places_a_at_position_i_and_zeros_elsewhere():
    a = randn(2, 3)
    row = J.embed_block(1, a, 3)
    assert torch.equal(row, torch.cat([torch.zeros(2, 3, dtype=F64), a, torch.zeros(2, 3, dtype=F64)], 1))
    assert torch.equal(J.embed_block(2, 1.0, 4), torch.eye(4)[2:3])  # e_i^T(1) = e_i^T
    with pytest.raises(IndexError, match="position 3 outside 0..2"):
        J.embed_block(3, a, 3)


# --- items 1-3 against autograd on random nonlinear maps --------------------------------


def test_product_rule_item1():
    m_mat, x = randn(4, 3), randn(3)
    u, b = (lambda x: torch.sin(m_mat @ x)), (lambda x: (x * x).sum())
    want = autograd_jacobian(lambda x: b(x) * u(x), x)
    got = J.product_rule(u(x), autograd_jacobian(u, x), b(x), autograd_jacobian(b, x))
    assert_rel_close(got, want, F64, "item 1")


def test_inner_product_rule_item2():
    m1, m2, x = randn(4, 3), randn(4, 3), randn(3)
    u, v = (lambda x: torch.tanh(m1 @ x)), (lambda x: (m2 @ x) ** 2)
    want = autograd_jacobian(lambda x: u(x) @ v(x), x)
    got = J.inner_product_rule(u(x), autograd_jacobian(u, x), v(x), autograd_jacobian(v, x))
    assert_rel_close(got, want, F64, "item 2")


def test_linear_map_rule_item3():
    a, m1, x = randn(5, 4), randn(4, 3), randn(3)
    u = lambda x: torch.exp(m1 @ x)  # noqa: E731
    want = autograd_jacobian(lambda x: a @ u(x), x)
    assert_rel_close(J.linear_map_rule(a, autograd_jacobian(u, x)), want, F64, "item 3")


# --- items 5-8: each Jacobian = autograd.functional.jacobian = torch.func.jacrev -------


# item -> (structured Jacobian, the map it differentiates, the argument) for W (m x n), X (n x b)
NOTES_JACOBIANS = {
    "5 dy/dW~": lambda W, X: (J.dy_dW(X[:, 0], W.shape[0]), lambda W: W @ X[:, 0], W),
    "6 dY~/dW~": lambda W, X: (J.dY_dW(X, W.shape[0]), lambda W: W @ X, W),
    "7 d(Y^T)~/d(X^T)~": lambda W, X: (J.dYT_dXT(W, X.shape[1]), lambda XT: XT @ W.t(), X.t()),
    "8 dY~/dX~": lambda W, X: (J.dY_dX(W, X.shape[1]), lambda X: W @ X, X),
}


@pytest.mark.parametrize("item", NOTES_JACOBIANS)
@pytest.mark.parametrize("m,n,b", SHAPES)
def test_items5_to_8_match_autograd(item, m, n, b):
    structured, fn, arg = NOTES_JACOBIANS[item](randn(m, n), randn(n, b))
    assert_matches_autograd(structured, fn, arg, f"item {item}")


@pytest.mark.parametrize("m,n,b", SHAPES)
def test_items7_8_four_d_form_is_the_permuted_reshape(m, n, b):
    W, X = randn(m, n), randn(n, b)
    got = J.dY_dX_4d(W, b)
    for want in (autograd_jacobian(lambda X: W @ X, X), torch.func.jacrev(lambda X: W @ X)(X)):
        assert got.shape == want.shape == (m, b, n, b)
        assert torch.equal(got, want)  # every entry is a w_ik or an exact 0
    # and, flattened, it is the matrix form W (x) I_b of item 8
    assert torch.equal(got.reshape(m * b, n * b), J.dY_dX(W, b).dense())


# --- PyTorch's row convention ------------------------------------------------------------


@pytest.mark.parametrize("activation", torch_matgrad.ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows,n,m", [(1, 1, 1), (7, 3, 5), (4, 33, 2)])
def test_linear_jacobians_match_autograd(activation, bias, rows, n, m):
    x, W = randn(n, rows).t(), randn(m, n)  # x: a transposed view, as a user may pass
    b = randn(m) if bias else None
    jac = J.linear_jacobians(x, W, b, activation)
    assert_matches_autograd(jac.input, lambda x: reference(x, W, b, activation), x, "d out/dx")
    assert_matches_autograd(jac.weight, lambda W: reference(x, W, b, activation), W, "d out/dW")
    if bias:
        assert_matches_autograd(jac.bias, lambda b: reference(x, W, b, activation), b, "d out/db")
    else:
        assert jac.bias is None


def test_activation_derivative_is_the_diagonal_of_the_elementwise_jacobian():
    z = randn(3, 4)
    for activation in torch_matgrad.ACTIVATIONS[1:]:
        want = autograd_jacobian(lambda z: activate_ref(z, activation).reshape(-1), z).reshape(12, 12)
        assert_rel_close(torch.diag(J.vec(J.activation_derivative(z, activation))), want, F64, activation)
    assert J.activation_derivative(z, None) is None


# --- structured products: equal to the dense form, one matmul, never (mb) x (mn) --------

KRONS = {
    "I (x) T": lambda: J.Kron(3, randn(4, 5)),
    "T (x) I": lambda: J.Kron(randn(4, 5), 3),
    "T (x) T": lambda: J.Kron(randn(2, 3), randn(4, 5)),
    "I (x) I": lambda: J.Kron(2, 3),  # no tensor factor: the default dtype (float32); exact here
    "D (T (x) I) P": lambda: J.Kron(randn(4, 5), 3, scale=randn(12), transpose_input=True),
    "D (I (x) T)": lambda: J.Kron(3, randn(1, 5).t(), scale=randn(15)),  # a transposed factor
}


@pytest.mark.parametrize("name", KRONS)
def test_structured_products_equal_the_dense_form(name):
    jac = KRONS[name]()
    dense = jac.dense()
    assert tuple(dense.shape) == jac.shape == (math.prod(jac.out_shape), math.prod(jac.in_shape))
    v, u = randn(jac.shape[1]).to(dense.dtype), randn(jac.shape[0]).to(dense.dtype)
    assert_rel_close(jac.matvec(v), dense @ v, F64, "matvec")
    assert_rel_close(jac.rmatvec(u), u @ dense, F64, "rmatvec")
    # leading dims batch: a stack of 2 x 3 vectors at once
    vs, us = randn(2, 3, jac.shape[1]).to(dense.dtype), randn(2, 3, jac.shape[0]).to(dense.dtype)
    assert_rel_close(jac.matvec(vs), vs @ dense.t(), F64, "batched matvec")
    assert_rel_close(jac.rmatvec(us), us @ dense, F64, "batched rmatvec")


def test_products_check_the_vector_length():
    jac = J.Kron(3, randn(4, 5))
    with pytest.raises(ValueError, match="length 15 for a 12 x 15 Jacobian, got shape \\(12,\\)"):
        jac.matvec(randn(12))
    with pytest.raises(ValueError, match="length 12 for a 12 x 15 Jacobian, got shape \\(\\)"):
        jac.rmatvec(randn(()))
    with pytest.raises(ValueError, match=r"scale must have shape \(12,\), got \(3, 4\)"):
        J.Kron(3, randn(4, 5), scale=randn(3, 4))


def test_vjp_at_real_size_is_one_matmul_and_dense_refuses():
    rows, n, m = 512, 384, 256
    x, W, b, G = randn(rows, n), randn(m, n), randn(m), randn(rows, m)
    jac = J.linear_jacobians(x, W, b, "gelu")
    # Dense, each would be (512*256) x (384*256) float64 = 103 GB; the products are GEMMs.
    for j, want_flops in ((jac.input, 2 * rows * m * n), (jac.weight, 2 * rows * m * n), (jac.bias, 2 * rows * m)):
        with FlopCounterMode(display=False) as counter:
            j.rmatvec(J.vec(G))
        assert counter.get_total_flops() == want_flops
        with FlopCounterMode(display=False) as counter:
            j.matvec(randn(j.shape[1]))
        assert counter.get_total_flops() == want_flops
    with pytest.raises(MemoryError, match=r"131072 x 98304 torch.float64 Jacobian needs 103,079,215,104"):
        jac.weight.dense()
    gz = G * J.activation_derivative(x @ W.t() + b, "gelu")
    assert_rel_close(J.as_mat(jac.weight.rmatvec(J.vec(G)), W.shape), gz.t() @ x, F64, "G_z^T x")


def test_dense_limit_is_checked_before_allocating(monkeypatch):
    jac = J.dY_dW(randn(3, 4), 5)  # (5*4) x (5*3) float64: 2400 bytes
    with pytest.raises(MemoryError, match=r"20 x 15 torch.float64 Jacobian needs 2,400 bytes, over the limit of 2,399"):
        jac.dense(max_bytes=2399)
    assert jac.dense(max_bytes=2400).shape == (20, 15)
    with pytest.raises(MemoryError, match="limit of 100 bytes"):
        J.dY_dX_4d(randn(3, 4), 5, max_bytes=100)
    # the memory available is a second limit (MemAvailable on Linux, free memory on a GPU)
    if Path("/proc/meminfo").exists():
        assert J._free_bytes(torch.device("cpu")) > 0
    monkeypatch.setattr(J, "_free_bytes", lambda device: 1000)
    with pytest.raises(MemoryError, match="needs 2,400 bytes, over the 1,000 bytes free on cpu"):
        jac.dense()
    monkeypatch.undo()
    # an int factor is a symbolic identity: this costs nothing until dense() refuses it
    huge = J.Kron(10**6, randn(2, 2))
    assert huge.shape == (2 * 10**6, 2 * 10**6)
    with pytest.raises(MemoryError, match="use matvec/rmatvec"):
        huge.dense()


# --- the derivations replayed with the rules of items 1-4 --------------------------------


def test_replay_items5_6_from_the_inner_product_rule_and_e_i():
    """``Y_ij = <w_i, X_j>``, ``dw_i/dW~ = e_i^T(I_n)``, ``dX_j/dW~ = 0``: row (i, j) of
    ``dY~/dW~`` is ``X_j^T e_i^T(I_n) = e_i^T(X_j^T)`` (items 2, 4), i.e. ``I_m (x) X^T``."""
    m, n, b = 3, 4, 2
    W, X = randn(m, n), randn(n, b)
    zero = torch.zeros(n, m * n, dtype=F64)
    rows = []
    for i in range(m):
        for j in range(b):
            row = J.inner_product_rule(W[i], J.embed_block(i, torch.eye(n, dtype=F64), m), X[:, j], zero)
            assert torch.equal(row, J.embed_block(i, X[:, j], m)[0])
            rows.append(row)
    assert torch.equal(torch.stack(rows), J.dY_dW(X, m).dense())
    assert torch.equal(torch.stack(rows[::b]), J.dy_dW(X[:, 0], m).dense())  # item 5 is item 6 with b = 1


def test_replay_item8_from_the_inner_product_rule():
    """``Y_ij = <w_i, X_j>`` with ``dw_i/dX~ = 0`` and ``dX_j/dX~ = I_n (x) e_j^T`` (column
    j picked out of ``X~``): row (i, j) is ``w_i^T (I_n (x) e_j^T)`` (item 2), i.e. ``W (x) I_b``."""
    m, n, b = 3, 4, 2
    W, X = randn(m, n), randn(n, b)
    zero = torch.zeros(n, n * b, dtype=F64)
    pick = [J.Kron(n, J.embed_block(j, 1.0, b).to(F64)).dense() for j in range(b)]
    for j in range(b):
        assert torch.equal(pick[j] @ J.vec(X), X[:, j])
    rows = [J.inner_product_rule(W[i], zero, X[:, j], pick[j]) for i in range(m) for j in range(b)]
    assert torch.equal(torch.stack(rows), J.dY_dX(W, b).dense())


def test_replay_activation_and_bias_with_items_1_3_and_10():
    """``out = act(z)``: ``d out~/dW~ = diag(act'(z~)) dz~/dW~`` (items 1, 3); the bias is
    a weight column whose input is constantly 1 (item 10 with ``x = 1``)."""
    x, W, b = randn(5, 3), randn(4, 3), randn(4)
    plain = J.linear_jacobians(x, W, b)
    for activation in torch_matgrad.ACTIVATIONS[1:]:
        jac = J.linear_jacobians(x, W, b, activation)
        diag = torch.diag(J.vec(J.activation_derivative(x @ W.t() + b, activation)))
        for got, dz in zip(jac, plain):
            assert_rel_close(got.dense(), J.linear_map_rule(diag, dz.dense()), F64, activation)
    ones = J.linear_jacobians(torch.ones(5, 1, dtype=F64), b[:, None]).weight
    assert torch.equal(plain.bias.dense(), ones.dense())


@pytest.mark.parametrize("m,n,b", SHAPES)
def test_items9_to_11_the_backward_is_vec_G_times_the_jacobian(m, n, b):
    W, X, G = randn(m, n), randn(n, b), randn(m, b)
    # item 10: dz/dW = (dz/dY~ (I_m (x) X^T))_as_mat = G X^T; item 9 is its column b = 1
    assert_rel_close(J.as_mat(J.dY_dW(X, m).rmatvec(J.vec(G)), (m, n)), G @ X.t(), F64, "item 10")
    g, x = G[:, 0], X[:, 0]
    assert_rel_close(J.as_mat(J.dy_dW(x, m).rmatvec(g), (m, n)), torch.outer(g, x), F64, "item 9")
    # item 11: dz/dX = W^T G, by either Jacobian of X (items 7 and 8)
    assert_rel_close(J.as_mat(J.dY_dX(W, b).rmatvec(J.vec(G)), (n, b)), W.t() @ G, F64, "item 11 via 8")
    assert_rel_close(J.as_mat(J.dYT_dXT(W, b).rmatvec(J.vec(G.t())), (b, n)), G.t() @ W, F64, "item 11 via 7")


# --- three ways: the notes' Jacobians, the op's backward, autograd ----------------------



@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", torch_matgrad.ACTIVATIONS)
@pytest.mark.parametrize(
    "lead,n,m,bias", [((1,), 1, 1, True), ((7,), 33, 5, False), ((3, 11), 7, 127, True), ((0,), 3, 2, True)]
)
def test_three_way_notes_backward_autograd(device, backend, activation, lead, n, m, bias):
    x = randn(n, *lead).movedim(0, -1).to(device)  # non-contiguous, with leading dims
    W, G = randn(m, n).to(device), randn(*lead, m).to(device)
    b = randn(m).to(device) if bias else None
    before = [t.clone() for t in (x, W, b, G) if t is not None]
    notes = J.linear_vjp(G.reshape(-1, m), x.reshape(-1, n), W, b, activation)
    inputs = [t.detach().requires_grad_() for t in (x, W, b) if t is not None]
    with torch_matgrad.use_backend(backend):
        out = torch_matgrad.linear(*inputs, activation=activation)
    backward = torch.autograd.grad(out, inputs, G)
    ref = reference(inputs[0], inputs[1], inputs[2] if bias else None, activation)
    autograd = torch.autograd.grad(ref, inputs, G)
    for name, got, by_op, by_autograd in zip(("x", "W", "b"), notes, backward, autograd):
        got = got.reshape(by_op.shape)
        assert_rel_close(got, by_op, F64, f"grad_{name}: notes vs {backend} backward")
        assert_rel_close(got, by_autograd, F64, f"grad_{name}: notes vs autograd")
    assert all(torch.equal(t, u) for t, u in zip(before, (t for t in (x, W, b, G) if t is not None)))


# --- errors ------------------------------------------------------------------------------


def test_bad_shapes_raise_clear_errors():
    x, W = randn(5, 3), randn(4, 3)
    with pytest.raises(ValueError, match=r"input has 2 features .* weight of shape \(4, 3\) expects in_features=3"):
        J.linear_jacobians(randn(5, 2), W)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\) .* got \(3,\)"):
        J.linear_jacobians(x, W, randn(3))
    with pytest.raises(TypeError, match="one dtype for all tensors, got input torch.float32, weight torch.float64"):
        J.linear_jacobians(x.float(), W)
    with pytest.raises(ValueError, match=r"x must be a 2-D tensor, got shape \(2, 5, 3\)"):
        J.linear_jacobians(randn(2, 5, 3), W)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(5, 4\), got \(4, 5\)"):
        J.linear_vjp(randn(4, 5), x, W)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        J.linear_jacobians(x, W, activation="tanh")
    with pytest.raises(ValueError, match=r"x must be a vector, got shape \(3, 1\)"):
        J.dy_dW(randn(3, 1), 4)
    with pytest.raises(ValueError, match=r"W must be a 2-D tensor, got shape \(3,\)"):
        J.dY_dX_4d(randn(3), 2)
    with pytest.raises(ValueError, match=r"a factor must be a 2-D tensor or an int size of I, got shape \(2, 2, 2\)"):
        J.Kron(2, randn(2, 2, 2))
    with pytest.raises(ValueError, match=r"A must be a scalar, vector or matrix, got shape \(1, 1, 1\)"):
        J.embed_block(0, randn(1, 1, 1), 2)


# --- the CLI -----------------------------------------------------------------------------


def test_cli_prints_the_block_maps_and_agrees(capsys):
    assert main(["jacobian", "--m", "2", "--n", "3", "--b", "2", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    for grid in ("[ X^T  0   ]\n  [ 0    X^T ]", "[ W  0 ]\n  [ 0  W ]", "[ w11 I  w12 I  w13 I ]", "[ D1 W  0    ]"):
        assert grid in text
    assert "?" not in text and "0 mismatch" in text


def test_cli_exits_1_on_a_wrong_backward_or_a_wrong_jacobian(capsys, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(torch_matgrad.formulas, "grad_weight", lambda g, x: 2 * g.transpose(-1, -2).matmul(x))
        assert main(["jacobian"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    monkeypatch.setattr(J, "dY_dW", lambda X, m: J.Kron(m, 2 * X.t()))
    assert main(["jacobian"]) == 1
    assert "[ ?  0 ]\n  [ 0  ? ]" in capsys.readouterr().out


def test_derivation_md_links_name_real_functions_and_tests():
    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "derivation.md").read_text()
    tests = re.findall(r"tests/test_jacobian\.py::(\w+)", text)
    functions = re.findall(r"\[`(jacobian|formulas)\.(\w+)`\]", text)
    assert len(tests) >= 15 and len(functions) >= 15
    assert [t for t in tests if t not in globals()] == []
    assert [f"{mod}.{name}" for mod, name in functions if not hasattr(getattr(torch_matgrad, mod), name)] == []
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (root / "docs" / target).resolve().exists(), target
