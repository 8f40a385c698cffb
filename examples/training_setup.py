"""What both training examples set up the same way: processes, precision, tokenizer, optimizer groups."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


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
