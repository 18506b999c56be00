"""The surgery on PEFT models: ``fuse_mlps`` fuses MLP blocks whose projections are PEFT
LoRA layers (a tiny Llama and GPT-2 built from configs) and computes what PEFT computes,
outputs and adapter gradients, with dropout; PEFT's own features (saving, its state dict,
disabling, switching, merging, unloading, a mixed batch's adapter names) behave as on
the unfused model; optimizer state is untouched; what the op cannot compute is left to
the layers, with a warning at fusing time; ``replace_linear`` leaves the adapters' own
layers alone; 20 AdamW steps follow PEFT's losses."""

from __future__ import annotations

import copy
import importlib
import json
import warnings

import pytest
import torch
from torch import nn

import torch_matgrad as mg

from _util import REL_TOL, assert_rel_close, rel_err

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from torch_matgrad.surgery.peft import LoRAFusedMLP  # noqa: E402  (imports peft)

V = 97
QV_MLP = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def _config(targets=QV_MLP, dropout=0.0, **options):
    # init_lora_weights=False: B is random, not 0, so every adapter changes the output.
    return peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=dropout,
                           init_lora_weights=False, **options)


def _peft_llama(targets=QV_MLP, dropout=0.0, **options):
    model = _llama()
    torch.manual_seed(1)
    return peft.get_peft_model(model, _config(targets, dropout, **options))


def _fuse(model, fused=2):
    """``fuse_mlps`` on ``model`` in place, expecting ``fused`` blocks and no warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mg.fuse_mlps(model) == fused
    assert not [str(w.message) for w in caught if "torch_matgrad" in str(w.message)]
    return model


def _fused_copy(ref, fused=2):
    return _fuse(copy.deepcopy(ref), fused)


def _targets_as_set(config):
    return {**config, "target_modules": set(config["target_modules"])}


def _mlps(model):
    return [layer.mlp for layer in model.base_model.model.model.layers]


@pytest.fixture
def op_calls(monkeypatch):
    """How many times FusedMLP called the fused op (not its layers)."""
    module = importlib.import_module("torch_matgrad.mlp")
    calls = []
    op = module.mlp

    def counted(*args, **kwargs):
        calls.append(tuple(kwargs[f"{role}_lora"] is not None for role in ("up", "gate", "down")))
        return op(*args, **kwargs)

    monkeypatch.setattr(module, "mlp", counted)
    return calls


def _ids(seed=2):
    return torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(seed))


def _step(model, ids, seed=3):
    """``(loss, logits, {name: grad})`` of one training-mode forward and backward; the
    seed fixes the dropout's draws."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), {n: p.grad for n, p in model.named_parameters()
                                                    if p.grad is not None}


def _assert_same_step(got, want, want64=None):
    """``got`` (fp32) against ``want64`` (PEFT in float64) within fp32's tolerance, or
    within twice PEFT's own fp32 distance from it where that is larger; without a float64
    run, against ``want`` within fp32's tolerance."""
    (loss, logits, grads), (w_loss, w_logits, w_grads) = got, want
    assert list(grads) == list(w_grads) and grads
    ref = want if want64 is None else want64
    for what, ours, theirs, exact in [("loss", loss, w_loss, ref[0]), ("logits", logits, w_logits, ref[1]),
                                      *((n, grads[n], w_grads[n], ref[2][n]) for n in grads)]:
        tol = max(REL_TOL[torch.float32], 2 * rel_err(theirs, exact))
        assert rel_err(ours, exact) <= tol, f"{what}: {rel_err(ours, exact):.2e} > {tol:.2e}"


# --------------------------------------------------------------------------- fusing


