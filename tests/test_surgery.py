"""replace_linear / fuse_activations / restore_linear on real module trees, and the
model-level edges: meta-device weights, tied weights, frozen (LoRA-style) and toggled
``requires_grad``."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_matgrad as tm
from _backends import backend  # noqa: F401  (fixture)
from _util import assert_rel_close

ACT_MODULES = [
    (nn.ReLU(), "relu"),
    (nn.ReLU(inplace=True), "relu"),
    (nn.GELU(), "gelu"),
    (nn.GELU(approximate="tanh"), "gelu_tanh"),
    (nn.SiLU(), "silu"),
]


def _mlp(act=None):
    act = act if act is not None else nn.GELU()
    return nn.Sequential(nn.Linear(7, 33), act, nn.Linear(33, 5))


def _outputs_and_grads(model, x):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    params = list(model.parameters())
    # The same cotangent for both models under comparison (randn_like takes no generator
    # before torch 2.5).
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, [x] + params, cot.to(out.device))
    return [out, *grads]


def _assert_same_function(a, b, x, dtype=torch.float32):
    for i, (got, want) in enumerate(zip(_outputs_and_grads(a, x), _outputs_and_grads(b, x))):
        assert_rel_close(got, want, dtype, what=f"output/grad #{i}")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3, bias=False)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x + self.mlp(x))


def test_replace_linear_swaps_and_shares_parameters():
    model = Block().eval()
    ref = copy.deepcopy(model)
    params_before = dict(model.named_parameters())
    with pytest.warns(UserWarning, match=r"'attn.out_proj'.*MultiheadAttention"):
        n = tm.replace_linear(model)
    assert n == 3
    assert all(type(m) is tm.Linear for m in (model.mlp[0], model.mlp[2], model.head))
    assert type(model.attn.out_proj) is not tm.Linear
    # Same Parameter objects, same names: optimizer state and state_dict stay valid.
    assert all(p is params_before[k] for k, p in model.named_parameters())
    assert list(model.state_dict()) == list(ref.state_dict())
    assert not model.training and not model.head.training
    _assert_same_function(model, ref, torch.randn(2, 5, 16))


def test_replace_linear_keeps_device_dtype_and_mode():
    ref = _mlp().to(torch.float64).train()
    ref[2].eval()
    model = copy.deepcopy(ref)
    tm.replace_linear(model)
    assert model[0].weight.dtype == torch.float64 and model[0].training and not model[2].training
    _assert_same_function(model, ref, torch.randn(4, 7, dtype=torch.float64), torch.float64)


def test_optimizer_state_survives_the_swap():
    model, ref = _mlp(), _mlp()
    ref.load_state_dict(model.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, ref)]
    x = torch.randn(9, 7)
    for step in range(3):
        if step == 1:
            tm.replace_linear(model)  # between steps, with Adam moments already stored
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_rel_close(p, q, torch.float32, what=name)
    assert type(model[0]) is tm.Linear


def test_parameter_hooks_survive_and_the_root_is_not_replaced():
    model = _mlp()
    seen = []
    model[0].weight.register_hook(lambda g: seen.append(tuple(g.shape)))
    assert tm.replace_linear(model) == 2
    model(torch.randn(3, 7)).sum().backward()
    assert seen == [(33, 7)]  # the hook lives on the shared Parameter
    root = nn.Linear(3, 3)
    assert tm.replace_linear(root) == 0 and type(root) is nn.Linear  # documented: use from_linear


@pytest.mark.parametrize(
    "include, exclude, swapped",
    [
        (None, None, {"enc.0", "enc.2", "dec.0", "dec.2", "lm_head"}),
        ("enc", None, {"enc.0", "enc.2"}),  # a parent's name selects its children
        (["*.0"], None, {"enc.0", "dec.0"}),
        (None, "lm_head", {"enc.0", "enc.2", "dec.0", "dec.2"}),
        ("enc", ["enc.2"], {"enc.0"}),  # exclude wins over include
        ("dec.*", "dec", set()),
        ("nothing*", None, set()),
    ],
)
def test_include_exclude_patterns(include, exclude, swapped):
    model = nn.Module()
    model.enc, model.dec, model.lm_head = _mlp(), _mlp(), nn.Linear(5, 2)
    assert tm.replace_linear(model, include=include, exclude=exclude) == len(swapped)
    got = {name for name, m in model.named_modules() if isinstance(m, tm.Linear)}
    assert got == swapped


def test_already_swapped_layers_are_skipped_silently():
    model = _mlp()
    assert tm.replace_linear(model) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tm.replace_linear(model) == 0


def test_subclasses_and_hooked_layers_are_left_alone_with_a_warning():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    calls = []
    model[1].register_forward_hook(lambda *args: calls.append("hook"))
    with pytest.warns(UserWarning) as record:
        assert tm.replace_linear(model) == 1
    messages = " ".join(str(w.message) for w in record)
    assert "'0'" in messages and "subclass" in messages and "'1'" in messages and "hooks" in messages
    assert type(model[0]) is Scaled and type(model[1]) is nn.Linear and type(model[2]) is tm.Linear
    model(torch.randn(2, 4))
    assert calls == ["hook"]


def test_excluded_layers_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tm.replace_linear(Block(), exclude="attn") == 3


def test_the_warning_says_how_to_silence_it():
    with pytest.warns(UserWarning) as record:
        tm.replace_linear(Block())
    (message,) = [str(w.message) for w in record]
    assert "exclude=['attn.out_proj'] (or a pattern such as '*.out_proj')" in message
    with warnings.catch_warnings():  # following the advice silences it
        warnings.simplefilter("error")
        assert tm.replace_linear(Block(), exclude=["attn.out_proj"]) == 3
        assert tm.replace_linear(Block(), exclude=["*.out_proj"]) == 3


def test_the_readme_pattern_covers_nn_transformer_attention():
    # README: exclude=["lm_head", "*attn"]. nn.Transformer names its attention modules
    # self_attn (encoder and decoder) and multihead_attn (decoder cross-attention).
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        n = tm.replace_linear(model, exclude=["lm_head", "*attn"])
    assert n == 4  # linear1 and linear2 of the encoder layer's and the decoder layer's feed-forward
    for name in ("encoder.layers.0.self_attn", "decoder.layers.0.self_attn", "decoder.layers.0.multihead_attn"):
        assert type(model.get_submodule(name).out_proj) is not tm.Linear


def test_shared_module_is_swapped_once_and_stays_shared():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    assert tm.replace_linear(model) == 1
    assert model[0] is model[2] and type(model[0]) is tm.Linear


def test_tied_weights_accumulate_gradients_like_nn_linear():
    def tied():
        a, b = nn.Linear(8, 8), nn.Linear(8, 8, bias=False)
        b.weight = a.weight  # the same Parameter in two layers
        return nn.Sequential(a, nn.Tanh(), b)

    ref = tied()
    model = copy.deepcopy(ref)  # deepcopy keeps the tie
    tm.replace_linear(model)
    assert model[0].weight is model[2].weight
    assert len(list(model.parameters())) == 2
    _assert_same_function(model, ref, torch.randn(5, 8))


def test_meta_device_model_swaps_then_materialises():
    with torch.device("meta"):
        model = _mlp()
    assert tm.replace_linear(model) == 2
    assert model[0].weight.is_meta
    out = model(torch.randn(3, 4, 7, device="meta"))
    assert out.is_meta and out.shape == (3, 4, 5)  # shape propagation, as F.linear does
    model.to_empty(device="cpu")
    for m in model:
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    assert type(model[0]) is tm.Linear and not model[0].weight.is_meta
    ref = _mlp()
    ref.load_state_dict(model.state_dict())
    _assert_same_function(model, ref, torch.randn(3, 7))


def test_meta_weights_with_real_input_raise_a_clear_error():
    with torch.device("meta"):
        layer = tm.Linear(7, 5)
    with pytest.raises(RuntimeError, match=r"one device.*input on cpu, weight on meta"):
        layer(torch.randn(2, 7))


@pytest.mark.parametrize("act, name", ACT_MODULES, ids=[f"{n}-{a!r}" for a, n in ACT_MODULES])
@pytest.mark.parametrize("pre_swapped", [False, True])
def test_fuse_activations_same_numerics(act, name, pre_swapped):
    ref = _mlp(copy.deepcopy(act))
    model = copy.deepcopy(ref)
    if pre_swapped:
        tm.replace_linear(model)
    keys, weight = list(model.state_dict()), model[0].weight
    assert tm.fuse_activations(model) == 1
    assert type(model[0]) is tm.LinearAct and model[0].activation == name
    assert not isinstance(model[0], nn.Linear)  # LoRA & co. must not take it for a linear map
    assert type(model[1]) is nn.Identity and len(model) == 3
    assert list(model.state_dict()) == keys
    assert model[0].weight is weight
    # Same function on ragged, non-contiguous, leading-batch-dim input.
    x = torch.randn(3, 7, 4).transpose(1, 2)
    _assert_same_function(model, ref, x)


def test_fuse_activations_shares_parameters_and_skips_unsafe_pairs():
    shared = nn.Linear(4, 4)
    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda m, i, o: None)

    class MyReLU(nn.ReLU):
        pass

    model = nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(),  # fused
        shared, nn.ReLU(),  # shared Linear also used below: not fused
        hooked, nn.SiLU(),  # hook would see the pre-activation: not fused
        nn.Linear(4, 4), MyReLU(),  # subclassed activation: not fused
        nn.Linear(4, 4), nn.Tanh(),  # unsupported activation
        nn.Sequential(nn.Linear(4, 4), nn.GELU()),  # nested Sequential: fused
        shared,
    )
    first_weight = model[0].weight
    ref = copy.deepcopy(model)
    assert tm.fuse_activations(model) == 2
    assert model[0].weight is first_weight
    assert [type(m).__name__ for m in model[:10]] == [
        "LinearAct", "Identity", "Linear", "ReLU", "Linear", "SiLU", "Linear", "MyReLU", "Linear", "Tanh"
    ]
    assert type(model[2]) is nn.Linear and model[10][0].activation == "gelu"
    _assert_same_function(model, ref, torch.randn(6, 4))


def test_fuse_only_inside_sequential():
    assert tm.fuse_activations(Block()) == 1  # the MLP's Linear -> SiLU is a Sequential...
    block = Block()
    block.mlp = nn.ModuleList(list(block.mlp))  # ...a ModuleList has no call order
    assert tm.fuse_activations(block) == 0


class _MatmulShapes(TorchDispatchMode):
    """Records the output shape of every matrix product that runs."""

    PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.PRODUCTS:
            self.shapes.append(tuple(out.shape))
        return out


class LoRA(nn.Module):
    """A frozen base layer plus a trainable rank-4 update, as in LoRA fine-tuning."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.base = nn.Linear(n_in, n_out)
        self.down = nn.Linear(n_in, 4, bias=False)
        self.up = nn.Linear(4, n_out, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def _lora_model():
    model = nn.Sequential(LoRA(24, 40), nn.GELU(), LoRA(40, 24))
    tm.replace_linear(model)
    for layer in (model[0], model[2]):
        layer.base.requires_grad_(False)
    return model


def _backward_products(model, x):
    out = model(x)
    with _MatmulShapes() as rec:
        out.backward(torch.randn_like(out))
    return rec.shapes


def test_frozen_base_weights_skip_the_weight_gradient_product():
    # torch ops, so that the products are visible to the dispatch mode (a Triton kernel
    # is not an aten op); the test below covers what every backend is asked for.
    with tm.use_backend("torch"):
        _check_products_skipped()


def _check_products_skipped():
    model = _lora_model()
    x = torch.randn(7, 24)
    shapes = _backward_products(model, x)
    # grad_W = G_z^T x would be a (40, 24) / (24, 40) product; the adapters' are (4, .)
    # and (., 4), and grad_x products are (7, .): so the weight shapes identify it.
    assert (40, 24) not in shapes and (24, 40) not in shapes
    assert (4, 24) in shapes and (24, 4) in shapes  # the adapters' weight gradients do run
    assert all(layer.base.weight.grad is None for layer in (model[0], model[2]))
    # The control: unfrozen, the same count shows the products, so the test can fail.
    model[2].base.requires_grad_(True)
    shapes = _backward_products(model, x)
    assert (24, 40) in shapes and (40, 24) not in shapes


def test_frozen_base_weights_ask_no_backend_for_the_weight_gradient(backend, monkeypatch):
    asked = []
    real_backward = tm.dispatch.backward

    def spy(grad_out, grad_z, x, weight, saved, activation, needs, ran_on):
        assert ran_on == backend
        asked.append((None if weight is None else tuple(weight.shape), tuple(needs)))
        return real_backward(grad_out, grad_z, x, weight, saved, activation, needs, ran_on)

    monkeypatch.setattr(tm.dispatch, "backward", spy)
    model = _lora_model()
    model(torch.randn(7, 24)).sum().backward()
    # (saved weight's shape, (need_x, need_W, need_b)); W is saved only when grad_x is
    # needed. The first base layer sees data and frozen parameters: no backward at all.
    # The second base layer is asked for grad_x only; the adapters for their weights.
    expected = [
        (None, (False, True, False)),  # first down-projection (its input is data)
        ((40, 4), (True, True, False)),  # first up-projection
        ((24, 40), (True, False, False)),  # second base layer: no G_z^T x
        ((4, 40), (True, True, False)),
        ((24, 4), (True, True, False)),
    ]
    assert sorted(asked, key=str) == sorted(expected, key=str)


def test_requires_grad_toggled_between_steps_matches_nn_linear():
    ref = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 6))
    model = copy.deepcopy(ref)
    tm.replace_linear(model)
    tm.fuse_activations(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref)]
    for step, frozen in enumerate([True, False, True, False]):
        x = torch.randn(5, 12)
        for m, opt in zip((model, ref), opts):
            m[0].weight.requires_grad_(not frozen)
            opt.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            opt.step()
        assert (model[0].weight.grad is None) == frozen, f"step {step}"
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert_rel_close(p, q, torch.float32, what=f"step {step} {name}")


