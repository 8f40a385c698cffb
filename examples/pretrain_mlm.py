"""Masked-LM pre-training of a small BERT from a local text file, offline, end to end.

1. A WordPiece tokenizer is trained on the text with the ``tokenizers`` library (BERT's
   normaliser and pre-tokeniser, ``[PAD] [UNK] [CLS] [SEP] [MASK]``).
2. Consecutive lines are packed into ``[CLS] ... [SEP]`` sequences of at most ``--seq-len``
   tokens; every tenth line is held out for evaluation.
3. Every step draws fresh masks (BERT's rule: 15% of the tokens are chosen; of those 80%
   become ``[MASK]``, 10% a random token, 10% stay) and trains ``bertfast.BertForMaskedLM``
   with fused AdamW (no decay on biases and LayerNorm), linear warm-up and decay, autocast
   (bf16, or fp16 with dynamic loss scaling; fp32 by default on the CPU), gradient accumulation,
   clipping, and the fused chunked MLM loss (:mod:`bertfast.mlm_loss`: the vocabulary-sized
   logits are never stored whole).  The step is a :class:`bertfast.TrainStep` (one CUDA graph
   on a single GPU, eager under DDP or on the CPU); ``--no-train-step`` runs the same step as a
   plain PyTorch loop.
4. The model is saved in Hugging Face's format (``config.json`` + ``model.safetensors``,
   the decoder weight stored once as it is tied to the word embeddings, plus the
   ``tokenizer.json``), reloaded with ``from_pretrained`` and checked: the held-out loss of
   the reloaded model equals the trained model's.

The loss is the mean over every labelled token of a whole optimizer step, across
micro-batches and processes: each micro-batch contributes its summed loss divided by the
step's global count of labelled tokens.  Every process draws the same global batches and
masks and trains on its slice, so ``N`` processes compute what one process computes with
``N`` times the batch (checked by ``tests/test_distributed.py``).

With the defaults (200 steps, about a minute on two CPU cores) the training loss falls from
6.9 to about 4.7 and the held-out loss from 6.9 to about 5.9: the shipped file is tiny
(300 lines), so past the word frequencies the model mostly memorises.  Point ``--data`` at
a larger file for real pre-training.

    python examples/pretrain_mlm.py --output-dir /tmp/bertfast-mlm
    torchrun --nproc_per_node=2 examples/pretrain_mlm.py --output-dir /tmp/bertfast-mlm

Under ``torchrun`` the processes use DistributedDataParallel (gloo on the CPU, nccl on GPUs).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import bertfast
from bertfast.mlm_loss import IGNORE_INDEX, masked_lm_head_loss

# The examples' shared set-up, also when an example is imported by its path (tests).
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training_setup import (  # noqa: E402
    SPECIAL_TOKENS,
    add_step_arguments,
    autocast_dtype,
    init_distributed,
    make_optimizer,
    make_step,
    shared_tokenizer,
)

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "corpus.txt")
TOKENIZER_FILE = "tokenizer.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="a UTF-8 text file, one sentence or paragraph a line")
    p.add_argument("--output-dir", required=True, help="where the checkpoint and tokenizer are written")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json to use instead of training one")
    p.add_argument("--vocab-size", type=int, default=1000, help="of the tokenizer trained on --data")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with a rising learning rate")
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--backend", default="auto", help='bertfast backend: "auto", "reference", "triton", "ext"')
    p.add_argument("--chunk-size", type=int, default=2048, help="labelled tokens per chunk of the evaluation loss")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    add_step_arguments(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- set-up


def pack_sequences(tokenizer, lines: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive lines packed into ``[CLS] tokens [SEP]`` rows of at most ``seq_len``, padded.

    Returns ``input_ids`` and ``attention_mask``, both ``(rows, seq_len)``.
    """
    cls_id, sep_id, pad_id = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    room = seq_len - 2
    rows, current = [], []
    for encoding in tokenizer.encode_batch(lines, add_special_tokens=False):
        ids = encoding.ids[:room]
        if current and len(current) + len(ids) > room:
            rows.append(current)
            current = []
        current = current + ids
    if current:
        rows.append(current)
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, ids in enumerate(rows):
        row = [cls_id, *ids, sep_id]
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def mask_tokens(input_ids, attention_mask, special_ids, vocab_size, mask_id, mask_prob, generator):
    """BERT's masking: choose ``mask_prob`` of the real tokens; 80% -> [MASK], 10% -> random, 10% kept.

    Returns ``(masked_input_ids, labels)`` with ``labels = -100`` where nothing is predicted.
    """
    candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids))
    chosen = candidates & (torch.rand(input_ids.shape, generator=generator) < mask_prob)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    draw = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (draw < 0.8)
    to_random = chosen & (draw >= 0.8) & (draw < 0.9)
    random_ids = torch.randint(len(special_ids), vocab_size, input_ids.shape, generator=generator)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