@pytest.mark.parametrize("targets, adapted", [
    (QV_MLP, (True, True, True)),
    ("all-linear", (True, True, True)),
    (["gate_proj"], (False, True, False)),
])
def test_peft_llama_blocks_fuse_keeping_every_peft_module(targets, adapted, op_calls):
    ref = _peft_llama(targets)
    keys, params = list(ref.state_dict()), dict(ref.named_parameters())
    model = copy.deepcopy(ref)
    modules = dict(model.named_modules())
    _fuse(model)
    for mlp in _mlps(model):
        assert type(mlp) is LoRAFusedMLP
        for name in ("gate_proj", "up_proj", "down_proj"):  # the same objects under the same names
            assert getattr(mlp, name) is modules[f"{_name(model, mlp)}.{name}"]
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == list(params)
    ids = _ids()
    assert_rel_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, torch.float32, "logits")
    assert op_calls == [adapted, adapted]


def _name(model, module):
    return next(n for n, m in model.named_modules() if m is module)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_step_matches_peft_in_float64(dropout, op_calls):
    """Loss, logits and every adapter's gradient in train mode; with dropout, the same
    seed draws PEFT's masks (CPU)."""
    ref = _peft_llama("all-linear", dropout)
    model = _fused_copy(ref)
    ids = _ids()
    want64 = _step(copy.deepcopy(ref).double(), ids)
    got, want = _step(model, ids), _step(ref, ids)
    assert len(op_calls) == 2
    _assert_same_step(got, want, want64)
    if dropout:  # the masks matter: without them (eval) the loss is another
        model.eval()
        assert abs(model(input_ids=ids, labels=ids).loss - got[0]) > 1e-4


def test_gpt2_conv1d_blocks_with_fan_in_fan_out(op_calls):
    """GPT-2's Conv1D base layers (PEFT's fan_in_fan_out): the base weight is read through
    a transpose, lora_A and lora_B as stored."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT: "setting fan_in_fan_out to True"
        ref = peft.get_peft_model(transformers.GPT2LMHeadModel(config), _config(["c_fc", "c_proj"], 0.1))
    model = _fused_copy(ref)
    assert type(model.base_model.model.transformer.h[0].mlp) is LoRAFusedMLP
    ids = _ids()
    _assert_same_step(_step(model, ids), _step(ref, ids), _step(copy.deepcopy(ref).double(), ids))
    assert op_calls == [(True, False, True)] * 2


def test_sequential_block_with_lora_layers(op_calls):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    ref = peft.get_peft_model(ref, _config(["0", "2"], 0.1))
    model = _fused_copy(ref, 1)
    x = torch.randn(5, 8)
    outs = []
    for m in (model, ref):
        torch.manual_seed(4)
        outs.append(m(x))
    assert_rel_close(outs[0], outs[1], torch.float32, "output")
    assert op_calls == [(True, False, True)]


def test_compiles_as_one_graph(op_calls):
    """The reader is plain Python over module attributes: torch.compile(fullgraph=True)
    traces it, and the compiled fused model computes PEFT's outputs and gradients."""
    ref = _peft_llama(dropout=0.1)
    model = _fused_copy(ref)
    torch._dynamo.reset()
    model.compile(fullgraph=True, backend="aot_eager")  # in place: the parameters keep their names
    ids = _ids()
    _assert_same_step(_step(model, ids), _step(ref, ids))
    assert op_calls == [(True, True, True)] * 2  # traced once, the op in the graph
    torch._dynamo.reset()


# ------------------------------------------------------------- PEFT's own features


def test_save_pretrained_and_the_peft_state_dict_are_unchanged(tmp_path):
    ref = _peft_llama()
    model = _fused_copy(ref)
    keys = list(ref.state_dict())
    ref.save_pretrained(tmp_path / "ref")
    model.save_pretrained(tmp_path / "fused")
    files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert "adapter_model.safetensors" in files and files == sorted(p.name for p in (tmp_path / "fused").iterdir())
    for name in files:
        want, got = ((tmp_path / d / name).read_bytes() for d in ("ref", "fused"))
        if name.endswith(".json"):
            # PEFT keeps target_modules as a set and writes it in the set's order, which a
            # deepcopy may change: compared as a set, the rest of the file exactly.
            want, got = (_targets_as_set(json.loads(b)) for b in (want, got))
        assert got == want, name
    want, got = peft.get_peft_model_state_dict(ref), peft.get_peft_model_state_dict(model)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    # Loaded into a model fused before: the plain blocks call PEFT's layers (their
    # weight alone would drop the adapter), and fuse_mlps again gives them PEFT's reader.
    loaded = peft.PeftModel.from_pretrained(_fuse(_llama()), tmp_path / "fused")
    ids = _ids()
    assert_rel_close(loaded(input_ids=ids).logits, ref(input_ids=ids).logits, torch.float32, "loaded, unfused")
    _fuse(loaded)
    assert all(type(mlp) is LoRAFusedMLP for mlp in _mlps(loaded)) and list(loaded.state_dict()) == keys
    assert_rel_close(loaded(input_ids=ids).logits, ref(input_ids=ids).logits, torch.float32, "loaded")


