"""Converting live transformers models to bertfast (from_hf), and the "bertfast" attention in transformers' registry."""

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bertfast  # noqa: E402
from bertfast import hf, ops  # noqa: E402
from bertfast.numerics import FP32_REL_TOL, MODEL_FP32_REL_TOL, rel_error  # noqa: E402

from .helpers import ragged_batch, small_config  # noqa: E402

HAS_REGISTRY = hasattr(transformers, "AttentionInterface")
needs_registry = pytest.mark.skipif(not HAS_REGISTRY, reason="this transformers has no AttentionInterface")


def make_hf(kind: str, hf_overrides=None, **overrides):
    """A transformers model of an odd geometry (hidden 48 over 3 heads), random weights, eval mode.

    ``hf_overrides`` are set on the Hugging Face config only (values bertfast's config refuses).
    """
    config = small_config(num_labels=2 if kind == "BertForQuestionAnswering" else 3, **overrides).to_dict()
    config.update(hf_overrides or {})
    return getattr(transformers, kind)(transformers.BertConfig(**config, attn_implementation="eager")).eval()


def valid(value, mask):
    """Valid positions of per-token outputs; per-sequence outputs whole."""
    return value[mask.bool()] if value.dim() >= 2 and tuple(value.shape[:2]) == tuple(mask.shape) else value


@pytest.mark.parametrize("kind", hf.SUPPORTED_CLASSES)
def test_from_hf_matches_hugging_face(kind):
    source = make_hf(kind)
    ours = getattr(bertfast, kind).from_hf(source, backend="reference")
    assert type(ours) is getattr(bertfast, kind)
    assert not ours.training and ours.backend == "reference"
    theirs_state = source.state_dict()
    assert list(ours.state_dict()) == list(theirs_state)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs_state[key]), key
        assert value.data_ptr() != theirs_state[key].data_ptr(), f"{key} must be a copy"
    ids, types, mask = ragged_batch(ours.config, [11, 3, 8], 11)
    out = ours(ids, mask, types)
    expected = source(input_ids=ids, attention_mask=mask, token_type_ids=types)
    for key in expected.keys():
        err = rel_error(valid(out[key], mask), valid(expected[key], mask))
        assert err <= MODEL_FP32_REL_TOL, f"{key}: relative error {err:.2e}"
    # picking the class by the Hugging Face class name gives the same model
    by_name = hf.convert(source, backend="reference")
    assert type(by_name) is type(ours)


@pytest.mark.parametrize(
    "num_labels, problem_type, label_dtype",
    [
        (1, None, torch.float32),  # regression by the label count
        (3, "regression", torch.float32),
        (3, None, torch.long),  # single-label by the labels' dtype
        (3, None, torch.float32),  # multi-label by the labels' dtype
        (3, "multi_label_classification", torch.float32),
    ],
)
def test_sequence_classification_loss_follows_hugging_faces_rule(num_labels, problem_type, label_dtype):
    source = make_hf("BertForSequenceClassification", hf_overrides={"num_labels": num_labels})
    source.config.problem_type = problem_type
    ours = bertfast.BertForSequenceClassification.from_hf(source, backend="reference")
    ids, types, mask = ragged_batch(ours.config, [7, 4, 6], 7)
    generator = torch.Generator().manual_seed(0)
    if label_dtype == torch.long:
        labels = torch.randint(0, num_labels, (3,), generator=generator)
    elif problem_type is None and num_labels > 1:
        labels = torch.randint(0, 2, (3, num_labels), generator=generator).float()
    else:
        labels = torch.randn((3, num_labels), generator=generator).squeeze(-1)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    expected = source(**inputs).loss
    assert rel_error(ours(**inputs).loss, expected) <= MODEL_FP32_REL_TOL


