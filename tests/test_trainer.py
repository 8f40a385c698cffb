"""transformers' Trainer and pipelines with patched and native models (CPU, tiny BERT, dropout 0).

Trainer passes ``num_items_in_batch`` to forwards that take it and then does not divide the
loss by the accumulation steps.  Hugging Face's BERT heads ignore it (a per-micro-batch mean);
bertfast's native heads honour it (the sum over the step's items divided by their count), so
a native model under gradient accumulation trains exactly like Hugging Face on the whole batch.
"""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch

import bertfast

from .helpers import is_key_bias, minilm_path

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from bertfast.trainer import CheckpointConfig  # noqa: E402

VOCAB, SEQ, EXAMPLES = 100, 8, 16
LEARNING_RATE = 1e-2


def _hf_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config).eval()


def _dataset() -> list[dict]:
    """Ragged padding (one row unpadded in four), labels 0/1."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for i in range(EXAMPLES):
        length = SEQ - i % 4
        mask = torch.zeros(SEQ, dtype=torch.long)
        mask[:length] = 1
        ids = torch.randint(1, VOCAB, (SEQ,), generator=generator) * mask
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(i % 2)})
    return rows


class _RecordingTrainer(transformers.Trainer):
    """Keeps every micro-batch's loss as training_step returns it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_losses = []

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.micro_losses.append(loss.item())
        return loss


def _trainer(model, output_dir, batch=4, accumulation=2, steps=3, **overrides) -> _RecordingTrainer:
    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    args = transformers.TrainingArguments(**{**options, **overrides})
    return _RecordingTrainer(model=model, args=args, train_dataset=_dataset())


def _assert_same_parameters(model, reference, steps=3):
    # AdamW divides each gradient by its own running RMS, so fp32 rounding of tiny gradients shows up to
    # ~2e-5 after three lr=1e-2 steps (single elements, with the attention's summation order); a real
    # difference (a missing term, a wrong scale) moves weights by ~lr, 100 times the bound.
    # A key bias's gradient is all rounding (softmax ignores it): AdamW moves it by up to ~lr per step in a
    # direction the rounding picks, so the two models agree only on that bound (its gradient is checked to
    # vanish in tests/test_patching.py).  |m_hat| / sqrt(v_hat) stays within 1.1 over a few steps.
    expected = reference.state_dict()
    initial = _hf_classifier().state_dict()
    for name, tensor in model.state_dict().items():
        if is_key_bias(name):
            for trained in (tensor, expected[name]):
                assert (trained - initial[name]).abs().max() <= 1.1 * LEARNING_RATE * steps, name
            continue
        message = functools.partial("{}: {}".format, name)
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-4, msg=message)


def test_patched_model_trains_like_hf_with_accumulation(tmp_path):
    hf = _hf_classifier()
    patched = bertfast.patch(copy.deepcopy(hf), strict=True)
    reference = _trainer(hf, tmp_path / "hf")
    reference.train()
    trainer = _trainer(patched, tmp_path / "patched")
    trainer.train()  # Trainer passes num_items_in_batch; the patched encoder accepts it
    assert len(trainer.micro_losses) == 6
    torch.testing.assert_close(trainer.micro_losses, reference.micro_losses, rtol=1e-5, atol=1e-6)
    _assert_same_parameters(patched, hf)


def test_native_model_trains_like_hf(tmp_path):
    hf = _hf_classifier()
    native = bertfast.from_hf(hf)
    reference = _trainer(hf, tmp_path / "hf", accumulation=1)
    reference.train()
    trainer = _trainer(native, tmp_path / "native", accumulation=1)
    trainer.train()
    torch.testing.assert_close(trainer.micro_losses, reference.micro_losses, rtol=1e-5, atol=1e-6)
    _assert_same_parameters(native, hf)


def test_native_accumulation_equals_hf_whole_batch(tmp_path):
    """Two micro-batches of 4 with num_items_in_batch = 8: each micro-loss is its sum / 8, so a
    step's losses add up to the mean over 8 and its gradient is Hugging Face's at batch 8."""
    hf = _hf_classifier()
    native = bertfast.from_hf(hf)
    reference = _trainer(hf, tmp_path / "hf", batch=8, accumulation=1)
    reference.train()
    trainer = _trainer(native, tmp_path / "native", batch=4, accumulation=2)
    trainer.train()
    steps = [a + b for a, b in zip(trainer.micro_losses[::2], trainer.micro_losses[1::2])]
    torch.testing.assert_close(steps, reference.micro_losses, rtol=1e-5, atol=1e-6)
    _assert_same_parameters(native, hf)


