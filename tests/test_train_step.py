"""bertfast.TrainStep on the CPU: the same loss and parameters as a plain PyTorch loop, no host read
inside a step, token-budget packing, and checkpoints that resume bit for bit."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bertfast
from bertfast.train_step import Bucket, pack_to_budget

from .helpers import ragged_batch, small_config

DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_hidden_layers=2)


HEADS = {
    "masked_lm": bertfast.BertForMaskedLM,
    "pretraining": bertfast.BertForPreTraining,
    "sequence_classification": bertfast.BertForSequenceClassification,
    "token_classification": bertfast.BertForTokenClassification,
    "question_answering": bertfast.BertForQuestionAnswering,
}


def head_labels(head: str, config, ids, mask, gen) -> dict:
    """The labels ``head``'s forward takes for a ``(batch, seq)`` micro-batch (none at padding)."""
    batch, seq = ids.shape
    mlm = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, -100).masked_fill(mask == 0, -100)
    classes = torch.randint(0, 2 if head == "pretraining" else config.num_labels, (batch,), generator=gen)
    if head == "masked_lm":
        return {"labels": mlm}
    if head == "pretraining":
        return {"labels": mlm, "next_sentence_label": classes}
    if head == "sequence_classification":
        return {"labels": classes}
    if head == "token_classification":
        tags = torch.randint(0, config.num_labels, (batch, seq), generator=gen)
        return {"labels": tags.masked_fill(mask == 0, -100)}
    lengths = mask.sum(dim=1)
    start = (torch.rand(batch, generator=gen) * lengths).long()
    end = torch.minimum(start + 2, lengths - 1)
    return {"start_positions": start, "end_positions": end}


