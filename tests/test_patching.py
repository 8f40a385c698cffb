"""bertfast.patch / unpatch on live transformers BERT models, against the same model unpatched."""

import copy
import io
import os

import torch

if not torch.cuda.is_available():  # before triton is imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

transformers = pytest.importorskip("transformers")

import bertfast  # noqa: E402
from bertfast import ops  # noqa: E402
from bertfast.errors import BackendUnavailable  # noqa: E402
from bertfast.numerics import FP32_REL_TOL, MODEL_FP32_REL_TOL, assert_close, rel_error  # noqa: E402
from bertfast.patching import PatchError, PatchWarning, is_patched, patch, unpatch  # noqa: E402

from .helpers import (  # noqa: E402
    assert_key_bias_gradient_vanishes,
    is_key_bias,
    ragged_batch,
    small_config,
    span_outputs_under_the_rule,
    triton_device,
)

KINDS = [
    "BertModel",
    "BertForSequenceClassification",
    "BertForMaskedLM",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
]


def _triton_ready() -> bool:
    if ops.backend_availability("triton") is not None:
        return False
    import importlib.util

    return all(importlib.util.find_spec(f"bertfast.kernels.{k}") for k in ("attention", "layer_norm", "bias_gelu"))


TRITON = pytest.mark.skipif(not _triton_ready(), reason="the Triton backend (kernels/) is not available here")
BACKENDS = ["reference", pytest.param("triton", marks=TRITON)]


def make_hf(kind: str, **overrides):
    """A transformers model of an odd geometry (hidden 48 over 3 heads, FFN 70), random weights, eval mode."""
    config = small_config(num_labels=2 if kind == "BertForQuestionAnswering" else 3, **overrides)
    hf_config = transformers.BertConfig(**config.to_dict(), attn_implementation="eager")
    return getattr(transformers, kind)(hf_config).eval()


def patched_pair(kind: str, backend: str = "reference", unpad="auto", **overrides):
    """(patched model, an unpatched deep copy of it)."""
    model = make_hf(kind, **overrides)
    reference = copy.deepcopy(model)
    assert patch(model, backend=backend, unpad=unpad) is model
    assert is_patched(model) and not is_patched(reference)
    return model, reference


def head_inputs(kind, config, mask, generator):
    """Labels that give each head a loss touching every parameter (none at padding for per-token heads)."""
    batch, seq = mask.shape
    if kind in ("BertForMaskedLM", "BertForTokenClassification"):
        classes = config.vocab_size if kind == "BertForMaskedLM" else config.num_labels
        labels = torch.randint(0, classes, (batch, seq), generator=generator)
        return {"labels": labels.masked_fill(mask == 0, -100)}
    if kind == "BertForSequenceClassification":
        return {"labels": torch.randint(0, config.num_labels, (batch,), generator=generator)}
    if kind == "BertForQuestionAnswering":
        lengths = mask.sum(1)
        start = (torch.rand(batch, generator=generator) * lengths).long()
        return {"start_positions": start, "end_positions": lengths - 1}
    return {}


def loss_of(out, mask, generator):
    """The head's loss (if any) plus random projections of every output at valid positions.

    The projections break invariances of the losses (e.g. question answering's softmax over
    the sequence makes the last LayerNorm bias's exact gradient zero), so every gradient is
    a meaningful number to compare.
    """
    total = out.loss if out.get("loss") is not None else 0.0
    for key, value in out.items():
        if key != "loss" and isinstance(value, torch.Tensor):
            value = per_token(value, mask)
            total = total + (value * torch.randn(value.shape, generator=generator).to(value.device)).sum()
    return total


def per_token(value, mask):
    """The valid positions of a (batch, seq, ...) output; other outputs as they are."""
    return value[mask.bool()] if value.dim() >= 2 and tuple(value.shape[:2]) == tuple(mask.shape) else value


