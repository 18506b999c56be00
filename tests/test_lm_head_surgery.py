"""``fuse_lm_head_loss`` / ``restore_lm_head_loss`` on tiny transformers causal LMs built
from configs: the model's own loss (shifted labels, -100s, ``num_items_in_batch``) from
the fused op without logits, the stock logits and ``generate`` otherwise, training, the
round trip, composition with the other surgery, and what is refused."""

from __future__ import annotations

import copy
import inspect
import io
import math
import warnings

import pytest
import torch
from torch import nn

import torch_matgrad as mg

from _util import assert_rel_close

transformers = pytest.importorskip("transformers")

V = 97
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def _tiny(family: str, dtype=torch.float32) -> nn.Module:
    """A two-layer model of ``family``; Gemma 2 and 3 with a soft cap small enough to
    change the loss, Llama and Qwen2 with tied embeddings (GPT-2 and Gemma tie by default)."""
    t = transformers
    gated = dict(intermediate_size=64, num_key_value_heads=2)
    if family == "gpt2":
        config = t.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return t.GPT2LMHeadModel(config).to(dtype)
    configs = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, dict(tie_word_embeddings=True)),
        "mistral": (t.MistralConfig, t.MistralForCausalLM, {}),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, dict(head_dim=8)),
        "gemma": (t.GemmaConfig, t.GemmaForCausalLM, dict(head_dim=8)),
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM, dict(head_dim=8, final_logit_softcapping=0.1)),
        "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM, dict(head_dim=8, final_logit_softcapping=0.1)),
        "phi": (t.PhiConfig, t.PhiForCausalLM, {}),  # a head with a bias
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM, dict(pad_token_id=0)),
    }
    config_class, model_class, extra = configs[family]
    model = model_class(config_class(**gated, **extra, **COMMON)).to(dtype)
    if family == "phi":  # initialised to zeros: make the bias count
        nn.init.normal_(model.lm_head.bias)
    return model


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi", "phi3", "gpt2"]


@pytest.fixture
def op_calls(monkeypatch):
    """How many times the fused op ran (a counting wrapper around it)."""
    from torch_matgrad.surgery import causal_lm

    calls = []
    op = causal_lm.linear_cross_entropy

    def counted(*args, **kwargs):
        calls.append(kwargs.get("softcap"))
        return op(*args, **kwargs)

    monkeypatch.setattr(causal_lm, "linear_cross_entropy", counted)
    return calls