def mlm_batches(config, seed: int, steps: int, micro: int, lengths=(7, 3, 9), head: str = "masked_lm"):
    """``steps`` lists of ``micro`` micro-batches with ``head``'s labels; every micro-batch has the same
    token count."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        group = []
        for _ in range(micro):
            order = torch.randperm(len(lengths), generator=gen).tolist()
            ids, types, mask = ragged_batch(config, [lengths[i] for i in order], seq=9, generator=gen)
            labels = head_labels(head, config, ids, mask, gen)
            group.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, **labels})
        out.append(group)
    return out


def models(backend: str, config, head=bertfast.BertForMaskedLM):
    torch.manual_seed(0)
    model = head(config, backend=backend).train()
    return model, copy.deepcopy(model)


def head_config(head: str, **overrides):
    """Three token classes, two for the other heads (question answering's start and end)."""
    return small_config(num_labels=3 if head == "token_classification" else 2, **overrides)


def check_equals_a_plain_loop(backend: str, head: str):
    """Accumulation 2, clipping, dropout on: the same losses and parameters as loss / 2, backward,
    clip_grad_norm_, AdamW.step over the same model with the same generator draws."""
    config = head_config(head, **DROPOUT)
    ours, plain = models(backend, config, HEADS[head])
    batches = mlm_batches(config, seed=1, steps=3, micro=2, head=head)
    total = int(batches[0][0]["attention_mask"].sum())  # no fill token: dropout draws the plain loop's shapes
    step = bertfast.TrainStep(
        ours, torch.optim.AdamW(ours.parameters(), lr=1e-3), accumulation_steps=2, max_grad_norm=0.05,
        token_budget=total,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    for i, group in enumerate(batches):
        torch.manual_seed(100 + i)
        loss = step(group)
        torch.manual_seed(100 + i)
        optimizer.zero_grad()
        expected = 0.0
        for m in group:
            part = plain(**m).loss / 2
            part.backward()
            expected += part.item()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
        optimizer.step()
        assert loss.item() == pytest.approx(expected, rel=1e-5)
    for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    initial = models(backend, config, HEADS[head])[0]
    unused = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}  # no pooler without a sequence-level head
    moved = [name for (name, p), q in zip(ours.named_parameters(), initial.parameters()) if not torch.equal(p, q)]
    assert set(moved) | unused >= {name for name, _ in ours.named_parameters()}, "every parameter trained"


@pytest.mark.parametrize("head", sorted(HEADS))
def test_train_step_equals_a_plain_loop(head):
    check_equals_a_plain_loop("reference", head)


def test_train_step_equals_a_plain_loop_on_triton():
    check_equals_a_plain_loop("triton", "masked_lm")


class HostSyncs(TorchDispatchMode):
    """Ops that read a device value back to the host (on the CPU: would, on a GPU)."""

    READS = {"_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero"}

    def __init__(self, allowed_scalars=()):
        super().__init__()
        self.allowed = {t.data_ptr() for t in allowed_scalars}
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in self.READS and not (first is not None and first.data_ptr() in self.allowed):
            self.found.append(name)
        if name in ("_to_copy", "copy_") and kwargs and str(kwargs.get("device", "")) == "cpu":
            self.found.append(f"{name} to the host")
        return func(*args, **(kwargs or {}))


def test_a_step_reads_nothing_back():
    config = small_config(**DROPOUT)
    model, _ = models("triton", config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = bertfast.TrainStep(model, optimizer, accumulation_steps=2, max_grad_norm=1.0, loss_scale="dynamic",
                              buckets=[(4, 12)])  # fmt: skip
    optimizer = step.optimizer
    groups = mlm_batches(config, seed=2, steps=2, micro=2)
    step(groups[0])  # builds the optimizer state
    prepared = step.prepare(groups[1])  # host work, before the step
    # On the CPU a non-capturable AdamW reads its step counters (CPU scalars by design; on a GPU
    # the captured step uses AdamW(capturable=True), whose counters stay on the device).
    counters = [state["step"] for state in optimizer.state.values()]
    with HostSyncs(counters) as syncs:
        step.run(*prepared)
    assert syncs.found == []


def test_a_step_with_a_host_read_is_caught():
    """The counter has teeth: the fused MLM loss's own gather (no token budget) reads the count back."""
    config = small_config(num_hidden_layers=1)
    model, _ = models("triton", config)
    batch = mlm_batches(config, seed=3, steps=1, micro=1)[0][0]
    with HostSyncs() as syncs:
        model(**batch).loss.backward()
    assert "nonzero" in syncs.found


def test_packing_fills_the_budget_and_refuses_what_does_not_fit():
    seq = 6
    bucket = Bucket(batch=seq + 1, seq=seq, tokens=21, labels=21)
    lengths = list(range(seq + 1))  # every length, 0 to seq: 21 tokens, the budget exactly
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    packed = pack_to_budget(mask, bucket)
    assert packed.indices.numel() == 21 and packed.max_seqlen == seq
    assert packed.cu_seqlens[: seq + 2].tolist() == [0, 0, 1, 3, 6, 10, 15, 21]
    assert packed.cu_seqlens[-1] == 21 and packed.indices.tolist() == mask.flatten().nonzero().squeeze(1).tolist()

    short = mask.clone()
    short[-1] = 0  # 15 tokens: 6 fill tokens from padding positions, in fill sequences of at most seq
    packed = pack_to_budget(short, bucket)
    fill = packed.indices[15:]
    assert fill.numel() == 6 and not short.flatten()[fill].any()
    assert (packed.cu_seqlens.diff() <= seq).all() and packed.cu_seqlens[-1] == 21

    with pytest.raises(ValueError, match="22 tokens but the bucket 7 x 6 holds a budget of 21"):
        pack_to_budget(torch.cat([mask[:-2], torch.ones(2, seq, dtype=torch.long)]), bucket)
    with pytest.raises(ValueError, match="right-padded"):
        pack_to_budget(mask.flip(1), bucket)


def test_packed_model_equals_the_padded_one():
    """Every length in the bucket, including one that fills it: the loss through the token budget
    is the loss of the model's own padded forward."""
    config = small_config(num_hidden_layers=2)
    model, _ = models("reference", config, head=bertfast.BertForSequenceClassification)
    lengths = [1, 2, 3, 4, 5, 6]
    ids, types, mask = ragged_batch(config, lengths, seq=6, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}
    model.eval()
    expected = model(**batch).loss
    step = bertfast.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), token_budget=sum(lengths) + 4)
    loss = step(batch)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fits no bucket"):
        bertfast.TrainStep(model, step.optimizer, buckets=[(2, 6)])(batch)


