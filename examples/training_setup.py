"""What both training examples set up the same way: processes, precision, tokenizer, optimizer, the step."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

import bertfast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_GRAD_NORM = 1.0


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device): an existing process group, torchrun's environment, or one process."""
    if dist.is_initialized():  # main() called by a program that set up the processes itself
        # gloo is the CPU backend: its group trains on the CPU even where a GPU is visible
        on_gpu = torch.cuda.is_available() and dist.get_backend() != "gloo"
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), world_size, device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, None for fp32.

    "auto": bf16 on GPUs that have it, else fp16 (with a GradScaler); fp32 on the CPU, where
    autocast to bf16 works but is slower than fp32 without native bf16 arithmetic.
    """
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_tokenizer(lines: list[str], vocab_size: int):
    """A BERT-style WordPiece tokenizer trained on ``lines`` (lower-cased, [CLS] text [SEP])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer


def shared_tokenizer(lines: list[str], vocab_size: int, rank: int):
    """Trained by rank 0 and sent to the others (training breaks ties in no fixed order)."""
    from tokenizers import Tokenizer

    payload = [train_tokenizer(lines, vocab_size).to_str() if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(payload, src=0)
    return Tokenizer.from_str(payload[0])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm parameters (as BERT)."""
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.dim() == 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, weight_decay: float, lr: float, device: torch.device, **kwargs):
    """Fused AdamW over :func:`param_groups`.  On a GPU it is capturable and its learning rate is a
    device tensor (updated in place by the schedule), so a captured :class:`bertfast.TrainStep` can run it."""
    on_gpu = device.type == "cuda"
    lr = torch.tensor(lr, device=device) if on_gpu else lr
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=True, capturable=on_gpu, **kwargs)


def add_step_arguments(parser) -> None:
    parser.add_argument(
        "--no-train-step",
        dest="train_step",
        action="store_false",
        help="run the step as a plain PyTorch loop instead of bertfast.TrainStep (captured on a GPU)",
    )


def make_step(model: nn.Module, optimizer, device, amp_dtype, accumulation_steps: int, buckets, train_step: bool):
    """A function from a step's micro-batches (dicts of CPU tensors, as the model's forward takes them)
    to the step's loss: forward, backward, fp16 loss scaling, clipping by global norm and the optimizer step.

    ``train_step``: :class:`bertfast.TrainStep` (one CUDA graph per bucket on a single GPU; eager under
    DistributedDataParallel, which a graph cannot hold), else the same step as a plain PyTorch loop.
    Each micro-batch's loss is divided by the number of micro-batches, unless it carries
    ``num_items_in_batch`` (then the model divides its summed loss by it).
    """
    fp16 = amp_dtype == torch.float16
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if train_step:
        step = bertfast.TrainStep(
            model,
            optimizer,
            accumulation_steps=accumulation_steps,
            max_grad_norm=MAX_GRAD_NORM,
            loss_scale="dynamic" if fp16 else None,
            autocast_dtype=amp_dtype,
            buckets=buckets,
            capture=False if ddp else "auto",
        )
        return lambda micro_batches: step(micro_batches).item()

    scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    def plain_step(micro_batches) -> float:
        total = 0.0
        for i, micro_batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP: all-reduce the gradients once per step, after the last micro-batch.
            sync = model.no_sync() if ddp and not last else contextlib.nullcontext()
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in micro_batch.items()}
            with sync:
                with autocast(device, amp_dtype):
                    loss = model(**inputs).loss
                if "num_items_in_batch" not in inputs:
                    loss = loss / len(micro_batches)
                scaler.scale(loss).backward()
            total += loss.item()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return total

    return plain_step
