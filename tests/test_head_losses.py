"""One loss rule at padding (bertfast.head_losses) on every face: native and patched, every backend that
runs here, padded and padding-free, eager and torch.compile."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bertfast  # noqa: E402
from bertfast import head_losses  # noqa: E402

from .helpers import small_config, triton_device  # noqa: E402

HEADS = ["BertForMaskedLM", "BertForPreTraining", "BertForTokenClassification", "BertForQuestionAnswering"]
TRITON = triton_device()


def _native_backends():
    faces = [("reference", "auto"), ("reference", False)]
    if TRITON == "cpu":
        faces.append(("triton", "auto"))
    if bertfast.ops.backend_availability("ext") is None:
        faces.append(("ext", "auto"))
    return faces


def batch_with_labels_at_padding(config, head: str):
    """Right, left and middle padding; labels (and span positions) at padding, past the end and at tokens."""
    gen = torch.Generator().manual_seed(11)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [0] * 3 + [1] * 6, [1, 1, 0, 0, 1, 1, 1, 0, 1]])
    ids = torch.randint(1, config.vocab_size, mask.shape, generator=gen)
    types = torch.randint(0, config.type_vocab_size, mask.shape, generator=gen)
    if head == "BertForQuestionAnswering":
        labels = {"start_positions": torch.tensor([2, 7, 1, 4]), "end_positions": torch.tensor([6, 3, 12, 8])}
    else:
        classes = config.vocab_size if "Token" not in head else config.num_labels
        labels = {"labels": torch.randint(0, classes, mask.shape, generator=gen)}
        if head == "BertForPreTraining":
            labels["next_sentence_label"] = torch.tensor([0, 1, 1, 0])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, **labels}


def native_model(head: str, config):
    torch.manual_seed(0)
    return getattr(bertfast, head)(config, backend="reference").eval()


def loss_and_logits(model, inputs):
    out = model(**inputs)
    logits = out.start_logits if hasattr(out, "start_logits") else None
    return out.loss, logits


@pytest.mark.parametrize("mode", ["eval", "train"])  # train: the MLM heads take the fused, chunked loss
@pytest.mark.parametrize("head", HEADS)
def test_every_face_gives_one_loss(head, mode):
    config = small_config(num_labels=2 if "Question" in head else 3)  # dropout 0: train mode is deterministic
    model = native_model(head, config).train(mode == "train")
    inputs = batch_with_labels_at_padding(config, head)
    # The rule's own numbers: the padded reference path with padding removed from the loss by hand.
    expected, _ = loss_and_logits(model.set_backend("reference").set_unpad(False), inputs)
    losses = {}
    with torch.no_grad():
        for backend, unpad in _native_backends():
            model.set_backend(backend).set_unpad(unpad)
            losses[f"native-{backend}-unpad={unpad}"] = loss_and_logits(model, inputs)[0]
        model.set_backend("reference").set_unpad("auto")
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        losses["native-compiled"] = loss_and_logits(compiled, inputs)[0]
        hf_config = transformers.BertConfig(**config.to_dict(), attn_implementation="eager")
        hf = getattr(transformers, head)(hf_config).train(mode == "train")
        hf.load_state_dict(model.state_dict(), strict=False)
        for unpad in ("auto", False):
            bertfast.patch(hf, backend="reference", unpad=unpad)
            losses[f"patched-unpad={unpad}"] = loss_and_logits(hf, inputs)[0]
    for face, loss in losses.items():
        torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-5, msg=lambda m, face=face: f"{face}: {m}")


def padded_forward(head: str):
    """(padded reference forward of ``head`` on the batch above, its inputs, their token mask)."""
    config = small_config(num_labels=2 if "Question" in head else 3)
    inputs = batch_with_labels_at_padding(config, head)
    with torch.no_grad():
        out = native_model(head, config).set_unpad(False)(**inputs)
    return out, inputs, inputs["attention_mask"].bool()


def test_labels_at_padding_are_ignored_and_span_positions_at_padding_too():
    """The rule itself, against hand-built losses."""
    out, inputs, tokens = padded_forward("BertForTokenClassification")
    by_hand = torch.nn.functional.cross_entropy(out.logits[tokens], inputs["labels"][tokens])
    torch.testing.assert_close(out.loss, by_hand)

    out, inputs, tokens = padded_forward("BertForQuestionAnswering")
    assert (out.start_logits[~tokens] == torch.finfo(out.start_logits.dtype).min).all()
    # Row 1: start 7 is padding (ignored), end 3 a token; row 2 (left-padded): start 1 is padding, end 12 is
    # past the end (both ignored).
    start_kept, end_kept = [0, 3], [0, 1, 3]
    start = torch.nn.functional.cross_entropy(out.start_logits[start_kept], inputs["start_positions"][start_kept])
    end = torch.nn.functional.cross_entropy(out.end_logits[end_kept], inputs["end_positions"][end_kept])
    torch.testing.assert_close(out.loss, (start + end) / 2)
    assert torch.softmax(out.start_logits, -1)[~tokens].max() == 0, "padding gets no span probability"


def test_patched_span_head_keeps_hugging_face_outputs_without_padding():
    """With no padding the rule changes nothing: the patched QA model is Hugging Face's, tuple outputs too."""
    config = small_config(num_labels=2)
    hf_config = transformers.BertConfig(**config.to_dict(), attn_implementation="eager")
    hf = transformers.BertForQuestionAnswering(hf_config).eval()
    ids = torch.randint(1, config.vocab_size, (2, 7))
    positions = {"start_positions": torch.tensor([1, 3]), "end_positions": torch.tensor([4, 9])}
    with torch.no_grad():
        theirs = hf(input_ids=ids, **positions)
        bertfast.patch(hf, backend="reference")
        ours = hf(ids, None, None, None, **positions, return_dict=False)
    torch.testing.assert_close(ours[0], theirs.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs.start_logits, rtol=1e-5, atol=1e-5)
    bertfast.unpatch(hf)
    assert "forward" not in hf.__dict__


def test_ignore_padding_labels_without_a_mask_changes_nothing():
    labels = torch.tensor([[1, 2, -100]])
    assert head_losses.ignore_padding_labels(labels, None) is labels
    masked = head_losses.ignore_padding_labels(labels, torch.tensor([[True, False, True]]))
    assert masked.tolist() == [[1, -100, -100]]