def test_disable_adapter_gives_the_base_models_outputs(op_calls):
    ref = _peft_llama()
    model = _fused_copy(ref)
    ids = _ids()
    base = _llama()(input_ids=ids).logits
    with ref.disable_adapter(), model.disable_adapter():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert_rel_close(got, want, torch.float32, "disabled")
    assert_rel_close(got, base, torch.float32, "base model")
    assert op_calls == [(False, False, False)] * 2
    assert_rel_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, torch.float32, "enabled again")


def test_set_adapter_switches_between_two_adapters(op_calls):
    ref = _peft_llama()
    torch.manual_seed(5)
    ref.add_adapter("other", _config(["gate_proj", "down_proj"], 0.1))  # other targets, the first block's x frozen
    model = _fused_copy(ref)
    ids = _ids()
    for name, adapted in (("other", (False, True, True)), ("default", (True, True, True))):
        ref.set_adapter(name)
        model.set_adapter(name)
        op_calls.clear()
        got, want = _step(model, ids), _step(ref, ids)
        _assert_same_step(got, want)
        assert op_calls == [adapted] * 2
        assert all(f".{name}." in n for n in got[2])  # PEFT's requires_grad: the active adapter's alone


def test_adapters_on_the_mlp_alone(op_calls):
    """LoRA on the MLP projections alone: the first block's input needs no gradient
    (frozen embeddings and attention), its adapters' gradients are PEFT's all the same."""
    ref = _peft_llama(["gate_proj", "up_proj", "down_proj"])
    model = _fused_copy(ref)
    ids = _ids()
    _assert_same_step(_step(model, ids), _step(ref, ids), _step(copy.deepcopy(ref).double(), ids))
    assert op_calls == [(True, True, True)] * 2


def test_several_active_adapters_run_the_layers(op_calls):
    """Set after fusing, two active adapters on one layer (their sum, which the op does
    not compute): the block calls its layers, PEFT's forward."""
    ref = _peft_llama()
    torch.manual_seed(5)
    ref.add_adapter("other", _config(["up_proj"]))
    model = _fused_copy(ref)
    for m in (ref, model):
        m.base_model.set_adapter(["default", "other"])
    ids = _ids()
    _assert_same_step(_step(model, ids), _step(ref, ids))
    assert op_calls == []


def test_mixed_batch_adapter_names_run_the_layers(op_calls):
    """``adapter_names`` reach the LoRA layers through PEFT's forward pre-hooks, which the
    block sees and leaves to the layers."""
    ref = _peft_llama()
    torch.manual_seed(5)
    ref.add_adapter("other", _config())
    model = _fused_copy(ref).eval()
    ref.eval()
    ids, names = _ids(), ["other", "__base__"]
    got, want = model(input_ids=ids, adapter_names=names).logits, ref(input_ids=ids, adapter_names=names).logits
    assert_rel_close(got, want, torch.float32, "mixed batch")
    assert op_calls == []
    assert_rel_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, torch.float32, "after")
    assert len(op_calls) == 2


