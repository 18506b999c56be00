"""The tools a PyTorch user reaches for, on models using the layers: TorchScript (script,
trace, save and load), the legacy ONNX export run by onnxruntime, torch.fx symbolic
tracing, torch.export (strict), PEFT's LoRA, and Hugging Face models (GPT-2's Conv1D,
accelerate's offload hooks). Tiny models, built from configs: nothing is downloaded.
"""

import copy
import io
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import torch_matgrad as tm
from _util import assert_rel_close, reference

ACTS = list(tm.ACTIVATIONS)


def _model(seed=0):
    """Every layer kind and activation: a torch_matgrad.Linear, a LinearAct per
    activation, one without bias, and leading batch dims in use."""
    torch.manual_seed(seed)
    return nn.Sequential(
        tm.Linear(12, 16),
        tm.LinearAct(16, 16, activation="relu"),
        tm.LinearAct(16, 16, activation="gelu"),
        tm.LinearAct(16, 16, bias=False, activation="gelu_tanh"),
        tm.LinearAct(16, 8, activation="silu"),
    )


def _reference64(model, x):
    """The model's function in float64 with torch.nn.functional alone."""
    x = x.double()
    for layer in model:
        bias = None if layer.bias is None else layer.bias.double()
        x = reference(x, layer.weight.double(), bias, layer.activation)
    return x


def _quiet():
    """TorchScript's and the legacy exporter's deprecation notices are not our subject."""
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    return context


@pytest.fixture
def quiet():
    context = _quiet()
    yield
    context.__exit__(None, None, None)


def _round_trip(scripted):
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    return torch.jit.load(buf)


# ------------------------------------------------------------------ TorchScript


def test_torch_jit_script_save_and_load(quiet):
    model = _model()
    loaded = _round_trip(torch.jit.script(model))
    for rows in ((5,), (2, 3), (0,)):
        x = torch.randn(*rows, 12)
        assert_rel_close(loaded(x), _reference64(model, x), torch.float32, what=f"scripted, rows {rows}")
    # The compiled code is F.linear and the activation: no Python call left to fail at save.
    assert str(loaded.inlined_graph).count("aten::linear") == 5


def test_torch_jit_trace_save_and_load_trains_like_eager(quiet):
    model = _model()
    x = torch.randn(3, 4, 12)
    traced = torch.jit.trace(model, x)
    assert "LinearFunction" not in str(traced.inlined_graph)  # aten ops only
    loaded = _round_trip(traced)
    x2 = torch.randn(3, 4, 12, requires_grad=True)  # another input of the traced shape
    out = loaded(x2)
    assert out.requires_grad
    assert_rel_close(out, _reference64(model, x2.detach()), torch.float32, what="traced output")
    # Gradients through the loaded trace (its own parameter copies) equal eager's.
    (grad_x,) = torch.autograd.grad(out.square().sum(), x2)
    x3 = x2.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(model(x3).square().sum(), x3)
    assert_rel_close(grad_x, want, torch.float32, what="grad through the trace")


def test_jit_trace_warns_nothing_from_the_package():
    """The input checks compare sizes, which a trace records as traced values (comparing
    them warns that the trace keeps the outcome): they run with the tracer paused, so
    nothing warns even with every filter reset, as pytest resets them for each test."""
    model, package = _model(), Path(tm.__file__).parent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(model, torch.randn(2, 3, 12))
        torch.jit.trace(model, torch.randn(2, 12, requires_grad=True))  # the training path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.jit.trace(model, torch.randn(5, 12))
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if Path(w.filename).is_relative_to(package)]
    assert not ours, ours
    # The full checks, which the MLP block shares, on traced sizes.
    w, b = torch.randn(16, 12), torch.randn(16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(lambda x: (tm.function._check(x, w, b, "gelu"), x * 2)[1], torch.randn(2, 12))
        # A conversion of our own, to show that the tracer's warnings are recorded here.
        torch.jit.trace(lambda x: x * 2 if bool(x.sum() > -1e9) else x, torch.randn(2, 12))
    tracer = [c for c in caught if issubclass(c.category, torch.jit.TracerWarning)]
    assert tracer and all(Path(c.filename) == Path(__file__) for c in tracer), [(c.filename, str(c.message))
                                                                                 for c in tracer]
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):  # the checks still run
        torch.jit.trace(lambda x: tm.linear(x, torch.randn(16, 12), torch.randn(1)), torch.randn(2, 12))