def test_config_is_mapped_field_for_field():
    source = make_hf("BertForSequenceClassification", classifier_dropout=0.3, layer_norm_eps=1e-7, type_vocab_size=3)
    source.config.problem_type = "multi_label_classification"
    config = hf.config_from_hf(source.config)
    for field in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "max_position_embeddings",
        "type_vocab_size",
        "initializer_range",
        "layer_norm_eps",
        "pad_token_id",
        "classifier_dropout",
        "num_labels",
        "problem_type",
    ):
        assert getattr(config, field) == getattr(source.config, field), field
    assert config.extra["id2label"] == source.config.to_dict()["id2label"]


def test_bert_model_from_a_head_model_takes_its_encoder():
    source = make_hf("BertForSequenceClassification")
    encoder = bertfast.BertModel.from_hf(source, backend="reference")
    assert encoder.pooler is not None
    ids, types, mask = ragged_batch(encoder.config, [6, 2], 6)
    out = encoder(ids, mask, types)
    expected = source.bert(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert rel_error(out.last_hidden_state[mask.bool()], expected.last_hidden_state[mask.bool()]) <= 1e-5
    assert rel_error(out.pooler_output, expected.pooler_output) <= MODEL_FP32_REL_TOL
    # a masked-LM model's encoder has no pooler, and neither has the converted one
    assert bertfast.BertModel.from_hf(make_hf("BertForMaskedLM")).pooler is None


def test_dtype_device_and_mode_follow_the_hugging_face_model():
    source = make_hf("BertForTokenClassification").to(torch.float16).train()
    ours = bertfast.BertForTokenClassification.from_hf(source)
    assert ours.training
    assert {p.dtype for p in ours.parameters()} == {torch.float16}
    assert {p.device for p in ours.parameters()} == {source.bert.embeddings.word_embeddings.weight.device}


def test_converted_model_trains_like_hugging_face():
    source = make_hf("BertForMaskedLM")
    ours = bertfast.BertForMaskedLM.from_hf(source, backend="reference")
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    ids, types, mask = ragged_batch(ours.config, [9, 5], 9)
    labels = ids.masked_fill(mask == 0, -100)
    ours(ids, mask, types, labels=labels).loss.backward()
    source(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss.backward()
    expected = dict(source.named_parameters())
    for name, p in ours.named_parameters():
        if name.endswith("key.bias"):
            continue  # exactly zero in exact arithmetic (softmax shift invariance): rounding noise
        assert rel_error(p.grad, expected[name].grad) <= FP32_REL_TOL["backward"], name


def test_conversion_refuses_what_bertfast_cannot_represent():
    with pytest.raises(ValueError, match="hidden_act"):
        bertfast.BertModel.from_hf(make_hf("BertModel", {"hidden_act": "gelu_new"}))
    relative = make_hf("BertModel")
    relative.config.position_embedding_type = "relative_key"
    with pytest.raises(ValueError, match="position_embedding_type"):
        bertfast.BertModel.from_hf(relative)
    decoder = make_hf("BertModel")
    decoder.config.is_decoder = True
    with pytest.raises(ValueError, match="is_decoder"):
        hf.convert(decoder)
    replaced = make_hf("BertForTokenClassification")
    replaced.bert.encoder.layer[1].intermediate.intermediate_act_fn = torch.nn.ReLU()
    with pytest.raises(ValueError, match="ReLU"):
        hf.convert(replaced)
    untied = make_hf("BertForMaskedLM")
    untied.cls.predictions.decoder.weight = torch.nn.Parameter(untied.cls.predictions.decoder.weight.detach() + 1)
    with pytest.raises(ValueError, match="untied masked-LM decoder"):
        hf.convert(untied)
    assert bertfast.BertModel.from_hf(untied).pooler is None  # the encoder alone is fine


def test_conversion_refuses_mismatched_classes():
    with pytest.raises(TypeError, match="heads differ"):
        bertfast.BertForMaskedLM.from_hf(make_hf("BertForSequenceClassification"))
    with pytest.raises(TypeError, match="not a supported transformers BERT class"):
        hf.convert(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="already a bertfast model"):
        hf.convert(bertfast.BertModel(small_config()))


# --------------------------------------------------------------------------------------
# The "bertfast" attention implementation inside transformers
# --------------------------------------------------------------------------------------


def test_key_padding_mask_from_hf_accepts_padding_masks_in_every_encoding():
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(3, 6, generator=g) > 0.3
    keep[:, 0] = True
    batch, q, kv = 3, 6, 6
    expanded = keep[:, None, None, :].expand(batch, 1, q, kv)
    additive = torch.zeros(batch, 1, q, kv).masked_fill(~expanded, torch.finfo(torch.float32).min)
    for mask in (
        keep,
        keep.long(),
        expanded,
        expanded.clone(),  # materialised: checked value by value
        keep[:, None, None, :],  # (batch, 1, 1, kv)
        additive,
        additive.masked_fill(~expanded, float("-inf")),
        keep[:, None, None, :].expand(batch, 4, q, kv).clone(),  # one row per head
    ):
        result = hf.key_padding_mask_from_hf(mask, batch, q, kv)
        assert result.dtype == torch.bool and torch.equal(result, keep), tuple(mask.shape)
    assert hf.key_padding_mask_from_hf(None, batch, q, kv) is None


def test_key_padding_mask_from_hf_refuses_everything_else():
    batch, n = 2, 5
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(batch, 1, n, n)
    with pytest.raises(NotImplementedError, match="differs between queries"):
        hf.key_padding_mask_from_hf(causal.clone(), batch, n, n)
    per_head = torch.ones(batch, 2, n, n, dtype=torch.bool)
    per_head[:, 1, :, -1] = False
    with pytest.raises(NotImplementedError, match="differs between queries or heads"):
        hf.key_padding_mask_from_hf(per_head, batch, n, n)
    bias = torch.randn(batch, 1, n, n)
    with pytest.raises(NotImplementedError, match="a bias, not a padding mask"):
        hf.key_padding_mask_from_hf(bias, batch, n, n)
    with pytest.raises(NotImplementedError, match="shape"):
        hf.key_padding_mask_from_hf(torch.ones(batch, n, n), batch, n, n)
    with pytest.raises(ValueError, match="shape"):
        hf.key_padding_mask_from_hf(torch.ones(batch, n + 1), batch, n, n)
    with pytest.raises(NotImplementedError, match="tensor mask"):
        hf.key_padding_mask_from_hf(object(), batch, n, n)


@needs_registry
def test_registered_attention_matches_eager_and_runs_through_bertfast(monkeypatch):
    assert hf.register_attention(backend="reference") == "bertfast"
    calls = []
    original = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    eager = make_hf("BertForSequenceClassification")
    model = copy.deepcopy(eager)
    model.set_attn_implementation("bertfast")
    assert model.config._attn_implementation == "bertfast"
    ids, types, mask = ragged_batch(model.config, [10, 4, 7], 10)
    kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=torch.tensor([0, 1, 2]))
    ours, theirs = model(**kwargs), eager(**kwargs)
    assert len(calls) == model.config.num_hidden_layers
    assert all(torch.equal(m, mask.bool()) for m in calls)  # the user's 2-D mask reached the attention
    assert rel_error(ours.logits, theirs.logits) <= MODEL_FP32_REL_TOL
    ours.loss.backward()
    theirs.loss.backward()
    expected = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        if not name.endswith("key.bias"):
            assert rel_error(p.grad, expected[name].grad) <= FP32_REL_TOL["backward"], name
    # a model built with it from the start, and no mask at all
    built = transformers.BertModel._from_config(eager.config, attn_implementation="bertfast").eval()
    assert built.config._attn_implementation == "bertfast"
    assert torch.isfinite(built(input_ids=ids).last_hidden_state).all()


@needs_registry
def test_registered_attention_with_a_4d_mask_and_what_it_refuses():
    hf.register_attention(backend="reference")
    eager = make_hf("BertModel")
    model = copy.deepcopy(eager)
    model.set_attn_implementation("bertfast")
    ids, types, mask = ragged_batch(model.config, [8, 5], 8)
    mask4 = mask.bool()[:, None, None, :].expand(2, 1, 8, 8).clone()  # a user's own 4-D key-padding mask
    ours = model(input_ids=ids, attention_mask=mask4).last_hidden_state
    theirs = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    assert rel_error(ours[mask.bool()], theirs[mask.bool()]) <= MODEL_FP32_REL_TOL
    causal = torch.ones(8, 8, dtype=torch.bool).tril()[None, None].expand(2, 1, 8, 8).clone()
    with pytest.raises(NotImplementedError, match="differs between queries"):
        model(input_ids=ids, attention_mask=causal)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)