def test_native_loss_normalised_by_num_items_in_batch():
    native = bertfast.from_hf(_hf_classifier())
    batch = _dataset()[:4]
    inputs = {k: torch.stack([row[k] for row in batch]) for k in batch[0]}
    mean = native(**inputs).loss
    torch.testing.assert_close(native(**inputs, num_items_in_batch=torch.tensor(10)).loss, mean * 4 / 10)
    with pytest.raises(TypeError, match="cu_seq_lens_q"):
        native(**inputs, cu_seq_lens_q=torch.tensor([0, 8]))
    with pytest.raises(NotImplementedError, match="output_attentions"):
        native(**inputs, output_attentions=True)


def test_native_checkpoint_and_resume(tmp_path):
    hf = _hf_classifier()
    uninterrupted = bertfast.from_hf(hf)
    _trainer(uninterrupted, tmp_path / "whole", steps=4).train()

    first = bertfast.from_hf(hf)
    _trainer(first, tmp_path / "run", steps=2, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    resumed = bertfast.from_hf(hf)
    _trainer(resumed, tmp_path / "run", steps=4).train(resume_from_checkpoint=str(checkpoint))
    _assert_same_parameters(resumed, uninterrupted, steps=4)

    # save_pretrained's folder, and a Trainer checkpoint with CheckpointConfig, load in both libraries.
    saved = tmp_path / "saved"
    first.save_pretrained(saved)
    with_config = bertfast.from_hf(hf)
    trainer = _trainer(with_config, tmp_path / "cb", steps=2, save_strategy="steps", save_steps=2)
    trainer.add_callback(CheckpointConfig())
    trainer.train()
    inputs = {"input_ids": torch.randint(1, VOCAB, (2, SEQ)), "attention_mask": torch.ones(2, SEQ, dtype=torch.long)}
    for folder, model in ((saved, first), (tmp_path / "cb" / "checkpoint-2", with_config)):
        assert os.path.isfile(folder / "config.json")
        expected = model.eval()(**inputs).logits
        loaded_hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
        loaded_native = bertfast.BertForSequenceClassification.from_pretrained(folder)
        with torch.no_grad():
            torch.testing.assert_close(loaded_hf(**inputs).logits, expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(loaded_native(**inputs).logits, expected, rtol=1e-5, atol=1e-6)
    assert not os.path.isfile(checkpoint / "config.json"), "without the callback Trainer writes none"


def test_checkpoint_config_refuses_a_family_model_before_training(tmp_path):
    """Trainer writes a native model's weights under bertfast's BERT names: a RoBERTa model's checkpoints
    described by a config.json would load into transformers' RoBERTa classes wrong, so the callback refuses
    before the first step (save_pretrained writes the family's layout)."""
    torch.manual_seed(0)
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    roberta = bertfast.from_hf(transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**fields)))
    trainer = _trainer(roberta, tmp_path / "roberta", steps=2, save_strategy="steps", save_steps=1)
    trainer.add_callback(CheckpointConfig())
    with pytest.raises(ValueError, match="native roberta model: Trainer writes its weights under bertfast's BERT"):
        trainer.train()
    assert trainer.micro_losses == []


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    return path, transformers.AutoTokenizer.from_pretrained(path)


def test_pipelines_run_native_models(minilm):
    path, tokenizer = minilm
    encoder = bertfast.BertModel.from_pretrained(path)
    hf_encoder = transformers.BertModel.from_pretrained(path).eval()
    texts = ["bertfast runs BERT.", "A second, longer sentence for the batch."]
    features = transformers.pipeline("feature-extraction", model=encoder, tokenizer=tokenizer)(texts)
    expected = transformers.pipeline("feature-extraction", model=hf_encoder, tokenizer=tokenizer)(texts)
    for got, want in zip(features, expected):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)

    classifier = bertfast.BertForSequenceClassification.from_pretrained(path)
    hf_classifier = transformers.BertForSequenceClassification.from_pretrained(path).eval()
    hf_classifier.load_state_dict(classifier.state_dict())  # the same (new) classifier head
    results = transformers.pipeline("text-classification", model=classifier, tokenizer=tokenizer)(texts)
    expected = transformers.pipeline("text-classification", model=hf_classifier, tokenizer=tokenizer)(texts)
    assert [r["label"] for r in results] == [r["label"] for r in expected]
    torch.testing.assert_close([r["score"] for r in results], [r["score"] for r in expected], rtol=1e-4, atol=1e-5)


