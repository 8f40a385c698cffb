"""What is benchmarked: sizes, the model configs, and the padding of batches.

On a GPU everything is BERT-large (hidden 1024, 16 heads x 64, FFN 4096, 24 layers).
Without one the same suites and the same code run once at tiny sizes so they never rot.

Padding: real batches are padded to the longest sequence.  Every padded benchmark input
uses right padding with sequence lengths drawn uniformly from ``[ceil(seq/2), seq]``
(seeded), the first sequence of each batch kept at full length so the padded width is
the nominal ``seq``; about 75% of the positions are real tokens.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..config import BertConfig

PADDING_DISTRIBUTION = (
    "right padding; sequence lengths uniform in [ceil(seq/2), seq] (seeded), the first sequence of each batch "
    "full length (~75% real tokens)"
)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    batch: int
    seq: int

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.seq}"


@dataclasses.dataclass(frozen=True)
class TokenShape:
    """A token-wise op (LayerNorm, bias+GELU) over ``batch * seq`` rows of ``features``."""

    batch: int
    seq: int
    features: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def label(self) -> str:
        return f"{self.tokens}x{self.features}"


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    batch: int
    seq: int
    heads: int
    head_dim: int

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.seq}x{self.heads}x{self.head_dim}"


# --- GPU sizes: BERT-large -----------------------------------------------------------
FORWARD_SHAPES = tuple(ModelShape(b, s) for b, s in ((1, 128), (32, 128), (128, 128), (8, 512), (32, 512)))
TRAIN_SHAPES = tuple(ModelShape(b, s) for b, s in ((32, 128), (8, 512)))
# 16384 tokens = a 128 x 128 batch; the row's batch/seq say so.
LAYER_NORM_SHAPES = (TokenShape(128, 128, 1024),)
BIAS_GELU_SHAPES = (TokenShape(128, 128, 4096),)
ATTENTION_SHAPES = (AttentionShape(32, 128, 16, 64), AttentionShape(8, 512, 16, 64))
GPU_DTYPES = ("bf16", "fp16")
TRAIN_DTYPES = ("bf16",)

# --- CPU smoke sizes (odd on purpose) -------------------------------------------------
SMOKE_FORWARD_SHAPES = (ModelShape(2, 13),)
SMOKE_TRAIN_SHAPES = (ModelShape(2, 13),)
SMOKE_LAYER_NORM_SHAPES = (TokenShape(2, 13, 48),)
SMOKE_BIAS_GELU_SHAPES = (TokenShape(2, 13, 96),)
SMOKE_ATTENTION_SHAPES = (AttentionShape(2, 13, 3, 16),)
SMOKE_DTYPES = ("fp32",)


def bert_large_config(**overrides) -> BertConfig:
    """BERT-large with dropout off: the fused kernels and every baseline compute the same thing."""
    return BertConfig.bert_large(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides)


def tiny_config(**overrides) -> BertConfig:
    """A 2-layer BERT small enough for the CPU and Triton's interpreter."""
    fields = dict(
        vocab_size=128,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertConfig(**{**fields, **overrides})


def model_label(config: BertConfig) -> str:
    """``bert-large`` / ``-base`` / ``-small`` / ``-tiny`` or ``bert-L<layers>-H<hidden>``: the row-name stem."""
    dims = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size)
    known = {(24, 1024, 16, 4096): "bert-large", (12, 768, 12, 3072): "bert-base", (4, 512, 8, 2048): "bert-small"}
    tiny = tiny_config()
    known[(tiny.num_hidden_layers, tiny.hidden_size, tiny.num_attention_heads, tiny.intermediate_size)] = "bert-tiny"
    return known.get(dims, f"bert-L{config.num_hidden_layers}-H{config.hidden_size}")


def padded_lengths(batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """Sequence lengths of one padded batch (see the module docstring)."""
    low = max(1, math.ceil(seq / 2))
    lengths = torch.randint(low, seq + 1, (batch,), generator=generator)
    lengths[0] = seq
    return lengths


def key_padding_mask(lengths: torch.Tensor, seq: int) -> torch.Tensor:
    """``(batch, seq)`` bool, True at real tokens (right padding)."""
    return torch.arange(seq)[None, :] < lengths[:, None]
