"""Fine-tune ``bertfast.BertForSequenceClassification`` on a sentence task made on the spot, offline.

The task (binary sentiment of composed sentences, generated from templates with a seed):

    "the soup was very good"                                  -> positive
    "the soup was not very good"                              -> negative  (negation flips a clause)
    "the music was dull but the staff seemed lovely"          -> positive  (after "but", the last clause decides)
    "although the room is lovely , the view was never great"  -> negative
    "the coffee is pleasant and the service was excellent"    -> positive  ("and" joins clauses that agree)

Clauses are joined by "but" and "although" as often as by "and", so the words of a sentence
do not tell its label: "the food was good but the view was bad" and "the food was bad but
the view was good" hold the same words with opposite labels.  A bag of words cannot beat
chance on those; the model has to read the order and the scope of the negations.

A WordPiece tokenizer is trained on the training sentences with the ``tokenizers`` library,
and a small BERT (2 layers, hidden 128, 0.3M parameters) is trained from scratch with AdamW,
a linear schedule, autocast (bf16, or fp16 with dynamic loss scaling; fp32 by default on
the CPU), gradient accumulation and clipping, in a :class:`bertfast.TrainStep` (one CUDA graph
per bucket of sentence widths on a single GPU; ``--no-train-step`` runs a plain PyTorch loop).
With the defaults it reaches a held-out accuracy of at least 0.99 in 300 steps (1.000 with
seeds 0 to 3; it stays at chance for the first ~100 steps while the model discovers the
structure), in about half a minute on two CPU cores.

    python examples/finetune_classification.py
    python examples/finetune_classification.py --backend triton   # on a GPU
    torchrun --nproc_per_node=2 examples/finetune_classification.py

Under ``torchrun`` the processes use DistributedDataParallel (gloo on the CPU, nccl on GPUs);
each takes its share of every global batch.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import bertfast

# The examples' shared set-up, also when an example is imported by its path (tests).
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training_setup import (  # noqa: E402
    add_step_arguments,
    autocast_dtype,
    init_distributed,
    make_optimizer,
    make_step,
    shared_tokenizer,
)

NOUNS = ["food", "soup", "service", "music", "film", "book", "hotel", "room", "staff", "view", "coffee", "concert"]
POSITIVE = ["good", "great", "excellent", "wonderful", "pleasant", "lovely"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "poor", "dull"]
INTENSIFIERS = ["", "", "very ", "really "]
NEGATIONS = ["not ", "never "]
VERBS = ["was", "is", "seemed"]


def make_clause(rng: random.Random, polarity: int) -> str:
    """A clause of the given polarity (1 positive, 0 negative), negated half of the time."""
    negated = rng.random() < 0.5
    words = POSITIVE if polarity != negated else NEGATIVE  # a negated clause uses the opposite adjective
    negation = rng.choice(NEGATIONS) if negated else ""
    return f"the {rng.choice(NOUNS)} {rng.choice(VERBS)} {negation}{rng.choice(INTENSIFIERS)}{rng.choice(words)}"


def make_example(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    form = rng.randrange(4)
    if form == 0:
        return make_clause(rng, label), label
    if form == 1:  # "and": both clauses agree
        return f"{make_clause(rng, label)} and {make_clause(rng, label)}", label
    if form == 2:  # "but": the last clause decides, the first says the opposite
        return f"{make_clause(rng, 1 - label)} but {make_clause(rng, label)}", label
    return f"although {make_clause(rng, 1 - label)} , {make_clause(rng, label)}", label


def make_dataset(size: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    pairs = [make_example(rng) for _ in range(size)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--vocab-size", type=int, default=200)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--backend", default="auto", help='bertfast backend: "auto", "reference", "triton", "ext"')
    p.add_argument("--output-dir", default=None, help="save the fine-tuned model (Hugging Face format) here")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    add_step_arguments(p)
    return p.parse_args(argv)


def encode(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, padded to the longest sentence."""
    encodings = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    ids = torch.zeros((len(texts), width), dtype=torch.long)  # [PAD] is id 0
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for i, e in enumerate(encodings):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    return ids, mask


def trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of this batch."""
    width = int(mask.sum(dim=1).max())
    return ids[:, :width], mask[:, :width]


@torch.no_grad()
def accuracy(model, ids, mask, labels, device, batch_size: int = 256) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(ids), batch_size):
        batch_ids, batch_mask = trim(ids[i : i + batch_size], mask[i : i + batch_size])
        logits = model(batch_ids.to(device), attention_mask=batch_mask.to(device)).logits
        correct += int((logits.argmax(dim=-1).cpu() == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(ids)


def main(argv=None) -> dict:
    args = parse_args(argv)
    owns_process_group = not dist.is_initialized()
    rank, world_size, device = init_distributed()
    torch.manual_seed(args.seed)
    log = print if rank == 0 else (lambda *a, **k: None)

    train_texts, train_labels = make_dataset(args.train_size, seed=args.seed)
    eval_texts, eval_labels = make_dataset(args.eval_size, seed=args.seed + 10_000)
    tokenizer = shared_tokenizer(train_texts, args.vocab_size, rank)
    train_ids, train_mask = encode(tokenizer, train_texts)
    eval_ids, eval_mask = encode(tokenizer, eval_texts)
    train_y, eval_y = torch.tensor(train_labels), torch.tensor(eval_labels)

    config = bertfast.BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=max(64, train_ids.shape[1], eval_ids.shape[1]),
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
        num_labels=2,
    )
    model = bertfast.BertForSequenceClassification(config, backend=args.backend).to(device).train()
    trained = model
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = make_optimizer(trained, args.weight_decay, args.lr, device)
    warmup = max(1, int(args.warmup * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (args.steps - step) / max(1, args.steps - warmup)))
    )
    amp_dtype = autocast_dtype(args.precision, device)
    # Micro-batches are trimmed to their longest sentence; TrainStep pads them to the next of a few widths.
    widths = sorted({min(2**k, train_ids.shape[1]) for k in range(3, train_ids.shape[1].bit_length() + 1)})
    buckets = [(args.batch_size, width) for width in widths]
    train_step = make_step(model, optimizer, device, amp_dtype, args.grad_accum, buckets, args.train_step)
    log(
        f"{len(train_texts)} training / {len(eval_texts)} held-out sentences, vocab {config.vocab_size}, "
        f"{sum(p.numel() for p in trained.parameters()) / 1e6:.2f}M parameters, {world_size} process(es), "
        f"autocast {amp_dtype}, backend {trained.backend}; e.g. {train_texts[0]!r} -> {train_labels[0]}"
    )

    gen = torch.Generator().manual_seed(args.seed + 1)
    global_micro = args.batch_size * world_size
    order, cursor = torch.randperm(len(train_texts), generator=gen), 0
    losses = []
    start = time.time()
    for step in range(args.steps):
        micro_batches = []
        for _ in range(args.grad_accum):
            if cursor + global_micro > len(order):
                order, cursor = torch.randperm(len(train_texts), generator=gen), 0
            rows = order[cursor + rank * args.batch_size : cursor + (rank + 1) * args.batch_size]
            cursor += global_micro
            ids, mask = trim(train_ids[rows], train_mask[rows])
            micro_batches.append({"input_ids": ids, "attention_mask": mask, "labels": train_y[rows]})
        step_loss = train_step(micro_batches)
        schedule.step()
        losses.append(step_loss)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            acc = accuracy(trained, eval_ids, eval_mask, eval_y, device)
            log(f"step {step + 1:5d}  loss {step_loss:.4f}  held-out accuracy {acc:.3f}  {time.time() - start:.1f}s")

    final_accuracy = accuracy(trained, eval_ids, eval_mask, eval_y, device)
    log(f"held-out accuracy {final_accuracy:.4f} ({len(eval_texts)} sentences)")
    if args.output_dir and rank == 0:
        trained.save_pretrained(args.output_dir)
        tokenizer.save(os.path.join(args.output_dir, "tokenizer.json"))
        log(f"saved to {args.output_dir}")
    if owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    return {"train_losses": losses, "accuracy": final_accuracy}


if __name__ == "__main__":
    main()
