"""bertfast.patch on modules that hold BERT models, and its non-strict contract for what it cannot run."""

import copy
import logging

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from bertfast.patching import PatchError, PatchWarning, is_patched, patch, patched_modules  # noqa: E402

from .helpers import ragged_batch, small_config  # noqa: E402


def make_hf(kind: str):
    config = transformers.BertConfig(**small_config(num_labels=3).to_dict(), attn_implementation="eager")
    return getattr(transformers, kind)(config).eval()


class Pair(nn.Module):
    """A container of two BERT models (a retriever and a classifier, say), not a transformers model."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict(
            {"query": make_hf("BertModel"), "scorer": make_hf("BertForSequenceClassification")}
        )
        self.proj = nn.Linear(48, 8)


class ToyConfig(transformers.PretrainedConfig):
    model_type = "toy-encoder"


class ToyEncoder(transformers.PreTrainedModel):
    """A model family bertfast.patch does not run, whose attention calls transformers' registry."""

    config_class = ToyConfig
    _supports_attention_backend = True

    def __init__(self, config):
        super().__init__(config)
        self.dense = nn.Linear(4, 4)


def tiny_gpt2():
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32)
    return transformers.GPT2Model(config).eval()


def quantized_query(model: nn.Module) -> nn.Module:
    layer = model.bert.encoder.layer[0].attention.self
    layer.query = torch.ao.nn.quantized.Linear(48, 48)
    return model


def test_every_bert_model_in_a_container_is_patched_and_reported(caplog):
    pair = Pair()
    reference = copy.deepcopy(pair)
    with caplog.at_level(logging.INFO, logger="bertfast.patching"):
        assert patch(pair, backend="reference") is pair
    assert patched_modules(pair) == ["encoders.query", "encoders.scorer.bert"]
    assert "encoders.query, encoders.scorer.bert" in caplog.text
    ids, types, mask = ragged_batch(small_config(), [7, 3, 5], 7)
    with torch.no_grad():
        for name in ("query", "scorer"):
            ours = pair.encoders[name](input_ids=ids, attention_mask=mask, token_type_ids=types)[0]
            theirs = reference.encoders[name](input_ids=ids, attention_mask=mask, token_type_ids=types)[0]
            valid = mask.bool() if ours.dim() == 3 else slice(None)
            torch.testing.assert_close(ours[valid], theirs[valid], rtol=1e-5, atol=1e-5)


def test_a_quantized_linear_is_named_by_its_path_and_leaves_the_model_unpatched():
    model = quantized_query(make_hf("BertForSequenceClassification"))
    expected = "bert.encoder.layer.0.attention.self.query is torch.ao.nn.quantized.Linear, not torch.nn.Linear"
    with pytest.warns(PatchWarning, match=expected):
        assert patch(model) is model
    assert not is_patched(model)
    with pytest.raises(PatchError, match=expected):
        patch(model, strict=True)


def test_strict_refuses_a_container_before_patching_any_of_it():
    pair = Pair()
    quantized_query(pair.encoders["scorer"])
    with pytest.raises(PatchError, match="encoders.scorer.bert.encoder.layer.0.attention.self.query"):
        patch(pair, strict=True)
    assert not is_patched(pair)
    with pytest.warns(PatchWarning, match="left encoders.scorer"):
        patch(pair)
    assert patched_modules(pair) == ["encoders.query"]


def test_another_model_family_is_left_unpatched_with_a_pointer_to_register_attention():
    toy = ToyEncoder(ToyConfig())
    with pytest.warns(PatchWarning, match=r"left ToyEncoder unpatched: .*'toy-encoder'.*register_attention\(\)"):
        assert patch(toy) is toy
    assert not is_patched(toy)
    with pytest.raises(PatchError, match="register_attention"):
        patch(toy, strict=True)


def test_a_causal_model_gets_no_register_attention_pointer():
    gpt2 = tiny_gpt2()
    with pytest.warns(PatchWarning, match="GPT2Model") as record:
        patch(gpt2)
    assert "register_attention" not in str(record[0].message)


def test_a_container_with_a_bert_and_another_family_patches_the_bert_and_names_the_other():
    box = nn.ModuleList([make_hf("BertModel"), tiny_gpt2()])
    with pytest.warns(PatchWarning, match=r"left 1 \(GPT2Model\) unpatched"):
        patch(box, backend="reference")
    assert patched_modules(box) == ["0"]
    with pytest.raises(PatchError, match="GPT2Model"):
        patch(nn.ModuleList([make_hf("BertModel"), tiny_gpt2()]), strict=True)