# ------------------------------------------------------------------- restore_linear


def _swapped_and_fused(act=None):
    ref = _mlp(act)
    model = copy.deepcopy(ref)
    assert tm.replace_linear(model) == 2 and tm.fuse_activations(model) == 1
    return ref, model


@pytest.mark.parametrize("act, name", ACT_MODULES, ids=[f"{n}-{a!r}" for a, n in ACT_MODULES])
def test_restore_linear_undoes_replace_and_fuse(act, name):
    ref, model = _swapped_and_fused(copy.deepcopy(act))
    params, keys = dict(model.named_parameters()), list(model.state_dict())
    model[2].eval()
    assert tm.restore_linear(model) == 2
    assert [type(m) for m in model] == [nn.Linear, type(act), nn.Linear]
    assert list(model.state_dict()) == keys == list(ref.state_dict())
    assert all(p is params[k] for k, p in model.named_parameters())  # shared, not copied
    assert model[0].training and not model[2].training
    x = torch.randn(3, 4, 7)
    _assert_same_function(model.train(), ref, x)
    assert tm.restore_linear(model) == 0  # nothing of ours is left


def test_restore_linear_activation_kinds_round_trip():
    for act, name in ACT_MODULES:
        _, model = _swapped_and_fused(copy.deepcopy(act))
        tm.restore_linear(model)
        assert tm.fuse_activations(model) == 1 and model[0].activation == name


