"""The tools a PyTorch user reaches for, on models using the layers: PEFT's LoRA, and
Hugging Face models (GPT-2's Conv1D, accelerate's offload hooks). Tiny models, built from
configs: nothing is downloaded.
"""

import copy
import io
import subprocess
import sys
import warnings

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

    ref = _gpt2()
    model = copy.deepcopy(ref)
    params, keys = dict(model.named_parameters()), list(model.state_dict())
    assert tm.replace_linear(model) == 2 * 4 + 1  # c_attn, c_proj, c_fc, c_proj per block; lm_head
    block = model.transformer.h[0]
    for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        assert type(layer) is tm.hf.Conv1D and isinstance(layer, Conv1D)
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
    """torch_matgrad.hf.Conv1D is a Conv1D: PEFT adapts it as one (fan_in_fan_out)."""
    pytest.importorskip("peft")
    ref = _gpt2()
    model = copy.deepcopy(ref)
    tm.replace_linear(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT: "setting fan_in_fan_out to True"
        lora, want = _lora(model, ["c_attn", "c_fc"]), _lora(ref, ["c_attn", "c_fc"])
    assert type(lora.base_model.model.transformer.h[0].attn.c_attn.base_layer) is tm.hf.Conv1D
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
