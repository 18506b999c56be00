"""The MLP block under ``torch.compile``: one op the compiler does not look inside
(``torch.ops.torch_matgrad.mlp`` and its backward), so that the compiled block saves
what the eager one saves, never ``h``: less than the compiled stock block. The same
gradients as the eager block, whatever the compiled graph does with the saved tensors
(``retain_graph``, a second backward, checkpointing).

Compiling costs seconds on 2 CPU cores: the checks share a few compiles, most with
``aot_eager_decomp_partition`` (AOTAutograd's partitioner as Inductor runs it, without
code generation)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import torch_matgrad as mg
from torch_matgrad.mlp import saved_bytes

from _util import assert_rel_close

PARTITION = "aot_eager_decomp_partition"
# Every activation, plain and gated, bias or not: one model, one compile.
CONFIGS = [(False, "gelu", True), (False, "relu", False), (False, None, True), (False, "gelu_tanh", False),
           (True, "silu", False), (True, "gelu_tanh", True)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # The partitioner's choices depend on whether Inductor is loaded (it asks Inductor
    # what fuses): load it, as a user's compile does.
    import torch._inductor  # noqa: F401

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _stack(d=24, hidden=40):
    torch.manual_seed(0)
    return nn.Sequential(*[mg.FusedMLP(d, hidden, activation=act, gated=gated, bias=bias)
                           for gated, act, bias in CONFIGS])


def _grads(model, x, cot, **backward):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(cot, **backward)
    grads = [out.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _assert_all_close(got, want, dtype, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_rel_close(g, w, dtype, what=f"{what}: output/grad #{i}")


def test_every_kind_of_block_compiles_to_the_op_with_the_eager_gradients():
    model = _stack()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(PARTITION)(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x, cot = torch.randn(2, 7, 24), torch.randn(2, 7, 24)  # leading dims
    _assert_all_close(_grads(compiled, x, cot), _grads(model, x, cot), torch.float32, "compiled")
    (graph,) = graphs
    ops = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert ops.count("torch_matgrad.mlp") == len(CONFIGS), ops


def test_compiled_block_saves_x_and_the_preactivations_less_than_the_compiled_stock_block():
    for gated, activation in ((False, "gelu_tanh"), (True, "silu")):
        torch._dynamo.reset()
        block = mg.FusedMLP(32, 96, activation=activation, gated=gated)
        act = {"gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU()}[activation]

        def stock(x):
            h = act(block.up(x)) if not gated else act(block.gate(x)) * block.up(x)
            return block.down(h)

        x = torch.randn(64, 32, requires_grad=True)
        params = list(block.parameters())
        ours = torch.compile(block, fullgraph=True, backend=PARTITION)
        out, ours_bytes = saved_bytes(ours, x, params=params)
        want, stock_bytes = saved_bytes(torch.compile(stock, fullgraph=True, backend=PARTITION), x, params=params)
        assert_rel_close(out, want, torch.float32)
        expected = x.nbytes + 64 * 96 * 4 * (2 if gated else 1)  # x, u (and g): never h
        assert ours_bytes == expected, (ours_bytes, expected)
        # The compiled stock block keeps h (or act(g)) too: what the op exists to drop.
        assert ours_bytes < stock_bytes, (ours_bytes, stock_bytes)


def test_retain_graph_and_a_second_backward_when_compiled():
    # The compiled backward writes over the saved u and g only when the graph dies.
    model = _stack()
    compiled = torch.compile(model, fullgraph=True, backend=PARTITION)
    x, cot = torch.randn(9, 24, requires_grad=True), torch.randn(9, 24)
    want = _grads(model, x, cot)[1:]
    out = compiled(x)
    out.backward(cot, retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    out.backward(cot)  # the same saved tensors again: accumulates a second time
    second = [x.grad] + [p.grad for p in model.parameters()]
    _assert_all_close(first, want, torch.float32, "first backward")
    _assert_all_close([s - f for s, f in zip(second, first)], want, torch.float32, "second backward")


class _Checkpointed(nn.Module):
    """The blocks of ``model``, each under activation checkpointing (its saved tensors
    recomputed in the backward, as the compiled graph then does itself)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        for block in self.model:
            x = checkpoint(block, x, use_reentrant=False)
        return x


def test_checkpointed_blocks_when_compiled():
    model = _stack()
    compiled = torch.compile(_Checkpointed(model), fullgraph=True, backend=PARTITION)
    x, cot = torch.randn(9, 24), torch.randn(9, 24)
    _assert_all_close(_grads(compiled, x, cot), _grads(model, x, cot), torch.float32, "checkpointed")


def test_dynamic_shapes_with_inductor_under_autocast():
    """Inductor's code generation, one dynamic-shape compile over ragged and empty
    batches, inside CPU bf16 autocast (the op's own casts trace without a break)."""
    model = nn.Sequential(mg.FusedMLP(16, 40, activation="gelu_tanh"),
                          mg.FusedMLP(16, 40, activation="silu", gated=True, bias=False))
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for rows in (33, 7, 1, 0):
        x, cot = torch.randn(rows, 16), torch.randn(rows, 16, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = _grads(compiled, x, cot), _grads(ref, x, cot)
        assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
        _assert_all_close(got, want, torch.bfloat16, f"{rows} rows")


@pytest.mark.parametrize("gated,lora", [(False, False), (True, False), (True, True)],
                         ids=["plain", "gated", "gated-lora"])
def test_opcheck(gated, lora):
    """The ops' schemas, fake implementations and autograd registration agree with
    what they compute (PyTorch's opcheck), adapters with dropout included."""
    from torch_matgrad.mlp import _mlp_backward_op, _mlp_op

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, up_w, up_b, down_w = t(7, 8), t(16, 8), t(16), t(5, 16)
    gate_w = t(16, 8) if gated else None
    adapted, config = [None] * 9, []
    if lora:  # up: rank 3, dropout; gate: none; down: rank 2
        adapted = [t(3, 8), t(16, 3), torch.rand(7, 8) > 0.3, None, None, None, t(2, 16), t(5, 2), None]
        config = [0.5, 1 / 0.7, 0.0, 1.0, 2.0, 1.0]
    args = (x, up_w, up_b, gate_w, None, down_w, None, *adapted, config, "gelu", "torch")
    torch.library.opcheck(_mlp_op, args)
    with torch.no_grad():
        out, u, g, *ts = _mlp_op(*args)
    plain = lambda v: None if v is None or v.numel() == 0 else v.detach()  # noqa: E731
    saved = [x.detach(), up_w.detach(), plain(gate_w), down_w.detach(), u, plain(g), *map(plain, ts),
             *map(plain, adapted)]
    needs = [True, True, True, gated, False, True, False, lora, lora, False, False, lora, lora]
    grad_args = (torch.randn(7, 5, dtype=torch.float64), None, None, None, None, None, saved, config, "gelu", needs,
                 "torch")
    torch.library.opcheck(_mlp_backward_op, grad_args, test_utils=("test_schema", "test_faketensor"))