@torch.no_grad()
def evaluate(model: bertfast.BertForMaskedLM, batches, device, chunk_size: int) -> float:
    """Mean MLM loss per labelled token over fixed (pre-masked) batches, fp32, dropout off."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for input_ids, attention_mask, labels in batches:
        input_ids, attention_mask, labels = (t.to(device) for t in (input_ids, attention_mask, labels))
        hidden = model.bert(input_ids, attention_mask=attention_mask).last_hidden_state
        loss = masked_lm_head_loss(
            model.cls.predictions, hidden, labels, chunk_size=chunk_size, reduction="sum", backend=model.backend
        )
        total += loss.item()
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    owns_process_group = not dist.is_initialized()
    rank, world_size, device = init_distributed()
    torch.manual_seed(args.seed)
    log = print if rank == 0 else (lambda *a, **k: None)

    with open(args.data, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    # Every tenth line is held out: same topics, unseen sentences.
    train_lines = [line for i, line in enumerate(lines) if i % 10 != 9]
    eval_lines = [line for i, line in enumerate(lines) if i % 10 == 9]

    if args.tokenizer:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(args.tokenizer)
    else:
        tokenizer = shared_tokenizer(train_lines, args.vocab_size, rank)
    vocab_size = tokenizer.get_vocab_size()
    special_ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert special_ids == list(range(len(SPECIAL_TOKENS))), "special tokens must come first in the vocabulary"
    mask_id = tokenizer.token_to_id("[MASK]")
    train_ids, train_mask = pack_sequences(tokenizer, train_lines, args.seq_len)
    eval_ids, eval_mask = pack_sequences(tokenizer, eval_lines, args.seq_len)

    # Held-out batches are masked once, so every evaluation sees the same task.
    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    eval_inputs, eval_labels = mask_tokens(
        eval_ids, eval_mask, special_ids, vocab_size, mask_id, args.mask_prob, eval_gen
    )
    eval_batches = [
        (eval_inputs[i : i + 32], eval_mask[i : i + 32], eval_labels[i : i + 32]) for i in range(0, len(eval_ids), 32)
    ]

    config = bertfast.BertConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.seq_len,
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
        pad_token_id=tokenizer.token_to_id("[PAD]"),
    )
    model = bertfast.BertForMaskedLM(config, backend=args.backend).to(device).train()
    trained = model
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = make_optimizer(trained, args.weight_decay, args.lr, device, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, int(args.warmup * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (args.steps - step) / max(1, args.steps - warmup)))
    )
    amp_dtype = autocast_dtype(args.precision, device)
    buckets = [(args.batch_size, args.seq_len)]
    train_step = make_step(model, optimizer, device, amp_dtype, args.grad_accum, buckets, args.train_step)

    eval_before = evaluate(trained, eval_batches, device, args.chunk_size)
    log(
        f"{len(train_ids)} training / {len(eval_ids)} held-out sequences, vocab {vocab_size}, "
        f"{sum(p.numel() for p in trained.parameters()) / 1e6:.2f}M parameters, {world_size} process(es), "
        f"autocast {amp_dtype}, backend {trained.backend}; held-out loss {eval_before:.3f}"
    )

    # Every process draws the same global micro-batches (rows and masks, from one seeded
    # generator) and trains on its slice, so N processes train exactly as one process with N
    # times the batch: the same tokens, the same masks, the same normalisation.
    train_gen = torch.Generator().manual_seed(args.seed + 2)
    global_micro = args.batch_size * world_size
    mine = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
    order, cursor = torch.randperm(len(train_ids), generator=train_gen), 0
    losses = []
    start = time.time()
    for step in range(args.steps):
        micro_batches, count = [], 0
        for _ in range(args.grad_accum):
            if cursor + global_micro > len(order):
                order, cursor = torch.randperm(len(train_ids), generator=train_gen), 0
            rows = order[cursor : cursor + global_micro]
            cursor += global_micro
            inputs, labels = mask_tokens(
                train_ids[rows], train_mask[rows], special_ids, vocab_size, mask_id, args.mask_prob, train_gen
            )
            count += int((labels != IGNORE_INDEX).sum())
            micro_batches.append(
                {"input_ids": inputs[mine], "attention_mask": train_mask[rows][mine], "labels": labels[mine]}
            )
        # Each micro-batch's summed loss over the step's global count of labelled tokens; DDP
        # averages gradients over the processes, so the count is divided by world_size to keep the sum.
        for micro_batch in micro_batches:
            micro_batch["num_items_in_batch"] = max(count, 1) / world_size
        step_loss = train_step(micro_batches) / world_size
        schedule.step()
        if world_size > 1:
            summed = torch.tensor(step_loss, device=device)
            dist.all_reduce(summed)
            step_loss = summed.item()
        losses.append(step_loss)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            lr = schedule.get_last_lr()[0]
            held_out = evaluate(trained, eval_batches, device, args.chunk_size)
            log(
                f"step {step + 1:5d}  loss {step_loss:.4f}  held-out {held_out:.4f}  lr {lr:.2e}  "
                f"{time.time() - start:.1f}s"
            )

    eval_after = evaluate(trained, eval_batches, device, args.chunk_size)
    result = {"train_losses": losses, "eval_loss_before": eval_before, "eval_loss_after": eval_after}
    log(f"held-out loss {eval_before:.3f} -> {eval_after:.3f}")

    if rank == 0:
        trained.save_pretrained(args.output_dir)
        tokenizer.save(os.path.join(args.output_dir, TOKENIZER_FILE))
        reloaded = bertfast.BertForMaskedLM.from_pretrained(args.output_dir, backend=args.backend, device=device)
        tied = reloaded.cls.predictions.decoder.weight is reloaded.bert.embeddings.word_embeddings.weight
        eval_reloaded = evaluate(reloaded, eval_batches, device, args.chunk_size)
        log(f"saved to {args.output_dir}; reloaded: held-out loss {eval_reloaded:.6f} (trained {eval_after:.6f})")
        if not tied:
            raise RuntimeError("the reloaded decoder weight is not tied to the word embeddings")
        if not math.isclose(eval_reloaded, eval_after, rel_tol=1e-6):
            raise RuntimeError(f"the reloaded model's loss {eval_reloaded} differs from the trained {eval_after}")
        result.update(eval_loss_reloaded=eval_reloaded, output_dir=args.output_dir)
    if dist.is_initialized():
        dist.barrier()  # the others wait for rank 0's checkpoint
        if owns_process_group:
            dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