def test_restore_linear_outside_a_fused_sequential_wraps_in_a_sequential():
    """A LinearAct built directly has no free slot for the activation: it becomes
    Sequential(nn.Linear, activation), keys gaining '.0'; a shared one stays shared."""
    model = nn.Module()
    model.fc = tm.Linear(6, 8, activation="silu")
    model.seq = nn.Sequential(model.fc, nn.Identity(), nn.Linear(8, 2))  # shared: no slot reuse
    model.last = tm.LinearAct(8, 3, bias=False, activation="gelu_tanh")
    ref = copy.deepcopy(model)
    weight = model.fc.weight
    assert tm.restore_linear(model) == 2
    assert type(model.fc) is nn.Sequential and model.seq[0] is model.fc and type(model.seq[1]) is nn.Identity
    assert [type(m) for m in model.fc] == [nn.Linear, nn.SiLU] and model.fc[0].weight is weight
    assert type(model.last[1]) is nn.GELU and model.last[1].approximate == "tanh" and model.last[0].bias is None
    assert sorted(model.state_dict()) == ["fc.0.bias", "fc.0.weight", "last.0.weight", "seq.0.0.bias",
                                          "seq.0.0.weight", "seq.2.bias", "seq.2.weight"]
    x = torch.randn(5, 6)
    for m in (model, ref):
        m.forward = lambda x, m=m: (m.seq(x), m.last(m.fc(x)))
    for got, want in zip(model(x), ref(x)):
        assert_rel_close(got, want, torch.float32, what="restored output")


