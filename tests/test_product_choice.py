"""Each product of the Triton backend's linear op on the fused kernel or on cuBLAS: the
rule (``dispatch.cublas_products`` and its table), the products on cuBLAS against a
float64 reference, and the pass that writes ``G_z`` with ``grad_b`` beside it."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

from _util import REL_TOL, activate_ref, assert_rel_close, float32_matmul_precision, rel_err

pytestmark = pytest.mark.kernels
triton = pytest.importorskip("triton")

import torch_matgrad  # noqa: E402
from torch_matgrad import dispatch, formulas, triton_backend  # noqa: E402
from torch_matgrad.triton_kernels import gz_pass  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL = dispatch.PRODUCTS


@pytest.fixture(autouse=True)
def _ieee_fp32():
    with float32_matmul_precision("highest"):
        yield


def _saved(z, activation):
    """What the backward keeps for ``act'``: the output for ReLU, else ``z``."""
    return torch.relu(z) if activation == "relu" else z


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, n", [(1, 1), (7, 33), (61, 20)])
def test_pass_writes_gz_and_sums_grad_b(activation, dtype, m, n):
    g = torch.randn(m, n, dtype=dtype, device=DEVICE)
    z = torch.randn(n, m, dtype=dtype, device=DEVICE).t()  # a transposed view: strides, not copies
    saved = _saved(z, activation)
    gz, grad_b = gz_pass.grad_preactivation_and_bias(g, saved, activation)
    want = formulas.grad_preactivation(g.double(), saved.double(), activation)
    assert gz.dtype == grad_b.dtype == dtype and gz.is_contiguous() and grad_b.shape == (n,)
    assert_rel_close(gz, want, dtype, "G_z")
    # grad_b is the column sum of the G_z that was written (its rounded values), rounded once.
    assert rel_err(grad_b, gz.double().sum(0)) <= (2**-8 if dtype == torch.bfloat16 else REL_TOL[dtype])
    assert_rel_close(grad_b, want.sum(0), dtype, "grad_b")
    again = gz_pass.grad_preactivation_and_bias(g, saved, activation)
    assert torch.equal(again[0], gz) and torch.equal(again[1], grad_b)  # a fixed order of sums