def assert_grads_match(model, reference, rel_tol):
    reference_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        expected = reference_params[name].grad
        assert p.grad is not None and expected is not None, name
        if is_key_bias(name):
            query_bias_grad = reference_params[name.replace("key.bias", "query.bias")].grad
            assert_key_bias_gradient_vanishes(name, p.grad, query_bias_grad)
            continue
        err = rel_error(p.grad, expected)
        assert err <= rel_tol, f"{name}: gradient relative error {err:.2e} > {rel_tol:.0e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_patched_matches_unpatched(kind, backend):
    # The interpreter is slow: the Triton runs use one layer and a smaller batch.
    layers, lengths, seq = (1, [7, 4], 7) if backend == "triton" else (2, [11, 6, 9], 11)
    # Where the backend runs: the Triton one refuses CPU tensors once CUDA is visible.
    device = triton_device() if backend == "triton" else "cpu"
    pair = patched_pair(kind, backend, num_hidden_layers=layers)
    model, reference = (m.to(device) for m in pair)
    config = model.config
    ids, types, mask = ragged_batch(config, lengths, seq)
    g = torch.Generator().manual_seed(1)
    labels = {key: value.to(device) for key, value in head_inputs(kind, config, mask, g).items()}
    ids, types, mask = ids.to(device), types.to(device), mask.to(device)
    ours = model(input_ids=ids, attention_mask=mask, token_type_ids=types, **labels)
    theirs = reference(input_ids=ids, attention_mask=mask, token_type_ids=types, **labels)
    if kind == "BertForQuestionAnswering":  # bertfast keeps padding out of the span softmax (head_losses)
        theirs = span_outputs_under_the_rule(theirs, mask, labels["start_positions"], labels["end_positions"])
    assert type(ours) is type(theirs)
    assert list(ours.keys()) == list(theirs.keys())
    for key in theirs.keys():
        err = rel_error(per_token(ours[key], mask), per_token(theirs[key], mask))
        assert err <= MODEL_FP32_REL_TOL, f"{key}: relative error {err:.2e}"
    loss_of(ours, mask, torch.Generator().manual_seed(2)).backward()
    loss_of(theirs, mask, torch.Generator().manual_seed(2)).backward()
    assert_grads_match(model, reference, FP32_REL_TOL["backward"])


