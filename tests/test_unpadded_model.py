"""The padding-free encoder against the padded path and the reference."""

import pytest
import torch

import bertfast
from bertfast.numerics import MODEL_FP32_REL_TOL, rel_error
from bertfast.padding import pack_mask, pad, unpad

from .helpers import ragged_batch, small_config, triton_device


def test_pack_and_pad_round_trip_with_holes():
    keep = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    packed = pack_mask(keep)
    assert packed.cu_seqlens.tolist() == [0, 3, 3, 4] and packed.max_seqlen == 3
    x = torch.randn(3, 4, 5)
    back = pad(unpad(x, packed), packed)
    assert torch.equal(back[keep], x[keep]) and not back[~keep].any()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unpadded_equals_padded_at_valid_positions(backend):
    device = "cpu"
    if backend == "triton":
        pytest.importorskip("triton")
        device = triton_device()  # CUDA on a GPU machine: the Triton backend refuses CPU tensors there
        if device is None:
            pytest.skip("the Triton backend cannot run here")
    config = small_config()
    model = bertfast.BertModel(config, backend=backend).eval().to(device)
    ids, types, mask = ragged_batch(config, [17, 1, 9, 0, 17], seq=17)
    mask[2, 3] = 0  # a hole: packing must keep original positions
    ids, types, mask = ids.to(device), types.to(device), mask.to(device)
    with torch.no_grad():
        padded = model.set_unpad(False)(ids, mask, types, output_hidden_states=True)
        packed = model.set_unpad(True)(ids, mask, types, output_hidden_states=True)
    assert packed.packed is not None and padded.packed is None
    valid = mask.bool()
    assert rel_error(packed.last_hidden_state[valid], padded.last_hidden_state[valid]) <= MODEL_FP32_REL_TOL
    assert not packed.last_hidden_state[~valid].any(), "padding positions must be zero"
    for a, b in zip(packed.hidden_states, padded.hidden_states):
        assert rel_error(a[valid], b[valid]) <= MODEL_FP32_REL_TOL
    rows = valid[:, 0]  # the pooler reads position 0: equal wherever it is a token
    assert rel_error(packed.pooler_output[rows], padded.pooler_output[rows]) <= MODEL_FP32_REL_TOL
    assert torch.isfinite(packed.pooler_output).all()


def test_auto_unpads_only_with_padding():
    config = small_config()
    model = bertfast.BertModel(config, backend="reference").eval()
    ids, types, mask = ragged_batch(config, [6, 3], seq=6)
    assert model(ids, mask, types).packed is not None
    assert model(ids, torch.ones_like(mask), types).packed is None
    assert model(ids).packed is None


def test_gradients_through_the_unpadded_model():
    config = small_config()
    model = bertfast.BertForSequenceClassification(config, backend="reference")
    twin = bertfast.BertForSequenceClassification(config, backend="reference")
    twin.load_state_dict(model.state_dict())
    model.set_unpad(True)
    twin.set_unpad(False)
    ids, types, mask = ragged_batch(config, [8, 5, 2], seq=8)
    labels = torch.tensor([0, 1, 1])
    model(ids, mask, types, labels=labels).loss.backward()
    twin(ids, mask, types, labels=labels).loss.backward()
    grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_unpad_setting_is_validated():
    with pytest.raises(ValueError, match="unpad"):
        bertfast.BertModel(small_config(), unpad="yes")


def test_left_padding_pools_what_hugging_face_pools():
    """Left padding puts padding at position 0, which the pooler reads: such a batch runs padded, so the pooled
    output, the classifier's logits and the encoder's gradient are Hugging Face's (padding-free they were not)."""
    transformers = pytest.importorskip("transformers")
    config = small_config(num_labels=3)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**config.to_dict())).eval()
    ours = bertfast.BertForSequenceClassification(config, backend="reference").eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, config.vocab_size, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 6:] = 0  # right padding in the same batch
    labels = torch.tensor([0, 2, 1])
    theirs = hf(input_ids=ids, attention_mask=mask, labels=labels)
    mine = ours(ids, mask, labels=labels)
    assert rel_error(mine.logits, theirs.logits) <= MODEL_FP32_REL_TOL
    mine.loss.backward()
    theirs.loss.backward()
    for name, p in ours.bert.embeddings.named_parameters():
        expected = dict(hf.bert.embeddings.named_parameters())[name].grad
        assert rel_error(p.grad, expected) <= 1e-4, name
    # Right padding alone still runs padding-free; unpad=True cannot pool a left-padded row and says so.
    right = torch.ones(2, 9, dtype=torch.long)
    right[1, 5:] = 0
    assert ours.bert(ids[:2], right).packed is not None
    assert ours.bert(ids, mask).packed is None
    ours.set_unpad(True)
    with pytest.raises(ValueError, match="left padding"):
        ours(ids, mask)
