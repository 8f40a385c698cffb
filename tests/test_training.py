"""Training: the examples at a tiny size, and short training runs compared across backends.

- The two examples (``examples/``) run in-process at a tiny size: their loss falls, the
  checkpoint they write is in Hugging Face's format and reloads to the same loss (and loads
  into ``transformers``).
- Convergence: the same tiny model trained for ``STEPS`` AdamW steps on the reference
  backend and on the Triton backend (the interpreter on a CPU) follows the same loss curve
  within ``CURVE_REL_TOL`` (dropout off: the two runs differ only by kernel rounding).
- With dropout on (reference backend: attention dropout runs only there) training still
  reduces the loss.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import bertfast
from bertfast.mlm_loss import IGNORE_INDEX, masked_lm_head_loss

from .helpers import load_example

# Per-step relative difference of the loss, reference vs triton, fp32, over STEPS steps.
# Measured on a CPU (interpreter): 7e-8; the bound leaves room for other summation orders (GPUs).
CURVE_REL_TOL = 1e-5
STEPS = 8


def _tiny_model_args(**overrides) -> list[str]:
    args = dict(hidden_size=32, layers=1, heads=2, intermediate_size=64, backend="reference", log_every=1000)
    args.update(overrides)
    return [item for k, v in args.items() for item in (f"--{k.replace('_', '-')}", str(v))]


# ----------------------------------------------------------------------------- examples


def test_pretrain_example_learns_saves_and_reloads(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    pretrain = load_example("pretrain_mlm")
    out = tmp_path / "mlm"
    argv = ["--output-dir", str(out), "--steps", "8", "--seq-len", "32", "--batch-size", "8", "--grad-accum", "2"]
    argv += ["--vocab-size", "300", "--chunk-size", "16", "--precision", "fp32", *_tiny_model_args()]
    result = pretrain.main(argv)
    assert "held-out loss" in capsys.readouterr().out

    assert len(result["train_losses"]) == 8
    assert all(torch.isfinite(torch.tensor(result["train_losses"])))
    assert result["eval_loss_after"] < result["eval_loss_before"] - 0.05, result
    assert result["eval_loss_reloaded"] == pytest.approx(result["eval_loss_after"], rel=1e-6)

    # Hugging Face's layout: config.json, model.safetensors with the tied decoder stored once, tokenizer.json.
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    with open(out / "config.json") as f:
        assert json.load(f)["architectures"] == ["BertForMaskedLM"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "bert.embeddings.word_embeddings.weight" in keys
    assert "cls.predictions.decoder.weight" not in keys


def test_pretrain_checkpoint_loads_into_transformers(tmp_path):
    """The example's checkpoint gives Hugging Face's BertForMaskedLM the same MLM loss as ours."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pretrain = load_example("pretrain_mlm")
    out = tmp_path / "mlm"
    argv = ["--output-dir", str(out), "--steps", "2", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "1"]
    pretrain.main(argv + ["--vocab-size", "200", "--precision", "fp32", *_tiny_model_args()])

    ours = bertfast.BertForMaskedLM.from_pretrained(out, backend="reference")
    theirs = transformers.BertForMaskedLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(5, ours.config.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, IGNORE_INDEX))
    labels[0, 0] = ids[0, 0]
    labels[mask == 0] = IGNORE_INDEX  # padding positions' hidden states are not defined alike
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask, labels=labels).loss
        hidden = ours.bert(ids, attention_mask=mask).last_hidden_state
        fused = masked_lm_head_loss(ours.cls.predictions, hidden, labels, chunk_size=7)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-5)


def test_finetune_example_learns_and_reloads(tmp_path):
    pytest.importorskip("tokenizers")
    finetune = load_example("finetune_classification")
    out = tmp_path / "classifier"
    # 64 sentences in two micro-batches a step: at lr 1e-2 the tiny model starts memorising within 20 steps.
    argv = ["--train-size", "64", "--eval-size", "64", "--steps", "20", "--batch-size", "16", "--grad-accum", "2"]
    argv += ["--lr", "1e-2", "--dropout", "0", "--precision", "fp32", "--output-dir", str(out), *_tiny_model_args()]
    result = finetune.main(argv)
    losses = result["train_losses"]
    assert len(losses) == 20 and 0.0 <= result["accuracy"] <= 1.0
    assert losses[0] > 0.68 and min(losses[-5:]) < 0.55, losses

    # The saved classifier reloads with the same held-out predictions.
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts, labels = finetune.make_dataset(64, seed=10_000)
    ids, mask = finetune.encode(tokenizer, texts)
    reloaded = bertfast.BertForSequenceClassification.from_pretrained(out, backend="reference")
    accuracy = finetune.accuracy(reloaded, ids, mask, torch.tensor(labels), torch.device("cpu"))
    assert accuracy == result["accuracy"]


def test_task_needs_word_order():
    """The example's "but" sentences: the same words with opposite labels occur (no bag-of-words shortcut)."""
    finetune = load_example("finetune_classification")
    texts, labels = finetune.make_dataset(4000, seed=0)
    by_words: dict[tuple, set] = {}
    for text, label in zip(texts, labels):
        by_words.setdefault(tuple(sorted(text.split())), set()).add(label)
    assert any(len(found) == 2 for found in by_words.values())