def test_register_attention_explains_an_old_transformers(monkeypatch):
    # transformers swaps its own module object in sys.modules once a model is built: patch the live one
    monkeypatch.setattr(sys.modules["transformers"], "AttentionInterface", None, raising=False)  # < 4.51
    with pytest.raises(RuntimeError, match="no AttentionInterface"):
        hf.register_attention()


@needs_registry
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_registered_attention_refuses_a_sliding_window_compiled_or_not(compiled):
    """ModernBERT's local layers mask a window, not padding: refused, never applied as a padding mask."""
    hf.register_attention(backend="reference")
    config = transformers.ModernBertConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        global_attn_every_n_layers=2, local_attention=4, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
    )  # fmt: skip
    model = transformers.ModernBertModel(config).eval()
    model.set_attn_implementation("bertfast")
    run = torch.compile(model, backend="eager") if compiled else model
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with pytest.raises(NotImplementedError, match="key-padding masks only"):
        run(input_ids=ids, attention_mask=mask)


def test_key_padding_mask_from_hf_compiled_takes_only_masks_it_need_not_read():
    batch, n = 2, 5
    keep = torch.ones(batch, n, dtype=torch.bool)
    keep[1, 3:] = False

    @torch.compile(backend="eager", fullgraph=True)
    def convert(mask):
        return hf.key_padding_mask_from_hf(mask, batch, n, n)

    assert torch.equal(convert(keep[:, None, None, :].expand(batch, 1, n, n)), keep)
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(batch, 1, n, n).clone()
    additive = torch.zeros(batch, 1, 1, n)
    for mask in (causal, additive):
        with pytest.raises(Exception, match="cannot check that a materialised or additive 4-D mask"):
            convert(mask)