def test_pass_splits_rows_into_stripes_and_handles_empty():
    # The stripes' partials are what the sum adds: more than one here.
    m, n = 300, 33
    assert -(-m // gz_pass._rows_per_program(m, n, 3)) > 1
    for shape in ((0, 5), (5, 0)):
        gz, grad_b = gz_pass.grad_preactivation_and_bias(torch.randn(shape), torch.randn(shape), "silu")
        assert gz.shape == shape and torch.equal(grad_b, torch.zeros(shape[1]))


@pytest.mark.parametrize("products", [(), ("forward",), ("grad_x",), ("grad_w",), ALL],
                         ids=lambda p: "+".join(p) or "none")
@pytest.mark.parametrize("activation", [None, "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_each_product_on_either_matches_the_reference(products, activation, bias, dtype):
    x = torch.randn(2, 33, 40, dtype=dtype, device=DEVICE, requires_grad=True)
    w = torch.randn(17, 40, dtype=dtype, device=DEVICE, requires_grad=True)
    b = torch.randn(17, dtype=dtype, device=DEVICE, requires_grad=True) if bias else None
    params = [t for t in (x, w, b) if t is not None]
    g = torch.randn(2, 33, 17, dtype=dtype, device=DEVICE)
    with torch_matgrad.use_backend("triton"), dispatch.products_on_cublas(products), dispatch.recording() as ran:
        out = torch_matgrad.linear(x, w, b, activation=activation)
        grads = torch.autograd.grad(out, params, g)
    ref_params = [t.detach().double().requires_grad_() for t in params]
    ref = activate_ref(torch.nn.functional.linear(*ref_params[:2], ref_params[2] if bias else None), activation)
    want = torch.autograd.grad(ref, ref_params, g.double())
    for name, got, expected in zip(("out", "grad_x", "grad_W", "grad_b"), (out, *grads), (ref, *want)):
        assert_rel_close(got, expected, dtype, name)
    assert ran["forward", "triton"] == ran["backward", "triton"] == 1
    assert {p for kind, p in ran if kind == "cublas"} == set(products)  # the check names what ran


def test_only_grad_b_on_cublas_after_the_pass():
    # x and W frozen: the backward computes grad_b alone, summed in the pass.
    x, w = torch.randn(33, 40, device=DEVICE), torch.randn(17, 40, device=DEVICE)
    b = torch.randn(17, device=DEVICE, requires_grad=True)
    g = torch.randn(33, 17, device=DEVICE)
    with torch_matgrad.use_backend("triton"), dispatch.products_on_cublas(["grad_w"]), dispatch.recording() as ran:
        (got,) = torch.autograd.grad(torch_matgrad.linear(x, w, b, activation="gelu"), b, g)
    z = (x @ w.t() + b).double()
    assert_rel_close(got, formulas.grad_preactivation(g.double(), z, "gelu").sum(0), torch.float32, "grad_b")
    assert ran["cublas", "grad_w"] == 1


def test_the_prologue_strategy_gives_way_to_the_pass_for_cublas():
    # cuBLAS has no act' prologue: a product there takes G_z from the pass.
    x = torch.randn(33, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(17, 40, device=DEVICE, requires_grad=True)
    g = torch.randn(33, 17, device=DEVICE)
    ref = torch.autograd.grad(torch.nn.functional.silu(x.double() @ w.double().t()), (x, w), g.double())
    with torch_matgrad.use_backend("triton"), triton_backend.gz_strategy("prologue"):
        for products in (["grad_x"], ["grad_w"]):
            with dispatch.products_on_cublas(products):
                got = torch.autograd.grad(torch_matgrad.linear(x, w, activation="silu"), (x, w), g)
            for a, e in zip(got, ref):
                assert_rel_close(a, e, torch.float32, str(products))


def test_the_table_sends_a_shape_class_to_cublas(monkeypatch):
    card = dispatch.card(torch.device(DEVICE))
    monkeypatch.setattr(dispatch, "CUBLAS_PRODUCTS", {card: {"decode": frozenset({"grad_x", "forward"})}})
    w = torch.randn(24, 40, device=DEVICE, requires_grad=True)
    for rows, want in ((dispatch.DECODE_ROWS, {"forward", "grad_x"}), (dispatch.DECODE_ROWS + 1, set())):
        x = torch.randn(rows, 40, device=DEVICE, requires_grad=True)
        with torch_matgrad.use_backend("triton"), dispatch.recording() as ran:
            torch_matgrad.linear(x, w).sum().backward()
        assert {p for kind, p in ran if kind == "cublas"} == want, rows
    # Another card's entry, or none, leaves every product on the kernels.
    monkeypatch.setattr(dispatch, "CUBLAS_PRODUCTS", {"another-card": {"decode": frozenset(ALL)}})
    assert dispatch.cublas_products(torch.device(DEVICE), 1, 40) == frozenset()


def test_shape_classes_and_card_names():
    assert [dispatch.shape_class(m, k) for m, k in ((1, 8192), (16, 8192), (17, 2048), (17, 2049))] == [
        "decode", "decode", "narrow", "wide"]
    assert dispatch.card(torch.device("cpu")) == "cpu"
    # The card's name is its results folder's.
    assert dispatch.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert dispatch.slug("NVIDIA H200") == "nvidia-h200"
    with pytest.raises(ValueError, match=r"unknown products \['grad_b'\]; choose among 'forward', 'grad_x', 'grad_w'"):
        with dispatch.products_on_cublas(["grad_b"]):
            pass


def test_no_table_is_no_lookup():
    # Nothing measured: the host path does not even name the card.
    assert dispatch.CUBLAS_PRODUCTS == {} or all(
        set(classes) <= set(dispatch.SHAPE_CLASSES) and all(p <= set(ALL) for p in classes.values())
        for classes in dispatch.CUBLAS_PRODUCTS.values())
    dispatch.card.cache_clear()
    if not dispatch.CUBLAS_PRODUCTS:
        dispatch.cublas_products(torch.device(DEVICE), 1, 40)
        assert dispatch.card.cache_info().currsize == 0


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "product_choice", Path(__file__).resolve().parents[1] / "benchmarks" / "product_choice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_derives_the_tables_entry():
    bench = _benchmark()

    def row(cls, product, ratio):
        return {"class": cls, "product": product, "cublas_over_kernel": ratio}

    rows = [row("decode", "forward", 0.8), row("decode", "forward", 1.05),  # geomean 0.917: cuBLAS
            row("decode", "grad_x", 0.99),  # within the margin: the kernel keeps it
            row("wide", "grad_w", 0.5), row("narrow", "grad_x", float("nan"))]
    assert bench.rule_entry(bench.choice(rows)) == {"decode": frozenset({"forward"}), "wide": frozenset({"grad_w"})}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run; a GPU times the real table")
def test_the_benchmarks_dry_run_checks_every_product(tmp_path):
    bench = _benchmark()
    assert bench.main(["--out", str(tmp_path)]) == 0
    with open(tmp_path / "product_choice.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(bench.DRY_RUN_SHAPES) * len(bench.ACTIVATIONS) * len(dispatch.PRODUCTS)
    assert {r["class"] for r in rows} == {"decode", "narrow"}
    assert all(float(r[f"rel_err_{side}"]) < bench.TOLERANCE for r in rows for side in ("kernel", "cublas"))
    assert "`dispatch.CUBLAS_PRODUCTS['cpu'] = {}`; `dispatch` holds this entry." in (
        tmp_path / "product_choice.md").read_text()