def test_functional_linear_under_jit_trace(quiet):
    w, b = torch.randn(6, 5), torch.randn(6)
    traced = torch.jit.trace(lambda x: tm.linear(x, w, b, "gelu"), torch.randn(2, 5, requires_grad=True))
    x = torch.randn(7, 5)
    assert_rel_close(traced(x), reference(x.double(), w.double(), b.double(), "gelu"), torch.float32)


# ------------------------------------------------------------------ legacy ONNX


def test_legacy_onnx_export_runs_in_onnxruntime(quiet):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _model().eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.randn(3, 12),), buf, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for rows in (3, 17):
        x = torch.randn(rows, 12)
        (y,) = session.run(None, {"x": x.numpy()})
        assert_rel_close(torch.from_numpy(y), _reference64(model, x), torch.float32, what=f"onnxruntime, {rows} rows")


# ------------------------------------------------------------------------ torch.fx


class _Functional(nn.Module):
    """Calls the op as ``torch_matgrad.linear(...)``, the way user code does."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4))

    def forward(self, x):
        return tm.linear(x, self.weight, self.bias, activation="silu") * 2


def test_fx_symbolic_trace_records_one_node_per_op():
    model = nn.Sequential(_model(), nn.Tanh(), _Functional())
    graph_module = torch.fx.symbolic_trace(model)
    calls = [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target is tm.function.linear]
    assert len(calls) == 6  # five layers and the functional call, each one node
    assert [n.args[3] if len(n.args) > 3 else n.kwargs.get("activation") for n in calls] == ACTS + ["silu"]
    x = torch.randn(2, 5, 12, requires_grad=True)
    got, want = graph_module(x), model(x)
    assert torch.equal(got, want)
    (g1,) = torch.autograd.grad(got.sum(), x)
    (g2,) = torch.autograd.grad(want.sum(), x)
    assert torch.equal(g1, g2)


# ------------------------------------------------------------------ torch.export


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
def test_torch_export_outputs_require_grad_like_nn_linear(strict):
    model = _model()
    ref = nn.Sequential(nn.Linear(12, 16), nn.GELU())
    x = torch.randn(3, 12)
    exported = torch.export.export(model, (x,), strict=strict).module()
    stock = torch.export.export(ref, (x,), strict=strict).module()
    out = exported(x)
    assert out.requires_grad == stock(x).requires_grad == True  # noqa: E712
    assert_rel_close(out, _reference64(model, x), torch.float32, what="exported output")


# --------------------------------------------------------------------- PEFT LoRA


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))


def _lora(model, targets, seed=1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # init_lora_weights=False: random A and B, so BAx != 0
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))


def _fused(model):
    model = copy.deepcopy(model)
    assert tm.replace_linear(model) == 3 and tm.fuse_activations(model) == 2
    return model


def test_peft_lora_refuses_a_fused_layer_by_name():
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match=r"LinearAct.*is not supported"):
        _lora(_fused(_mlp()), ["0", "4"])


def test_peft_all_linear_leaves_fused_layers_unadapted():
    """``all-linear`` picks nn.Linear layers: the fused ones (0 and 2) get no adapter and
    compute act(Wx + b) exactly; never act(Wx + b) + BAx."""
    pytest.importorskip("peft")
    lora = _lora(_fused(_mlp()), "all-linear")
    model = lora.base_model.model
    assert type(model[0]) is tm.LinearAct and type(model[2]) is tm.LinearAct
    want = _lora(_mlp(), ["4"])  # the same adapter on the same layer, the rest stock
    x = torch.randn(5, 8)
    assert_rel_close(lora(x), want(x), torch.float32, what="all-linear on the fused model")


def test_peft_lora_on_restored_layers_is_act_of_wx_plus_b_plus_bax():
    """The documented way to adapt fused layers: restore_linear, then replace_linear
    without fusing: LoRA then computes act(Wx + b + BAx), as on the stock model."""
    pytest.importorskip("peft")
    model = _fused(_mlp())
    assert tm.restore_linear(model) == 3 and tm.replace_linear(model) == 3
    lora, want = _lora(model, ["0", "2", "4"]), _lora(_mlp(), ["0", "2", "4"])
    x = torch.randn(5, 8)
    assert_rel_close(lora(x), want(x), torch.float32, what="LoRA output")
    first = lora.base_model.model[0]  # act(Wx + b + s B A x) for the first layer, by hand
    delta = first.lora_B["default"](first.lora_A["default"](x)) * first.scaling["default"]
    by_hand = nn.functional.silu(first.base_layer(x) + delta)
    assert_rel_close(lora.base_model.model[1](first(x)), by_hand, torch.float32, what="first layer")
    merged = lora.merge_and_unload()
    assert_rel_close(merged(x), want(x), torch.float32, what="after merge_and_unload")


# ----------------------------------------------------- Hugging Face transformers


def _gpt2(**config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    options = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                   eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    options.update(config)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**options))


def test_gpt2_conv1d_is_swapped_sharing_parameters():
    from transformers.pytorch_utils import Conv1D

    from torch_matgrad.surgery import conv1d as ours

    ref = _gpt2()
    model = copy.deepcopy(ref)
    params, keys = dict(model.named_parameters()), list(model.state_dict())
    assert tm.replace_linear(model) == 2 * 4 + 1  # c_attn, c_proj, c_fc, c_proj per block; lm_head
    block = model.transformer.h[0]
    for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        assert type(layer) is ours.Conv1D and isinstance(layer, Conv1D)
    assert type(model.lm_head) is tm.Linear and model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert all(p is params[k] for k, p in model.named_parameters()) and list(model.state_dict()) == keys
    assert tm.replace_linear(model) == 0
    # The weight is read through a transpose: the (in, out) Parameter, never a copy.
    layer = block.mlp.c_fc
    x = torch.randn(3, 32, requires_grad=True)
    with tm.dispatch.recording() as ran:
        out = layer(x)
    assert ran["forward", "torch"] == 1
    assert_rel_close(out, x.double() @ layer.weight.double() + layer.bias.double(), torch.float32, what="x W + b")
    out.sum().backward()
    assert layer.weight.grad.shape == (32, 128)
    assert tm.restore_linear(model) == 9
    assert type(block.attn.c_attn) is Conv1D and type(model.lm_head) is nn.Linear
    assert all(p is params[k] for k, p in model.named_parameters())


def test_gpt2_trains_and_generates_like_the_original():
    ref = _gpt2()
    model = copy.deepcopy(ref)
    tm.replace_linear(model)
    g = torch.Generator().manual_seed(2)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, model)]
    for step in range(3):
        ids = torch.randint(0, 64, (4, 16), generator=g)
        losses = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            with tm.dispatch.recording() as ran:
                loss = m(input_ids=ids, labels=ids).loss
                loss.backward()
            opt.step()
            losses.append(loss.item())
        assert ran["forward", "torch"] == 9 and ran["backward", "torch"] == 9, ran  # the swapped model's op ran
        assert abs(losses[1] - losses[0]) <= 1e-5 * abs(losses[0]), f"step {step}: {losses}"
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_rel_close(p, q, torch.float32, what=name)
    prompt = torch.randint(0, 64, (2, 4), generator=g)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.eval().generate(prompt, **kwargs), ref.eval().generate(prompt, **kwargs))


def test_gpt2_resize_token_embeddings_brings_back_a_stock_untied_head():
    """As the README says: a resized untied lm_head (and anything from_pretrained builds)
    is a new stock module; replace_linear again swaps it."""
    model = _gpt2(tie_word_embeddings=False)
    tm.replace_linear(model)
    model.resize_token_embeddings(70)
    assert type(model.lm_head) is nn.Linear
    assert tm.replace_linear(model) == 1 and type(model.lm_head) is tm.Linear


def test_peft_lora_on_swapped_gpt2_matches_the_original():
    """torch_matgrad.surgery.conv1d.Conv1D is a Conv1D: PEFT adapts it as one (fan_in_fan_out)."""
    pytest.importorskip("peft")
    from torch_matgrad.surgery import conv1d as ours

    ref = _gpt2()
    model = copy.deepcopy(ref)
    tm.replace_linear(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT: "setting fan_in_fan_out to True"
        lora, want = _lora(model, ["c_attn", "c_fc"]), _lora(ref, ["c_attn", "c_fc"])
    assert type(lora.base_model.model.transformer.h[0].attn.c_attn.base_layer) is ours.Conv1D
    ids = torch.randint(0, 64, (2, 12))
    assert_rel_close(lora(input_ids=ids).logits, want(input_ids=ids).logits, torch.float32, what="LoRA logits")


def test_layers_with_accelerate_hooks_are_left_alone_with_a_warning():
    accelerate = pytest.importorskip("accelerate")
    ref = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    model = copy.deepcopy(ref)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))  # weights on meta until each call
    assert model[0].weight.is_meta
    with pytest.warns(UserWarning) as record:
        assert tm.replace_linear(model) == 0
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and all("patched" in m and "_hf_hook" in m for m in messages)
    assert tm.fuse_activations(model) == 0
    x = torch.randn(3, 8)
    assert_rel_close(model(x), ref(x), torch.float32, what="offloaded model after the calls")