def test_merge_unmerge_and_unload(op_calls):
    ref = _peft_llama()
    ids = _ids()
    for how in ("merge_adapter", "merge_and_unload", "unload"):
        want_model, got_model = copy.deepcopy(ref), _fused_copy(ref)
        want_model, got_model = (getattr(m, how)() or m for m in (want_model, got_model))
        op_calls.clear()
        want, got = want_model(input_ids=ids).logits, got_model(input_ids=ids).logits
        assert_rel_close(got, want, torch.float32, how)
        assert op_calls == [(False, False, False)] * 2, how  # merged: the base weights hold the update
        if how != "merge_adapter":  # the base layers in the LoRA layers' places, read as FusedMLP reads them
            for mlp in got_model.model.layers:
                assert type(mlp.mlp.gate_proj) is nn.Linear and type(mlp.mlp) is LoRAFusedMLP
            assert not [n for n, _ in got_model.named_modules() if "lora" in n]
            continue
        for m in (want_model, got_model):
            m.unmerge_adapter()
        assert_rel_close(got_model(input_ids=ids).logits, ref(input_ids=ids).logits, torch.float32, "unmerged")
        with got_model.disable_adapter():  # merged then disabled: the layer's forward unmerges (its own calls)
            got_model.merge_adapter()
            op_calls.clear()
            assert_rel_close(got_model(input_ids=ids).logits, _llama()(input_ids=ids).logits, torch.float32,
                             "disabled while merged")
            assert op_calls == []


def test_optimizer_state_is_untouched():
    ref = _peft_llama()
    model = copy.deepcopy(ref)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = _ids()
    _step(model, ids)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    before = dict(model.named_parameters())
    _fuse(model)
    assert all(p is before[n] for n, p in model.named_parameters())  # the optimizer's own Parameters
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for i, s in state["state"].items():
        assert all(torch.equal(after["state"][i][k], v) for k, v in s.items())
    # and the next step is the unfused model's
    twin = copy.deepcopy(ref)
    twin_opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-3)
    _step(twin, ids)
    twin_opt.step()
    _step(model, ids, seed=4), _step(twin, ids, seed=4)
    opt.step(), twin_opt.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_rel_close(p, q, torch.float32, n)


def test_adapters_in_float32_beside_bfloat16_weights(op_calls):
    """PEFT keeps adapters in float32 on a bf16 model (autocast_adapter_dtype) and adds
    their update in float32: outside autocast the block calls its layers; under autocast
    the op takes everything in bf16, as PEFT's layers then compute."""
    model = _llama().to(torch.bfloat16)
    torch.manual_seed(1)
    ref = peft.get_peft_model(model, _config())
    assert ref.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"].weight.dtype == torch.float32
    model = _fused_copy(ref)
    ids = _ids()
    assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert op_calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert len(op_calls) == 2
    assert_rel_close(got, want, torch.bfloat16, "autocast")


# ----------------------------------------------------------------- left alone


def _warned(model, reason, mlps=2):
    """fuse_mlps on ``model`` fuses nothing and warns once a block, naming the block, the
    projection and ``reason``."""
    with pytest.warns(UserWarning) as record:
        assert mg.fuse_mlps(model) == 0
    messages = [str(w.message) for w in record if str(w.message).startswith("torch_matgrad.fuse_mlps")]
    assert len(messages) == mlps, messages
    for i, message in enumerate(messages):
        assert f"left 'base_model.model.model.layers.{i}.mlp' as it is: its " in message and reason in message, message
        assert "exclude=" in message
    assert not any(isinstance(m, mg.FusedMLP) for m in model.modules())


def test_dora_is_left_alone():
    _warned(_peft_llama(use_dora=True), "uses DoRA for adapter 'default' (use_dora=True)")


def test_lora_bias_is_left_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: merging impossible without a base bias
        model = _peft_llama(lora_bias=True)
    _warned(model, "gate_proj has a bias in adapter 'default''s lora_B (lora_bias=True)")


def test_merged_adapters_are_left_alone():
    model = _peft_llama()
    model.merge_adapter()
    _warned(model, "gate_proj has the adapters ['default'] merged into its base weights (merge_adapter); "
                   "unmerge_adapter() first")


def test_several_active_adapters_are_left_alone():
    model = _peft_llama()
    model.add_adapter("other", _config(["up_proj"]))
    model.base_model.set_adapter(["default", "other"])
    _warned(model, "up_proj has the adapters ['default', 'other'] active at once")


