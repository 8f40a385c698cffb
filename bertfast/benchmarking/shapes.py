"""What is benchmarked: sizes, the model configs, and the padding of batches.

On a GPU everything is BERT-large (hidden 1024, 16 heads x 64, FFN 4096, 24 layers).
Without one the same suites and the same code run once at tiny sizes so they never rot.

Padding: real batches are padded to the longest sequence.  Every padded benchmark input
uses right padding with sequence lengths drawn uniformly from ``[ceil(seq/2), seq]``
(seeded), the first sequence of each batch kept at full length so the padded width is
the nominal ``seq``; about 75% of the positions are real tokens.

Variable-length batches (the padding-free rows, ``*-varlen``) draw each sequence's length
as a fraction ``f`` of the maximum ``seq`` from a stated distribution and pad every batch
to ``seq`` (a tokenizer's ``padding="max_length"``); the length is ``round(f * seq)``
clipped to ``[1, seq]``:

- ``uniform-0.2-1.0``: ``f ~ U(0.2, 1.0)``, mean fill 0.60;
- ``text-like``: a log-normal clipped at the maximum, ``f = min(1, 0.45 * exp(0.6 * z))``
  with ``z ~ N(0, 1)``: median 0.45, mean fill 0.505, 9.2% of the sequences truncated to the
  maximum; the shape of tokenized sentences and passages (many short, a long tail cut at
  the model's limit).

One more distribution is kept apart (the FP8 inference rows use it, not the padding-free section):

- ``squad-like``: SQuAD v1.1 question + context in BERT wordpieces at the maximum 384 (MLPerf
  Inference's BERT task), ``f = min(1, 0.40 * exp(0.48 * z))``: median 154 tokens, mean 170,
  3% of the sequences at the maximum (long contexts are cut into 384-token windows).

The draws are stratified so every batch represents its distribution: with ``u_i = (p_i +
v_i) / batch`` for a random permutation ``p`` of ``0..batch-1`` and ``v_i ~ U(0, 1)``, the
fraction is the distribution's quantile at ``u_i``.  Each length is still a draw from the
distribution, but a batch's fill stays within a few percent of the mean even at batch 16.
All draws come from seeded generators.
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


@dataclasses.dataclass(frozen=True)
class UniformLengths:
    """Length fractions ``f ~ U(low, high)`` of the maximum."""

    low: float = 0.2
    high: float = 1.0

    def __post_init__(self):
        if not 0.0 < self.low <= self.high <= 1.0:
            raise ValueError(f"need 0 < low <= high <= 1, got low={self.low}, high={self.high}")

    @property
    def name(self) -> str:
        return f"uniform-{float(self.low)}-{float(self.high)}"  # "uniform-0.2-1.0"

    @property
    def description(self) -> str:
        return f"f ~ U({self.low:g}, {self.high:g}) of the maximum, mean fill {self.mean_fill:.3f}"

    @property
    def mean_fill(self) -> float:
        return (self.low + self.high) / 2

    def quantile(self, u: torch.Tensor) -> torch.Tensor:
        return self.low + (self.high - self.low) * u


@dataclasses.dataclass(frozen=True)
class TextLikeLengths:
    """Length fractions ``f = min(1, median * exp(sigma * z))``, ``z ~ N(0, 1)``: a clipped log-normal."""

    median: float = 0.45
    sigma: float = 0.6
    name = "text-like"  # a class attribute, not a field

    def __post_init__(self):
        if not (0.0 < self.median and self.sigma > 0.0):
            raise ValueError(f"need median > 0 and sigma > 0, got median={self.median}, sigma={self.sigma}")

    @property
    def description(self) -> str:
        return (
            f"f = min(1, {self.median:g} * exp({self.sigma:g} * z)), z ~ N(0, 1): log-normal clipped at the maximum, "
            f"median {self.median:g}, mean fill {self.mean_fill:.3f}, {self.truncated:.1%} of the sequences at the "
            "maximum"
        )

    @property
    def truncated(self) -> float:
        """P(f = 1): the share of sequences cut at the maximum."""
        return _normal_cdf(math.log(self.median) / self.sigma)

    @property
    def mean_fill(self) -> float:
        """``E[min(1, X)]`` for ``X`` log-normal: ``E[X; X < 1] + P(X >= 1)``."""
        mu, sigma = math.log(self.median), self.sigma
        below = math.exp(mu + sigma * sigma / 2) * _normal_cdf((-mu - sigma * sigma) / sigma)
        return below + self.truncated

    def quantile(self, u: torch.Tensor) -> torch.Tensor:
        z = torch.special.ndtri(u.double())
        return (self.median * torch.exp(self.sigma * z)).clamp(max=1.0).to(u.dtype)


@dataclasses.dataclass(frozen=True)
class SquadLikeLengths(TextLikeLengths):
    """SQuAD v1.1 question + context lengths in BERT wordpieces as a fraction of the maximum (384): a clipped
    log-normal with median 0.40 (154 of 384) and sigma 0.48, mean 170 tokens, 3% at the maximum."""

    median: float = 0.40
    sigma: float = 0.48
    name = "squad-like"

    @property
    def description(self) -> str:
        return "SQuAD v1.1 question + context in BERT wordpieces (max 384): " + super().description


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


LengthDistribution = UniformLengths | TextLikeLengths
LENGTH_DISTRIBUTIONS: tuple[LengthDistribution, ...] = (UniformLengths(0.2, 1.0), TextLikeLengths(0.45, 0.6))
# The FP8 inference rows' lengths (MLPerf Inference's BERT task runs SQuAD v1.1 at max 384).
SQUAD_LIKE = SquadLikeLengths()
SQUAD_MAX = 384


def length_distribution(name: str) -> LengthDistribution:
    for dist in (*LENGTH_DISTRIBUTIONS, SQUAD_LIKE):
        if dist.name == name:
            return dist
    known = [d.name for d in (*LENGTH_DISTRIBUTIONS, SQUAD_LIKE)]
    raise ValueError(f"unknown length distribution {name!r}; choose from {known}")


def lengths_description() -> str:
    """The variable-length batches in words (stored in result files)."""
    dists = "; ".join(f"{d.name}: {d.description}" for d in (*LENGTH_DISTRIBUTIONS, SQUAD_LIKE))
    return (
        "varlen rows: each length round(f * seq) clipped to [1, seq], f drawn (stratified, seeded) from "
        f"{dists}; batches padded to seq"
    )


def varlen_lengths(dist: LengthDistribution, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` int64 sequence lengths in ``[1, seq]`` drawn from ``dist`` (stratified; see the module docstring)."""
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be positive, got {batch} and {seq}")
    strata = torch.randperm(batch, generator=generator, dtype=torch.float64)
    u = (strata + torch.rand(batch, generator=generator, dtype=torch.float64)) / batch
    fractions = dist.quantile(u)
    return torch.round(fractions * seq).clamp(1, seq).to(torch.int64)