def test_restore_linear_patterns_and_refusals():
    class MyLinear(tm.Linear):
        pass

    model = nn.Sequential(tm.Linear(4, 4), MyLinear(4, 4), tm.Linear(4, 4), nn.Sequential(tm.Linear(4, 4)))
    model[2].register_forward_pre_hook(lambda *args: None)
    with pytest.warns(UserWarning) as record:
        assert tm.restore_linear(model, exclude="3") == 1
    messages = " ".join(str(w.message) for w in record)
    assert "restore_linear: left '1'" in messages and "subclass of torch_matgrad.Linear" in messages
    assert "left '2'" in messages and "hooks" in messages
    assert [type(m) for m in model[:3]] == [nn.Linear, MyLinear, tm.Linear] and type(model[3][0]) is tm.Linear
    assert tm.restore_linear(model, include="3.*") == 1 and type(model[3][0]) is nn.Linear


def test_quantize_dynamic_after_restore_linear():
    """quantize_dynamic({nn.Linear}) swaps exact nn.Linear types: torch_matgrad layers
    stay float, silently. restore_linear first makes the result the stock model's."""
    import warnings

    quantize_dynamic = torch.ao.quantization.quantize_dynamic
    quantized = torch.ao.nn.quantized.dynamic.Linear
    ref = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    model = copy.deepcopy(ref)
    tm.replace_linear(model)
    tm.fuse_activations(model)
    x = torch.randn(5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization's notice
        warnings.simplefilter("ignore", UserWarning)  # quantized tensor creation's notice
        left_float = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        assert not any(isinstance(m, quantized) for m in left_float.modules())  # the trap
        assert tm.restore_linear(model) == 3
        got = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        want = quantize_dynamic(copy.deepcopy(ref), {nn.Linear}, dtype=torch.qint8)
    assert [type(m).__name__ for m in got] == [type(m).__name__ for m in want]
    assert sum(isinstance(m, quantized) for m in got) == 3
    assert torch.equal(got(x), want(x))