def _batch(gen=None):
    ids = torch.randint(0, V, (2, 11), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt left out of the loss
    labels[1, -2:] = -100  # padding
    return ids, labels


def _fused_copy(ref: nn.Module) -> nn.Module:
    model = copy.deepcopy(ref)
    assert mg.fuse_lm_head_loss(model) == 1
    return model


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_are_the_models_own_without_logits(family, op_calls):
    ref = _tiny(family)
    keys = list(ref.state_dict())
    model = _fused_copy(ref)
    assert list(model.state_dict()) == keys and type(model.lm_head) is nn.Linear
    tied = ref.lm_head.weight is ref.get_input_embeddings().weight
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    assert tied == (family in ("llama", "qwen2", "gemma", "gemma2", "gemma3", "gpt2"))
    # generate and Trainer read the signature (logits_to_keep, which columns to keep)
    assert inspect.signature(model.forward) == inspect.signature(ref.forward)
    ids, labels = _batch()
    for extra in ({}, {"num_items_in_batch": torch.tensor(13)}):
        ref.zero_grad(), model.zero_grad()
        want, got = ref(input_ids=ids, labels=labels, **extra), model(input_ids=ids, labels=labels, **extra)
        assert got.logits is None and "logits" not in got and want.logits.shape == (2, 11, V)
        assert_rel_close(got.loss, want.loss, torch.float32, "loss")
        assert got.loss.dtype == want.loss.dtype == torch.float32
        want.loss.backward(), got.loss.backward()
        want_grads, got_grads = _grads(ref), _grads(model)
        assert list(got_grads) == list(want_grads)
        for name in want_grads:
            assert_rel_close(got_grads[name], want_grads[name], torch.float32, name)
    cap = 0.1 if family in ("gemma2", "gemma3") else None
    assert op_calls == [cap, cap]
    if cap is not None:  # the soft cap matters at this size: the op applied it
        uncapped = copy.deepcopy(ref)
        uncapped.config.final_logit_softcapping = None
        assert abs(uncapped(input_ids=ids, labels=labels).loss - want.loss) > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_nothing_of_the_logits_size_is_kept_for_the_backward(family):
    ref = _tiny(family)
    model = _fused_copy(ref)
    ids, labels = _batch()

    def kept_shapes(m):  # of the tensors kept for the backward other than the Parameters (or views of them)
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        shapes = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(input_ids=ids, labels=labels).loss.backward()
        return shapes

    def logits_sized(shapes):
        return [s for s in shapes if len(s) > 1 and s[-1] == V and math.prod(s) >= ids.numel() * V]

    assert logits_sized(kept_shapes(ref))  # the stock loss keeps the logits (and more)
    assert not logits_sized(kept_shapes(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_without_labels_or_gradients_the_models_own_forward_runs(family, op_calls):
    ref = _tiny(family).eval()
    model = _fused_copy(ref)
    ids, labels = _batch()
    assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    with torch.no_grad():
        got, want = model(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
        assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
    prompt = ids[:1, :5]
    outs = [m.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                       return_dict_in_generate=True) for m in (ref, model)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert all(torch.equal(a, b) for a, b in zip(outs[0].scores, outs[1].scores))
    assert op_calls == []


def _adamw_losses(model: nn.Module, batches) -> list:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for ids, labels in batches:
        opt.zero_grad()
        losses.append(model(input_ids=ids, labels=labels).loss)
        losses[-1].backward()
        opt.step()
    return [loss.item() for loss in losses]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_five_adamw_steps_give_the_same_losses(family):
    ref = _tiny(family).train()
    model = _fused_copy(ref)
    gen = torch.Generator().manual_seed(1)
    batches = [_batch(gen) for _ in range(5)]
    assert _adamw_losses(model, batches) == pytest.approx(_adamw_losses(ref, batches), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-model", "fp32-model-bf16-autocast"])
def test_half_precision_loss_is_float32_as_the_models_own(family, autocast, op_calls):
    ref = _tiny(family, torch.float32 if autocast else torch.bfloat16)
    model = _fused_copy(ref)
    ids, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want, got = ref(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss
    # ForCausalLMLoss upcasts the bf16 logits: the loss is not rounded to bf16 either
    # (that alone would be ~1e-3 off); the logits' own rounding is what differs.
    assert got.dtype == want.dtype == torch.float32
    assert abs(got.item() - want.item()) <= 1e-4 * want.item()
    assert len(op_calls) == 1


def test_tuples_positional_labels_shift_labels_and_ignore_index(op_calls):
    ref = _tiny("llama")
    model = _fused_copy(ref)
    ids, labels = _batch()
    want = ref(input_ids=ids, labels=labels, return_dict=False)
    got = model(input_ids=ids, labels=labels, return_dict=False)
    # the stock tuple is (loss, logits, cache); None keeps the logits' place
    assert len(got) == len(want) == 3 and got[1] is None and type(got[2]) is type(want[2])
    assert_rel_close(got[0], want[0], torch.float32, "return_dict=False")
    # labels by position: forward(input_ids, attention_mask, position_ids, cache, inputs_embeds, labels)
    by_position = model(ids, None, None, None, None, labels)
    assert by_position.logits is None
    assert_rel_close(by_position.loss, want[0], torch.float32, "positional labels")
    # shift_labels given by the caller (sequence parallelism) and another ignore_index
    shift = torch.randint(0, V, ids.shape)
    shift[:, ::3] = 7
    kw = dict(input_ids=ids, labels=labels, shift_labels=shift, ignore_index=7)
    assert_rel_close(model(**kw).loss, ref(**kw).loss, torch.float32, "shift_labels")
    assert len(op_calls) == 3


def test_restore_gives_back_the_class_forward_and_copies_keep_the_fusion(op_calls):
    ref = _tiny("gpt2")
    model = _fused_copy(ref)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the whole module pickled, as deepcopy copies it
    for twin in (copy.deepcopy(model), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        assert twin.forward.model is twin and twin.lm_head.weight is twin.transformer.wte.weight
    assert mg.fuse_lm_head_loss(model) == 0  # already fused: skipped silently
    assert mg.restore_lm_head_loss(model) == 1 and mg.restore_lm_head_loss(model) == 0
    assert "forward" not in model.__dict__ and model.forward.__func__ is type(model).forward
    ids, labels = _batch()
    out = model(input_ids=ids, labels=labels)
    assert torch.equal(out.logits, ref(input_ids=ids, labels=labels).logits)
    assert op_calls == []
    assert twin(input_ids=ids, labels=labels).logits is None and len(op_calls) == 1


def test_compiles_without_a_graph_break_to_the_models_own_loss_and_gradients():
    ref = _tiny("llama")
    model = _fused_copy(ref)
    ids, labels = _batch()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=labels)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1
    want = ref(input_ids=ids, labels=labels)
    want.loss.backward()
    torch._dynamo.reset()
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids, labels=labels)
    assert got.logits is None
    assert_rel_close(got.loss, want.loss, torch.float32, "compiled loss")
    got.loss.backward()
    want_grads, got_grads = _grads(ref), _grads(model)
    assert list(got_grads) == list(want_grads)
    for name in want_grads:
        assert_rel_close(got_grads[name], want_grads[name], torch.float32, name)


@pytest.mark.parametrize("first", ["fuse_lm_head_loss", "replace_linear"])
def test_composes_with_replace_linear_and_fuse_mlps(first, op_calls):
    ref = _tiny("qwen2")
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    steps = [lambda: mg.fuse_lm_head_loss(model), lambda: mg.replace_linear(model), lambda: mg.fuse_mlps(model)]
    for step in steps if first == "fuse_lm_head_loss" else steps[::-1]:
        assert step() > 0
    assert type(model.lm_head) is mg.Linear and list(model.state_dict()) == keys
    ids, labels = _batch()
    got, want = model(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    assert got.logits is None and len(op_calls) == 1
    assert_rel_close(got.loss, want.loss, torch.float32)
    assert mg.restore_lm_head_loss(model) == 1
    assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_a_peft_model_fuses_the_causal_lm_inside(op_calls):
    peft = pytest.importorskip("peft")
    from torch_matgrad.surgery import causal_lm

    ref = peft.get_peft_model(_tiny("mistral"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = copy.deepcopy(ref)
    assert mg.fuse_lm_head_loss(model) == 1  # the PeftModel itself has no lm_head of its own
    assert isinstance(model.base_model.model.__dict__["forward"], causal_lm.LMHeadLossForward)
    ids, labels = _batch()
    got, want = model(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    assert got.logits is None and len(op_calls) == 1
    assert_rel_close(got.loss, want.loss, torch.float32)
    assert mg.restore_lm_head_loss(model) == 1


def _custom_loss(logits, labels, vocab_size, **kwargs):
    return logits.float().square().mean()


class _MyLlama(transformers.LlamaForCausalLM):
    pass


@pytest.mark.parametrize(
    "change, match",
    [
        (None, r"left the model \(_MyLlama\) as it is: _MyLlama is not a class whose forward"),
        (lambda m: m.register_forward_hook(lambda *a: None), r"it has forward hooks"),
        (lambda m: m.lm_head.register_forward_hook(lambda *a: None), r"its lm_head has module hooks"),
        (lambda m: setattr(m, "lm_head", nn.Sequential(m.lm_head)), r"its lm_head is a Sequential"),
        (lambda m: setattr(m, "loss_function", _custom_loss), r"its loss_function is _custom_loss"),
    ],
    ids=["subclass", "forward-hook", "head-hook", "head-kind", "loss-function"],
)
def test_what_cannot_be_reproduced_is_left_with_a_warning(change, match):
    model = _MyLlama(transformers.LlamaConfig(intermediate_size=64, **COMMON)) if change is None else _tiny("llama")
    if change is not None:
        change(model)
    with pytest.warns(UserWarning, match=match):
        assert mg.fuse_lm_head_loss(model) == 0
    assert "forward" not in model.__dict__


def test_a_model_without_a_causal_lm_is_named_in_the_warning():
    with pytest.warns(UserWarning, match=r"fuse_lm_head_loss: Sequential holds no transformers causal language model"):
        assert mg.fuse_lm_head_loss(nn.Sequential(nn.Linear(3, 4))) == 0
    assert mg.restore_lm_head_loss(nn.Sequential(nn.Linear(3, 4))) == 0


def test_a_model_changed_after_fusing_computes_its_own_loss_with_a_warning(op_calls):
    ref = _tiny("phi")
    model = _fused_copy(ref)
    model.lm_head.register_forward_hook(lambda *a: None)
    ids, labels = _batch()
    with pytest.warns(UserWarning, match=r"PhiForCausalLM computes its own loss: its lm_head has module hooks"):
        out = model(input_ids=ids, labels=labels)
    assert torch.equal(out.logits, ref(input_ids=ids, labels=labels).logits) and op_calls == []


def test_accelerate_hooks_are_refused_before_and_block_restore_after():
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    model = _tiny("llama")
    add_hook_to_module(model, ModelHook())
    with pytest.warns(UserWarning, match=r"its forward is patched on the instance \(accelerate's _hf_hook"):
        assert mg.fuse_lm_head_loss(model) == 0
    remove_hook_from_module(model)
    assert mg.fuse_lm_head_loss(model) == 1
    add_hook_to_module(model, ModelHook())  # patched again on top of the fused forward
    again = r"restore_lm_head_loss: left the model \(LlamaForCausalLM\) .* remove those hooks"
    with pytest.warns(UserWarning, match=again):
        assert mg.restore_lm_head_loss(model) == 0
    remove_hook_from_module(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mg.restore_lm_head_loss(model) == 1
    assert "forward" not in model.__dict__