@pytest.mark.parametrize("vocab, new", [(101, 107), (30, 34), (101, 90)])  # covariance definite, singular; shrink
@pytest.mark.parametrize("mean_resizing", [True, False])
def test_resize_token_embeddings_draws_new_rows_as_transformers_does(vocab, new, mean_resizing):
    """New rows: transformers' multivariate normal with the old rows' mean and 1e-9 x their covariance, or the mean
    where that covariance is not positive definite (more dimensions than rows); N(0, initializer_range) with
    ``mean_resizing=False``.  The same seed gives the same rows; the tied decoder and its bias follow."""
    native = bertfast.BertForMaskedLM(small_config(vocab_size=vocab))
    with torch.no_grad():  # rows far from N(0, 0.02), so a draw from the wrong distribution shows
        native.get_input_embeddings().weight.mul_(30).add_(1.5)
        native.cls.predictions.bias.normal_()
    theirs = transformers.BertForMaskedLM(transformers.BertConfig(**native.config.to_dict())).eval()
    theirs.load_state_dict(native.state_dict())
    for model in (theirs, native):
        torch.manual_seed(7)
        model.resize_token_embeddings(new, mean_resizing=mean_resizing)
    ours, reference = native.get_input_embeddings().weight, theirs.get_input_embeddings().weight
    assert ours.shape == reference.shape == (new, 48)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert native.cls.predictions.decoder.weight is ours and native.config.vocab_size == new
    torch.testing.assert_close(native.cls.predictions.bias, theirs.cls.predictions.bias, rtol=0, atol=0)