def test_fill_mask_and_token_classification_pipelines_run_native_models(minilm):
    """fill-mask writes into the model's output (``outputs["input_ids"] = ...``), as into transformers' ModelOutput."""
    path, tokenizer = minilm
    texts = [f"bertfast runs {tokenizer.mask_token} fast.", f"A {tokenizer.mask_token} sentence."]
    for task, name in (("fill-mask", "BertForMaskedLM"), ("token-classification", "BertForTokenClassification")):
        native = getattr(bertfast, name).from_pretrained(path)
        hf = getattr(transformers, name).from_pretrained(path).eval()
        hf.load_state_dict(native.state_dict(), strict=False)  # the same (new) head weights
        results = transformers.pipeline(task, model=native, tokenizer=tokenizer)(texts)
        expected = transformers.pipeline(task, model=hf, tokenizer=tokenizer)(texts)
        for got, want in zip(results, expected):
            assert [r.get("token", r.get("entity")) for r in got] == [r.get("token", r.get("entity")) for r in want]
            torch.testing.assert_close([float(r["score"]) for r in got], [float(r["score"]) for r in want])


def test_outputs_behave_like_transformers_model_output():
    from bertfast.outputs import BaseModelOutput, MaskedLMOutput

    logits = torch.randn(2, 3)
    out = MaskedLMOutput(logits=logits)
    assert out.keys() == ["logits"] and out.to_tuple() == (logits,) and "loss" not in out
    with pytest.raises(KeyError):
        out["loss"]
    loss = torch.tensor(1.0)
    out["loss"] = loss  # a field, by item: the attribute follows
    assert out.loss is loss and out[0] is loss and out.keys() == ["loss", "logits"]
    out.input_ids = ids = torch.ones(2, 3)  # a new key, by attribute: the item follows, after the fields
    assert out["input_ids"] is ids and out.keys() == ["loss", "logits", "input_ids"] and len(out) == 3
    assert dict(out.items()) == {"loss": loss, "logits": logits, "input_ids": ids}
    assert BaseModelOutput(last_hidden_state=logits, packed_last_hidden_state=logits).keys() == ["last_hidden_state"]


def _token_dataset(head: str) -> list[dict]:
    """``_dataset``'s rows with the labels each token-reading head takes."""
    rows = []
    for row in _dataset():
        row = {"input_ids": row["input_ids"], "attention_mask": row["attention_mask"]}
        length = int(row["attention_mask"].sum())
        if head == "ForQuestionAnswering":  # no padding: bertfast keeps padding out of the span softmax
            row["attention_mask"] = torch.ones_like(row["attention_mask"])
            row.update(start_positions=torch.tensor(1), end_positions=torch.tensor(length - 1))
        else:
            classes = VOCAB if head == "ForMaskedLM" else 2
            row["labels"] = (row["input_ids"] % classes).masked_fill(row["attention_mask"] == 0, -100)
        rows.append(row)
    return rows


@pytest.mark.parametrize("head", ["ForMaskedLM", "ForTokenClassification", "ForQuestionAnswering"])
def test_trainer_default_arguments_train_patched_token_heads(head, tmp_path):
    """Trainer keeps the dataset columns the forward's signature names (remove_unused_columns): the patched
    forward shows the original's, so input_ids reach it, and it trains as the unpatched model."""
    reference = getattr(transformers, "Bert" + head)(_hf_classifier().config).eval()
    patched = bertfast.patch(copy.deepcopy(reference), backend="reference")
    losses = []
    for model in (reference, patched):
        # A small rate: AdamW turns the attention key bias's zero gradient (rounding) into a full step.
        trainer = _trainer(model, tmp_path, accumulation=1, steps=2, learning_rate=1e-4)
        trainer.train_dataset = _token_dataset(head)
        trainer.train()
        losses.append(trainer.micro_losses)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