def test_other_tuner_layers_are_left_alone():
    model = peft.get_peft_model(_llama(), peft.LoHaConfig(r=4, target_modules=["up_proj"]))
    _warned(model, "up_proj is PEFT's peft.tuners.loha.layer.Linear, a layer the op does not read")


@pytest.mark.parametrize("kind, bits, options", [("Linear8bitLt", 8, dict(has_fp16_weights=False)),
                                                 ("Linear4bit", 4, {})])
def test_bitsandbytes_base_layers_are_left_alone(kind, bits, options):
    bnb = pytest.importorskip("bitsandbytes")
    model = _llama()
    for layer in model.model.layers:
        old = layer.mlp.up_proj
        layer.mlp.up_proj = getattr(bnb.nn, kind)(old.in_features, old.out_features, bias=False, **options)
    torch.manual_seed(1)
    _warned(peft.get_peft_model(model, _config()), f"up_proj is PEFT's LoRA on bitsandbytes' {kind} ({bits}-bit "
                                                   "quantized weights), which the op cannot read as a matrix")


# ------------------------------------------------------------- replace_linear


def test_replace_linear_swaps_base_layers_and_leaves_the_adapters_alone():
    ref = _peft_llama()
    model = copy.deepcopy(ref)
    # 2 x (q, k, v, o, gate, up, down) + lm_head; never lora_A or lora_B
    assert mg.replace_linear(model) == 15 and mg.replace_linear(model) == 0
    lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(lora_layers) == 10
    for layer in lora_layers:
        assert type(layer.base_layer) is mg.Linear
        assert type(layer.lora_A["default"]) is nn.Linear and type(layer.lora_B["default"]) is nn.Linear
    assert list(model.state_dict()) == list(ref.state_dict())
    ids = _ids()
    _assert_same_step(_step(model, ids), _step(ref, ids))
    with model.disable_adapter(), ref.disable_adapter():
        assert_rel_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, torch.float32, "disabled")
    merged, want = model.merge_and_unload(), ref.merge_and_unload()
    assert type(merged.model.layers[0].mlp.up_proj) is mg.Linear
    assert_rel_close(merged(input_ids=ids).logits, want(input_ids=ids).logits, torch.float32, "merged")


def test_peft_injects_into_swapped_layers_as_into_nn_linear():
    """Swapping before PEFT injects its adapters: it dispatches by the base layer's class,
    and a torch_matgrad.Linear is an nn.Linear, so it builds the same LoRA layers."""
    model = _llama()
    assert mg.replace_linear(model) == 15
    torch.manual_seed(1)
    swapped = peft.get_peft_model(model, _config())
    ref = _peft_llama()

    def tuners(m):
        return {n: type(t) for n, t in m.named_modules() if isinstance(t, peft.tuners.tuners_utils.BaseTunerLayer)}

    assert tuners(swapped) == tuners(ref) and len(tuners(ref)) == 10
    ids = _ids()
    _assert_same_step(_step(_fuse(swapped), ids), _step(ref, ids))


# ------------------------------------------------------------------ convergence


def test_twenty_adamw_steps_follow_peft():
    """LoRA on every projection, dropout on: 20 AdamW steps on one batch, each loss within
    1e-5 of PEFT's, and the adapters' gradients at the end equal."""
    ref = _peft_llama("all-linear", 0.1)
    model = _fused_copy(ref)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (model, ref)]
    ids = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(6))
    losses = []
    for step in range(20):
        got, want = (_step(m, ids, seed=step) for m in (model, ref))
        assert abs(got[0] - want[0]) <= 1e-5, f"step {step}: {got[0]} vs {want[0]}"
        losses.append(want[0])
        for opt in opts:
            opt.step()
    assert losses[-1] < losses[0] - 0.05  # it trained
    assert list(got[2]) == list(want[2]) and len(got[2]) == 2 * 7 * 2
    for name in want[2]:
        assert_rel_close(got[2][name], want[2][name], torch.float32, name)