@pytest.mark.parametrize("example", ["pretrain_mlm", "finetune_classification"])
def test_examples_run_under_bf16_autocast(tmp_path, example):
    pytest.importorskip("tokenizers")
    module = load_example(example)
    argv = ["--steps", "2", "--batch-size", "4", "--grad-accum", "2", "--precision", "bf16", *_tiny_model_args()]
    if example == "pretrain_mlm":
        argv += ["--output-dir", str(tmp_path), "--seq-len", "32", "--vocab-size", "200"]
    else:
        argv += ["--train-size", "32", "--eval-size", "16"]
    result = module.main(argv)
    assert all(torch.isfinite(torch.tensor(result["train_losses"])))


@pytest.mark.parametrize("example", ["pretrain_mlm", "finetune_classification"])
def test_examples_train_alike_with_and_without_train_step(tmp_path, example):
    """bertfast.TrainStep (the default) and --no-train-step (a plain PyTorch loop) give the same
    losses and the same trained model, with accumulation and clipping (dropout off: TrainStep's
    token budget draws dropout masks of another shape)."""
    pytest.importorskip("tokenizers")
    module = load_example(example)
    argv = ["--steps", "3", "--batch-size", "4", "--grad-accum", "2", "--precision", "fp32", "--dropout", "0"]
    argv += _tiny_model_args()
    if example == "pretrain_mlm":
        argv += ["--output-dir", str(tmp_path / "a"), "--seq-len", "32", "--vocab-size", "200"]
        first = module.main(argv)
        # The same tokenizer (training one breaks ties in no fixed order).
        argv += ["--tokenizer", str(tmp_path / "a" / "tokenizer.json"), "--output-dir", str(tmp_path / "b")]
    else:
        argv += ["--train-size", "32", "--eval-size", "16"]
        first = module.main(argv)
    plain = module.main(argv + ["--no-train-step"])
    assert first["train_losses"] == pytest.approx(plain["train_losses"], rel=1e-5)
    for key in ("eval_loss_after", "accuracy"):
        if key in first:
            assert first[key] == pytest.approx(plain[key], rel=1e-5)


# ----------------------------------------------------------------------------- convergence


def _tiny_config(dropout: float) -> bertfast.BertConfig:
    return bertfast.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def _mlm_batch(config: bertfast.BertConfig, seed: int):
    """Ragged rows (the padding-free path runs when it can), about 30% of the tokens labelled.

    Small: the Triton interpreter's cost grows with the number of rows."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (3, 10), generator=gen)
    mask = (torch.arange(10)[None, :] < torch.tensor([10, 7, 4])[:, None]).long()
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, torch.full_like(ids, IGNORE_INDEX))
    labels[:, 0] = ids[:, 0]  # at least one label a row
    labels[mask == 0] = IGNORE_INDEX
    return ids.masked_fill(labels != IGNORE_INDEX, 4), mask, labels


def _loss_curve(backend: str, dropout: float, steps: int, lr: float) -> list[float]:
    """AdamW on one fixed batch (random tokens: nothing to learn but the batch itself, quickly)."""
    config = _tiny_config(dropout)
    torch.manual_seed(7)
    model = bertfast.BertForMaskedLM(config, backend=backend).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    ids, mask, labels = _mlm_batch(config, seed=0)
    losses = []
    for _ in range(steps):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_triton_backend_follows_the_reference_loss_curve():
    pytest.importorskip("triton")
    probe = torch.empty(1, 2, 16)
    if not bertfast.ops.can_run("attention_varlen", "triton", (probe, probe, probe)):
        pytest.skip("the triton backend cannot run here")
    reference = _loss_curve("reference", dropout=0.0, steps=STEPS, lr=3e-3)
    triton = _loss_curve("triton", dropout=0.0, steps=STEPS, lr=3e-3)
    for step, (ref, got) in enumerate(zip(reference, triton)):
        assert abs(got - ref) <= CURVE_REL_TOL * abs(ref), f"step {step}: triton {got} vs reference {ref}"
    assert reference[-1] < 0.85 * reference[0], reference  # the curves compared are training curves


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_training_with_dropout_reduces_the_loss(backend):
    """With dropout on (in the kernels for triton) training still converges on every backend."""
    if backend == "triton":
        pytest.importorskip("triton")
        probe = torch.empty(1, 2, 16)
        if not bertfast.ops.can_run("attention_varlen", "triton", (probe, probe, probe), dropout_p=0.1):
            pytest.skip("the triton backend cannot run here")
    config = _tiny_config(dropout=0.1)
    model = bertfast.BertForMaskedLM(config, backend=backend).train()
    ids, mask, labels = _mlm_batch(config, seed=0)
    torch.manual_seed(1)
    first = model(ids, attention_mask=mask, labels=labels).loss.item()
    second = model(ids, attention_mask=mask, labels=labels).loss.item()
    assert first != second  # dropout is active: two passes differ

    losses = _loss_curve(backend, dropout=0.1, steps=12, lr=1e-2)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