def test_a_resumed_run_equals_an_uninterrupted_one():
    config = small_config(**DROPOUT)
    groups = mlm_batches(config, seed=5, steps=4, micro=1)

    def fresh():
        model, _ = models("reference", config)
        return bertfast.TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), max_grad_norm=1.0)

    torch.manual_seed(9)
    straight = fresh()
    losses = [straight(g).item() for g in groups]

    torch.manual_seed(9)
    first = fresh()
    resumed_losses = [first(g).item() for g in groups[:2]]
    saved = copy.deepcopy(first.state_dict())
    torch.manual_seed(12345)  # the generator state comes from the checkpoint
    second = fresh()
    second.load_state_dict(saved)
    resumed_losses += [second(g).item() for g in groups[2:]]
    assert resumed_losses == losses
    for p, q in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)


def test_capture_refusals():
    model, _ = models("reference", small_config(num_hidden_layers=1))
    with pytest.raises(ValueError, match="capturable optimizer"):
        bertfast.TrainStep(model, torch.optim.AdamW(model.parameters()), capture=True)
    with pytest.raises(ValueError, match="float learning rate"):
        bertfast.TrainStep(model, torch.optim.AdamW(model.parameters(), capturable=True), capture=True)
    capturable = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3), capturable=True)
    with pytest.raises(ValueError, match="CUDA device"):
        bertfast.TrainStep(model, capturable, capture=True)
    with pytest.raises(ValueError, match="fused"):
        bertfast.TrainStep(model, torch.optim.AdamW(model.parameters()), loss_scale="dynamic")
    step = bertfast.TrainStep(model, torch.optim.AdamW(model.parameters()))
    batch = mlm_batches(model.config, seed=6, steps=1, micro=1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="autocast_dtype"):
        step(batch)


SEQUENCE_HEADS = ["pretraining", "sequence_classification", "token_classification", "question_answering"]


@pytest.mark.parametrize("head", SEQUENCE_HEADS)
def test_rows_added_to_reach_the_bucket_are_ignored(head):
    """A 3-row micro-batch in a 5-row bucket (the smaller of two): the loss of the model's own forward."""
    config = head_config(head, num_hidden_layers=1)
    model, _ = models("reference", config, HEADS[head])
    batch = mlm_batches(config, seed=7, steps=1, micro=1, head=head)[0][0]
    model.eval()
    expected = model(**batch).loss
    step = bertfast.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), buckets=[(8, 16), (5, 12)])
    assert step.prepare(batch)[0] == Bucket(batch=5, seq=12, tokens=60, labels=60)
    torch.testing.assert_close(step(batch), expected.detach(), rtol=1e-5, atol=1e-6)


def test_float_labels_cannot_be_padded_to_a_bucket():
    config = small_config(num_hidden_layers=1, num_labels=1)
    model, _ = models("reference", config, bertfast.BertForSequenceClassification)
    batch = mlm_batches(config, seed=8, steps=1, micro=1, head="sequence_classification")[0][0]
    batch["labels"] = torch.randn(3)  # regression
    step = bertfast.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), buckets=[(4, 9)])
    with pytest.raises(ValueError, match="bucket's batch 4 cannot ignore"):
        step(batch)
    model.eval()
    exact = bertfast.TrainStep(model, step.optimizer, buckets=[(3, 9)])
    torch.testing.assert_close(exact(batch), model(**batch).loss.detach(), rtol=1e-5, atol=1e-6)
