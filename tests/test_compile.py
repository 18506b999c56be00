"""torch.compile(fullgraph=True) over a model using the layer: no graph breaks (fullgraph
raises on one), same outputs and gradients as eager.

One compile covers every activation, bias and no bias, leading batch dims and a
transposed input (compiling costs ~20 s on 2 CPU cores, so there is exactly one on CPU).
"""

import copy

import pytest
import torch
from torch import nn

import torch_matgrad as tm
from _backends import BACKENDS
from _util import assert_rel_close


def _model(device):
    layers = [nn.Linear(33, 17), nn.ReLU(), nn.Linear(17, 17), nn.GELU(), nn.Linear(17, 17, bias=False)]
    layers += [nn.GELU(approximate="tanh"), nn.Linear(17, 17), nn.SiLU(), nn.Linear(17, 5)]
    return nn.Sequential(*layers).to(device)


def _run(model, x, cot):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(cot)
    return [out, x.grad] + [p.grad for p in model.parameters()]


def _check_compiled_equals_eager(device, graphs=None):
    """Compiled (fullgraph, Inductor) against eager; each traced FX graph's code is
    appended to ``graphs`` when given (captured by the backend, outside the trace)."""
    torch._dynamo.reset()
    ref = _model(device)
    model = copy.deepcopy(ref)
    assert tm.replace_linear(model) == 5 and tm.fuse_activations(model) == 4
    assert [m.activation for m in model if isinstance(m, (tm.Linear, tm.LinearAct))] == [
        "relu", "gelu", "gelu_tanh", "silu", None
    ]
    backend = "inductor"
    if graphs is not None:
        from torch._inductor.compile_fx import compile_fx

        def backend(gm, example_inputs):
            graphs.append(gm.code)
            return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(2, 33, 7, device=device).transpose(1, 2)  # (2, 7, 33), non-contiguous
    cot = torch.randn(2, 7, 5, device=device)
    got = _run(compiled, x, cot)
    for i, (g, want) in enumerate(zip(got, _run(ref, x, cot))):
        # Inductor fuses and reorders the elementwise work around the GEMMs; fp32
        # rounding differences of that reordering stay far below REL_TOL[float32].
        assert_rel_close(g, want, torch.float32, what=f"output/grad #{i}")
    torch._dynamo.reset()


def test_compile_fullgraph_cpu():
    _check_compiled_equals_eager("cpu")


def test_compile_dynamic_batch_under_autocast():
    """Ragged and empty batches through one dynamic-shape compile, inside CPU bf16
    autocast (the op's own autocast branch must trace without a break)."""
    torch._dynamo.reset()
    model = nn.Sequential(tm.Linear(33, 17, activation="gelu"), tm.Linear(17, 5, bias=False))
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for rows in (7, 33, 1, 0):
        x = torch.randn(rows, 33)
        cot = torch.randn(rows, 5, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _run(compiled, x, cot)
            model.zero_grad()
            want = _run(model, x, cot)
        model.zero_grad()
        assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
        for i, (g, w) in enumerate(zip(got, want)):
            assert_rel_close(g, w, torch.bfloat16, what=f"{rows} rows, output/grad #{i}")
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_cuda(backend, monkeypatch):
    # nn.Linear's reference must not use TF32 either (the kernels follow the same switch).
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    graphs = []
    with tm.use_backend(backend):
        _check_compiled_equals_eager("cuda", graphs)
    assert len(graphs) == 1, "expected one whole-model graph"


@pytest.mark.cuda
@pytest.mark.xfail(
    strict=True,
    reason="known gap: while torch.compile traces, dispatch hands the op to Inductor (torch ops) "
    "instead of tracing the autotuned Triton kernels; enabling that needs a GPU to verify",
)
def test_compile_traces_the_triton_kernels_cuda(monkeypatch):
    # (Recording dispatch's choices from inside the trace is a side effect that the
    # autograd.Function higher-order op refuses on torch 2.11: the graphs are read instead.)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    graphs = []
    with tm.use_backend("triton"):
        _check_compiled_equals_eager("cuda", graphs)
    assert graphs, "nothing was compiled"
    assert any("triton_kernel_wrapper" in code for code in graphs), "the Triton kernels were not traced"
