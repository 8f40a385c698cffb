"""The reference path against Hugging Face transformers (the outside referee), fp32."""

import pytest
import torch
import transformers

import bertfast
from bertfast import head_losses
from bertfast.numerics import FP32_REL_TOL, MODEL_FP32_REL_TOL, rel_error

from .helpers import ODD_CONFIGS, hf_twin, ragged_batch, small_config, span_outputs_under_the_rule


@pytest.mark.parametrize("geometry", range(len(ODD_CONFIGS)))
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_bert_model_matches_hugging_face(geometry, attn_implementation):
    config = small_config(**ODD_CONFIGS[geometry])
    model = bertfast.BertModel(config, backend="reference").eval()
    hf = hf_twin(model, attn_implementation)
    ids, types, mask = ragged_batch(config, [33, 1, 20, 33], seq=33)
    with torch.no_grad():
        ours = model(ids, mask, types)
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    valid = mask.bool()
    assert rel_error(ours.last_hidden_state[valid], theirs.last_hidden_state[valid]) <= MODEL_FP32_REL_TOL
    assert rel_error(ours.pooler_output, theirs.pooler_output) <= MODEL_FP32_REL_TOL
    assert ours[0] is ours.last_hidden_state and ours[1] is ours.pooler_output


def test_hidden_states_match_hugging_face():
    config = small_config()
    model = bertfast.BertModel(config, backend="reference").eval()
    hf = hf_twin(model)
    ids, types, mask = ragged_batch(config, [9, 5], seq=9)
    with torch.no_grad():
        ours = model(ids, mask, types, output_hidden_states=True).hidden_states
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == config.num_hidden_layers + 1
    for a, b in zip(ours, theirs):
        assert rel_error(a[mask.bool()], b[mask.bool()]) <= MODEL_FP32_REL_TOL


def test_state_dict_keys_are_hugging_faces_and_round_trip():
    config = small_config()
    for name in (
        "BertModel",
        "BertForMaskedLM",
        "BertForPreTraining",
        "BertForSequenceClassification",
        "BertForTokenClassification",
        "BertForQuestionAnswering",
    ):
        ours = getattr(bertfast, name)(config)
        theirs = getattr(transformers, name)(transformers.BertConfig(**config.to_dict()))
        assert list(ours.state_dict()) == list(theirs.state_dict()), name
        copy = getattr(bertfast, name)(config)
        copy.load_state_dict(ours.state_dict())
        for key, value in ours.state_dict().items():
            assert torch.equal(copy.state_dict()[key], value), key


def test_padding_never_influences_valid_positions():
    config = small_config()
    model = bertfast.BertModel(config, backend="reference").eval()
    ids, types, mask = ragged_batch(config, [13, 4, 0], seq=13)
    with torch.no_grad():
        base = model(ids, mask, types)
        # other tokens and token types behind the padding, and an all-padding row replaced
        ids2, types2 = ids.clone(), types.clone()
        ids2[~mask.bool()] = torch.randint(1, config.vocab_size, (int((~mask.bool()).sum()),))
        types2[~mask.bool()] = 1 - types2[~mask.bool()]
        changed = model(ids2, mask, types2)
        alone = model(ids[:2], mask[:2], types[:2])
    valid = mask.bool()
    assert torch.equal(base.last_hidden_state[valid], changed.last_hidden_state[valid])
    # the all-padding row is finite and does not disturb the rest of the batch
    assert torch.isfinite(base.last_hidden_state).all() and torch.isfinite(base.pooler_output).all()
    torch.testing.assert_close(base.last_hidden_state[:2], alone.last_hidden_state, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 7), (2, 0)], ids=["no-sequence", "no-token"])
def test_empty_input_is_refused(shape):
    """As in Hugging Face: no silent output (an empty sequence would give the classifier's bias as logits)."""
    config = small_config()
    ids = torch.zeros(shape, dtype=torch.long)
    for model in (bertfast.BertModel(config).eval(), bertfast.BertForSequenceClassification(config).eval()):
        with pytest.raises(ValueError, match="empty input"):
            model(ids)
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.BertConfig(**config.to_dict())
    patched = bertfast.patch(transformers.BertForSequenceClassification(hf_config).eval(), backend="reference")
    with pytest.raises(ValueError, match="empty input"):
        patched(input_ids=ids)


