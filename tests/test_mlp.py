"""The MLP block as one op (``torch_matgrad.mlp``, ``FusedMLP``, ``fuse_mlps``): the same
numbers as the eager block, the explicit backward (float64 gradcheck and gradgradcheck),
less saved memory, autocast, compile, torch.func, and tiny transformers models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_matgrad as mg
from torch_matgrad.bench.allocations import step_allocations
from torch_matgrad.mlp import MLPFunction, saved_bytes

from _backends import backend  # noqa: F401  (fixture)
from _util import REL_TOL, activate_ref, assert_rel_close, rel_err

ACTS = [None, "relu", "gelu", "gelu_tanh", "silu"]


def eager(x, up_w, down_w, up_b=None, down_b=None, activation="gelu", gate_w=None, gate_b=None):
    """The block as eager PyTorch computes it (what nn.Linear layers and F compute)."""
    u = F.linear(x, up_w, up_b)
    h = activate_ref(u, activation) if gate_w is None else activate_ref(F.linear(x, gate_w, gate_b), activation) * u
    return F.linear(h, down_w, down_b)


def _params(d, hidden, d_out, gated, bias, dtype=torch.float64, param=False):
    make = (lambda *s: nn.Parameter(torch.randn(*s, dtype=dtype) / s[-1] ** 0.5)) if param else (
        lambda *s: (torch.randn(*s, dtype=dtype) / s[-1] ** 0.5).requires_grad_())
    p = dict(up_w=make(hidden, d), down_w=make(d_out, hidden))
    if bias:
        p.update(up_b=make(hidden), down_b=make(d_out))
    if gated:
        p["gate_w"] = make(hidden, d)
        if bias:
            p["gate_b"] = make(hidden)
    return p


def _call(fn, x, p, activation):
    return fn(x, p["up_w"], p["down_w"], p.get("up_b"), p.get("down_b"), activation, p.get("gate_w"), p.get("gate_b"))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTS)
def test_gradcheck_and_gradgradcheck(gated, bias, activation):
    p = _params(3, 5, 2, gated, bias)
    x = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)  # leading dims
    names = list(p)

    def fn(x, *ts):
        return _call(mg.mlp, x, dict(zip(names, ts)), activation)

    inputs = (x, *p.values())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(1,), (7, 33), (0,)], ids=lambda r: "x".join(map(str, r)))
def test_matches_eager_and_float64(backend, gated, activation, dtype, rows):  # noqa: F811
    p64 = _params(33, 40, 17, gated, True)  # every width spans two interpreter tiles (32)
    x64 = torch.randn(*rows, 33, dtype=torch.float64)
    g64 = torch.randn(*rows, 17, dtype=torch.float64)
    p = {k: v.detach().to(dtype).requires_grad_() for k, v in p64.items()}
    x = x64.to(dtype).requires_grad_()
    got = _call(mg.mlp, x, p, activation)
    got_grads = torch.autograd.grad(got, [x, *p.values()], g64.to(dtype))
    ref = _call(eager, x64.requires_grad_(), p64, activation)
    ref_grads = torch.autograd.grad(ref, [x64, *p64.values()], g64)
    # Eager PyTorch in the same dtype: two layers round u, h and grad_h on the way, so
    # its own distance from float64 sets the bar (at least the one-layer tolerance).
    xe = x64.detach().to(dtype).requires_grad_()
    pe = {k: v.detach().to(dtype).requires_grad_() for k, v in p64.items()}
    eag = _call(eager, xe, pe, activation)
    eag_grads = torch.autograd.grad(eag, [xe, *pe.values()], g64.to(dtype))
    for name, a, b, e in zip(["out", "x", *p], [got, *got_grads], [ref, *ref_grads], [eag, *eag_grads]):
        assert a.dtype == dtype and a.shape == b.shape
        tol = max(REL_TOL[dtype], 2 * rel_err(e, b))
        assert rel_err(a, b) <= tol, f"{name} ({backend}): {rel_err(a, b):.2e} > {tol:.2e}"


def test_inputs_not_modified_and_non_contiguous_views():
    p = _params(16, 24, 8, True, True, dtype=torch.float32)
    x = torch.randn(16, 10).t()  # transposed view
    before = [t.detach().clone() for t in (x, *p.values())]
    out = _call(mg.mlp, x, p, "silu")
    ref = _call(eager, x, p, "silu")
    assert_rel_close(out, ref, torch.float32)
    out.sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, (x, *p.values())))


@pytest.mark.parametrize("gated,activation", [(False, "gelu"), (True, "silu")], ids=["plain-gelu", "gated-silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_at_most_six_tenths_of_eager(gated, activation, dtype):
    # A Llama-like ratio of widths, d = 64, H = 176; the Parameters are not counted
    # (both save the same ones).
    p = _params(64, 176, 64, gated, True, dtype=dtype, param=True)
    x = torch.randn(4, 64, 64, dtype=dtype, requires_grad=True)
    ours, ours_bytes = saved_bytes(lambda: _call(mg.mlp, x, p, activation))
    ref, ref_bytes = saved_bytes(lambda: _call(eager, x, p, activation))
    assert ours_bytes <= 0.6 * ref_bytes, (ours_bytes, ref_bytes)
    # What is saved: x and the pre-activation(s), nothing of width H more.
    per_token = 64 + 176 * (2 if gated else 1)
    assert ours_bytes == 4 * 64 * per_token * dtype.itemsize
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, [x, *p.values()], g), torch.autograd.grad(ref, [x, *p.values()], g)):
        assert_rel_close(a, b, dtype)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 1024, 4096), (37, 24, 100), (1000, 72, 200)], ids=lambda s: "x".join(map(str, s)))
def test_training_steps_peak_is_at_most_eagers(gated, activation, dtype, shape):
    # The tensors a training step holds at its peak, as CUDA's allocator counts them
    # (bench.allocations), on meta tensors: the H200 bench's first shape at full size and
    # ragged ones (512-byte rounding), in milliseconds. The block saves fewer bytes, and
    # the backward's rebuild of h must not give them back.
    m, d, hidden = shape
    p = {k: v.detach().to("meta", dtype).requires_grad_() for k, v in _params(d, hidden, d, gated, True).items()}
    x = torch.randn(m, d, device="meta", dtype=dtype, requires_grad=True)
    grad = torch.randn(m, d, device="meta", dtype=dtype)
    peaks = {}
    for name, fn in (("eager", eager), ("ours", mg.mlp)):
        peaks[name], _ = step_allocations(lambda: torch.autograd.grad(_call(fn, x, p, activation), [x, *p.values()], grad))
    assert peaks["ours"] <= peaks["eager"], peaks
    if (activation, shape) == ("gelu", (4096, 1024, 4096)):  # docs/mlp.md's figures, bf16 in MiB: 80 and 112 vs 112 and 208
        want = {(False, torch.bfloat16): 80, (True, torch.bfloat16): 112}.get((gated, dtype))
        assert want is None or peaks["ours"] // 2**20 == want


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", [None, "gelu", "silu"])
def test_first_order_backward_with_retain_graph_and_direct_gradients(gated, activation):
    # A backward whose graph dies may write its results over the saved u and g; with
    # retain_graph it must not: a second backward gets the same gradients. And the
    # direct gradients of u and g (the Function's other outputs) add in.
    p = _params(9, 20, 7, gated, True)
    x = torch.randn(11, 9, dtype=torch.float64, requires_grad=True)
    inputs = [x, *p.values()]
    out = _call(mg.mlp, x, p, activation)
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, inputs, g, retain_graph=True)
    second = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(_call(eager, x, p, activation), inputs, g)
    for a, b, e in zip(first, second, want):
        assert torch.equal(a, b)
        assert_rel_close(a, e, torch.float64)
    names = ("up_w", "up_b", "gate_w", "gate_b", "down_w", "down_b")
    args = (x.detach(), *(p.get(n) for n in names), *(None,) * 9, None, activation, "torch")  # no adapters
    out, u, gate, *ts = MLPFunction.apply(*args)
    assert ts == [None, None, None]
    loss = out.square().sum() + u.sin().sum() + (0 if gate is None else gate.cos().sum())
    got = torch.autograd.grad(loss, list(p.values()))

    def ref_loss(*ts):
        q = dict(zip(p, ts))
        u = F.linear(x.detach(), q["up_w"], q.get("up_b"))
        gz = F.linear(x.detach(), q["gate_w"], q.get("gate_b")) if gated else None
        h = activate_ref(u, activation) if not gated else activate_ref(gz, activation) * u
        return F.linear(h, q["down_w"], q["down_b"]).square().sum() + u.sin().sum() + (0 if gz is None else gz.cos().sum())

    for a, e in zip(got, torch.autograd.grad(ref_loss(*p.values()), list(p.values()))):
        assert_rel_close(a, e, torch.float64)


def test_autocast_behaves_like_the_eager_block():
    block = mg.FusedMLP(16, 48, activation="gelu_tanh", gated=True)
    ref = copy.deepcopy(block)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
        want = eager(x, ref.up.weight, ref.down.weight, ref.up.bias, ref.down.bias, "gelu_tanh", ref.gate.weight,
                     ref.gate.bias)
    assert out.dtype == want.dtype == torch.bfloat16
    assert_rel_close(out, want, torch.bfloat16)
    out.float().sum().backward()
    assert block.up.weight.grad.dtype == torch.float32


def test_torch_func_grad_and_vmap():
    p = _params(6, 10, 4, True, True)
    x = torch.randn(3, 6, dtype=torch.float64)

    def loss(up_w, x):
        return mg.mlp(x, up_w, p["down_w"], p["up_b"], p["down_b"], "silu", p["gate_w"], p["gate_b"]).square().sum()

    def loss_ref(up_w, x):
        return eager(x, up_w, p["down_w"], p["up_b"], p["down_b"], "silu", p["gate_w"], p["gate_b"]).square().sum()

    up_w = p["up_w"].detach()
    assert_rel_close(torch.func.grad(loss)(up_w, x), torch.func.grad(loss_ref)(up_w, x), torch.float64)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(up_w, x[:, None])
    want = torch.stack([torch.func.grad(loss_ref)(up_w, x[i : i + 1]) for i in range(3)])
    assert_rel_close(per_sample, want, torch.float64)


def test_backend_of_the_forward_runs_the_backward(backend):  # noqa: F811
    p = _params(16, 40, 8, True, True, dtype=torch.float32)
    x = torch.randn(33, 16, requires_grad=True)
    with mg.dispatch.recording() as ran:
        _call(mg.mlp, x, p, "silu").sum().backward()
    assert ran == {("forward", backend): 1, ("backward", backend): 1}


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(up_w=torch.randn(7, 4)), ValueError, r"torch_matgrad.mlp: input has 3 features .* up_weight of shape \(7, 4\)"),
        (dict(down_w=torch.randn(2, 6)), ValueError, r"down_weight must be 2-D \(out_features, 5\)"),
        (dict(gate_w=torch.randn(4, 3)), ValueError, r"gate_weight must have up_weight's shape \(5, 3\)"),
        (dict(up_b=torch.randn(4)), ValueError, r"up_bias must have shape \(5,\)"),
        (dict(down_b=torch.randn(3)), ValueError, r"down_bias must have shape \(2,\)"),
        (dict(down_w=torch.randn(2, 5, dtype=torch.float64)), TypeError, r"one dtype .* down_weight torch.float64"),
        (dict(down_w=torch.randn(2, 5, device="meta")), RuntimeError, r"one device.* down_weight on meta"),
        (dict(gate_b=torch.randn(5), gate_w=None), ValueError, r"gate_bias given without gate_weight"),
        (dict(activation="tanh"), ValueError, r"unknown activation 'tanh'"),
    ],
)
def test_bad_input_errors(change, error, match):
    args = dict(up_w=torch.randn(5, 3), down_w=torch.randn(2, 5), up_b=None, down_b=None, activation="gelu",
                gate_w=torch.randn(5, 3), gate_b=None)
    args.update(change)
    with pytest.raises(error, match=match):
        mg.mlp(torch.randn(4, 3), args["up_w"], args["down_w"], args["up_b"], args["down_b"], args["activation"],
               args["gate_w"], args["gate_b"])


# ------------------------------------------------------------------- fuse_mlps, nn


def test_fused_mlp_module():
    torch.manual_seed(3)
    block = mg.FusedMLP(12, 40, 6, activation="silu", gated=True)
    assert list(block.state_dict()) == [f"{r}.{p}" for r in ("up", "gate", "down") for p in ("weight", "bias")]
    assert "activation='silu', gated=True" in repr(block)
    x = torch.randn(2, 3, 12)
    want = eager(x, block.up.weight, block.down.weight, block.up.bias, block.down.bias, "silu", block.gate.weight,
                 block.gate.bias)
    assert_rel_close(block(x), want, torch.float32)
    assert not isinstance(block, nn.Linear)


@pytest.mark.parametrize("first", ["nn", "replace_linear", "fuse_activations"])
def test_fuse_mlps_on_sequential_keeps_parameters_and_keys(first):
    model = nn.Sequential(nn.Linear(10, 4), nn.ModuleDict({
        "mlp": nn.Sequential(nn.Linear(4, 16), nn.GELU(approximate="tanh"), nn.Dropout(0.0), nn.Linear(16, 4)),
    }))
    ref = copy.deepcopy(model)
    if first != "nn":
        mg.replace_linear(model)
    if first == "fuse_activations":
        mg.fuse_activations(model)
    params = dict(model.named_parameters())
    assert mg.fuse_mlps(model) == 1
    block = model[1]["mlp"]
    assert isinstance(block, mg.FusedMLP) and block.activation == "gelu_tanh"
    assert dict(model.named_parameters()) == params  # same objects, same names
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 10)
    assert_rel_close(block(model[0](x)), ref[1]["mlp"](ref[0](x)), torch.float32)
    assert mg.fuse_mlps(model) == 0  # already fused


def test_fuse_mlps_leaves_what_it_cannot_reproduce_with_a_warning():
    model = nn.ModuleDict({
        "tanh": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)),
        "dropout": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 4)),
        "norm": nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4)),  # not an MLP: silent
        "ok": nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 4)),
    })
    model["ok"][0].register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning) as record:
        assert mg.fuse_mlps(model) == 0
    text = " ".join(str(w.message) for w in record)
    assert "'tanh'" in text and "Tanh" in text and "'dropout'" in text and "p > 0" in text
    assert "'ok'" in text and "hooks" in text and "'norm'" not in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mg.fuse_mlps(model, exclude=["tanh", "dropout", "ok"]) == 0


# ------------------------------------------------------------------- transformers

transformers = pytest.importorskip("transformers")


def _tiny(kind):
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
    if kind == "llama":
        cfg = transformers.LlamaConfig(intermediate_size=88, num_key_value_heads=2, **common)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "phi":
        cfg = transformers.PhiConfig(intermediate_size=80, **common)
        return transformers.PhiForCausalLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2", "phi"])
@pytest.mark.parametrize("swap_first", [False, True], ids=["mlps_only", "after_replace_linear"])
def test_tiny_models_train_and_generate_the_same(kind, swap_first):
    torch.manual_seed(0)
    ref = _tiny(kind).train()
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    if swap_first:
        mg.replace_linear(model)
    assert mg.fuse_mlps(model) == 2
    assert list(model.state_dict()) == keys
    assert sum(isinstance(m, mg.FusedMLP) for m in model.modules()) == 2
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, model)]
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        ids = torch.randint(0, 97, (2, 12), generator=gen)
        losses = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0]), (step, losses)
    prompt = torch.randint(0, 97, (1, 5), generator=gen)
    outs = [m.eval().generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0) for m in (ref, model)]
    assert torch.equal(*outs)


@pytest.mark.parametrize(
    "config, module, act",
    [
        ("MistralConfig", "transformers.models.mistral.modeling_mistral.MistralMLP", "silu"),
        ("Qwen2Config", "transformers.models.qwen2.modeling_qwen2.Qwen2MLP", "silu"),
        ("GemmaConfig", "transformers.models.gemma.modeling_gemma.GemmaMLP", "gelu_pytorch_tanh"),
        ("LlamaConfig", "transformers.models.llama.modeling_llama.LlamaMLP", "gelu"),
    ],
)
def test_gated_transformers_blocks_are_reproduced(config, module, act):
    import importlib

    path, name = module.rsplit(".", 1)
    cls = getattr(importlib.import_module(path), name)
    kw = dict(hidden_size=24, intermediate_size=56, hidden_act=act, num_attention_heads=4, num_key_value_heads=2)
    if config == "GemmaConfig":
        kw["hidden_activation"] = act
    block = cls(getattr(transformers, config)(**kw))
    holder = nn.ModuleDict({"mlp": block})
    ref = copy.deepcopy(block)
    assert mg.fuse_mlps(holder) == 1
    fused = holder["mlp"]
    assert fused.gated and fused.up_proj is block.up_proj and fused.act_fn is block.act_fn
    x = torch.randn(3, 5, 24, requires_grad=True)
    out, want = fused(x), ref(x)
    assert_rel_close(out, want, torch.float32)
    assert_rel_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0], torch.float32)


def test_transformers_block_with_an_unknown_activation_is_left_with_a_warning():
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = transformers.LlamaConfig(hidden_size=8, intermediate_size=16, hidden_act="relu2", num_attention_heads=2)
    holder = nn.ModuleDict({"mlp": LlamaMLP(config)})
    with pytest.warns(UserWarning, match=r"left 'mlp' as it is: its activation ReLUSquaredActivation"):
        assert mg.fuse_mlps(holder) == 0


def test_rel_tol_table_covers_the_dtypes_used():
    assert {torch.float32, torch.bfloat16, torch.float64} <= set(REL_TOL)