def test_compute_goes_through_bertfast_ops(monkeypatch):
    """Every op of a patched forward runs on the chosen backend, resolved once per forward (bertfast.layers)."""
    from bertfast import layers
    from bertfast.ops import reference as reference_backend

    calls = []
    for name in ("attention", "attention_varlen_qkv", "layer_norm", "bias_gelu", "embedding_layer_norm"):
        original = getattr(reference_backend, name)
        monkeypatch.setattr(
            reference_backend, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    monkeypatch.setattr(layers, "_PLANS", {})  # plans made before the monkeypatch hold the originals
    model, _ = patched_pair("BertForMaskedLM")
    ids, types, mask = ragged_batch(model.config, [5, 3], 5)
    model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    layer_count = model.config.num_hidden_layers
    assert calls.count("embedding_layer_norm") == 1
    assert calls.count("attention_varlen_qkv") == layer_count  # padding-free by default
    assert calls.count("bias_gelu") == layer_count + 1  # + the MLM head transform
    # two per layer, the MLM head transform's, and the one inside the reference embedding_layer_norm
    assert calls.count("layer_norm") == 2 * layer_count + 2


def test_patch_touches_only_this_instance_and_unpatch_restores_exactly():
    modeling_bert = transformers.models.bert.modeling_bert
    class_forwards = {
        c: c.__dict__["forward"] for c in (modeling_bert.BertModel, modeling_bert.BertPredictionHeadTransform)
    }
    model = make_hf("BertForMaskedLM")
    other = copy.deepcopy(model)
    ids, types, mask = ragged_batch(model.config, [9, 2, 5], 9)
    before = other(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    attributes = {name: dict(m.__dict__) for name, m in model.named_modules()}
    parameters = dict(model.named_parameters())
    state_keys = list(model.state_dict())
    values = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}

    patch(model)
    assert "forward" in model.bert.__dict__ and "forward" in model.cls.predictions.transform.__dict__
    assert not is_patched(other) and all("forward" not in m.__dict__ for m in other.modules())
    assert all(c.__dict__["forward"] is f for c, f in class_forwards.items())
    assert dict(model.named_parameters()) == parameters  # the same Parameter objects, no copies
    assert list(model.state_dict()) == state_keys
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == pointers  # nothing moves
    assert all(torch.equal(v, values[k]) for k, v in model.state_dict().items())
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    patched = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert rel_error(patched[mask.bool()], before[mask.bool()]) <= MODEL_FP32_REL_TOL
    assert torch.equal(other(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, before)

    assert unpatch(model) is model
    assert not is_patched(model)
    for name, m in model.named_modules():
        assert dict(m.__dict__).keys() == attributes[name].keys(), name
        assert type(m).forward is class_forwards.get(type(m), type(m).forward)
        assert "forward" not in m.__dict__
    assert dict(model.named_parameters()) == parameters
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == pointers  # nothing moves
    assert all(torch.equal(v, values[k]) for k, v in model.state_dict().items())
    # Hugging Face's own forward again: bit-identical to the never-patched copy.
    assert torch.equal(model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, before)


def test_deepcopy_and_pickle_carry_the_patch():
    model, reference = patched_pair("BertForMaskedLM")
    ids, types, mask = ragged_batch(model.config, [6, 3], 6)
    expected = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert is_patched(clone)
        assert clone.bert.forward.args[0] is clone.bert  # bound to the copy, not to the original
        assert clone.cls.predictions.transform.forward.args[0] is clone.cls.predictions.transform
        assert torch.equal(clone(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, expected)
        assert not is_patched(unpatch(clone)) and is_patched(model)


def test_patched_model_saves_and_reloads_with_transformers(tmp_path):
    model, reference = patched_pair("BertForSequenceClassification")
    model.save_pretrained(tmp_path)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not is_patched(reloaded)
    for key, value in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_patching_twice_switches_backend_and_unpatch_is_idempotent():
    model, _ = patched_pair("BertForMaskedLM", "reference")
    patch(model, backend="auto")
    assert model.bert._bertfast_backend == "auto" == model.cls.predictions.transform._bertfast_backend
    unpatch(model)
    unpatch(model)
    assert not is_patched(model)
    with pytest.raises(ValueError, match="unknown backend"):
        patch(model, backend="cuda-magic")
    assert not is_patched(model)


def test_hidden_states_and_tuple_outputs_match():
    model, reference = patched_pair("BertForTokenClassification")
    ids, types, mask = ragged_batch(model.config, [8, 3], 8)
    kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    ours = model(**kwargs, output_hidden_states=True).hidden_states
    theirs = reference(**kwargs, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == model.config.num_hidden_layers + 1
    for a, b in zip(ours, theirs):
        assert rel_error(a[mask.bool()], b[mask.bool()]) <= MODEL_FP32_REL_TOL
    ours_tuple = model(**kwargs, output_hidden_states=True, return_dict=False)
    theirs_tuple = reference(**kwargs, output_hidden_states=True, return_dict=False)
    assert isinstance(ours_tuple, tuple) and len(ours_tuple) == len(theirs_tuple)
    assert rel_error(ours_tuple[0][mask.bool()], theirs_tuple[0][mask.bool()]) <= MODEL_FP32_REL_TOL
    # The encoder alone (no pooler here) as a tuple, hidden states requested by the config default:
    # laid out as the installed transformers lays it out.
    model.config.output_hidden_states = reference.config.output_hidden_states = True
    encoder_tuple = model.bert(**kwargs, return_dict=False)
    expected_tuple = reference.bert(**kwargs, return_dict=False)
    assert [type(v) for v in encoder_tuple] == [type(v) for v in expected_tuple]
    assert len(encoder_tuple[-1]) == model.config.num_hidden_layers + 1
    model.config.output_hidden_states = reference.config.output_hidden_states = False
    try:  # transformers 5 can select hidden states by index; older versions take a flag only
        selected_theirs = reference.bert(**kwargs, output_hidden_states=[0, -1]).hidden_states
    except Exception:
        selected_theirs = None
    if selected_theirs is not None:
        selected = model.bert(**kwargs, output_hidden_states=[0, -1]).hidden_states
        assert [h is None for h in selected] == [h is None for h in selected_theirs]


def test_inputs_embeds_and_explicit_positions_match():
    model, reference = patched_pair("BertModel")
    ids, types, mask = ragged_batch(model.config, [6, 4], 6)
    embeds = torch.randn(2, 6, model.config.hidden_size)
    positions = torch.tensor([[3, 1, 4, 1, 5, 9]])  # (1, seq), broadcast over the batch
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types, position_ids=positions)
    ours, theirs = model(**kwargs), reference(**kwargs)
    assert rel_error(ours.last_hidden_state[mask.bool()], theirs.last_hidden_state[mask.bool()]) <= MODEL_FP32_REL_TOL
    # bool and 0/1 float masks mean the same as an integer one; no mask means no padding
    for same_mask in (mask.bool(), mask.float()):
        again = model(inputs_embeds=embeds, attention_mask=same_mask, token_type_ids=types, position_ids=positions)
        assert torch.equal(again.last_hidden_state, ours.last_hidden_state)
    unmasked = model(input_ids=ids).last_hidden_state
    assert rel_error(unmasked, reference(input_ids=ids).last_hidden_state) <= MODEL_FP32_REL_TOL


def set_dropout(model, hidden: float, attention: float) -> None:
    attention_dropouts = {id(layer.attention.self.dropout) for layer in model.bert.encoder.layer}
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = attention if id(module) in attention_dropouts else hidden


@pytest.mark.parametrize("hidden_p, attention_p", [(0.2, 0.0), (0.0, 0.2)], ids=["hidden", "attention"])
def test_training_mode_applies_dropout_and_gradients_flow(hidden_p, attention_p):
    model, _ = patched_pair("BertForSequenceClassification")
    ids, types, mask = ragged_batch(model.config, [7, 5], 7)
    kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    eval_logits = model(**kwargs).logits
    set_dropout(model, hidden_p, attention_p)
    model.train()
    torch.manual_seed(5)
    first = model(**kwargs).logits
    torch.manual_seed(5)
    second = model(**kwargs).logits
    third = model(**kwargs).logits
    assert torch.equal(first, second), "the same seed gives the same dropout masks"
    assert not torch.allclose(first, third) and not torch.allclose(first, eval_logits), "dropout is not applied"
    F.cross_entropy(first, torch.tensor([0, 2])).backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "key.bias" not in n
    )
    model.eval()
    assert torch.equal(model(**kwargs).logits, eval_logits)


def test_explicit_backend_without_attention_dropout_raises_in_training():
    model, _ = patched_pair("BertModel", attention_probs_dropout_prob=0.1)
    probe = torch.empty(1, 4, 2, 8)
    if bertfast.ops.can_run("attention", "ext", (probe, probe, probe)):  # ext has no attention dropout
        patch(model, backend="ext")
        ids, types, mask = ragged_batch(model.config, [4, 2], 4)
        model.train()
        with pytest.raises(BackendUnavailable, match="dropout"):
            model(input_ids=ids, attention_mask=mask)
    # auto picks a backend that can (the reference one here)
    patch(model, backend="auto")
    model.train()
    ids, types, mask = ragged_batch(model.config, [4, 2], 4)
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask).last_hidden_state).all()