# --- GPU sizes: BERT-large -----------------------------------------------------------
FORWARD_SHAPES = tuple(ModelShape(b, s) for b, s in ((1, 128), (32, 128), (128, 128), (8, 512), (32, 512)))
TRAIN_SHAPES = tuple(ModelShape(b, s) for b, s in ((32, 128), (8, 512)))
# Padding-free rows: maximum lengths 128 and 512 (forward and a training step).
VARLEN_SHAPES = (ModelShape(32, 128), ModelShape(16, 512))
VARLEN_DTYPES = ("bf16",)
# Drop-in rows (patched Hugging Face, CUDA graphs) and the mixed-precision training rows: bf16.
DROP_IN_DTYPES = ("bf16",)
AMP_DTYPES = ("bf16",)
# 16384 tokens = a 128 x 128 batch; the row's batch/seq say so.
LAYER_NORM_SHAPES = (TokenShape(128, 128, 1024),)
BIAS_GELU_SHAPES = (TokenShape(128, 128, 4096),)
ATTENTION_SHAPES = (AttentionShape(32, 128, 16, 64), AttentionShape(8, 512, 16, 64))
# FP8 inference rows (issue 25): padded 32 x 128 and 32 x 384 (run padding-free), SQuAD-like lengths at 384.
FP8_SHAPES = (
    (ModelShape(32, 128), None),
    (ModelShape(32, 384), None),
    (ModelShape(32, 384), SQUAD_LIKE),
    (ModelShape(128, 384), SQUAD_LIKE),
)
# Sentence embeddings: MiniLM's hidden 384 at a serving batch, BERT-large's 1024.
MEAN_POOL_SHAPES = (TokenShape(256, 128, 384), TokenShape(64, 512, 1024))
GPU_DTYPES = ("bf16", "fp16")
TRAIN_DTYPES = ("bf16",)

# --- CPU smoke sizes (odd on purpose) -------------------------------------------------
SMOKE_FORWARD_SHAPES = (ModelShape(2, 13),)
SMOKE_TRAIN_SHAPES = (ModelShape(2, 13),)
SMOKE_VARLEN_SHAPES = (ModelShape(4, 13),)
SMOKE_LAYER_NORM_SHAPES = (TokenShape(2, 13, 48),)
SMOKE_BIAS_GELU_SHAPES = (TokenShape(2, 13, 96),)
SMOKE_ATTENTION_SHAPES = (AttentionShape(2, 13, 3, 16),)
SMOKE_MEAN_POOL_SHAPES = (TokenShape(3, 13, 48),)
SMOKE_FP8_SHAPES = ((ModelShape(2, 13), None), (ModelShape(4, 13), SQUAD_LIKE))
SMOKE_DTYPES = ("fp32",)
# torch.autocast has no float32 mode: the mixed-precision smoke runs autocast bf16 (on the CPU too).
SMOKE_AMP_DTYPES = ("bf16",)


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