def _hf_head_inputs(config, kind, batch, seq):
    g = torch.Generator().manual_seed(3)
    labels = {}
    if kind in ("BertForMaskedLM", "BertForPreTraining"):
        lab = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
        lab[torch.rand(batch, seq, generator=g) < 0.7] = -100
        labels["labels"] = lab
    if kind == "BertForPreTraining":
        labels["next_sentence_label"] = torch.randint(0, 2, (batch,), generator=g)
    if kind == "BertForSequenceClassification":
        labels["labels"] = torch.randint(0, config.num_labels, (batch,), generator=g)
    if kind == "BertForTokenClassification":
        lab = torch.randint(0, config.num_labels, (batch, seq), generator=g)
        lab[:, -2:] = -100
        labels["labels"] = lab
    if kind == "BertForQuestionAnswering":
        labels["start_positions"] = torch.randint(0, seq + 3, (batch,), generator=g)  # some out of range
        labels["end_positions"] = torch.randint(0, seq, (batch,), generator=g)
    return labels


@pytest.mark.parametrize(
    "kind",
    [
        "BertForMaskedLM",
        "BertForPreTraining",
        "BertForSequenceClassification",
        "BertForTokenClassification",
        "BertForQuestionAnswering",
    ],
)
def test_heads_match_hugging_face(kind):
    config = small_config(num_labels=2 if kind == "BertForQuestionAnswering" else 3)
    # Hugging Face computes padding positions too: compare padded.  Its losses read padding, bertfast's
    # do not (bertfast.head_losses): Hugging Face gets labels without any at padding, and its span logits
    # and loss are taken with padding masked out.
    model = getattr(bertfast, kind)(config, backend="reference").eval().set_unpad(False)
    hf = hf_twin(model)
    ids, types, mask = ragged_batch(config, [11, 6, 9], seq=11)
    labels = _hf_head_inputs(config, kind, 3, 11)
    ours = model(ids, mask, types, **labels)
    if "labels" in labels and labels["labels"].dim() == 2:
        labels["labels"] = head_losses.ignore_padding_labels(labels["labels"], mask)
    theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, **labels)
    if kind == "BertForQuestionAnswering":
        theirs = span_outputs_under_the_rule(theirs, mask, labels["start_positions"], labels["end_positions"])
    assert type(ours).__name__.replace("PreTrainingOutput", "BertForPreTrainingOutput") in (
        type(theirs).__name__,
        type(theirs).__name__.replace("QuestionAnsweringModelOutput", "QuestionAnsweringOutput"),
    )
    for key in theirs.keys():
        ours_value = ours[key]
        assert rel_error(ours_value, theirs[key]) <= MODEL_FP32_REL_TOL, key
    # losses drive the same gradients
    ours.loss.backward()
    theirs.loss.backward()
    hf_grads = dict(hf.named_parameters())
    noise = 1e-6 * max(p.grad.abs().max() for p in hf_grads.values() if p.grad is not None)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        expected = hf_grads[name].grad
        if expected.abs().max() <= noise:
            # Gradients that are zero in exact arithmetic (key biases; the last LayerNorm bias under the
            # span softmax: softmax is shift invariant) are rounding noise on both sides.
            assert (p.grad - expected).abs().max() <= noise, name
        else:  # fused SDPA and Hugging Face's eager attention round differently: the policy's norm bound
            assert rel_error(p.grad, expected) <= FP32_REL_TOL["backward"], name


def test_masked_lm_decoder_is_tied_to_word_embeddings():
    model = bertfast.BertForMaskedLM(small_config())
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias


def test_unpadded_masked_lm_loss_matches_hugging_face():
    config = small_config()
    model = bertfast.BertForMaskedLM(config, backend="reference").eval().set_unpad(True)
    hf = hf_twin(model)
    ids, types, mask = ragged_batch(config, [11, 6, 9], seq=11)
    labels = _hf_head_inputs(config, "BertForMaskedLM", 3, 11)["labels"]
    labels[~mask.bool()] = -100  # no labels on padding
    ours = model(ids, mask, types, labels=labels)
    theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert rel_error(ours.loss, theirs.loss) <= MODEL_FP32_REL_TOL
    valid = mask.bool()
    assert rel_error(ours.logits[valid], theirs.logits[valid]) <= MODEL_FP32_REL_TOL


def test_autocast_bf16_within_the_low_precision_policy():
    """Under torch.autocast the model keeps activations in bf16 (the policy in bertfast.layers): its error is
    held to 2x that of Hugging Face computing in bf16 throughout."""
    import copy

    from bertfast.numerics import lowp_bound, max_abs_error

    config = small_config()
    model = bertfast.BertModel(config, backend="reference").eval()
    hf = hf_twin(model)
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    ids, types, mask = ragged_batch(config, [12, 7], seq=12)
    valid = mask.bool()
    with torch.no_grad():
        ref64 = bertfast.BertModel(config, backend="reference").double().eval()
        ref64.load_state_dict(model.state_dict())
        exact = ref64(ids, mask, types).last_hidden_state[valid]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = model(ids, mask, types).last_hidden_state[valid]
        theirs = hf_bf16(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state[valid]
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert max_abs_error(ours, exact) <= lowp_bound(theirs, exact, torch.bfloat16, "forward")