def test_gradient_checkpointing_is_honoured():
    model, reference = patched_pair("BertForTokenClassification")
    for m in (model, reference):
        # transformers 5 renamed it (the old name warns); transformers 4 has the old name only
        enable = getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable
        enable()
        m.train()
    calls = []
    # transformers 5 gives every layer the checkpointing function, transformers 4 the encoder
    owners = {}
    for layer in model.bert.encoder.layer:
        owner = layer if hasattr(layer, "_gradient_checkpointing_func") else model.bert.encoder
        owners[id(owner)] = owner
    for owner in owners.values():
        original = owner._gradient_checkpointing_func
        owner._gradient_checkpointing_func = lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k)
    ids, types, mask = ragged_batch(model.config, [6, 6, 3], 6)
    labels = head_inputs("BertForTokenClassification", model.config, mask, torch.Generator().manual_seed(0))
    model(input_ids=ids, attention_mask=mask, token_type_ids=types, **labels).loss.backward()
    reference(input_ids=ids, attention_mask=mask, token_type_ids=types, **labels).loss.backward()
    assert len(calls) == model.config.num_hidden_layers
    assert_grads_match(model, reference, FP32_REL_TOL["backward"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_policy(dtype):
    model, reference = patched_pair("BertModel")
    reference64 = copy.deepcopy(reference).double()
    model.to(dtype)
    reference.to(dtype)
    ids, types, mask = ragged_batch(model.config, [10, 4, 7], 10)
    kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    valid = mask.bool()
    ours = model(**kwargs).last_hidden_state
    assert ours.dtype == dtype
    assert_close(
        ours[valid],
        reference64(**kwargs).last_hidden_state[valid],
        torch_lowp=reference(**kwargs).last_hidden_state[valid],
        name=f"patched last_hidden_state ({dtype})",
    )


def test_autocast_mixed_precision_within_policy():
    """Under autocast (fp32 weights, bf16 compute) the patched layers run in bf16 with fp32 statistics."""
    model, reference = patched_pair("BertForMaskedLM")
    reference64 = copy.deepcopy(reference).double()
    ids, types, mask = ragged_batch(model.config, [10, 4, 7], 10)
    kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    valid = mask.bool()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(**kwargs).logits
        theirs = reference(**kwargs).logits
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert_close(ours[valid], reference64(**kwargs).logits[valid], torch_lowp=theirs[valid], name="autocast MLM logits")
    ours[valid].float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_compile_fullgraph_patched_hugging_face_model():
    model, _ = patched_pair("BertForQuestionAnswering")
    ids, types, mask = ragged_batch(model.config, [9, 5], 9)
    kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    eager = model(**kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**kwargs)
    assert type(compiled) is type(eager)
    valid = mask.bool()  # compiled runs padded, eager padding-free: they agree at real tokens
    for key in ("start_logits", "end_logits"):
        torch.testing.assert_close(compiled[key][valid], eager[key][valid], rtol=1e-6, atol=1e-6)


def test_compile_fullgraph_native_bertfast_model():
    model = bertfast.BertForSequenceClassification(small_config(num_labels=3), backend="reference").eval()
    ids, types, mask = ragged_batch(model.config, [9, 5], 9)
    eager = model(ids, mask, types)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, mask, types)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# What is not supported: a clear error at call time, or a warning and no patch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(output_attentions=True), NotImplementedError, "output_attentions"),
        (dict(head_mask=torch.ones(2, 3)), NotImplementedError, "head_mask"),
        (dict(encoder_hidden_states=torch.zeros(2, 5, 48)), NotImplementedError, "encoder_hidden_states"),
        (dict(past_key_values=object()), NotImplementedError, "past_key_values"),
        (dict(attention_mask=torch.ones(2, 1, 5, 5)), NotImplementedError, "4-D mask"),
        (dict(attention_mask=torch.ones(2, 5, 5)), NotImplementedError, "3-D mask"),
        (dict(attention_mask=torch.ones(2, 4)), ValueError, "shape"),
        (dict(attention_mask=torch.full((2, 5), 0.5)), ValueError, "only 0 and 1"),
        (dict(cu_seq_lens_q=torch.zeros(3)), TypeError, "cu_seq_lens_q"),
        (dict(input_ids=torch.full((2, 5), 101)), ValueError, r"input_ids must be in \[0, 101\)"),
        (dict(token_type_ids=torch.full((2, 5), 2)), ValueError, "token_type_ids must be in"),
        (dict(input_ids=torch.ones(2, 161, dtype=torch.long)), ValueError, "max_position_embeddings"),
        (dict(inputs_embeds=torch.zeros(2, 5, 48)), ValueError, "exactly one of input_ids or inputs_embeds"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unsupported_call_raises(kwargs, error, match):
    model, _ = patched_pair("BertModel")
    call = dict(input_ids=torch.randint(0, 101, (2, 5)), attention_mask=torch.ones(2, 5, dtype=torch.long))
    call.update(kwargs)
    with pytest.raises(error, match=match):
        model(**call)


def test_output_attentions_from_config_raises():
    model, _ = patched_pair("BertForSequenceClassification")
    model.config.output_attentions = True
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(input_ids=torch.randint(0, 101, (1, 4)))


class _AdapterLinear(torch.nn.Linear):
    """Stands for a LoRA or quantized layer: a Linear subclass with its own forward."""

    def forward(self, x):
        return super().forward(x) * 2


def _with_adapter(model):
    old = model.bert.encoder.layer[0].attention.self.query
    new = _AdapterLinear(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    model.bert.encoder.layer[0].attention.self.query = new
    return model


def _config_change(**fields):
    def change(model):
        for key, value in fields.items():
            setattr(model.config, key, value)
        return model

    return change


def _hooked(model):
    model.bert.encoder.layer[1].output.register_forward_hook(lambda module, args, out: out * 0)
    return model


def _instance_forward(model):
    layer = model.bert.encoder.layer[0]
    layer.forward = lambda *a, **k: type(layer).forward(layer, *a, **k)  # as accelerate's hooks do
    return model


def _relu_intermediate(model):
    model.bert.encoder.layer[0].intermediate.intermediate_act_fn = torch.nn.ReLU()
    return model


@pytest.mark.parametrize(
    "make_unsupported, match",
    [
        (_config_change(is_decoder=True), "decoder"),
        (_config_change(add_cross_attention=True), "decoder"),
        (_config_change(position_embedding_type="relative_key"), "position_embedding_type"),
        (_config_change(hidden_act="gelu_new"), "hidden_act"),
        (_config_change(hidden_act="relu"), "hidden_act"),
        (_relu_intermediate, "ReLU"),
        (_with_adapter, "_AdapterLinear"),
        (_hooked, "hooks"),
        (_instance_forward, "instance-level forward"),
    ],
    ids=[
        "is_decoder",
        "cross_attention",
        "relative_positions",
        "gelu_new",
        "relu",
        "relu_module",
        "adapter",
        "forward_hook",
        "instance_forward",
    ],  # fmt: skip
)
def test_unsupported_model_is_left_unpatched_with_a_warning(make_unsupported, match):
    model = make_unsupported(make_hf("BertForSequenceClassification"))
    with pytest.warns(PatchWarning, match=match):
        assert patch(model) is model
    assert not is_patched(model)
    assert all("forward" not in m.__dict__ or m is model.bert.encoder.layer[0] for m in model.modules())
    with pytest.raises(PatchError, match=match):
        patch(model, strict=True)


def test_unsupported_head_transform_keeps_its_forward_but_the_encoder_is_patched():
    model = make_hf("BertForMaskedLM")
    transform = model.cls.predictions.transform
    transform.transform_act_fn = torch.nn.ReLU()
    with pytest.warns(PatchWarning, match="transform"):
        patch(model)
    assert "forward" in model.bert.__dict__ and "forward" not in transform.__dict__


def test_patch_refuses_what_is_not_a_transformers_bert():
    with pytest.raises(TypeError, match="already a bertfast model"):
        patch(bertfast.BertModel(small_config()))
    linear = torch.nn.Linear(2, 2)
    with pytest.warns(PatchWarning, match="found no transformers BERT model in Linear"):
        assert patch(linear) is linear and not is_patched(linear)
    with pytest.raises(PatchError, match="found no transformers BERT model"):
        patch(linear, strict=True)
    with pytest.raises(TypeError, match="before torch.compile"):
        patch(torch.compile(make_hf("BertModel"), backend="eager"))


def test_a_layer_wrapped_after_patch_is_refused_not_ignored():
    """An adapter (LoRA's lora.Linear wraps its base layer the same way) added after patch must not be skipped."""
    import transformers

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = bertfast.patch(transformers.BertModel(config).eval(), backend="reference")
    ids = torch.randint(1, 50, (2, 6))
    model(input_ids=ids)  # plain layers: fine

    class Adapter(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer, self.delta = base, torch.nn.Linear(32, 32, bias=False)

        def forward(self, x):
            return self.base_layer(x) + self.delta(x)

    sa = model.encoder.layer[1].attention.self
    sa.value = Adapter(sa.value)
    with pytest.raises(bertfast.PatchError, match=r"encoder.layer.1.attention.self.value was replaced by a .*Adapter"):
        model(input_ids=ids)
    bertfast.unpatch(model)
    assert model(input_ids=ids).last_hidden_state.isfinite().all()  # unpatched, transformers runs the adapter


@pytest.mark.parametrize("order", ["checkpointing-then-patch", "patch-then-checkpointing"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_with_frozen_embeddings_in_either_order(order, reentrant):
    """transformers' input-requires-grad hook is honoured: patching works after checkpointing is enabled, and
    with frozen embeddings and reentrant checkpointing the encoder still gets Hugging Face's gradients."""
    import transformers

    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = transformers.BertForSequenceClassification(config).train()
    theirs = copy.deepcopy(ours)
    checkpointing = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    for model in (ours, theirs):
        model.bert.embeddings.requires_grad_(False)
    if order == "checkpointing-then-patch":
        ours.gradient_checkpointing_enable(**checkpointing)
        bertfast.patch(ours, backend="reference", strict=True)
    else:
        bertfast.patch(ours, backend="reference", strict=True)
        ours.gradient_checkpointing_enable(**checkpointing)
    theirs.gradient_checkpointing_enable(**checkpointing)
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    labels = torch.tensor([0, 1])
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    theirs(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    expected = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if expected[name].grad is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None, f"{name} got no gradient"
        if is_key_bias(name):
            assert_key_bias_gradient_vanishes(name, p.grad, expected[name.replace("key.bias", "query.bias")].grad)
            continue
        assert rel_error(p.grad, expected[name].grad) <= FP32_REL_TOL["backward"], name


def test_patch_refuses_a_transformers_before_5(monkeypatch):
    """Before transformers 5 BERT laid its outputs out otherwise; patch says so instead of mimicking 5."""
    from transformers.models.bert import modeling_bert

    model = make_hf("BertModel")
    monkeypatch.setattr(modeling_bert.BertModel, "forward", lambda self, *args, **kwargs: None)  # not wrapped
    with pytest.raises(RuntimeError, match="needs transformers 5 or newer"):
        patch(model)
    assert not is_patched(model)


@pytest.mark.parametrize(
    "family, head", [("bert", "ForMaskedLM"), ("bert", "ForQuestionAnswering"), ("distilbert", "ForMaskedLM")]
)
def test_patched_forwards_keep_the_original_signature_and_positional_order(family, head):
    """inspect.signature (which Trainer reads) shows each module's own forward, and positional arguments
    bind in its order: DistilBERT's is (input_ids, attention_mask, inputs_embeds, ...), without token types."""
    import inspect

    from .test_family import batch, hf_model

    reference = make_hf("Bert" + head) if family == "bert" else hf_model(family, head)
    model = bertfast.patch(copy.deepcopy(reference), backend="reference", strict=True)
    originals = {name: inspect.signature(m.forward) for name, m in reference.named_modules()}
    assert {name: inspect.signature(m.forward) for name, m in model.named_modules()} == originals
    ids, mask = batch(reference.config, [6, 4], 6)
    base = model.base_model
    embeds = base.embeddings.word_embeddings(ids)
    args = (ids, mask) if family == "bert" else (None, mask, embeds)
    expected = getattr(reference, reference.base_model_prefix)(*args).last_hidden_state
    got = base(*args).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)
    assert torch.equal(model(ids, mask)[0][mask.bool()], model(input_ids=ids, attention_mask=mask)[0][mask.bool()])


def _prune(model):
    import torch.nn.utils.prune

    torch.nn.utils.prune.l1_unstructured(model.encoder.layer[0].intermediate.dense, "weight", amount=0.5)


def _wrap_word_embeddings(model):
    class Adapter(torch.nn.Module):  # LoRA on the embeddings wraps the same way
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

        def forward(self, ids):
            return self.base_layer(ids) * 2

    model.embeddings.word_embeddings = Adapter(model.embeddings.word_embeddings)


def _hook_layer_norm(model):
    model.encoder.layer[1].output.LayerNorm.register_forward_hook(lambda module, args, out: out * 0)


def _parametrize_key(model):
    import torch.nn.utils.parametrize

    class Double(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    torch.nn.utils.parametrize.register_parametrization(model.encoder.layer[0].attention.self.key, "weight", Double())


@pytest.mark.parametrize(
    "change, match",
    [
        (_prune, r"encoder.layer.0.intermediate.dense: it has forward pre hooks"),
        (_wrap_word_embeddings, r"embeddings.word_embeddings was replaced by a .*Adapter"),
        (_hook_layer_norm, r"encoder.layer.1.output.LayerNorm: it has forward hooks"),
        (_parametrize_key, r"encoder.layer.0.attention.self.key is now a .*ParametrizedLinear"),
    ],
    ids=["prune", "wrapped-embeddings", "hooked-layer-norm", "parametrization"],
)
def test_a_submodule_changed_after_patch_is_refused_until_unpatch(change, match):
    """Whatever the patched forward would bypass (it reads parameters directly) raises, naming the module."""
    import transformers

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = bertfast.patch(transformers.BertModel(config).eval(), backend="reference", strict=True)
    ids = torch.randint(1, 50, (2, 6))
    model(input_ids=ids)
    model.gradient_checkpointing_enable()  # what patch honours leaves the check quiet
    model.get_input_embeddings().register_forward_hook(lambda *args: None).remove()
    model(input_ids=ids)
    change(model)
    with pytest.raises(bertfast.PatchError, match=match):
        model(input_ids=ids)
    bertfast.unpatch(model)
    expected = model(input_ids=ids).last_hidden_state  # unpatched, transformers runs the change
    bertfast.patch(model, backend="reference")  # patch refuses it up front instead
    assert not bertfast.is_patched(model) and torch.equal(model(input_ids=ids).last_hidden_state, expected)
